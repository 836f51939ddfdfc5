"""The public ops: argument checks, backend choice, autograd and fake (meta) kernels.

Each op is a ``torch.library.custom_op`` in the ``qdarts`` namespace, so ``torch.compile``
(fullgraph) traces models that use it without a graph break, and ``torch.library.opcheck`` passes.
The forward and backward are separate custom ops; the backward recomputes the quantizers from the
saved *inputs* (x, probs, scales; or the K outputs and weights), so nothing else is kept for it.
The backend is an argument of the op (a string), resolved once per call in Python.

In eager mode the same forward and backward functions run under a plain ``autograd.Function``
instead: the custom-op wrappers cost several hundred microseconds of Python per call, and a search
step makes hundreds of calls. Both paths call the same ``_mfq_forward``/``_mfq_backward`` (and
``_mos_*``) functions, so they compute the same thing; the custom ops are what compile traces. The
autograd functions are written for torch.func too (``setup_context``, vmap rules, jvp; see ``_functorch``).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections import Counter
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import _backends, _functorch, reference
from ._validation import (
    GRIDS,
    MAX_BITS,
    MAX_K,
    MIN_BITS,
    check_mixed_fake_quant,
    check_mixed_fake_quant_grouped,
    check_mixed_op_sum,
    check_scale_values,
    scale_values_read_on,
    single_bit_scales,
)

__all__ = [
    "fake_quant", "mixed_fake_quant", "mixed_fake_quant_grouped", "mixed_op_sum", "available_backends",
    "eager_reference", "rehearse_graph_capture",
]

available_backends = _backends.available_backends


#: Inside eager_reference(): the Counter of the calls it routes to the reference; else None. A
#: module global rather than a context variable: torch.compile traces a read of a global (and
#: guards on it), not ContextVar.get.
_eager_reference_calls: Optional[Counter] = None


@contextlib.contextmanager
def eager_reference() -> Iterator[Counter]:
    """Within the block, the public ops compute with :mod:`qdarts_kernels.reference` under ordinary
    autograd, whatever their ``backend``, and so do the modules of :mod:`qdarts_kernels.nn`, which
    call them (QuantConv2d then also stops keeping only its input for the backward): the model as
    plain PyTorch code would run it, for debugging and as the baseline of benchmarks. Code that
    ``torch.compile`` traces inside the block is compiled from the reference too. Yields a Counter
    of the calls per op name (eager calls only; traced calls are not counted). Process-wide, not
    per thread."""
    global _eager_reference_calls
    previous, calls = _eager_reference_calls, Counter()
    _eager_reference_calls = calls
    try:
        yield calls
    finally:
        _eager_reference_calls = previous


def eager_reference_active() -> bool:
    """Whether the calling code runs inside :func:`eager_reference`."""
    return _eager_reference_calls is not None


def plain_pytorch_layers() -> bool:
    """Whether the :mod:`qdarts_kernels.nn` layers take PyTorch's own modules and functions instead of
    their autograd functions and kernels: inside :func:`eager_reference`, and under torch.func's
    transforms and forward-mode AD, which the public ops support (their autograd functions have vmap
    rules and jvp) and the layers' own functions and kernels do not."""
    return _eager_reference_calls is not None or _functorch.transforming()


def _eager_reference_op(name: str):
    """Inside eager_reference(): the reference function for the public op ``name`` (the call
    counted when not traced); else None."""
    calls = _eager_reference_calls
    if calls is None:
        return None
    if not torch.compiler.is_compiling():
        calls[name] += 1
    return getattr(reference, name)


def _params(t: Tensor, like: Tensor) -> Tensor:
    # probs, scales and weights reach the kernels as contiguous fp32 (fp64 only for the reference
    # backend on fp64 inputs, so that gradcheck sees double precision throughout); checked first, as
    # they mostly are (the no-op to() and contiguous() calls cost more, a few per quantizer and step)
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    return t if t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous()


def _check_op_args(x: Tensor, probs: Tensor, scales: Tensor, bits, grid: int, axis: int,
                   grad: Optional[Tensor] = None):
    """Cheap checks for direct calls of the custom ops, which torch.compile's graphs make too (the
    public functions validate fully): a RuntimeError like the compiled ops' TORCH_CHECKs, where the
    Triton kernels would otherwise compute garbage or read out of bounds. Metadata only: no sync.
    The fake kernels make them too: a meta tensor among real ones dispatches to the fake kernel,
    which would otherwise return an uninitialised result."""
    _check_bits_and_grid(bits, grid)
    _check_tensor_args(x, probs, scales, len(bits), axis, grad)


def _check_op_scale_values(x: Tensor, scales: Tensor, name: str = "scales") -> None:
    """The scale values, in a forward custom op's body: compiled code calls the op, not the public
    function, whose check is skipped while tracing. Checked where the public ops check them (CPU
    tensors; GPU tensors under QDARTS_CHECK_SCALES=1); a RuntimeError, as the other checks of the
    custom ops and the C++ kernels' refusal of the same scales."""
    try:
        check_scale_values(scales, name, fp64_math=x.dtype == torch.float64)
    except ValueError as e:
        raise RuntimeError(str(e)) from None


_GRID_CODES = frozenset(GRIDS.values())
_OP_DTYPES = _backends.KERNEL_DTYPES + (torch.float64,)  # fp64: the reference backend's


def _check_bits_and_grid(bits, grid: int) -> None:
    if not (1 <= len(bits) <= MAX_K and all(MIN_BITS <= b <= MAX_BITS for b in bits)):
        raise RuntimeError(f"bits must hold 1..{MAX_K} bit-widths in [{MIN_BITS}, {MAX_BITS}], got {list(bits)}")
    if grid not in _GRID_CODES:
        raise RuntimeError(f"grid must be a grid code in {sorted(_GRID_CODES)} ({GRIDS}), got {grid}")


def _check_tensor_args(x: Tensor, probs: Tensor, scales: Tensor, k: int, axis: int, grad: Optional[Tensor]) -> None:
    if x.dtype not in _OP_DTYPES:
        raise RuntimeError(f"x must have dtype float32, float16, bfloat16 or float64, got {x.dtype}")
    for t, name in ((probs, "probs"), (scales, "scales")):
        if t.device != x.device:
            raise RuntimeError(f"{name} is on {t.device} but x is on {x.device}; they must share a device")
        if not t.is_floating_point():
            raise RuntimeError(f"{name} must have a floating dtype, got {t.dtype}")
    if not (axis == -1 or 0 <= axis < x.dim()):
        raise RuntimeError(f"axis must be -1 (per tensor) or a dimension of x (0..{x.dim() - 1}), got {axis}")
    if probs.shape != (k,):
        raise RuntimeError(f"probs must have shape [{k}], got {list(probs.shape)}")
    expected = (k,) if axis == -1 else (k, x.shape[axis])
    if scales.shape != expected:
        raise RuntimeError(f"scales must have shape {list(expected)}, got {list(scales.shape)}")
    if grad is not None:
        _check_grad(grad, x)


