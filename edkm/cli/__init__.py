"""The ``edkm`` command line (also ``python -m edkm``): :mod:`edkm.cli.main` parses and runs the
subcommands; :mod:`edkm.cli.compress` builds ``edkm compress``.
"""

from __future__ import annotations

from edkm.cli.main import main

__all__ = ["main"]
