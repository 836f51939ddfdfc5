"""Triton kernels for the qdarts ops.

``backend`` implements the backend interface of ``qdarts_kernels._backends`` on top of the kernels
in ``mixed_fake_quant`` and ``mixed_op_sum``. Importing this package imports ``triton`` (an
ImportError tells the registry that the backend is unavailable) and makes no CUDA call.
"""