def _check_grad(grad: Tensor, like: Tensor) -> None:
    if grad.shape != like.shape or grad.dtype != like.dtype or grad.device != like.device:
        raise RuntimeError(
            f"grad must match the op's output (shape {list(like.shape)}, {like.dtype}, {like.device}), "
            f"got shape {list(grad.shape)}, {grad.dtype}, {grad.device}"
        )


def _empty_like_none(t: Optional[Tensor], like: Tensor) -> Tensor:
    # custom ops cannot return None: a gradient that was not asked for travels as a 0-element tensor
    return like.new_empty(0) if t is None else t


def _contiguous_like(t: Tensor) -> Tensor:
    # what the kernels return for a parameter's gradient (dprobs, dscales): contiguous whatever the
    # parameter's strides (a transposed scales view included); the fakes must say so, as compiled
    # code checks the strides
    return torch.empty_like(t, memory_format=torch.contiguous_format)


class _MemoryOrder:
    """The order in memory of a tensor's dimensions, as the kernels see it: ``perm`` such that
    ``t.permute(perm)`` is contiguous, for a dense tensor that is not contiguous (channels_last, any
    permutation of a contiguous tensor); None (:data:`_CONTIGUOUS`) for the others.

    The kernels take contiguous tensors. A dense tensor is one already, viewed in its memory order,
    and the ops compute elementwise (per channel along an axis), so they run on that view, without the
    copy that ``t.contiguous()`` makes, and give their results the tensor's strides, as PyTorch's
    ``fake_quantize_per_tensor_affine`` does (a channels_last model keeps channels_last activations).
    Tensors that are not dense (gaps, overlaps: slices, expands) have no such order: they are copied
    to contiguous ones as before, and so are their results contiguous."""

    __slots__ = ("perm", "inverse")

    def __init__(self, perm: Optional[List[int]]) -> None:
        self.perm = perm
        self.inverse = None if perm is None else sorted(range(len(perm)), key=perm.__getitem__)

    @staticmethod
    def of(t: Tensor) -> "_MemoryOrder":
        """t's memory order; :data:`_CONTIGUOUS` where t is contiguous or not dense."""
        if t.is_contiguous():
            return _CONTIGUOUS
        # Dims by decreasing stride; the stable sort keeps equal strides (possible only where a dim has
        # size 1, whose stride is arbitrary) in their order. Then whether t in that order is contiguous,
        # as is_contiguous decides it (size-1 dims ignored), from the sizes and strides: a permute and
        # its is_contiguous took twice as long, a few microseconds a call.
        sizes, strides = t.shape, t.stride()
        perm = sorted(range(len(sizes)), key=lambda d: -strides[d])
        expected = 1
        for d in reversed(perm):
            if sizes[d] != 1:
                if strides[d] != expected:
                    return _CONTIGUOUS  # gaps or overlaps: not dense
                expected *= sizes[d]
        return _MemoryOrder(perm)

    def contiguous(self, t: Tensor) -> Tensor:
        """t (of the tensor's shape) as the kernels take it: viewed in this memory order, contiguous
        (no copy where t lies in memory this way, one copy where it does not: a gradient in another
        layout, a tensor that is not dense)."""
        return t.contiguous() if self.perm is None else t.permute(self.perm).contiguous()

    def axis(self, axis: int) -> int:
        """Where the tensor's dim ``axis`` lies in that view (-1, per tensor, stays -1)."""
        return axis if self.perm is None or axis < 0 else self.perm.index(axis)

    def restore(self, result: Tensor, like: Optional[Tensor] = None) -> Tensor:
        """A kernel's contiguous ``result`` on that view as a tensor of the tensor's shape (a view of
        it): permuted back where there is a memory order, else as it is, contiguous. With exactly the
        strides of ``like`` (the tensor, in this order), as ``torch.empty_like(like)`` in the fake
        kernels makes them: restrided where ``like`` has other strides in size-1 dims than its
        memory order gives them."""
        if self.perm is None:
            return result
        out = result.permute(self.inverse)
        if like is None or out.stride() == like.stride():
            return out
        return out.as_strided(like.shape, like.stride())


#: the order of the tensors that the kernels take as ``t.contiguous()`` (see _MemoryOrder)
_CONTIGUOUS = _MemoryOrder(None)


def _kernel_output_like(t: Tensor) -> Tensor:
    # what the kernels return for a tensor shaped like t (an output, a gradient; see _MemoryOrder):
    # t's strides where t is dense but not contiguous (empty_like's preserve_format keeps them
    # exactly then), else contiguous ones (preserve_format would give a non-dense t channels_last
    # strides where it looks so, while the kernels then compute on t.contiguous())
    return _contiguous_like(t) if _MemoryOrder.of(t).perm is None else torch.empty_like(t)


# --------------------------------------------------------------------------------------------------
# mixed_fake_quant
# --------------------------------------------------------------------------------------------------


def _mfq_forward(x: Tensor, probs: Tensor, scales: Tensor, bits, grid: int, axis: int, backend: str) -> Tensor:
    """y with x's strides where x is dense, else contiguous (see _MemoryOrder)."""
    order = _MemoryOrder.of(x)
    y = _backends.get(backend).mixed_fake_quant_forward(
        order.contiguous(x), _params(probs, x), _params(scales, x), tuple(bits), grid, order.axis(axis)
    )
    return order.restore(y, x)


def _mfq_backward(grad, x, probs, scales, bits, grid, axis, backend, need_dx, need_dprobs, need_dscales):
    """(dx, dprobs, dscales) in the dtypes of x, probs, scales; None where not requested. dx has x's
    strides where x is dense, else it is contiguous (see _MemoryOrder)."""
    order = _MemoryOrder.of(x)
    dx, dp, ds = _backends.get(backend).mixed_fake_quant_backward(
        order.contiguous(grad), order.contiguous(x), _params(probs, x), _params(scales, x), tuple(bits),
        grid, order.axis(axis), need_dx, need_dprobs, need_dscales,
    )
    return (order.restore(dx, x) if dx is not None else None, dp.to(probs.dtype) if dp is not None else None,
            ds.to(scales.dtype) if ds is not None else None)


