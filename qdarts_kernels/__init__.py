"""qdarts_kernels: fused mixed-precision fake quantization and DARTS mixed-op kernels.

Public ops (each takes ``backend=None`` for the automatic choice, or "reference" | "cpu" | "cuda" |
"triton"); ``qdarts_kernels.reference`` holds the same functions in pure PyTorch, the spec;
``qdarts_kernels.cpu_kernels`` tells what the C++ CPU kernels run on and manages their output cache;
``build_info()`` what the compiled extension was built from (a stale one is warned about at import).
"""

from . import _backends, cpu_kernels, reference
from ._backends import build_info
from .ops import (
    available_backends,
    eager_reference,
    fake_quant,
    mixed_fake_quant,
    mixed_fake_quant_grouped,
    mixed_op_sum,
    rehearse_graph_capture,
)

_backends.warn_about_compiled()

__version__ = "0.1.0"
__all__ = [
    "fake_quant",
    "mixed_fake_quant",
    "mixed_fake_quant_grouped",
    "mixed_op_sum",
    "available_backends",
    "build_info",
    "eager_reference",
    "rehearse_graph_capture",
    "cpu_kernels",
    "reference",
]
