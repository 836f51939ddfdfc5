"""``python -m qdarts.benchmark`` is ``qdarts bench`` (usable before the console script exists)."""

import sys

from .cli import main

sys.exit(main())