@_functorch.AutogradForms
class _MixedFakeQuantFunction(torch.autograd.Function):
    """Eager-mode autograd of mixed_fake_quant (see the module docstring), torch.func included."""

    @staticmethod
    def forward(x, probs, scales, bits, grid, axis, backend):
        return _mfq_forward(x, probs, scales, bits, grid, axis, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, probs, scales, bits, grid, axis, backend = inputs
        ctx.save_for_backward(x, probs, scales)
        if _functorch.forward_ad_active():
            ctx.save_for_forward(x, probs, scales)
        ctx.args = (bits, grid, axis, backend)

    @staticmethod
    def jvp(ctx, dx, dprobs, dscales, *_):
        # forward mode from the reference's formula (torch ops, no fused kernel), in the math dtype
        x, probs, scales = ctx.saved_tensors
        return _in_math_dtype(reference.mixed_fake_quant_jvp, x, (x, probs, scales, dx, dprobs, dscales),
                              ctx.args[:3])

    @staticmethod
    def backward(ctx, grad):
        needs = ctx.needs_input_grad[:3]
        dx, dp, ds = _functorch.first_order(lambda g, x, p, s: _mfq_backward(g, x, p, s, *ctx.args, *needs),
                                            "mixed_fake_quant", ctx.args[-1], grad, *ctx.saved_tensors)
        return dx, dp, ds, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, x, probs, scales, bits, grid, axis, backend):
        x_dim, p_dim, s_dim = in_dims[:3]
        if p_dim is None and s_dim is None:
            # elementwise in x for given probs and scales: the batch in front of x's dims, one call
            axis = axis + 1 if axis >= 0 else axis
            return _MixedFakeQuantFunction.apply(x.movedim(x_dim, 0), probs, scales, bits, grid, axis, backend), 0
        return _functorch.per_sample(
            lambda *t: _MixedFakeQuantFunction.apply(*t, bits, grid, axis, backend), info, in_dims[:3],
            (x, probs, scales))


@torch.library.custom_op("qdarts::mixed_fake_quant", mutates_args=())
def _mixed_fake_quant_op(
    x: Tensor, probs: Tensor, scales: Tensor, bits: List[int], grid: int, axis: int, backend: str
) -> Tensor:
    _check_op_args(x, probs, scales, bits, grid, axis)
    _check_op_scale_values(x, scales)
    return _mfq_forward(x, probs, scales, bits, grid, axis, backend)


@_mixed_fake_quant_op.register_fake
def _(x, probs, scales, bits, grid, axis, backend):
    _check_op_args(x, probs, scales, bits, grid, axis)
    return _kernel_output_like(x)


