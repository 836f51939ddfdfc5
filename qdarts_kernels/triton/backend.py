"""The ``triton`` backend: the backend interface of ``qdarts_kernels._backends`` over the Triton
kernels. Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (the test suite)."""

from .mixed_fake_quant import mixed_fake_quant_backward, mixed_fake_quant_forward
from .mixed_fake_quant_grouped import mixed_fake_quant_grouped_backward, mixed_fake_quant_grouped_forward
from .mixed_op_sum import mixed_op_sum_backward, mixed_op_sum_forward

__all__ = [
    "mixed_fake_quant_forward",
    "mixed_fake_quant_backward",
    "mixed_op_sum_forward",
    "mixed_op_sum_backward",
    "mixed_fake_quant_grouped_forward",
    "mixed_fake_quant_grouped_backward",
]
