"""`python -m sdrt.cli ...` runs the `sdrt` command."""

import sys

from sdrt.cli import main

sys.exit(main())