@torch.library.custom_op("qdarts::mixed_fake_quant_backward", mutates_args=())
def _mixed_fake_quant_backward_op(
    grad: Tensor,
    x: Tensor,
    probs: Tensor,
    scales: Tensor,
    bits: List[int],
    grid: int,
    axis: int,
    backend: str,
    need_dx: bool,
    need_dprobs: bool,
    need_dscales: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    _check_op_args(x, probs, scales, bits, grid, axis, grad)
    dx, dp, ds = _mfq_backward(grad, x, probs, scales, bits, grid, axis, backend, need_dx, need_dprobs, need_dscales)
    return _empty_like_none(dx, x), _empty_like_none(dp, probs), _empty_like_none(ds, scales)


@_mixed_fake_quant_backward_op.register_fake
def _(grad, x, probs, scales, bits, grid, axis, backend, need_dx, need_dprobs, need_dscales):
    _check_op_args(x, probs, scales, bits, grid, axis, grad)
    return (
        _kernel_output_like(x) if need_dx else x.new_empty(0),
        _contiguous_like(probs) if need_dprobs else probs.new_empty(0),
        _contiguous_like(scales) if need_dscales else scales.new_empty(0),
    )


def _mfq_setup_context(ctx, inputs, output):
    x, probs, scales, bits, grid, axis, backend = inputs
    ctx.save_for_backward(x, probs, scales)
    ctx.args = (bits, grid, axis, backend)


def _mfq_op_backward(ctx, grad):
    x, probs, scales = ctx.saved_tensors
    need_dx, need_dp, need_ds = ctx.needs_input_grad[:3]
    if not (need_dx or need_dp or need_ds):
        return None, None, None, None, None, None, None
    bits, grid, axis, backend = ctx.args
    dx, dp, ds = _mixed_fake_quant_backward_op(
        grad, x, probs, scales, bits, grid, axis, backend, need_dx, need_dp, need_ds
    )
    return (dx if need_dx else None, dp if need_dp else None, ds if need_ds else None,
            None, None, None, None)


_mixed_fake_quant_op.register_autograd(_mfq_op_backward, setup_context=_mfq_setup_context)


def _in_math_dtype(fn: Callable, like: Tensor, tensors: Sequence[Optional[Tensor]], args: Sequence) -> Tensor:
    """``fn(*tensors, *args)`` with the tensors (None stays None) in ``like``'s math dtype (fp32; fp64 for
    fp64), the result in ``like``'s dtype."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    y = fn(*(None if t is None else t.to(dtype) for t in tensors), *args)
    return y.to(like.dtype)


def _check_backend_dtype(name: str, t: Tensor, arg: str) -> None:
    if name != "reference" and t.dtype not in _backends.KERNEL_DTYPES:
        raise TypeError(
            f"{arg} has dtype {t.dtype}; backend {name!r} supports float32, float16 and bfloat16 "
            "(the reference backend, and so the automatic choice, takes float64)"
        )


def _checked_mixed_fake_quant_args(x, probs, scales, bits, grid, axis, backend):
    """The validated (bits, grid code, axis, backend name) of a mixed_fake_quant call."""
    bits, code, ax = check_mixed_fake_quant(x, probs, scales, bits, grid, axis)
    name = _backends.resolve(backend, x.device, x.dtype)
    _check_backend_dtype(name, x, "x")
    return bits, code, ax, name


# Callers that make one kind of call again and again (a module's quantizer, step after step) validate
# it in full the first time each kind is seen and keep the result in a dict of theirs, ``checked``:
# the kind is what the checks and the backend choice depend on (dtypes, devices and the shapes that
# are checked, bits, grid, axis, the backend setting). The full checks cost a digits search step some
# 2-5 % of its time (2-core VM of bench/results). Only the scale values are not read again on the later
# calls: such callers make their scales themselves, and the C++ CPU kernels refuse non-finite or too
# small ones as the public ops do (such scales mean that the run diverged: qdarts.divergence).


def _backend_setting(backend: Optional[str]) -> Optional[str]:
    """What decides the backend of a call besides its tensors: ``backend``, else QDARTS_BACKEND."""
    return backend or os.environ.get("QDARTS_BACKEND")


def _checked_mixed_fake_quant_args_of_a_kind(checked: dict, x, probs, scales, bits, grid, axis, backend):
    """:func:`_checked_mixed_fake_quant_args`, validated once per kind of call (see above)."""
    key = (x.dtype, x.device, x.dim(), axis, None if axis is None else x.shape[axis], probs.dtype, probs.shape,
           probs.device, scales.dtype, scales.shape, scales.device, tuple(bits), grid, _backend_setting(backend))
    args = checked.get(key)
    if args is None:
        args = checked[key] = _checked_mixed_fake_quant_args(x, probs, scales, bits, grid, axis, backend)
    return args


def mixed_fake_quant(
    x: Tensor,
    probs: Tensor,
    scales: Tensor,
    bits: Sequence[int],
    *,
    grid: str = "signed",
    axis: Optional[int] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Mixed-precision fake quantization ``y = sum_k probs[k] * Q(x; scales[k], bits[k])``.

    Same contract as :func:`qdarts_kernels.reference.mixed_fake_quant` (see there for the maths and
    the gradients), fused: one pass over x forward, one pass over (x, grad) backward, no per-bit
    temporaries. ``backend`` is None (automatic), "reference", "cpu", "cuda" or "triton".
    """
    ref = _eager_reference_op("mixed_fake_quant")
    if ref is not None:
        return ref(x, probs, scales, bits, grid=grid, axis=axis)
    bits, code, ax, name = _checked_mixed_fake_quant_args(x, probs, scales, bits, grid, axis, backend)
    if torch.compiler.is_compiling():
        return _mixed_fake_quant_op(x, probs, scales, list(bits), code, ax, name)
    if not (torch.is_grad_enabled() and (x.requires_grad or probs.requires_grad or scales.requires_grad)) and \
            not _functorch.transforming():
        # nothing to record (evaluation, a no_grad forward): the kernel without the autograd function,
        # whose apply costs as much host time as a small tensor's kernel (the digits search's evaluation
        # of its val set, fastest of 15: 420-447 -> 383-411 ms on the 2-core VM of bench/results); under
        # torch.func and forward-mode AD the function is needed (its vmap rule, its jvp)
        return _mfq_forward(x, probs, scales, bits, code, ax, name)
    return _MixedFakeQuantFunction.apply(x, probs, scales, bits, code, ax, name)


def fake_quant(
    x: Tensor,
    scale: Tensor,
    bits: int,
    *,
    grid: str = "signed",
    axis: Optional[int] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Single bit-width fake quantization with a learnable (LSQ) scale.

    ``scale`` has one element (per tensor) or shape [C] (per channel along ``axis``). With the
    signed grid this equals ``torch.fake_quantize_per_tensor_affine`` /
    ``torch.fake_quantize_per_channel_affine`` (zero point 0) bit for bit; its gradients are those
    of ``torch._fake_quantize_learnable_per_tensor_affine`` / ``_per_channel_affine``.
    """
    ref = _eager_reference_op("fake_quant")
    if ref is not None:
        return ref(x, scale, bits, grid=grid, axis=axis)
    scales = single_bit_scales(scale, bits, axis)
    # probs on x's device, so that a scale on another device is what the device check names
    probs = _ones(scale.dtype if scale.dtype in _backends.KERNEL_DTYPES else torch.float32,
                  x.device if isinstance(x, Tensor) else scale.device)
    return mixed_fake_quant(x, probs, scales, (bits,), grid=grid, axis=axis, backend=backend)


_ONES = {}


def _ones(dtype: torch.dtype, device: torch.device) -> Tensor:
    # probs = [1.0] for the single-bit op; cached so a QAT step does not allocate one per call. Only an
    # ordinary tensor made in eager code outside a CUDA-graph capture is kept: an inference tensor cannot
    # be saved for a later backward, a fake one (torch.export, a fake mode) cannot reach a kernel, a
    # captured fill runs only when its graph is replayed, and traced code makes its own in its graph.
    key = (dtype, device)
    t = _ONES.get(key)
    if t is None:
        t = torch.ones(1, dtype=dtype, device=device)
        if (not torch.compiler.is_compiling() and type(t) is Tensor and not t.is_inference()
                and not _graph_capturing(t.device)):
            _ONES[key] = t
    return t


# --------------------------------------------------------------------------------------------------
# mixed_fake_quant_grouped
# --------------------------------------------------------------------------------------------------


def _graph_capturing(device: torch.device) -> bool:
    """Whether work on ``device`` is being captured into a CUDA graph right now."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


#: Depth of rehearse_graph_capture() blocks being run (a module global, as _eager_reference_calls).
_capture_rehearsals = 0


@contextlib.contextmanager
def rehearse_graph_capture() -> Iterator[None]:
    """Within the block, the ops on CUDA tensors take the kernels they take while a CUDA graph is
    captured (``mixed_fake_quant_grouped``: one single-tensor call per tensor), run eagerly. Run the
    last warm-up step before a capture in it: a kernel that only a capture would launch is then
    compiled (Triton) and loaded here. Loading a GPU module while a stream is captured is an error
    ("operation not permitted when stream is capturing"), and a Triton kernel's first launch in a
    process loads it. ``qdarts search --cuda-graph`` does this itself; so should code that
    captures its own graphs of these ops (its last warm-up step in the block, or the whole
    ``torch.cuda.make_graphed_callables`` call, whose warm-up runs inside it). The values are an
    eager step's (the grouped backward's sums in another order). Process-wide, not per thread."""
    global _capture_rehearsals
    _capture_rehearsals += 1
    try:
        yield
    finally:
        _capture_rehearsals -= 1


def _capture_kernels(device: torch.device) -> bool:
    """Whether ops on ``device`` take the kernels of a CUDA-graph capture: captured or rehearsed."""
    return (_capture_rehearsals > 0 and device.type == "cuda") or _graph_capturing(device)


def _grouped_pair(backend: str, device: torch.device) -> Tuple[Callable, Callable]:
    """(grouped forward, grouped backward) of ``backend`` for tensors on ``device``. While a CUDA graph
    is captured (``qdarts search --cuda-graph``, ``torch.compile`` in mode reduce-overhead or
    max-autotune) or the capture rehearsed (:func:`rehearse_graph_capture`), one single-tensor call
    per tensor instead: the grouped kernels read their tensors' descriptors from a host buffer copied
    to the device, and a captured copy is not run but recorded, to be replayed from the same host
    address at every replay, long after the caching host allocator has handed that buffer out again
    (and it may refuse to allocate pinned memory during a capture at all). The same values: the
    forward bit for bit, the reductions of the backward in another order."""
    b = _backends.get(backend)
    if not _capture_kernels(device):
        return b.mixed_fake_quant_grouped_forward, b.mixed_fake_quant_grouped_backward
    return (functools.partial(_backends.loop_grouped_forward, b.mixed_fake_quant_forward),
            functools.partial(_backends.loop_grouped_backward, b.mixed_fake_quant_backward))


def _mfqg_forward(xs, probs: Tensor, scales, bits, grid: int, axes, backend: str) -> List[Tensor]:
    like = xs[0]
    forward, _ = _grouped_pair(backend, like.device)
    orders = [_MemoryOrder.of(x) for x in xs]  # each x's (see _MemoryOrder)
    ys = forward([o.contiguous(x) for o, x in zip(orders, xs)], _params(probs, like),
                 [_params(s, like) for s in scales], tuple(bits), grid,
                 tuple(o.axis(ax) for o, ax in zip(orders, axes)))
    return [o.restore(y, x) for o, y, x in zip(orders, ys, xs)]


def _mfqg_backward(grads, xs, probs, scales, bits, grid, axes, backend, need_dx, need_dprobs, need_dscales):
    """(list of dx | None, dprobs [N, K] in probs' dtype | None, flat fp32 dscales | None). The
    custom op cannot return views of one buffer, so the callers split the flat dscales into
    per-tensor views (``_split_like``, which also casts each to its scales' dtype)."""
    like = xs[0]
    _, backward = _grouped_pair(backend, like.device)
    orders = [_MemoryOrder.of(x) for x in xs]  # each x's (see _MemoryOrder)
    dxs, dp, ds = backward(
        [o.contiguous(g) for o, g in zip(orders, grads)], [o.contiguous(x) for o, x in zip(orders, xs)],
        _params(probs, like), [_params(s, like) for s in scales], tuple(bits), grid,
        tuple(o.axis(ax) for o, ax in zip(orders, axes)), need_dx, need_dprobs, need_dscales,
    )
    if dxs is not None:
        dxs = [o.restore(dx, x) for o, dx, x in zip(orders, dxs, xs)]
    return dxs, (dp.to(probs.dtype) if dp is not None else None), ds


def _split_like(flat: Tensor, like: Sequence[Tensor]) -> List[Tensor]:
    """Views of ``flat`` shaped like each tensor of ``like``, in order, each in its tensor's dtype
    (no copy where the dtype is already that of ``flat``)."""
    return [part.view(t.shape).to(t.dtype) for part, t in zip(flat.split([t.numel() for t in like]), like)]


def _grads_or_zeros(grads, outputs_like) -> List[Tensor]:
    # an output that took no part in the loss has no gradient; it contributes zero
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, outputs_like)]


