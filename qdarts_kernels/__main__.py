"""``python -m qdarts_kernels``: what the package runs on here (``qdarts_kernels.collect_env``)."""

from .collect_env import main

raise SystemExit(main())
