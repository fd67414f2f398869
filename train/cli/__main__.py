"""`python -m lora_core.train.cli ...` is `lora-core ...` (e.g. under torchrun, which runs modules)."""
import sys

from lora_core.train.cli import main

sys.exit(main())
