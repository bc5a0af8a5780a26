"""``python -m edkm`` runs the ``edkm`` command line."""

import sys

from edkm.cli.main import main

sys.exit(main())
