"""Backend registry: which kernel implementations exist here, and which one a call uses.

A backend is an object with four functions over *prepared* arguments (contiguous x and outputs in
fp32/fp16/bf16; probs, scales and weights contiguous fp32; axis >= 0 for per-channel scales, -1
for per-tensor; grid as its integer code)::

    mixed_fake_quant_forward(x, probs, scales, bits, grid, axis) -> y
    mixed_fake_quant_backward(grad, x, probs, scales, bits, grid, axis,
                              need_dx, need_dprobs, need_dscales) -> (dx | None, dprobs | None, dscales | None)
    mixed_op_sum_forward(outputs, weights) -> y
    mixed_op_sum_backward(grad, outputs, weights, need_doutputs, need_dweights) -> (list | None, dweights | None)

dprobs, dscales and dweights are fp32; the public ops cast them to the parameters' dtypes.

Automatic choice (``backend=None``): ``QDARTS_BACKEND`` if set; else CUDA tensors take the fastest
GPU backend measured (``GPU_PREFERENCE``), CPU tensors the C++ ``cpu`` backend, and ``reference``
when nothing compiled is there.
"""

from __future__ import annotations

import os
import warnings
from typing import Dict, List, Optional

import torch

BACKEND_NAMES = ("reference", "cpu", "cuda", "triton")
#: Order in which GPU backends are preferred for CUDA tensors. Triton first: on the H100 both meet
#: the bandwidth target and Triton needs no compiled extension (see bench/results/ for figures).
GPU_PREFERENCE = ("triton", "cuda", "reference")

_loaded: Dict[str, object] = {}
_failed: Dict[str, str] = {}
_warned = False


def _load(name: str):
    """Import a backend once; remember why it failed so that errors can say so."""
    if name in _loaded:
        return _loaded[name]
    if name in _failed:
        return None
    try:
        if name == "reference":
            from . import _reference_backend as mod
        elif name in ("cpu", "cuda"):
            from . import _cpp

            mod = _cpp.backend(name)
        elif name == "triton":
            from .triton import backend as mod
        else:  # pragma: no cover - guarded by callers
            raise ValueError(name)
    except Exception as e:  # ImportError, OSError from a bad .so, or "not built for CUDA"
        _failed[name] = f"{type(e).__name__}: {e}"
        return None
    _loaded[name] = mod
    return mod


def warn_if_compiled_missing() -> None:
    """Called once at import: if ``_C`` cannot be loaded, say so (once) and carry on without it.

    At import rather than at the first call so that no warning is raised inside code that
    torch.compile traces.
    """
    global _warned
    if not _warned and _load("cpu") is None:
        _warned = True
        warnings.warn(
            "qdarts_kernels._C is not available (" + _failed.get("cpu", "not built") + "); "
            "the 'cpu' and 'cuda' backends are disabled and CPU tensors use the pure-PyTorch "
            "reference. Build the extension with `pip install --no-build-isolation .` to enable them.",
            RuntimeWarning,
            stacklevel=3,
        )


def _runnable(name: str) -> bool:
    # Triton compiles for GPUs only; on a machine without one it runs solely in its interpreter
    if name == "triton" and not (_triton_interpreting() or torch.cuda.is_available()):
        return False
    return _load(name) is not None


def available_backends() -> List[str]:
    """Names of the backends that can run here (``triton`` on CPU only under TRITON_INTERPRET=1)."""
    return [n for n in BACKEND_NAMES if _runnable(n)]


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_device(name: str, device: torch.device) -> None:
    if name == "cpu" and device.type != "cpu":
        raise ValueError(f"backend 'cpu' runs on CPU tensors only, got tensors on {device}")
    if name == "cuda" and device.type != "cuda":
        raise ValueError(f"backend 'cuda' runs on CUDA tensors only, got tensors on {device}")
    if name == "triton" and device.type == "cpu" and not _triton_interpreting():
        raise ValueError("backend 'triton' runs on CPU tensors only under TRITON_INTERPRET=1")
    if name == "triton" and device.type not in ("cpu", "cuda"):
        raise ValueError(f"backend 'triton' does not support tensors on {device}")


def resolve(backend: Optional[str], device: torch.device) -> str:
    """The backend name a call on ``device`` uses."""
    if backend is None:
        backend = os.environ.get("QDARTS_BACKEND") or None
    if backend is not None:
        if backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be one of {list(BACKEND_NAMES)} or None, got {backend!r}")
        if _load(backend) is None:
            raise RuntimeError(f"backend {backend!r} is not available here: {_failed.get(backend)}")
        _check_device(backend, device)
        return backend
    if device.type == "cuda":
        for name in GPU_PREFERENCE:
            if _load(name) is not None:
                return name
    if device.type == "cpu":
        if _load("cpu") is not None:
            return "cpu"
    return "reference"


def get(name: str):
    mod = _load(name)
    if mod is None:
        raise RuntimeError(f"backend {name!r} is not available here: {_failed.get(name)}")
    return mod
