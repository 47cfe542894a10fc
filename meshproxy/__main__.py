"""``python -m meshproxy``: same as the ``meshproxy`` console script."""

import sys

from meshproxy.cli import main

sys.exit(main())
