"""`python -m fastcsm` runs the `fastcsm` command."""

import sys

from .cli import main

sys.exit(main())
