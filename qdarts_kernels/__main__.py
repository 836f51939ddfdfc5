"""``python -m qdarts_kernels``: what the package runs on here (``qdarts_kernels.collect_env``)."""

if __name__ == "__main__":
    from .collect_env import main

    raise SystemExit(main())
