"""``python -m lowmem_alignprop`` and ``accelerate launch -m lowmem_alignprop``."""

import sys

from .cli import main

sys.exit(main())
