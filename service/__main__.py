"""``python -m service``: the same as ``recmix-serve``."""

import sys

from service.cli import main

sys.exit(main())
