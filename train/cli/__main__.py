"""`python -m train.cli ...` is `lora-core ...` (e.g. under torchrun, which runs modules)."""
import sys

from train.cli import main

sys.exit(main())