@_functorch.AutogradForms
class _MixedFakeQuantGroupedFunction(torch.autograd.Function):
    """Eager-mode autograd of mixed_fake_quant_grouped; the N xs, then the N scales, come as
    separate arguments after ``n``."""

    @staticmethod
    def forward(probs, bits, grid, axes, backend, straight_through, n, *xs_and_scales):
        xs, scales = xs_and_scales[:n], xs_and_scales[n:]
        return tuple(_mfqg_forward(xs, probs, scales, bits, grid, axes, backend))

    @staticmethod
    def setup_context(ctx, inputs, output):
        probs, bits, grid, axes, backend, straight_through, n, *xs_and_scales = inputs
        ctx.save_for_backward(probs, *xs_and_scales)
        if _functorch.forward_ad_active():
            ctx.save_for_forward(probs, *xs_and_scales)
        ctx.args = (bits, grid, axes, backend)
        ctx.straight_through = straight_through
        ctx.n = n

    @staticmethod
    def jvp(ctx, dprobs, _bits, _grid, _axes, _backend, _straight_through, _n, *dxs_and_dscales):
        # each tensor's as mixed_fake_quant's; straight through, x's tangent passes unchanged
        n, (bits, grid, axes, _) = ctx.n, ctx.args
        probs, *xs_and_scales = ctx.saved_tensors
        dys = []
        for i in range(n):
            x, dx = xs_and_scales[i], dxs_and_dscales[i]
            tangents = (None if ctx.straight_through else dx, None if dprobs is None else dprobs[i],
                        dxs_and_dscales[n + i])
            dy = _in_math_dtype(reference.mixed_fake_quant_jvp, x, (x, probs[i], xs_and_scales[n + i], *tangents),
                                (bits, grid, axes[i]))
            dys.append(dy + dx if ctx.straight_through and dx is not None else dy)
        return tuple(dys)

    @staticmethod
    def backward(ctx, *grads):
        n = ctx.n
        probs, *xs_and_scales = ctx.saved_tensors
        xs, scales = xs_and_scales[:n], xs_and_scales[n:]
        needs = ctx.needs_input_grad
        need_dx, need_dp, need_ds = any(needs[7:7 + n]), needs[0], any(needs[7 + n:])
        kernel_dx = need_dx and not ctx.straight_through
        if kernel_dx or need_dp or need_ds:
            def backward(p, *tensors):  # the N grads, xs and scales; dxs flat, then dp and the flat ds
                dxs, dp, ds = _mfqg_backward(tensors[:n], tensors[n:2 * n], p, tensors[2 * n:], *ctx.args,
                                             kernel_dx, need_dp, need_ds)
                return (*(dxs if dxs is not None else [None] * n), dp, ds)

            *dxs, dp, ds = _functorch.first_order(backward, "mixed_fake_quant_grouped", ctx.args[-1], probs,
                                                  *grads, *xs, *scales)
            dxs = dxs if kernel_dx else None
        else:
            dxs = dp = ds = None
        if need_dx and ctx.straight_through:
            dxs = grads  # the identity: each incoming gradient as it is (None for an unused output)
        dxs = dxs if dxs is not None else [None] * n
        dss = _split_like(ds, scales) if ds is not None else [None] * n
        return (dp, None, None, None, None, None, None, *dxs, *dss)

    @staticmethod
    def vmap(info, in_dims, probs, bits, grid, axes, backend, straight_through, n, *xs_and_scales):
        return _functorch.per_sample(
            lambda p, *t: _MixedFakeQuantGroupedFunction.apply(p, bits, grid, axes, backend, straight_through, n, *t),
            info, (in_dims[0], *in_dims[7:]), (probs, *xs_and_scales))


@torch.library.custom_op("qdarts::mixed_fake_quant_grouped", mutates_args=())
def _mixed_fake_quant_grouped_op(
    xs: List[Tensor], probs: Tensor, scales: List[Tensor], bits: List[int], grid: int, axes: List[int], backend: str,
    straight_through: bool,
) -> List[Tensor]:
    _check_grouped_op_args(xs, probs, scales, bits, grid, axes)
    if scale_values_read_on(xs[0].device):
        try:  # all N at once (a supernet's weight quantizer takes hundreds), then the culprit by name
            _check_op_scale_values(xs[0], torch.cat([s.detach().reshape(-1) for s in scales]))
        except RuntimeError:
            for i, s in enumerate(scales):
                _check_op_scale_values(xs[0], s, f"scales[{i}]")
            raise
    return _mfqg_forward(xs, probs, scales, bits, grid, axes, backend)


