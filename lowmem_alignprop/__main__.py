"""``python -m lowmem_alignprop`` and ``accelerate launch -m lowmem_alignprop``."""

import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while the libraries import: no traceback
    print("interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
