"""``python -m edkm`` runs the ``edkm`` command line."""

import sys

from edkm.cli import main

sys.exit(main())