@_mixed_fake_quant_grouped_op.register_fake
def _(xs, probs, scales, bits, grid, axes, backend, straight_through):
    _check_grouped_op_args(xs, probs, scales, bits, grid, axes)
    return [_kernel_output_like(x) for x in xs]


def _check_grouped_op_args(xs, probs, scales, bits, grid, axes, grads=None):
    """Cheap checks for direct calls of the grouped custom ops (see _check_op_args)."""
    n = len(xs)
    if n == 0:
        raise RuntimeError("xs must hold at least one tensor")
    _check_bits_and_grid(bits, grid)
    if probs.shape != (n, len(bits)):
        raise RuntimeError(f"probs must have shape [{n}, {len(bits)}], got {list(probs.shape)}")
    if len(scales) != n or len(axes) != n or (grads is not None and len(grads) != n):
        raise RuntimeError(f"scales, axes (and grads) must hold one entry per x ({n})")
    if len({ax == -1 for ax in axes}) > 1:
        raise RuntimeError(f"axes must be all -1 (per tensor) or all >= 0 (per channel), got {list(axes)}")
    for i, (x, s, ax) in enumerate(zip(xs, scales, axes)):
        if x.dtype != xs[0].dtype or x.device != xs[0].device:
            raise RuntimeError(f"xs[{i}] is {x.dtype} on {x.device} but xs[0] is {xs[0].dtype} on {xs[0].device}")
        _check_tensor_args(x, probs[i], s, len(bits), ax, None if grads is None else grads[i])


@torch.library.custom_op("qdarts::mixed_fake_quant_grouped_backward", mutates_args=())
def _mixed_fake_quant_grouped_backward_op(
    grads: List[Tensor],
    xs: List[Tensor],
    probs: Tensor,
    scales: List[Tensor],
    bits: List[int],
    grid: int,
    axes: List[int],
    backend: str,
    need_dx: bool,
    need_dprobs: bool,
    need_dscales: bool,
) -> List[Tensor]:
    """[dx_0 .. dx_{N-1}, dprobs [N, K], flat dscales]; 0-element tensors where not requested."""
    _check_grouped_op_args(xs, probs, scales, bits, grid, axes, grads)
    dxs, dp, ds = _mfqg_backward(grads, xs, probs, scales, bits, grid, axes, backend,
                                 need_dx, need_dprobs, need_dscales)
    if dxs is None:
        dxs = [x.new_empty(0) for x in xs]
    return list(dxs) + [_empty_like_none(dp, probs), _empty_like_none(ds, scales[0])]


@_mixed_fake_quant_grouped_backward_op.register_fake
def _(grads, xs, probs, scales, bits, grid, axes, backend, need_dx, need_dprobs, need_dscales):
    _check_grouped_op_args(xs, probs, scales, bits, grid, axes, grads)
    dxs = [_kernel_output_like(x) if need_dx else x.new_empty(0) for x in xs]
    math_dtype = torch.float64 if xs[0].dtype == torch.float64 else torch.float32  # see _params
    dscales = scales[0].new_empty(sum(s.numel() for s in scales) if need_dscales else 0, dtype=math_dtype)
    return dxs + [_contiguous_like(probs) if need_dprobs else probs.new_empty(0), dscales]


def _mfqg_setup_context(ctx, inputs, output):
    xs, probs, scales, bits, grid, axes, backend, straight_through = inputs
    ctx.save_for_backward(probs, *xs, *scales)
    ctx.args = (bits, grid, axes, backend)
    ctx.straight_through = straight_through
    ctx.n = len(xs)


def _mfqg_op_backward(ctx, grads):
    n = ctx.n
    probs, *xs_and_scales = ctx.saved_tensors
    xs, scales = xs_and_scales[:n], xs_and_scales[n:]
    need_xs, need_dp, need_ss = ctx.needs_input_grad[:3]
    need_dx, need_ds = any(need_xs), any(need_ss)
    kernel_dx = need_dx and not ctx.straight_through
    res = None
    if kernel_dx or need_dp or need_ds:
        bits, grid, axes, backend = ctx.args
        res = _mixed_fake_quant_grouped_backward_op(
            _grads_or_zeros(grads, xs), xs, probs, scales, bits, grid, axes, backend, kernel_dx, need_dp, need_ds
        )
    if not need_dx:
        dxs = [None] * n
    else:
        dxs = list(grads) if ctx.straight_through else res[:n]  # straight through: the identity
    return (
        dxs,
        res[n] if need_dp else None,
        _split_like(res[n + 1], scales) if need_ds else [None] * n,
        None, None, None, None, None,
    )


_mixed_fake_quant_grouped_op.register_autograd(_mfqg_op_backward, setup_context=_mfqg_setup_context)


def mixed_fake_quant_grouped(
    xs: Sequence[Tensor],
    probs: Union[Sequence[Tensor], Tensor],
    scales: Sequence[Tensor],
    bits: Sequence[int],
    *,
    grid: str = "signed",
    axis: Optional[int] = None,
    backend: Optional[str] = None,
    straight_through: bool = False,
) -> List[Tensor]:
    """``mixed_fake_quant`` of N tensors sharing one bit set and grid, in one kernel launch.

    ``ys[i] = mixed_fake_quant(xs[i], probs[i], scales[i], bits, grid=grid, axis=axis)``, bit for
    bit forward, with the same gradients (up to the order of the sums) for xs, probs and scales.
    Same contract as :func:`qdarts_kernels.reference.mixed_fake_quant_grouped`: xs are N >= 1
    tensors of any shapes (0 elements allowed) of one dtype and device; probs N tensors [K] or one
    [N, K] tensor; scales N tensors [K] (per tensor) or [K, C_i] (per channel along ``axis`` of
    each x). The ``triton`` and ``cuda`` backends quantize all N with one launch forward, and one
    launch plus one small reduction launch backward (instead of one launch or two per tensor); the
    ``reference`` and ``cpu`` backends loop over the tensors. Errors name the index (``xs[3]``).
    ``straight_through``: the gradient of each x is its output's gradient as it is (the identity,
    as the paper's weight quantizers take it; no kernel computes it), the values are unchanged.
    """
    ref = _eager_reference_op("mixed_fake_quant_grouped")
    if ref is not None:
        return ref(xs, probs, scales, bits, grid=grid, axis=axis, straight_through=straight_through)
    xs, probs, scales, bits, code, axes, name = _checked_grouped_args(xs, probs, scales, bits, grid, axis, backend)
    # one [N, K] tensor for the kernels: the caller's, or a stack of the rows (autograd splits its
    # gradient back into the rows)
    probs_nk = probs if isinstance(probs, Tensor) else torch.stack(probs)
    return _grouped_apply(xs, probs_nk, scales, bits, code, axes, name, bool(straight_through))


