"""``python -m simclrv2 <command>`` (the form torchrun runs)."""

import sys

from .cli import main

sys.exit(main())
