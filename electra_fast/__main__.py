"""`python -m electra_fast ...` (also what `torchrun -m electra_fast pretrain ...` runs)."""
import sys

from electra_fast.cli import main

sys.exit(main())