def _checked_grouped_args(xs, probs, scales, bits, grid, axis, backend):
    """The validated (xs, probs, scales, bits, grid code, axes, backend name) of a grouped call."""
    xs, probs, scales, bits, code, axes = check_mixed_fake_quant_grouped(xs, probs, scales, bits, grid, axis)
    name = _backends.resolve(backend, xs[0].device, xs[0].dtype)
    _check_backend_dtype(name, xs[0], "xs")
    return xs, probs, scales, bits, code, axes, name


def _grouped_apply(xs, probs_nk: Tensor, scales, bits, code: int, axes, name: str, straight_through: bool):
    if torch.compiler.is_compiling():
        return _mixed_fake_quant_grouped_op(xs, probs_nk, scales, list(bits), code, list(axes), name, straight_through)
    return list(_MixedFakeQuantGroupedFunction.apply(probs_nk, bits, code, axes, name, straight_through, len(xs), *xs,
                                                     *scales))


def _mixed_fake_quant_grouped_of_a_kind(checked: dict, xs: Sequence[Tensor], probs: Tensor, scales: Sequence[Tensor],
                                        bits, *, grid: str, axis: Optional[int], backend: Optional[str],
                                        straight_through: bool = False) -> List[Tensor]:
    """:func:`mixed_fake_quant_grouped` with ``probs`` one [N, K] tensor, validated once per kind of call
    (see :func:`_checked_mixed_fake_quant_args_of_a_kind`; the kind holds the dtype, device and shape of
    every tensor). For a supernet's grouped weight quantizer, whose full checks took 4.5 ms a call
    over the digits supernet's 543 weights."""
    if eager_reference_active() or torch.compiler.is_compiling():
        return mixed_fake_quant_grouped(xs, probs, scales, bits, grid=grid, axis=axis, backend=backend,
                                        straight_through=straight_through)
    key = (tuple((x.dtype, x.device, x.shape) for x in xs), tuple((s.dtype, s.device, s.shape) for s in scales),
           probs.dtype, probs.device, probs.shape, tuple(bits), grid, axis, _backend_setting(backend))
    args = checked.get(key)
    if args is None:
        args = checked[key] = _checked_grouped_args(xs, probs, scales, bits, grid, axis, backend)[3:]
    return _grouped_apply(list(xs), probs, list(scales), *args, bool(straight_through))


# --------------------------------------------------------------------------------------------------
# mixed_op_sum
# --------------------------------------------------------------------------------------------------


def _mos_forward(outputs, weights: Tensor, backend: str) -> Tensor:
    """y with the first output's strides where it is dense, else contiguous; the other outputs are
    brought to its memory order (see _MemoryOrder)."""
    order = _MemoryOrder.of(outputs[0])
    y = _backends.get(backend).mixed_op_sum_forward([order.contiguous(o) for o in outputs],
                                                    _params(weights, outputs[0]))
    return order.restore(y, outputs[0])


def _mos_backward(grad, outputs, weights, backend, need_doutputs, need_dweights):
    """(list of d outputs, d weights in the weights' dtype); None where not requested. ``outputs``
    may be the stand-ins of :func:`_mos_saved_outputs` when d weights are not requested. The d
    outputs have the first output's strides where it is dense, else they are contiguous."""
    order = _MemoryOrder.of(outputs[0])
    douts, dw = _backends.get(backend).mixed_op_sum_backward(
        order.contiguous(grad), [order.contiguous(o) for o in outputs], _params(weights, grad), need_doutputs,
        need_dweights
    )
    if douts is not None:
        douts = [order.restore(d, outputs[0]) for d in douts]
    return douts, (dw.to(weights.dtype) if dw is not None else None)


def _mos_kept_outputs(outputs: Sequence[Tensor], need_dweights: bool) -> Tuple[Tensor, ...]:
    # The K outputs are read by the backward only for d weights, so they are kept for it only when
    # the weights need a gradient. In the weight step of a search (alpha frozen) they do not, and
    # the candidate outputs are then about a quarter of what the whole supernet would keep.
    return tuple(outputs) if need_dweights else ()


def _mos_saved_outputs(kept: Sequence[Tensor], grad: Tensor, k: int, order: "_MemoryOrder"
                       ) -> Tuple[Tensor, List[Tensor]]:
    """(grad, the outputs kept by _mos_kept_outputs; or grad laid out in the first output's memory
    ``order`` and K stand-ins, when none were kept): the backends read the outputs only for d
    weights, and otherwise only their number, shape, dtype and device, which are grad's (see
    _backends). The stand-ins are that grad itself, so that a strided grad (a slice of a
    concatenation's gradient) is copied once, not K + 1 times, and so that the d outputs, which take
    the first output's layout (_mos_backward), take it here too."""
    if kept:
        return grad, list(kept)
    grad = order.restore(order.contiguous(grad))
    return grad, [grad] * k


