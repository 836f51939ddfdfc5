"""Grouped mixed fake quantization in Triton: N tensors, one bit set, one kernel launch.

``ys[i] = sum_k probs[i, k] * Q(xs[i]; scales[i][k], bits[k])`` for i = 0..N-1, with the maths of
``mixed_fake_quant`` (see that module: same quantizer helpers, same operation order, so every y_i
is bit for bit the single op's). Backward is one launch over all N tensors writing dx_i and
per-tile partial sums, plus one launch of a small kernel that adds the partials of each output
value in a fixed order (deterministic, no atomics, no host sync).

Pointer table. The host builds one int64 table META [N, _F] from the shapes (and the data
pointers of the call): for tensor i its programs [PROG_START, PROG_END), its data pointers (x, y
or dx, g and its scales; loaded in the kernel and cast with ``.to(tl.pointer_type(DTYPE))``, which
also works under the Triton interpreter, where the pointers are host addresses), its tiling, and
its offsets in the concatenated dscales and in the partial-sum buffer. A program finds its tensor
by a binary search over PROG_START (ceil(log2 N) scalar loads). On a GPU the table travels
host -> device as one non-blocking copy from pinned memory, so a call never waits for the device.

Tiling. Tensor i is viewed as a 2-D array [ROWS, COLS] whose rows each lie in one channel:
per channel ([outer, C, inner] around ``axis``) ROWS = outer * C, COLS = inner, channel = row % C;
per tensor ROWS = ceil(numel / BLOCK_J), COLS = BLOCK_J, one channel (the flat tail is masked).
All tensors share one tile [BLOCK_R, BLOCK_J] (constexpr); per channel BLOCK_J follows the
smallest inner of the group, so no tensor wastes more than half its lanes; a tensor with a larger
inner gets more column blocks.

Partial sums (fp32, [rows, K] in one buffer): one row per program for dp_k = sum_tile g Q_k, then
one row per (tile row, column block) for ds_k = p_k * sum g ((q_k - z) - in_k x inv_s_k), stored
channel-major (row index (c * outer + o) * COL_BLOCKS + column block for tile row o * C + c), so
that the partials of one output value are one contiguous segment of rows.
"""

from __future__ import annotations

import functools
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._common import LAUNCH_OPTIONS, cast_out, device_guard, next_pow2, tile_size
from .mixed_fake_quant import _add_pass_weight, _grid_ranges, _quantize

# Columns of the per-tensor table META; constexpr because the kernels read them (compiled Triton reads
# no other globals) and the host indexes its rows with them.
(_PROG_START, _PROG_END, _X, _OUT, _G, _S, _NUMEL, _ROWS, _COLS, _CHANNELS, _OUTER, _COL_BLOCKS, _SCALE_OFF,
 _PART_S_OFF, _CHAN_START, _F) = (tl.constexpr(column) for column in range(16))
_POINTER_COLUMNS = (_X, _OUT, _G, _S)

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
#: Partial-sum rows one program of the reduction adds per step.
_REDUCE_BLOCK = 128


class GroupedPlan(NamedTuple):
    """Shape-only part of a launch: tile, grid sizes and the META rows without the pointers."""

    block_rows: int
    block_cols: int
    num_warps: int
    search_steps: int  # binary-search steps over N tensors: ceil(log2 N)
    programs: int
    channels: int  # output segments of dscales: sum of C_i (per channel) or N (per tensor)
    part_s_rows: int
    meta: Tuple[Tuple[int, ...], ...]


