"""`python -m endostream` (also what `torchrun -m endostream train ...` runs)."""

import sys

from endostream.cli import main

sys.exit(main())
