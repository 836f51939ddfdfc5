"""Benchmarks of the qdarts_kernels ops and of the supernet search step (``qdarts bench``).

``cases`` defines what is timed (shared with the pytest-benchmark files under ``bench/``),
``timing`` how, ``runner`` the kernel sweep, ``endtoend`` the search step, ``report`` the
results.json / report.md / plots, ``readme`` the README's performance section, ``cli`` the command.
"""