@functools.lru_cache(maxsize=1024)
def plan_grouped(shapes: Tuple[Tuple[int, ...], ...], axes: Tuple[int, ...]) -> GroupedPlan:
    """The tiling of N tensors of ``shapes`` quantized along ``axes`` (all -1: per tensor)."""
    per_channel = axes[0] >= 0
    views = []  # (outer, channels, inner, numel)
    for shape, axis in zip(shapes, axes):
        numel = functools.reduce(int.__mul__, shape, 1)
        if per_channel:
            outer = functools.reduce(int.__mul__, shape[:axis], 1)
            inner = functools.reduce(int.__mul__, shape[axis + 1:], 1)
            views.append((outer, shape[axis], inner, numel))
        else:
            views.append((1, 1, numel, numel))
    nonempty = [v for v in views if v[3] > 0]
    tile = tile_size(max([v[3] for v in nonempty], default=1))
    if per_channel:
        block_cols = min(next_pow2(min([v[2] for v in nonempty], default=1)), tile.elements)
        block_rows = min(tile.elements // block_cols, next_pow2(max([v[0] * v[1] for v in nonempty], default=1)))
    else:
        block_cols, block_rows = min(tile.elements, next_pow2(max([v[3] for v in nonempty], default=1))), 1
    meta = []
    programs = channels = part_s_rows = scale_off = 0
    for outer, chans, inner, numel in views:
        if per_channel:
            rows, cols = outer * chans, inner
        else:
            rows, cols, outer = triton.cdiv(numel, block_cols), block_cols, triton.cdiv(numel, block_cols)
        col_blocks = triton.cdiv(cols, block_cols)
        count = triton.cdiv(rows, block_rows) * col_blocks if numel else 0
        row = [0] * _F.value
        row[_PROG_START], row[_PROG_END] = programs, programs + count
        row[_NUMEL], row[_ROWS], row[_COLS], row[_CHANNELS] = numel, rows, cols, chans
        row[_OUTER], row[_COL_BLOCKS] = outer, col_blocks
        row[_SCALE_OFF], row[_PART_S_OFF], row[_CHAN_START] = scale_off, part_s_rows, channels
        meta.append(tuple(row))
        programs += count
        part_s_rows += rows * col_blocks if numel else 0
        channels += chans
        scale_off += chans  # per bit-width: dscales of tensor i are K * chans floats from K * SCALE_OFF
    return GroupedPlan(block_rows, block_cols, tile.num_warps, (len(shapes) - 1).bit_length(), programs, channels,
                       part_s_rows, tuple(meta))


def _meta_tensor(plan: GroupedPlan, pointers: Sequence[Tuple[int, int, int, int]], k: int,
                 device: torch.device) -> torch.Tensor:
    """META on ``device``: the plan's rows with this call's pointers (x, out, grad, scales; the
    tensors must stay alive until the kernel has run: the caller holds them); dscales offsets
    scaled by K."""
    rows = []
    for row, ptrs in zip(plan.meta, pointers):
        row = list(row)
        for col, p in zip(_POINTER_COLUMNS, ptrs):
            row[col] = p
        row[_SCALE_OFF] *= k
        rows.append(row)
    table = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cpu":
        return table
    # pinned + non_blocking: an asynchronous copy, the host does not wait for the device (never during a
    # CUDA-graph capture, which would replay it from a recycled block: see ops._grouped_pair)
    return table.pin_memory().to(device, non_blocking=True)


# --------------------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------------------


@triton.jit
def _find_segment(TABLE, column, n, value, STEPS: tl.constexpr):
    """Largest i < n with TABLE[i, column] <= value (the column is non-decreasing): binary search."""
    i = value * 0
    for t in tl.static_range(STEPS):
        cand = i + (1 << (STEPS - 1 - t))
        ok = cand < n
        start = tl.load(TABLE + tl.minimum(cand, n - 1).to(tl.int64) * _F + column)
        i = tl.where(ok & (start <= value), cand, i)
    return i


@triton.jit
def _tensor_tile(META, n, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr, STEPS: tl.constexpr):
    """This program's tensor, its tile (rows, columns, flat offsets, mask) and the tensor's fields."""
    pid = tl.program_id(0)
    i = _find_segment(META, _PROG_START, n, pid, STEPS)
    info = META + i.to(tl.int64) * _F
    local = pid - tl.load(info + _PROG_START)
    rows = tl.load(info + _ROWS)
    cols = tl.load(info + _COLS)
    col_blocks = tl.load(info + _COL_BLOCKS)
    pid_r = local // col_blocks
    pid_j = local % col_blocks
    row = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    col = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    offsets = row[:, None] * cols + col[None, :]
    mask = (row < rows)[:, None] & (col < cols)[None, :] & (offsets < tl.load(info + _NUMEL))
    return pid, i, info, pid_j, row, offsets, mask


@triton.jit
def _row_scale(info, k, row):
    """s_k of each tile row and 1 / s_k (correctly rounded), as [BLOCK_R] vectors."""
    channels = tl.load(info + _CHANNELS)
    rows = tl.load(info + _ROWS)
    # 1.0 past the last row keeps 1/s finite there; those lanes are masked anyway
    s = tl.load(_data_pointer(info, _S, tl.float32) + k * channels + row % channels, mask=row < rows, other=1.0)
    return s, tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)


@triton.jit
def _data_pointer(info, column, DTYPE: tl.constexpr):
    return tl.load(info + column).to(tl.pointer_type(DTYPE))


