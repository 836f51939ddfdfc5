"""Argument checks shared by the reference and every backend.

All public ops validate through these helpers so that every backend raises the same clear error,
naming the argument, before any kernel runs. The checks look only at metadata (shapes, dtypes,
devices) except for scale *values*, which are read only where that costs no host-device sync: CPU
tensors always, GPU tensors when ``QDARTS_CHECK_SCALES=1`` (a debug switch, read per call).
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ._functorch import unwrapped

#: Grid name -> code used by the compiled and Triton kernels.
GRIDS = {"signed": 0, "unsigned": 1, "midrise": 2, "relu": 3}
#: The grid that quantizes relu(x) on the unsigned grid (a ReLU folded into the quantizer).
RELU_GRID = GRIDS["relu"]
UNSIGNED_GRID = GRIDS["unsigned"]
#: Floating dtypes the kernels accept for x, outputs and gradients.
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Bit-width range and number of bit-widths per mixed quantizer.
MIN_BITS, MAX_BITS = 1, 16
MAX_K = 4


class GridParams(NamedTuple):
    qmin: float
    qmax: float
    zero_point: float


def grid_params(grid: int, bits: int) -> GridParams:
    """Integer range and zero point of one grid at one bit-width (DESIGN section 4).

    signed   z=0,   q in [-2^(b-1), 2^(b-1)-1]
    unsigned z=0,   q in [0, 2^b-1]
    midrise  z=0.5, q in [-2^(b-1)+1, 2^(b-1)]  (levels +-0.5 ... +-(2^(b-1)-0.5), EdMIPS weights)
    relu     the unsigned grid, applied to relu(x) (see reference.quantize_parts)
    """
    half = float(2 ** (bits - 1))
    if grid == 0:
        return GridParams(-half, half - 1.0, 0.0)
    if grid in (UNSIGNED_GRID, RELU_GRID):
        return GridParams(0.0, float(2**bits - 1), 0.0)
    return GridParams(-half + 1.0, half, 0.5)


def grid_code(grid: str) -> int:
    if not isinstance(grid, str) or grid not in GRIDS:  # a list or an array is not hashable
        raise ValueError(f"grid must be one of {sorted(GRIDS)}, got {grid!r}")
    return GRIDS[grid]


def _as_int(value) -> Optional[int]:
    """``value`` as a Python int where it is an integer (an int, a numpy integer), not a bool; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return int(value)
    return int(value) if isinstance(value, np.integer) else None


def normalize_bits(bits, name: str = "bits") -> Tuple[int, ...]:
    # what the layers pass on every call, their quantizer's own checked tuple: taken as it is
    if (type(bits) is tuple and 1 <= len(bits) <= MAX_K
            and all(type(b) is int and MIN_BITS <= b <= MAX_BITS for b in bits)):
        return bits
    if _as_int(bits) is not None:
        bits = (bits,)
    try:
        bits = tuple(bits)
    except TypeError:
        raise ValueError(f"{name} must be an int or a sequence of ints, got {type(bits).__name__}") from None
    if not 1 <= len(bits) <= MAX_K:
        raise ValueError(f"{name} must hold 1..{MAX_K} bit-widths, got {len(bits)}")
    out = []
    for value in bits:
        b = _as_int(value)
        if b is None:
            raise ValueError(f"{name} must hold ints, got {value!r}")
        if not MIN_BITS <= b <= MAX_BITS:
            raise ValueError(f"{name} must be in [{MIN_BITS}, {MAX_BITS}], got {b}")
        out.append(b)
    return tuple(out)


def distinct_bits(bits, name: str = "bits") -> Tuple[int, ...]:
    """:func:`normalize_bits` for a quantizer's choices, each bit-width once: the ops take (4, 4)
    (two scales of one bit-width), but a softmax over two equal choices cannot choose."""
    bits = normalize_bits(bits, name)
    if len(set(bits)) != len(bits):
        raise ValueError(f"{name} must be distinct, got {bits}")
    return bits


def _check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    # the kernels index memory by strides: a sparse or nested tensor would fail deep inside them, or in
    # the reference's arithmetic, with a message naming neither the argument nor its layout
    if t.layout is not torch.strided or t.is_nested:
        raise TypeError(f"{name} must be a dense tensor (torch.strided layout), got "
                        f"{'a nested tensor' if t.is_nested else t.layout}")


def _check_float(t: torch.Tensor, name: str, allow_double: bool = True) -> None:
    ok = SUPPORTED_DTYPES + ((torch.float64,) if allow_double else ())
    if t.dtype not in ok:
        raise TypeError(f"{name} must have a floating dtype in {[str(d) for d in ok]}, got {t.dtype}")


#: The least scale the ops take: the smallest normal fp32. The kernels multiply by 1 / scale, which
#: overflows to inf below it (and inf times the zero padding of a vector lane is NaN).
SMALLEST_SCALE = 2.0 ** -126


def scale_values_read_on(device: torch.device) -> bool:
    """Whether the scale values of tensors on ``device`` are checked: on CPU always, on a GPU only under
    QDARTS_CHECK_SCALES=1 (reading them there costs a host-device sync)."""
    return device.type == "cpu" or os.environ.get("QDARTS_CHECK_SCALES", "0") == "1"


