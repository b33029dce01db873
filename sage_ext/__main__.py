"""`python -m sage_ext ...`: the `sage-ext` command line (see sage_ext/cli.py)."""
import sys

from .cli import main

sys.exit(main())
