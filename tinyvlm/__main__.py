"""`python -m tinyvlm` runs the command line interface."""
import sys

from tinyvlm.cli import main

sys.exit(main())
