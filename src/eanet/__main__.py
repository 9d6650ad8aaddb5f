"""`python -m eanet` (also what `torchrun -m eanet` runs)."""

import sys

from eanet.cli.main import main

sys.exit(main())
