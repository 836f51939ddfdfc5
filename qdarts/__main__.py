"""``python -m qdarts`` = the ``qdarts`` console script."""

from .cli import main

raise SystemExit(main())