def check_scale_values(scales: torch.Tensor, name: str = "scales", fp64_math: bool = False) -> None:
    """Reject scales below SMALLEST_SCALE (<= 0 included) or non-finite where reading them costs no
    device sync. The values are those the kernels compute with: fp64 scales are rounded to fp32
    first unless ``fp64_math`` (an fp64 x, on the reference), so that one beyond fp32's range, inf
    to the kernels, is refused too."""
    if scales.numel() == 0:
        return
    if torch.compiler.is_compiling():
        # values are unknown while tracing (and reading them would break the graph); the custom ops
        # check them when the compiled code runs
        return
    if not scale_values_read_on(scales.device):
        return
    given = unwrapped(scales).detach()  # under torch.func's vmap: every sample's scales
    s, as_fp32 = given, ""
    if s.dtype == torch.float64 and not fp64_math:
        s, as_fp32 = s.float(), " (as float32, the kernels' arithmetic)"
    # The cheapest read of a CPU tensor's values: a few Python floats for per-tensor scales, one
    # min/max reduction otherwise. SMALLEST_SCALE <= v < inf is false for NaN, +-inf, 0 and negatives.
    if s.numel() <= 64:
        lo_hi = s.tolist() if s.dim() == 1 else s.flatten().tolist()
    else:
        lo, hi = torch.aminmax(s.flatten())
        lo_hi = [lo.item(), hi.item()]
    if all(SMALLEST_SCALE <= v < math.inf for v in lo_hi):
        return
    for bad, rule in ((~torch.isfinite(s), "must be finite"), (s <= 0, "must be > 0"),
                      (s < SMALLEST_SCALE, "must be >= 2**-126 (the smallest normal float32; 1 / scale overflows "
                                           "below it)")):
        if bool(bad.any()):
            # the first bad one in row-major order (with thousands of per-channel scales, the one to look
            # at), with the value given; under vmap the samples' dimension is not the argument's own
            index = tuple(int(i) for i in bad.nonzero()[0])
            where = f"{name}{list(index) if index else ''}" if given.dim() == scales.dim() else f"one sample's {name}"
            raise ValueError(f"{name} {rule}, got {where} = {given[index].item()}{as_fp32}")


