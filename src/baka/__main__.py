"""``python -m baka``: the same as the ``baka`` command."""

import sys

from baka.cli import main

sys.exit(main())
