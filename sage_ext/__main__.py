"""`python -m sage_ext ...`: the `sage-ext` command line (see sage_ext/cli/)."""
import sys

from .cli import main

sys.exit(main())
