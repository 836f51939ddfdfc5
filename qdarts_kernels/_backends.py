"""Backend registry: which kernel implementations exist here, and which one a call uses.

A backend is an object with four functions over *prepared* arguments (contiguous x and outputs in
fp32/fp16/bf16; probs, scales and weights contiguous fp32; axis >= 0 for per-channel scales, -1
for per-tensor; grid as its integer code)::

    mixed_fake_quant_forward(x, probs, scales, bits, grid, axis) -> y
    mixed_fake_quant_backward(grad, x, probs, scales, bits, grid, axis,
                              need_dx, need_dprobs, need_dscales) -> (dx | None, dprobs | None, dscales | None)
    mixed_op_sum_forward(outputs, weights) -> y
    mixed_op_sum_backward(grad, outputs, weights, need_doutputs, need_dweights) -> (list | None, dweights | None)
    mixed_fake_quant_grouped_forward(xs, probs, scales, bits, grid, axes) -> [y_0, ..., y_{N-1}]
    mixed_fake_quant_grouped_backward(grads, xs, probs, scales, bits, grid, axes,
                                      need_dx, need_dprobs, need_dscales)
        -> ([dx_0, ...] | None, dprobs | None, dscales | None)

dprobs, dscales and dweights are fp32; the public ops cast them to the parameters' dtypes.
A backend may also offer ``mixed_op_sum_with_autograd(outputs, weights) -> y``, the whole public
op outside torch.compile (autograd included, weights of any float dtype, first derivatives only);
the eager path of ``mixed_op_sum`` then calls it instead of its Python autograd.
mixed_op_sum_backward reads ``outputs`` only for dweights: without need_dweights they may be K
stand-ins of the outputs' shape, dtype and device (the public op then passes grad K times, having
kept no outputs for backward).

The grouped pair is ``mixed_fake_quant`` of N tensors with one bit set and grid: xs and grads are
lists of N contiguous tensors of one dtype (any shapes, 0 elements allowed); probs is one [N, K]
tensor (row i for xs[i]); scales a list of N tensors [K] or [K, C_i]; axes a tuple of N ints, each
axis normalised for its x (>= 0), or all -1 for per-tensor scales. y_i and dx_i are exactly those
of the single op on (xs[i], probs[i], scales[i]); dprobs is [N, K]; dscales is ONE flat tensor, the
concatenation of each scales[i]'s gradient flattened row-major (the public op splits it into
views). A fused backend does all N in one kernel launch forward, and one launch plus one small
reduction launch backward; ``loop_grouped_forward``/``loop_grouped_backward`` give the same
results from a backend's single-tensor functions (one call per tensor).

Automatic choice (``backend=None``): ``QDARTS_BACKEND`` if set; else CUDA tensors take the fastest
GPU backend measured (``GPU_PREFERENCE``), CPU tensors the C++ ``cpu`` backend, and ``reference``
when nothing compiled is there.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import _build_record

BACKEND_NAMES = ("reference", "cpu", "cuda", "triton")
#: Order in which GPU backends are preferred for CUDA tensors: the faster first. On the H100 the
#: cuda backend took less time than triton in every case of a host-inclusive run of the kernel
#: benchmark (0.59x-0.86x), and less device time in all but two cases, within 10 % there
#: (README, Status; bench/results/h100-2026-11-27.json).
GPU_PREFERENCE = ("cuda", "triton", "reference")

#: Most outputs a mixed_op_sum call may sum on a backend, where there is a limit: the cuda kernels
#: take the K pointers in their launch arguments (kMaxOpSumInputs, csrc/cuda/kernels.h). Checked here,
#: before the extension is called, so that a refusal is a Python error on every machine; the
#: automatic choice passes over such a backend for a larger K.
MIXED_OP_SUM_MAX_INPUTS = {"cuda": 64}



def op_sum_inputs_refusal(name: str, op_sum_inputs: Optional[int], source: str = "") -> Optional[str]:
    """Why backend ``name`` (asked for by ``source``, where given) cannot sum ``op_sum_inputs``
    outputs; None where it can, or where no K is given."""
    limit = MIXED_OP_SUM_MAX_INPUTS.get(name)
    if op_sum_inputs is None or limit is None or op_sum_inputs <= limit:
        return None
    asked = f" ({source})" if source else ""
    return f"outputs must hold at most {limit} tensors on backend {name!r}{asked}, got {op_sum_inputs}"


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


def build_info() -> Optional[Dict[str, Any]]:
    """How the compiled extension ``qdarts_kernels._C`` was built, or None where it is not available
    (or was built before it kept this record): ``{"csrc_digest", "torch", "cuda", "cuda_archs",
    "debug"}`` (the digest of its C++/CUDA sources, the torch it was built against, the CUDA version
    and the GPU architectures its CUDA kernels hold machine code for, e.g. ["8.0", "9.0"], or None
    without them, and whether it is a debug build).
    Written by setup.py (``_build_record.py``)."""
    if _load("cpu") is None or not hasattr(torch.ops.qdarts_C, "build_record"):
        return None
    return json.loads(torch.ops.qdarts_C.build_record())


def compiled_stale_reason() -> Optional[str]:
    """Why ``_C`` does not match the running torch or, in a source checkout, the sources in its
    ``csrc/`` (``_build_record.stale_reason``); None where it matches or is not available."""
    if _load("cpu") is None:
        return None
    info = build_info()
    if info is None:
        return "it was built by an older version of this package, which kept no build record"
    csrc = _build_record.checkout_csrc(os.path.dirname(__file__))
    try:
        return _build_record.stale_reason(info, str(torch.__version__), csrc)
    except OSError as e:  # a source that cannot be read: say so rather than fail the import
        return f"its sources in {csrc} could not be read to compare ({e})"


def warn_about_compiled() -> None:
    """Called once at import: if ``_C`` cannot be loaded, or was built from other sources or against
    another torch than those here, say so (once) and carry on (without it, in the first case).

    At import rather than at the first call so that no warning is raised inside code that
    torch.compile traces.
    """
    global _warned
    if _warned:
        return
    _warned = True
    if _load("cpu") is None:
        warnings.warn(
            "qdarts_kernels._C is not available (" + _failed.get("cpu", "not built") + "); "
            "the 'cpu' and 'cuda' backends are disabled and CPU tensors use the pure-PyTorch "
            "reference. Build the extension with `pip install --no-build-isolation .` to enable them.",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    stale = compiled_stale_reason()
    if stale is not None:
        warnings.warn(
            f"qdarts_kernels._C may not match this installation: {stale}. Its kernels run as they were "
            "built; rebuild it with `pip install --no-build-isolation -e .` (or `python setup.py build_ext "
            "--inplace`) in a checkout, or reinstall the package.",
            RuntimeWarning,
            stacklevel=3,
        )


def runnable(name: str) -> bool:
    # Triton compiles for GPUs only; on a machine without one it runs solely in its interpreter
    if name == "triton" and not (_triton_interpreting() or torch.cuda.is_available()):
        return False
    return _load(name) is not None


def available_backends() -> List[str]:
    """Names of the backends that can run here (``triton`` on CPU only under TRITON_INTERPRET=1)."""
    return [n for n in BACKEND_NAMES if runnable(n)]


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


#: The dtypes of the fused kernels (every backend but the reference).
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def requested(backend: Optional[str]) -> Tuple[Optional[str], str]:
    """(the backend asked for, where it came from): ``backend``, else ``QDARTS_BACKEND`` (set but empty
    is unset), else None (the automatic choice). Errors name the source: a user who set no backend=
    must learn that it was the variable."""
    if backend is not None:
        return backend, "backend"
    return os.environ.get("QDARTS_BACKEND") or None, "QDARTS_BACKEND"


def check_name(backend: Optional[str], source: str = "backend") -> None:
    """A ValueError naming ``source`` unless ``backend`` is a backend's name, or None where ``source`` is
    the backend= argument (the automatic choice). Modules call it when they are built, so that a misspelt
    backend is refused there, not at their first forward."""
    if backend is None and source == "backend":
        return
    if backend not in BACKEND_NAMES:
        choices = f"{list(BACKEND_NAMES)} or None" if source == "backend" else f"{list(BACKEND_NAMES)}"
        raise ValueError(f"{source} must be one of {choices}, got {backend!r}")


def resolve(backend: Optional[str], device: torch.device, dtype: Optional[torch.dtype] = None,
            op_sum_inputs: Optional[int] = None) -> str:
    """The backend name a call on ``device`` (on tensors of ``dtype``, where given) uses: the one
    asked for, else ``QDARTS_BACKEND``, else the automatic choice, which takes the reference for a
    dtype the kernels do not take (float64: gradcheck, a module moved to .double()).
    ``op_sum_inputs``: K of a mixed_op_sum call (see MIXED_OP_SUM_MAX_INPUTS)."""
    backend, source = requested(backend)
    if backend is None and dtype is not None and dtype not in KERNEL_DTYPES:
        return "reference"
    if backend is not None:
        check_name(backend, source)
        if _load(backend) is None:
            raise RuntimeError(f"backend {backend!r} ({source}) is not available here: {_failed.get(backend)}")
        _check_device(backend, device)
        refusal = op_sum_inputs_refusal(backend, op_sum_inputs, source)
        if refusal is not None:
            raise ValueError(f"{refusal}; the other backends take any number")
        return backend
    if device.type == "cuda":
        for name in GPU_PREFERENCE:
            if op_sum_inputs_refusal(name, op_sum_inputs) is None and _load(name) is not None:
                return name
    if device.type == "cpu":
        if _load("cpu") is not None:
            return "cpu"
    return "reference"


def takes_triton_only_kernels(backend: Optional[str], device: torch.device) -> bool:
    """Whether a call on ``device`` with ops backend ``backend`` (None: the automatic choice) takes
    the kernels that only the Triton backend has (the few-channel batch norm and depthwise-conv
    weight gradient of ``qdarts_kernels.triton``), rather than PyTorch's: with backend triton, or
    cuda on a CUDA device (the fused GPU backends), when Triton runs here, unless
    ``QDARTS_FEW_CHANNEL_KERNELS=0``. That switch is for timing both: the Triton kernels take less GPU
    time, but one launch more each than PyTorch's, host time that a host-bound eager step on a GPU
    pays and a step replayed from a CUDA graph does not."""
    if os.environ.get("QDARTS_FEW_CHANNEL_KERNELS", "1") == "0":
        return False
    name = resolve(backend, device)
    return (name == "triton" or (name == "cuda" and device.type == "cuda")) and runnable("triton")


def takes_cpu_only_kernels(backend: Optional[str], device: torch.device, op: Optional[str]) -> bool:
    """Whether a call on ``device`` with ops backend ``backend`` (None: the automatic choice) takes
    the few-channel CPU path of ``qdarts_kernels.nn`` (the C++ depthwise convolution, pools and batch
    norm, 1x1 convolutions as matrix products) rather than PyTorch's kernels: CPU tensors with backend cpu,
    unless ``QDARTS_FEW_CHANNEL_KERNELS=0`` (for timing both) or the compiled library predates the
    kernel ``torch.ops.qdarts_C.<op>`` the path needs (one warning: rebuild it; ``op`` None: none)."""
    if device.type != "cpu" or os.environ.get("QDARTS_FEW_CHANNEL_KERNELS", "1") == "0":
        return False
    return resolve(backend, device) == "cpu" and (op is None or _has_cpu_op(op))


@functools.lru_cache(maxsize=None)
def _has_cpu_op(op: str) -> bool:
    if hasattr(torch.ops.qdarts_C, op):
        return True
    warnings.warn(f"qdarts_kernels._C has no {op!r}: it was built from older sources (rebuild it: pip install -e . "
                  "or python setup.py build_ext --inplace); PyTorch's kernel is used instead", stacklevel=3)
    return False


def get(name: str):
    mod = _load(name)
    if mod is None:
        raise RuntimeError(f"backend {name!r} is not available here: {_failed.get(name)}")
    return mod


def loop_grouped_forward(single_forward: Callable, xs, probs, scales, bits, grid: int, axes: Sequence[int]):
    """The grouped forward of the interface as one ``single_forward`` call per tensor."""
    return [single_forward(x, probs[i], s, bits, grid, ax) for i, (x, s, ax) in enumerate(zip(xs, scales, axes))]


def loop_grouped_backward(single_backward: Callable, grads, xs, probs, scales, bits, grid: int,
                          axes: Sequence[int], need_dx: bool, need_dprobs: bool, need_dscales: bool):
    """The grouped backward of the interface as one ``single_backward`` call per tensor."""
    parts = [
        single_backward(g, x, probs[i], s, bits, grid, ax, need_dx, need_dprobs, need_dscales)
        for i, (g, x, s, ax) in enumerate(zip(grads, xs, scales, axes))
    ]
    return (
        [p[0] for p in parts] if need_dx else None,
        torch.stack([p[1] for p in parts]) if need_dprobs else None,
        torch.cat([p[2].reshape(-1) for p in parts]) if need_dscales else None,
    )
