"""qdarts_kernels: fused mixed-precision fake quantization and DARTS mixed-op kernels.

Public ops (each takes ``backend=None`` for the automatic choice, or "reference" | "cpu" | "cuda" |
"triton"); ``qdarts_kernels.reference`` holds the same functions in pure PyTorch, the spec.
"""

from . import _backends, reference
from .ops import available_backends, fake_quant, mixed_fake_quant, mixed_fake_quant_grouped, mixed_op_sum

_backends.warn_if_compiled_missing()

__version__ = "0.1.0"
__all__ = [
    "fake_quant",
    "mixed_fake_quant",
    "mixed_fake_quant_grouped",
    "mixed_op_sum",
    "available_backends",
    "reference",
]
