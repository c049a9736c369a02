"""``python -m procsched``: the command line (see :mod:`procsched.cli`)."""

import sys

from .cli import main

sys.exit(main())