def check_mixed_fake_quant(
    x: torch.Tensor,
    probs: Optional[torch.Tensor],
    scales: torch.Tensor,
    bits,
    grid: str,
    axis: Optional[int],
    index: str = "",
    probs_checked: bool = False,
) -> Tuple[Tuple[int, ...], int, int]:
    """Validate ``mixed_fake_quant`` arguments. Returns (bits, grid_code, axis) with axis >= 0,
    or -1 for per-tensor scales. ``index`` (e.g. "[3]") is appended to the argument names in the
    messages, for the grouped op's lists (xs[3], probs[3], scales[3]); ``probs_checked``: the
    caller checked the probabilities (the grouped op's one [N, K] tensor), ``probs`` is None."""
    xn, pn, sn = f"x{'s' if index else ''}{index}", f"probs{index}", f"scales{index}"
    _check_tensor(x, xn)
    if not probs_checked:
        _check_tensor(probs, pn)
    _check_tensor(scales, sn)
    bits = normalize_bits(bits)
    code = grid_code(grid)
    k = len(bits)
    _check_float(x, xn)
    _check_float(scales, sn)
    for t, name in ((probs, pn), (scales, sn)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but {xn} is on {x.device}; they must share a device")
    if not probs_checked:
        _check_float(probs, pn)
        if probs.shape != (k,):
            raise ValueError(f"{pn} must have shape [{k}] (one probability per bit-width of bits={list(bits)}), "
                             f"got {list(probs.shape)}")
    if axis is None:
        if scales.shape != (k,):
            raise ValueError(
                f"{sn} must have shape [{k}] for per-tensor quantization (axis=None) with bits={list(bits)}, "
                f"got {list(scales.shape)}"
            )
        ax = -1
    else:
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise ValueError(f"axis must be an int or None, got {axis!r}")
        if not -x.dim() <= axis < x.dim() or x.dim() == 0:
            raise ValueError(f"axis {axis} is out of range for {xn} with {x.dim()} dimensions")
        ax = axis % x.dim()
        c = x.shape[ax]
        if scales.shape != (k, c):
            raise ValueError(
                f"{sn} must have shape [{k}, {c}] for per-channel quantization along axis {axis} with "
                f"bits={list(bits)}, got {list(scales.shape)}"
            )
    check_scale_values(scales, sn, fp64_math=x.dtype == torch.float64)
    return bits, code, ax


def check_mixed_fake_quant_grouped(
    xs, probs, scales, bits, grid: str, axis: Optional[int]
) -> Tuple[list, Union[list, torch.Tensor], list, Tuple[int, ...], int, Tuple[int, ...]]:
    """Validate ``mixed_fake_quant_grouped`` arguments: each (xs[i], probs[i], scales[i]) as
    ``mixed_fake_quant`` validates one call, naming the index, and all xs of one dtype and device.

    ``probs`` is a list of N tensors [K] or one tensor [N, K]. Returns xs and scales as lists, probs
    as given (a list, or the [N, K] tensor), bits, the grid code and the axes (axis normalised for
    each x, as the single op does; all -1 for per-tensor scales)."""
    lists = []
    for value, name in ((xs, "xs"), (scales, "scales")):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{name} must be a list of tensors, got {type(value).__name__}")
        lists.append(list(value))
    xs, scales = lists
    n = len(xs)
    if n == 0:
        raise ValueError("xs must hold at least one tensor")
    bits = normalize_bits(bits)
    code = grid_code(grid)
    if isinstance(probs, torch.Tensor):
        # one check of the whole [N, K] tensor: splitting it into N rows only to check each costs the
        # search step some 50 ms of autograd views
        _check_tensor(probs, "probs")
        if probs.dim() != 2 or probs.shape[0] != n or probs.shape[1] != len(bits):
            raise ValueError(f"probs as one tensor must have shape [{n}, {len(bits)}] (one row per x, one "
                             f"probability per bit-width), got {list(probs.shape)}")
        _check_float(probs, "probs")
        _check_tensor(xs[0], "xs[0]")
        if probs.device != xs[0].device:
            raise ValueError(f"probs is on {probs.device} but xs[0] is on {xs[0].device}; they must share a device")
        rows: list = [None] * n
    elif isinstance(probs, (list, tuple)):
        probs = rows = list(probs)
    else:
        raise TypeError(f"probs must be a list of tensors or one [N, K] tensor, got {type(probs).__name__}")
    for value, name in ((rows, "probs"), (scales, "scales")):
        if len(value) != n:
            raise ValueError(f"{name} must hold one entry per x ({n}), got {len(value)}")
    axes = []
    for i, (x, p, s) in enumerate(zip(xs, rows, scales)):
        _, _, ax = check_mixed_fake_quant(x, p, s, bits, grid, axis, index=f"[{i}]",
                                          probs_checked=isinstance(probs, torch.Tensor))
        if i and x.dtype != xs[0].dtype:
            raise TypeError(f"xs[{i}] has dtype {x.dtype} but xs[0] has {xs[0].dtype}; all xs must share a dtype")
        if i and x.device != xs[0].device:
            raise ValueError(f"xs[{i}] is on {x.device} but xs[0] is on {xs[0].device}; all xs must share a device")
        axes.append(ax)
    return xs, probs, scales, bits, code, tuple(axes)


def single_bit_scales(scale, bits, axis: Optional[int]) -> torch.Tensor:
    """``fake_quant``'s ``scale`` as the [1] or [1, C] ``scales`` of ``mixed_fake_quant``."""
    _check_tensor(scale, "scale")
    if _as_int(bits) is None:
        raise ValueError(f"bits must be one int for fake_quant, got {bits!r}")
    if axis is None:
        if scale.numel() != 1:
            raise ValueError(f"scale must have one element for per-tensor quantization, got shape {list(scale.shape)}")
        return scale.reshape(1)
    if scale.dim() != 1:
        raise ValueError(f"scale must have shape [C] for per-channel quantization, got {list(scale.shape)}")
    return scale.reshape(1, -1)


def check_mixed_op_sum(outputs, weights: torch.Tensor) -> Sequence[torch.Tensor]:
    """Validate ``mixed_op_sum`` arguments; returns the outputs as a list of tensors."""
    _check_tensor(weights, "weights")
    if isinstance(outputs, torch.Tensor):
        _check_tensor(outputs, "outputs")
        if outputs.dim() < 1:
            raise ValueError("outputs as one tensor must be stacked along dim 0 (shape [K, ...])")
        outputs = list(outputs.unbind(0))
    elif isinstance(outputs, (list, tuple)):
        outputs = list(outputs)
    else:
        raise TypeError(f"outputs must be a list of tensors or one stacked tensor, got {type(outputs).__name__}")
    if len(outputs) == 0:
        raise ValueError("outputs must hold at least one tensor")
    for i, o in enumerate(outputs):
        _check_tensor(o, f"outputs[{i}]")
    first = outputs[0]
    _check_float(first, "outputs[0]")
    for i, o in enumerate(outputs[1:], 1):
        if o.shape != first.shape:
            raise ValueError(f"outputs[{i}] has shape {list(o.shape)} but outputs[0] has {list(first.shape)}")
        if o.dtype != first.dtype:
            raise TypeError(f"outputs[{i}] has dtype {o.dtype} but outputs[0] has {first.dtype}")
        if o.device != first.device:
            raise ValueError(f"outputs[{i}] is on {o.device} but outputs[0] is on {first.device}")
    _check_float(weights, "weights")
    if weights.shape != (len(outputs),):
        raise ValueError(f"weights must have shape [{len(outputs)}] (one per output), got {list(weights.shape)}")
    if weights.device != first.device:
        raise ValueError(f"weights is on {weights.device} but outputs are on {first.device}")
    return outputs
