"""``python -m seal.cli``: the command line, as the supervisor starts each child (``serve NAME``)."""

import sys

from seal.cli import main

sys.exit(main())