# --------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _grouped_forward_kernel(
    META, P, QMIN, QMAX, n,
    K: tl.constexpr, DTYPE: tl.constexpr, ZERO_POINT: tl.constexpr, RELU: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_J: tl.constexpr, STEPS: tl.constexpr,
):
    """y_i = sum_k p_ik Q_k(x_i) on one tile of one tensor, in the single op's order."""
    _, i, info, _, row, offsets, mask = _tensor_tile(META, n, BLOCK_R, BLOCK_J, STEPS)
    x = tl.load(_data_pointer(info, _X, DTYPE) + offsets, mask=mask, other=0.0).to(tl.float32)
    y = tl.zeros((BLOCK_R, BLOCK_J), tl.float32)
    for k in tl.static_range(K):
        s, inv_s = _row_scale(info, k, row)
        _, q_minus_z, _ = _quantize(x, inv_s[:, None], QMIN[k], QMAX[k], ZERO_POINT, RELU)
        term = tl.load(P + i * K + k) * (q_minus_z * s[:, None])
        if k == 0:
            y = term
        else:
            y = y + term
    tl.store(_data_pointer(info, _OUT, DTYPE) + offsets, cast_out(y, DTYPE), mask=mask)


@triton.jit
def _grouped_backward_kernel(
    META, P, PART_P, PART_S, QMIN, QMAX, n,
    K: tl.constexpr, DTYPE: tl.constexpr, ZERO_POINT: tl.constexpr, RELU: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DP: tl.constexpr, NEED_DS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr, STEPS: tl.constexpr,
):
    """dx_i on one tile and the tile's partial sums of dp and ds (see the module docstring)."""
    pid, i, info, pid_j, row, offsets, mask = _tensor_tile(META, n, BLOCK_R, BLOCK_J, STEPS)
    x = tl.load(_data_pointer(info, _X, DTYPE) + offsets, mask=mask, other=0.0).to(tl.float32)
    # g = 0 outside the tensor makes every masked lane add nothing to the sums
    g = tl.load(_data_pointer(info, _G, DTYPE) + offsets, mask=mask, other=0.0).to(tl.float32)
    dx_weight = tl.zeros((BLOCK_R, BLOCK_J), tl.float32)
    channels = tl.load(info + _CHANNELS)
    # partial row of each tile row: channel-major, so one channel's partials are contiguous
    part_row = (tl.load(info + _PART_S_OFF)
                + ((row % channels) * tl.load(info + _OUTER) + row // channels) * tl.load(info + _COL_BLOCKS) + pid_j)
    for k in tl.static_range(K):
        s, inv_s = _row_scale(info, k, row)
        x_inv_s, q_minus_z, inside = _quantize(x, inv_s[:, None], QMIN[k], QMAX[k], ZERO_POINT, RELU)
        p = tl.load(P + i * K + k)
        if NEED_DX:
            dx_weight = _add_pass_weight(dx_weight, p, inside)
        g_level = g * q_minus_z
        if NEED_DP:
            tl.store(PART_P + pid.to(tl.int64) * K + k, tl.sum(tl.sum(g_level, axis=1) * s, axis=0))
        if NEED_DS:
            # g * (difference), as the reference: the difference is exact where q_k ~ x / s_k
            # (fine grids), while g * (q_k - z) - g * x / s_k would cancel two rounded products
            lsq = g * (q_minus_z - tl.where(inside, x_inv_s, 0.0))
            tl.store(PART_S + part_row * K + k, p * tl.sum(lsq, axis=1), mask=row < tl.load(info + _ROWS))
    if NEED_DX:
        tl.store(_data_pointer(info, _OUT, DTYPE) + offsets, cast_out(g * dx_weight, DTYPE), mask=mask)


@triton.jit
def _grouped_reduce_kernel(
    META, PARTIALS, DP, DS, n, n_dp, p_rows,
    K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr, STEPS: tl.constexpr,
):
    """One output segment per program, its partial rows added in a fixed order: programs
    0..n_dp-1 give dprobs[i, :] (n_dp = N when dprobs is requested, else 0) from rows
    [PROG_START, PROG_END) of PARTIALS, the following ones the K dscales of one channel from the
    rows after the first p_rows."""
    seg = tl.program_id(0)
    k = tl.arange(0, KP)
    if seg < n_dp:
        info = META + seg.to(tl.int64) * _F
        start = tl.load(info + _PROG_START)
        end = tl.load(info + _PROG_END)
        out = DP + seg * K + k
    else:
        c_all = seg - n_dp
        info = META + _find_segment(META, _CHAN_START, n, c_all, STEPS).to(tl.int64) * _F
        c = c_all - tl.load(info + _CHAN_START)
        length = tl.load(info + _OUTER) * tl.load(info + _COL_BLOCKS)
        start = p_rows + tl.load(info + _PART_S_OFF) + c * length
        end = start + length
        out = DS + tl.load(info + _SCALE_OFF) + k * tl.load(info + _CHANNELS) + c
    acc = tl.zeros((BLOCK, KP), tl.float32)
    # a while loop: under the interpreter a loaded scalar is a 1-element block, which a for
    # loop cannot take as a bound but a comparison can
    first = start
    while first < end:
        r = first + tl.arange(0, BLOCK)
        acc += tl.load(PARTIALS + r[:, None] * K + k[None, :], mask=(r < end)[:, None] & (k < K)[None, :],
                       other=0.0)
        first += BLOCK
    tl.store(out, tl.sum(acc, axis=0), mask=k < K)


# --------------------------------------------------------------------------------------------------
# wrappers (the backend interface, see qdarts_kernels._backends)
# --------------------------------------------------------------------------------------------------


def _plan_for(xs: Sequence[torch.Tensor], axes: Sequence[int]) -> GroupedPlan:
    return plan_grouped(tuple(tuple(x.shape) for x in xs), tuple(axes))


def mixed_fake_quant_grouped_forward(
    xs: List[torch.Tensor], probs: torch.Tensor, scales: List[torch.Tensor], bits: Sequence[int], grid: int,
    axes: Sequence[int],
) -> List[torch.Tensor]:
    """ys of the grouped op (prepared arguments: contiguous xs of one dtype, fp32 probs [N, K],
    contiguous fp32 scales [K] or [K, C_i]) in one launch."""
    ys = [torch.empty_like(x) for x in xs]
    plan = _plan_for(xs, axes)
    if plan.programs == 0:
        return ys
    x0 = xs[0]
    meta = _meta_tensor(plan, [(x.data_ptr(), y.data_ptr(), 0, s.data_ptr()) for x, y, s in zip(xs, ys, scales)],
                        len(bits), x0.device)
    qmin, qmax, zero_point, relu = _grid_ranges(tuple(bits), grid)
    with device_guard(x0):
        _grouped_forward_kernel[(plan.programs,)](
            meta, probs, qmin, qmax, len(xs),
            K=len(bits), DTYPE=_TL_DTYPES[x0.dtype], ZERO_POINT=zero_point, RELU=relu, BLOCK_R=plan.block_rows,
            BLOCK_J=plan.block_cols, STEPS=plan.search_steps, num_warps=plan.num_warps, **LAUNCH_OPTIONS,
        )
    return ys


def mixed_fake_quant_grouped_backward(
    grads: List[torch.Tensor], xs: List[torch.Tensor], probs: torch.Tensor, scales: List[torch.Tensor],
    bits: Sequence[int], grid: int, axes: Sequence[int], need_dx: bool, need_dprobs: bool, need_dscales: bool,
) -> Tuple[Optional[List[torch.Tensor]], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dxs, dprobs [N, K], flat dscales) of the grouped op, each None unless requested: one
    launch over all tensors and, for dprobs / dscales, one launch of the fixed-order reduction."""
    if not (need_dx or need_dprobs or need_dscales):
        return None, None, None
    k, n, x0 = len(bits), len(xs), xs[0]
    plan = _plan_for(xs, axes)
    f32 = dict(dtype=torch.float32, device=x0.device)
    dxs = [torch.empty_like(x) for x in xs] if need_dx else None
    dprobs = torch.empty((n, k), **f32) if need_dprobs else None
    dscales = torch.empty(sum(s.numel() for s in scales), **f32) if need_dscales else None
    if plan.programs == 0:
        # sums over no elements
        return dxs, (dprobs.zero_() if need_dprobs else None), (dscales.zero_() if need_dscales else None)
    outs = dxs if need_dx else xs  # a pointer that is not needed is never dereferenced
    meta = _meta_tensor(
        plan, [(x.data_ptr(), o.data_ptr(), g.data_ptr(), s.data_ptr()) for x, o, g, s in zip(xs, outs, grads, scales)],
        k, x0.device,
    )
    p_rows = plan.programs if need_dprobs else 0
    partials = torch.empty((p_rows + (plan.part_s_rows if need_dscales else 0), k), **f32)
    part_p, part_s = partials[:p_rows], partials[p_rows:]
    qmin, qmax, zero_point, relu = _grid_ranges(tuple(bits), grid)
    with device_guard(x0):
        _grouped_backward_kernel[(plan.programs,)](
            meta, probs, part_p, part_s, qmin, qmax, n,
            K=k, DTYPE=_TL_DTYPES[x0.dtype], ZERO_POINT=zero_point, RELU=relu,
            NEED_DX=need_dx, NEED_DP=need_dprobs, NEED_DS=need_dscales,
            BLOCK_R=plan.block_rows, BLOCK_J=plan.block_cols, STEPS=plan.search_steps,
            num_warps=plan.num_warps, **LAUNCH_OPTIONS,
        )
        segments = (n if need_dprobs else 0) + (plan.channels if need_dscales else 0)
        if segments:
            _grouped_reduce_kernel[(segments,)](
                meta, partials, partials if dprobs is None else dprobs,
                partials if dscales is None else dscales, n, n if need_dprobs else 0, p_rows,
                K=k, KP=next_pow2(k), BLOCK=_REDUCE_BLOCK, STEPS=plan.search_steps,
            )
    return dxs, dprobs, dscales
