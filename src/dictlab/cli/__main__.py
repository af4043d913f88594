"""`python -m dictlab.cli`, as torchrun starts it."""

import sys

from dictlab.cli import main

sys.exit(main())