@_functorch.AutogradForms
class _MixedOpSumFunction(torch.autograd.Function):
    """Eager-mode autograd of mixed_op_sum; the K outputs come as separate arguments."""

    @staticmethod
    def forward(weights, backend, *outputs):
        return _mos_forward(outputs, weights, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        weights, backend, *outputs = inputs
        ctx.save_for_backward(weights, *_mos_kept_outputs(outputs, ctx.needs_input_grad[0]))
        ctx.backend = backend
        ctx.k = len(outputs)
        ctx.order = _MemoryOrder.of(outputs[0])  # for the stand-ins of the outputs not kept
        if _functorch.forward_ad_active():
            ctx.save_for_forward(weights, *outputs)

    @staticmethod
    def jvp(ctx, dweights, _backend, *doutputs):
        weights, *outputs = ctx.saved_tensors
        return _in_math_dtype(_mixed_op_sum_jvp, outputs[0], (weights, dweights, *outputs, *doutputs), ())

    @staticmethod
    def backward(ctx, grad):
        weights, *kept = ctx.saved_tensors
        grad, outputs = _mos_saved_outputs(kept, grad, ctx.k, ctx.order)
        need_dw, need_douts = ctx.needs_input_grad[0], any(ctx.needs_input_grad[2:])
        k = len(outputs)

        def backward(g, w, *outs):  # the K d outputs (or None each), then d weights
            douts, dw = _mos_backward(g, outs, w, ctx.backend, need_douts, need_dw)
            return (*(douts if douts is not None else [None] * k), dw)

        *douts, dw = _functorch.first_order(backward, "mixed_op_sum", ctx.backend, grad, weights, *outputs)
        return (dw, None, *douts)

    @staticmethod
    def vmap(info, in_dims, weights, backend, *outputs):
        w_dim, o_dims = in_dims[0], in_dims[2:]
        if w_dim is None:
            # for given weights the sum is elementwise: every output with the batch in front, one call
            outs = [o.expand(info.batch_size, *o.shape) if d is None else o.movedim(d, 0)
                    for o, d in zip(outputs, o_dims)]
            return _MixedOpSumFunction.apply(weights, backend, *outs), 0
        return _functorch.per_sample(lambda w, *o: _MixedOpSumFunction.apply(w, backend, *o), info,
                                     (w_dim, *o_dims), (weights, *outputs))


def _mixed_op_sum_jvp(weights: Tensor, dweights: Optional[Tensor], *outputs_and_tangents) -> Tensor:
    """d y = sum_k (d w_k o_k + w_k d o_k), a tangent None being zero (the transpose of the backward)."""
    k = len(outputs_and_tangents) // 2
    outputs, doutputs = outputs_and_tangents[:k], outputs_and_tangents[k:]
    dy = torch.zeros_like(outputs[0])
    for i, (o, do) in enumerate(zip(outputs, doutputs)):
        if dweights is not None:
            dy = dy + dweights[i] * o
        if do is not None:
            dy = dy + weights[i] * do
    return dy


def _check_mos_op_args(outputs: List[Tensor], weights: Tensor, backend: str) -> None:
    """The public checks for direct calls of the mixed_op_sum custom ops (see _check_op_args: the
    kernels trust K and the shapes), and the backend's limit on K, as a RuntimeError."""
    try:
        check_mixed_op_sum(outputs, weights)
    except (ValueError, TypeError) as e:
        raise RuntimeError(str(e)) from None
    refusal = _backends.op_sum_inputs_refusal(backend, len(outputs))
    if refusal is not None:
        raise RuntimeError(refusal)


@torch.library.custom_op("qdarts::mixed_op_sum", mutates_args=())
def _mixed_op_sum_op(outputs: List[Tensor], weights: Tensor, backend: str) -> Tensor:
    _check_mos_op_args(outputs, weights, backend)
    return _mos_forward(outputs, weights, backend)


@_mixed_op_sum_op.register_fake
def _(outputs, weights, backend):
    _check_mos_op_args(outputs, weights, backend)
    return _kernel_output_like(outputs[0])


@torch.library.custom_op("qdarts::mixed_op_sum_backward", mutates_args=())
def _mixed_op_sum_backward_op(
    grad: Tensor, outputs: List[Tensor], weights: Tensor, backend: str, need_doutputs: bool, need_dweights: bool
) -> List[Tensor]:
    _check_mos_op_args(outputs, weights, backend)
    _check_grad(grad, outputs[0])
    douts, dw = _mos_backward(grad, outputs, weights, backend, need_doutputs, need_dweights)
    if douts is None:
        douts = [outputs[0].new_empty(0) for _ in outputs]
    return list(douts) + [_empty_like_none(dw, weights)]


@_mixed_op_sum_backward_op.register_fake
def _(grad, outputs, weights, backend, need_doutputs, need_dweights):
    _check_mos_op_args(outputs, weights, backend)
    _check_grad(grad, outputs[0])
    # every d output as the first output lies (see _mos_backward)
    douts = [_kernel_output_like(outputs[0]) if need_doutputs else o.new_empty(0) for o in outputs]
    return douts + [torch.empty_like(weights) if need_dweights else weights.new_empty(0)]


def _mos_setup_context(ctx, inputs, output):
    outputs, weights, backend = inputs
    # weights.requires_grad, not ctx.needs_input_grad: during the forward the latter is indexed by
    # torch.library's flattened arguments (the K outputs first), a layout of its internals
    ctx.save_for_backward(weights, *_mos_kept_outputs(outputs, weights.requires_grad))
    ctx.backend = backend
    ctx.k = len(outputs)
    ctx.order = _MemoryOrder.of(outputs[0])  # for the stand-ins of the outputs not kept


def _mos_op_backward(ctx, grad):
    weights, *kept = ctx.saved_tensors
    grad, outputs = _mos_saved_outputs(kept, grad, ctx.k, ctx.order)
    # needs_input_grad[0] may be one flag per output: a list, true even when every flag is false
    flags = ctx.needs_input_grad[0]
    need_douts, need_dw = any(flags) if isinstance(flags, (list, tuple)) else bool(flags), ctx.needs_input_grad[1]
    if not (need_douts or need_dw):
        return None, None, None
    res = _mixed_op_sum_backward_op(grad, outputs, weights, ctx.backend, need_douts, bool(need_dw))
    douts = res[:-1] if need_douts else [None] * ctx.k
    return douts, (res[-1] if need_dw else None), None


_mixed_op_sum_op.register_autograd(_mos_op_backward, setup_context=_mos_setup_context)


def mixed_op_sum(
    outputs: Union[Sequence[Tensor], Tensor], weights: Tensor, *, backend: Optional[str] = None
) -> Tensor:
    """Weighted sum of candidate-op outputs ``y = sum_k weights[k] * outputs[k]`` (DARTS mixed op).

    ``outputs``: a list of K tensors of one shape, dtype and device, or one tensor stacked on dim 0;
    ``weights``: shape [K]. Same contract as :func:`qdarts_kernels.reference.mixed_op_sum`, fused:
    one read of each output and one write forward; backward reads g and the K outputs once.
    """
    ref = _eager_reference_op("mixed_op_sum")
    if ref is not None:
        return ref(outputs, weights)
    outs = check_mixed_op_sum(outputs, weights)
    name = _backends.resolve(backend, outs[0].device, outs[0].dtype, op_sum_inputs=len(outs))
    _check_backend_dtype(name, outs[0], "outputs")
    if torch.compiler.is_compiling():
        return _mixed_op_sum_op(outs, weights, name)
    with_autograd = getattr(_backends.get(name), "mixed_op_sum_with_autograd", None)
    if with_autograd is not None and not _functorch.transforming():
        # The C++ autograd takes contiguous outputs as they lie: the first output's memory order is
        # given to it as views (one copy of an output in another layout), the sum permuted back
        # (autograd permutes the gradients the same way), as _mos_forward and _mos_backward do.
        order = _MemoryOrder.of(outs[0])
        if order is _CONTIGUOUS:
            return with_autograd(outs, weights)
        return order.restore(with_autograd([order.contiguous(o) for o in outs], weights), outs[0])
    return _MixedOpSumFunction.apply(weights, name, *outs)
