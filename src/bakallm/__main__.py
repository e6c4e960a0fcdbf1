"""`python -m bakallm`, the same as the `bakallm` command (torchrun starts ranks this way: `torchrun ... -m bakallm train`)."""

import sys

from bakallm.cli import main

sys.exit(main())
