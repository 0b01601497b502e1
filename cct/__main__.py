"""`python -m cct` (also what `torchrun -m cct` runs)."""

import sys

from .cli import main

sys.exit(main())
