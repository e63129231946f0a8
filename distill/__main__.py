"""`python -m distill` is the `distill` command."""

import sys

from distill.cli import main

sys.exit(main())
