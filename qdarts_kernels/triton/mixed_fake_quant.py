"""Mixed-precision fake quantization in Triton: forward and backward kernels with their wrappers.

Maths (DESIGN section 4, ``qdarts_kernels.reference``), for bit-widths b_k, k = 0..K-1, K <= 4::

    inv_s_k = 1 / s_k                      (fp32, correctly rounded: tl.math.div_rn)
    v_k     = x * inv_s_k + z              (two roundings: no FMA, kernels launch without fp fusion)
    r_k     = round_half_to_even(v_k)
    q_k     = clamp(r_k, qmin_k, qmax_k)   (NaN-propagating: a NaN stays NaN, as in torch.clamp)
    in_k    = qmin_k <= r_k <= qmax_k      (mask on the rounded value)
    Q_k     = (q_k - z) * s_k
    y       = p_0 Q_0;  y = y + p_k Q_k    (k = 1..K-1, the reference's order: bit-exact in fp32)

Backward, g the incoming gradient, recomputing everything above from x (nothing is saved)::

    dx   = g * sum_k p_k in_k
    dp_k = sum g Q_k                                   = sum_channels s_k,c * sum g (q_k - z)
    ds_k = sum g p_k ((q_k - z) - in_k x / s_k)        = p_k * sum g ((q_k - z) - in_k x inv_s_k)

(ds summed per channel for per-channel scales.) On the relu grid (RELU) x stands for relu(x) above
and in_k also needs x > 0 (the ReLU's gradient). x / s_k is taken as x * inv_s_k, the product the
quantizer already formed; the sums are fp32 and deterministic: each program writes its partial sums
to a buffer and a fixed-order ``torch.sum`` on the device adds the partials (no atomics, no sync).
The per-tensor backward adds its terms with FMAs (one rounding each; the forward and dx round as the
reference does, see _add_pass_weight).

Layout. x is viewed as [outer, C, inner] around the channel axis (per tensor: [1, 1, numel]) and
tiled as a 2-D array [R, J] in one of two ways, whichever keeps the per-channel partial sums small:

- channel on rows:    R = outer * C rows of J = inner elements, channel = row % C; a tile's
  row sums are its partial ds (one partial per row and column block);
- channel on columns: R = outer rows of J = C * inner elements, channel = column // inner; a tile's
  column sums are its partial ds (one per column and row block). Used when inner is small
  (e.g. [N, C] activations with axis=1), where rows of length inner would make one partial per few
  elements.

Each program handles one [BLOCK_R, BLOCK_J] tile; its flat offsets are int64. The backward with
per-tensor scales (every activation quantizer) has its own persistent kernel instead: a fixed
number of programs, each looping over blocks of the flat tensor and summing the dp and ds terms
per lane in registers, reduced once per program rather than once per tile and bit-width.
"""

from __future__ import annotations

import functools
import warnings
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .._validation import RELU_GRID, grid_params
from ._common import (_INTERPRETED, LAUNCH_OPTIONS, REDUCE_PROGRAMS, TileSize, cast_out, device_guard, flat_block,
                      next_pow2, programs_in_one_wave, round_half_even, tile_size)

#: Most rows a channel-on-columns tile takes: its column sums are the partials, so taller tiles
#: mean fewer partials (at most K / 64 floats per element).
_MAX_BLOCK_R_COLUMNS = 64


class Layout(NamedTuple):
    """How x is tiled; see the module docstring."""

    channel_on_rows: bool
    outer: int
    channels: int
    inner: int
    rows: int
    cols: int
    block_rows: int
    block_cols: int
    row_blocks: int
    col_blocks: int
    num_warps: int

    @property
    def programs(self) -> int:
        return self.row_blocks * self.col_blocks


@functools.lru_cache(maxsize=4096)
def plan_layout(outer: int, channels: int, inner: int, tile: TileSize) -> Layout:
    """Tile shape and grid for x viewed as [outer, channels, inner], programs of ``tile``."""
    # Partial ds sums per element: 1/min(inner, tile) with the channel on rows, 1/min(outer, 64)
    # with the channel on columns. Per-tensor scales (outer = channels = 1) always take rows.
    channel_on_rows = min(inner, tile.elements) >= min(outer, _MAX_BLOCK_R_COLUMNS)
    if channel_on_rows:
        rows, cols = outer * channels, inner
        block_cols = min(next_pow2(cols), tile.elements)
        block_rows = min(tile.elements // block_cols, next_pow2(rows))
    else:
        rows, cols = outer, channels * inner
        block_rows = min(next_pow2(rows), _MAX_BLOCK_R_COLUMNS, tile.elements)  # a tile of 16 or 32 (tests)
        block_cols = min(tile.elements // block_rows, next_pow2(cols))
    return Layout(
        channel_on_rows, outer, channels, inner, rows, cols, block_rows, block_cols,
        triton.cdiv(rows, block_rows), triton.cdiv(cols, block_cols), tile.num_warps,
    )


def layout_for(x: torch.Tensor, axis: int, kernel: str) -> Layout:
    """The layout of ``x`` quantized per tensor (axis = -1) or per channel along ``axis``, for
    ``kernel`` ("mixed_fake_quant_forward" or "mixed_fake_quant_backward": each has its tile)."""
    tile = tile_size(x.numel(), kernel)
    if axis < 0:
        return plan_layout(1, 1, x.numel(), tile)
    shape = x.shape
    return plan_layout(
        functools.reduce(int.__mul__, shape[:axis], 1), shape[axis],
        functools.reduce(int.__mul__, shape[axis + 1:], 1), tile,
    )


# --------------------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------------------


@triton.jit
def _tile(pid, rows, cols, col_blocks, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr):
    """This program's row and column block, its rows and columns (int64), their flat offsets
    ``row * cols + col`` (int64: past 2^31 elements) and the in-bounds mask."""
    pid_r = pid // col_blocks
    pid_j = pid % col_blocks
    row = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    col = pid_j.to(tl.int64) * BLOCK_J + tl.arange(0, BLOCK_J)
    offsets = row[:, None] * cols + col[None, :]
    mask = (row < rows)[:, None] & (col < cols)[None, :]
    return pid_r, pid_j, row, col, offsets, mask


@triton.jit
def _channel_scale(S, k, row, col, cols, channels, inner, CHANNEL_ON_ROWS: tl.constexpr):
    """s_k of each tile row (channel on rows) or each tile column (channel on columns), 1-D."""
    if CHANNEL_ON_ROWS:
        return tl.load(S + k * channels + row % channels)
    else:
        # 1.0 for columns past the end keeps 1/s finite there; those lanes are masked anyway
        return tl.load(S + k * channels + col // inner, mask=col < cols, other=1.0)


@triton.jit
def _along_channel(v, CHANNEL_ON_ROWS: tl.constexpr):
    """A per-row or per-column vector shaped to broadcast over the tile."""
    if CHANNEL_ON_ROWS:
        return v[:, None]
    else:
        return v[None, :]


@triton.jit
def _sum_per_channel(t, CHANNEL_ON_ROWS: tl.constexpr):
    """Sum a tile over the axis that does not carry the channel."""
    if CHANNEL_ON_ROWS:
        return tl.sum(t, axis=1)
    else:
        return tl.sum(t, axis=0)


@triton.jit
def _scale_and_inverse(S, k, row, col, cols, channels, inner, CHANNEL_ON_ROWS: tl.constexpr):
    """s_k and 1 / s_k (correctly rounded) per tile row or column, shaped to broadcast."""
    s = _channel_scale(S, k, row, col, cols, channels, inner, CHANNEL_ON_ROWS)
    inv_s = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
    return s, _along_channel(s, CHANNEL_ON_ROWS), _along_channel(inv_s, CHANNEL_ON_ROWS)


@triton.jit
def _quantize(x, inv_s, qmin, qmax, ZERO_POINT: tl.constexpr, RELU: tl.constexpr):
    """The quantizer on an fp32 tile: returns (x * inv_s, q - z, in). RELU (the relu grid):
    quantize relu(x) (as torch.relu: -0.0 and NaN stay) and take in = 0 where x <= 0.

    With z = 0 (every grid but midrise) v = x * inv_s + z is left at x * inv_s: the two differ only
    in the sign of a zero, which neither the rounding's value, nor the clamp, nor in sees, and the
    level is made +0.0 below either way."""
    if RELU:
        x_inv_s = tl.where(x < 0.0, 0.0, x) * inv_s
    else:
        x_inv_s = x * inv_s
    if ZERO_POINT == 0.0:
        r = round_half_even(x_inv_s)
    else:
        r = round_half_even(x_inv_s + ZERO_POINT)
    # a NaN r stays NaN, as in torch.clamp (max.NaN / min.NaN on the GPU: one instruction a side)
    q = tl.clamp(r, qmin, qmax, propagate_nan=tl.PropagateNan.ALL)
    # qmin <= r <= qmax exactly when the clamp left r unchanged (false for a NaN r, as it must be)
    inside = q == r
    if RELU:
        inside = inside & (x > 0.0)
    # q - z in one addition: level 0 is +0.0, as in PyTorch's fake-quant (integer levels), where rint
    # gives -0.0 to a v in [-0.5, 0); with z = 1/2 no level is 0
    if ZERO_POINT == 0.0:
        level = q + 0.0
    else:
        level = q - ZERO_POINT
    return x_inv_s, level, inside


@triton.jit
def _weighted_level(x, P, S, k, qmin, qmax, row, col, cols, channels, inner, ZERO_POINT: tl.constexpr,
                    CHANNEL_ON_ROWS: tl.constexpr, RELU: tl.constexpr):
    """p_k * Q_k(x) = p_k * ((q_k - z) * s_k), rounded in this order as the reference does."""
    _, s, inv_s = _scale_and_inverse(S, k, row, col, cols, channels, inner, CHANNEL_ON_ROWS)
    _, q_minus_z, _ = _quantize(x, inv_s, qmin, qmax, ZERO_POINT, RELU)
    return tl.load(P + k) * (q_minus_z * s)


# --------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------


# Not specialised on their values (Triton's == 1 and divisible-by-16 variants): the counts that only place
# programs, and P's alignment (probs are read one scalar at a time, often a row of a [N, K] tensor, 3 of
# 4 of them not 16-byte aligned): they change no vector load, and shapes that differ only there share a
# compile (a search meets some 100 specialisations of the Triton kernels, each a compile on a new machine).
@triton.jit(do_not_specialize=["col_blocks"], do_not_specialize_on_alignment=["P"])
def _mixed_fake_quant_forward_kernel(
    X, Y, P, S, QMIN, QMAX,
    rows, cols, channels, inner, col_blocks,
    K: tl.constexpr, ZERO_POINT: tl.constexpr, CHANNEL_ON_ROWS: tl.constexpr, RELU: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """y = sum_k p_k Q_k(x) on one tile: one read of x, one write of y.

    QMIN, QMAX: tuples of K floats (the grid range of each bit-width); ZERO_POINT: z of the grid;
    RELU: the relu grid (see _quantize).
    """
    _, _, row, col, offsets, mask = _tile(tl.program_id(0), rows, cols, col_blocks, BLOCK_R, BLOCK_J)
    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    y = _weighted_level(x, P, S, 0, QMIN[0], QMAX[0], row, col, cols, channels, inner, ZERO_POINT,
                        CHANNEL_ON_ROWS, RELU)
    for k in tl.static_range(1, K):
        y = y + _weighted_level(x, P, S, k, QMIN[k], QMAX[k], row, col, cols, channels, inner, ZERO_POINT,
                                CHANNEL_ON_ROWS, RELU)
    tl.store(Y + offsets, cast_out(y, Y.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=None)
def _grid_ranges(bits: Sequence[int], grid: int) -> Tuple[Tuple[float, ...], Tuple[float, ...], float, bool]:
    """(QMIN, QMAX, zero_point, RELU) of the kernels."""
    params = [grid_params(grid, b) for b in bits]
    return tuple(p.qmin for p in params), tuple(p.qmax for p in params), params[0].zero_point, grid == RELU_GRID


def mixed_fake_quant_forward(
    x: torch.Tensor, probs: torch.Tensor, scales: torch.Tensor, bits: Sequence[int], grid: int, axis: int
) -> torch.Tensor:
    """``y = sum_k probs[k] * Q(x; scales[k], bits[k])`` (prepared arguments: contiguous x in
    fp32/fp16/bf16, contiguous fp32 probs [K] and scales [K] or [K, C]; axis -1 for per tensor)."""
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    lay = layout_for(x, axis, "mixed_fake_quant_forward")
    qmin, qmax, zero_point, relu = _grid_ranges(bits, grid)
    with device_guard(x):
        _mixed_fake_quant_forward_kernel[(lay.programs,)](
            x, y, probs, scales, qmin, qmax,
            lay.rows, lay.cols, lay.channels, lay.inner, lay.col_blocks,
            K=len(bits), ZERO_POINT=zero_point, CHANNEL_ON_ROWS=lay.channel_on_rows, RELU=relu,
            BLOCK_R=lay.block_rows, BLOCK_J=lay.block_cols, num_warps=lay.num_warps, **LAUNCH_OPTIONS,
        )
    return y


# --------------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["col_blocks", "row_blocks"], do_not_specialize_on_alignment=["P"])
def _mixed_fake_quant_backward_kernel(
    G, X, DX, P, S, PART_P, PART_S, QMIN, QMAX,
    rows, cols, channels, inner, col_blocks, row_blocks,
    K: tl.constexpr, ZERO_POINT: tl.constexpr, CHANNEL_ON_ROWS: tl.constexpr, RELU: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DP: tl.constexpr, NEED_DS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """dx on one tile, and this tile's partial sums of dp and ds: one read of x and g, one write
    of dx; only the requested gradients are computed.

    PART_P [programs, K]: this program's sum_tile g Q_k.
    PART_S: channel on rows [K, col_blocks, rows], channel on columns [K, row_blocks, cols]: the
    tile's p_k * sum g ((q_k - z) - in_k x inv_s_k) per row or per column.
    """
    pid = tl.program_id(0)
    pid_r, pid_j, row, col, offsets, mask = _tile(pid, rows, cols, col_blocks, BLOCK_R, BLOCK_J)
    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    # g = 0 outside the tensor makes every masked lane add nothing to the sums
    g = tl.load(G + offsets, mask=mask, other=0.0).to(tl.float32)
    dx_weight = tl.zeros((BLOCK_R, BLOCK_J), tl.float32)
    for k in tl.static_range(K):
        s_vec, _, inv_s = _scale_and_inverse(S, k, row, col, cols, channels, inner, CHANNEL_ON_ROWS)
        x_inv_s, q_minus_z, inside = _quantize(x, inv_s, QMIN[k], QMAX[k], ZERO_POINT, RELU)
        p = tl.load(P + k)
        if NEED_DX:
            dx_weight = _add_pass_weight(dx_weight, p, inside)
        g_level = g * q_minus_z
        if NEED_DP:
            dp = tl.sum(_sum_per_channel(g_level, CHANNEL_ON_ROWS) * s_vec, axis=0)
            tl.store(PART_P + pid.to(tl.int64) * K + k, dp)
        if NEED_DS:
            # g * ((q - z) - x inv_s), as the reference: subtracting two rounded products would
            # cancel badly at high bit-widths
            lsq = g * (q_minus_z - tl.where(inside, x_inv_s, 0.0))
            ds = p * _sum_per_channel(lsq, CHANNEL_ON_ROWS)
            if CHANNEL_ON_ROWS:
                tl.store(PART_S + (k * col_blocks + pid_j).to(tl.int64) * rows + row, ds, mask=row < rows)
            else:
                tl.store(PART_S + (k * row_blocks + pid_r).to(tl.int64) * cols + col, ds, mask=col < cols)
    if NEED_DX:
        tl.store(DX + offsets, cast_out(g * dx_weight, DX.dtype.element_ty), mask=mask)


@triton.jit
def _add_pass_weight(dx_weight, p, inside):
    """dx_weight + p * in, as the reference's product and sum (a NaN or infinite p must reach dx
    where in = 0 too: 0 * inf = NaN), in one FMA: p * in is exact, so one rounding is the sum's."""
    return tl.fma(p, inside.to(tl.float32), dx_weight)


@triton.jit
def _level_params(P, S, k):
    """(p_k, 1 / s_k) of per-tensor scales, the division correctly rounded: read once per program."""
    return tl.load(P + k), tl.math.div_rn(1.0, tl.load(S + k))


@triton.jit
def _level_gradients(x, g, dx_weight, acc_p, acc_s, p, inv_s, qmin, qmax, ZERO_POINT: tl.constexpr,
                     RELU: tl.constexpr, NEED_DX: tl.constexpr, NEED_DP: tl.constexpr, NEED_DS: tl.constexpr):
    """Bit-width k's terms on a 1-D block with per-tensor scales: dx_weight + p_k in_k, and the
    per-lane sums acc_p + g (q_k - z), acc_s + g ((q_k - z) - in_k x inv_s_k), each one FMA."""
    x_inv_s, q_minus_z, inside = _quantize(x, inv_s, qmin, qmax, ZERO_POINT, RELU)
    if NEED_DX:
        dx_weight = _add_pass_weight(dx_weight, p, inside)
    if NEED_DP:
        acc_p = tl.fma(g, q_minus_z, acc_p)
    if NEED_DS:
        acc_s = tl.fma(g, q_minus_z - tl.where(inside, x_inv_s, 0.0), acc_s)
    return dx_weight, acc_p, acc_s


@triton.jit
def _store_level_partials(acc_p, acc_s, P, S, PART_P, PART_S, pid, k, K: tl.constexpr,
                          NEED_DP: tl.constexpr, NEED_DS: tl.constexpr):
    """This program's partial dp_k = s_k sum acc_p and ds_k = p_k sum acc_s (one tree sum each)."""
    if NEED_DP:
        tl.store(PART_P + pid.to(tl.int64) * K + k, tl.sum(acc_p, axis=0) * tl.load(S + k))
    if NEED_DS:
        tl.store(PART_S + pid.to(tl.int64) * K + k, tl.load(P + k) * tl.sum(acc_s, axis=0))


@triton.jit(do_not_specialize=["programs"], do_not_specialize_on_alignment=["P"])
def _mixed_fake_quant_backward_per_tensor_kernel(
    G, X, DX, P, S, PART_P, PART_S, QMIN, QMAX, numel, programs,
    K: tl.constexpr, ZERO_POINT: tl.constexpr, RELU: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DP: tl.constexpr, NEED_DS: tl.constexpr,
    ROUNDS: tl.constexpr, BLOCK: tl.constexpr,
):
    """The backward with per-tensor scales, persistent: program p takes blocks p, p + P, p + 2P, ...
    (P = ``programs``, ROUNDS blocks each at most), writes their dx, and sums the dp and ds terms
    of all its blocks per lane, in registers; it reduces them once, at the end, into PART_P /
    PART_S [programs, K]. The tiled kernel reduces 2K times per block instead (cross-warp sums
    through shared memory, each one a barrier), the likely cause of its backward's 64 % of copy
    bandwidth on the H100 where the cuda backend, which sums per thread over a grid-stride loop
    like this, reached 92 %; with this kernel the forward and backward together reached 78 % on an
    H200, then on 1024 programs (see _persistent_wave). K <= 4 (one pair of accumulators per
    bit-width, each used only when K reaches it); p_k and 1 / s_k are read once, before the loop."""
    pid = tl.program_id(0)
    acc_p0 = tl.zeros((BLOCK,), tl.float32)
    acc_s0, acc_p1, acc_s1, acc_p2, acc_s2, acc_p3, acc_s3 = acc_p0, acc_p0, acc_p0, acc_p0, acc_p0, acc_p0, acc_p0
    p0, inv_s0 = _level_params(P, S, 0)
    p1, inv_s1, p2, inv_s2, p3, inv_s3 = p0, inv_s0, p0, inv_s0, p0, inv_s0
    if K > 1:
        p1, inv_s1 = _level_params(P, S, 1)
    if K > 2:
        p2, inv_s2 = _level_params(P, S, 2)
    if K > 3:
        p3, inv_s3 = _level_params(P, S, 3)
    for r in range(ROUNDS):
        # a block past the last one is all masked: it adds nothing
        offsets, mask = flat_block(pid + r * programs, numel, BLOCK)
        x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
        # g = 0 outside the tensor makes every masked lane add nothing to the sums
        g = tl.load(G + offsets, mask=mask, other=0.0).to(tl.float32)
        dx_weight = tl.zeros((BLOCK,), tl.float32)
        dx_weight, acc_p0, acc_s0 = _level_gradients(x, g, dx_weight, acc_p0, acc_s0, p0, inv_s0, QMIN[0], QMAX[0],
                                                     ZERO_POINT, RELU, NEED_DX, NEED_DP, NEED_DS)
        if K > 1:
            dx_weight, acc_p1, acc_s1 = _level_gradients(x, g, dx_weight, acc_p1, acc_s1, p1, inv_s1, QMIN[1],
                                                         QMAX[1], ZERO_POINT, RELU, NEED_DX, NEED_DP, NEED_DS)
        if K > 2:
            dx_weight, acc_p2, acc_s2 = _level_gradients(x, g, dx_weight, acc_p2, acc_s2, p2, inv_s2, QMIN[2],
                                                         QMAX[2], ZERO_POINT, RELU, NEED_DX, NEED_DP, NEED_DS)
        if K > 3:
            dx_weight, acc_p3, acc_s3 = _level_gradients(x, g, dx_weight, acc_p3, acc_s3, p3, inv_s3, QMIN[3],
                                                         QMAX[3], ZERO_POINT, RELU, NEED_DX, NEED_DP, NEED_DS)
        if NEED_DX:
            tl.store(DX + offsets, cast_out(g * dx_weight, DX.dtype.element_ty), mask=mask)
    _store_level_partials(acc_p0, acc_s0, P, S, PART_P, PART_S, pid, 0, K, NEED_DP, NEED_DS)
    if K > 1:
        _store_level_partials(acc_p1, acc_s1, P, S, PART_P, PART_S, pid, 1, K, NEED_DP, NEED_DS)
    if K > 2:
        _store_level_partials(acc_p2, acc_s2, P, S, PART_P, PART_S, pid, 2, K, NEED_DP, NEED_DS)
    if K > 3:
        _store_level_partials(acc_p3, acc_s3, P, S, PART_P, PART_S, pid, 3, K, NEED_DP, NEED_DS)


def mixed_fake_quant_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    probs: torch.Tensor,
    scales: torch.Tensor,
    bits: Sequence[int],
    grid: int,
    axis: int,
    need_dx: bool,
    need_dprobs: bool,
    need_dscales: bool,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dx, dprobs, dscales) of ``mixed_fake_quant``, each None unless requested; dprobs and
    dscales fp32, summed in a fixed order (deterministic)."""
    if not (need_dx or need_dprobs or need_dscales):
        return None, None, None
    k = len(bits)
    if x.numel() == 0:
        return (
            torch.empty_like(x) if need_dx else None,
            probs.new_zeros(k) if need_dprobs else None,
            torch.zeros_like(scales) if need_dscales else None,
        )
    qmin, qmax, zero_point, relu = _grid_ranges(bits, grid)
    dx = torch.empty_like(x) if need_dx else None
    if axis < 0:
        return _per_tensor_backward(grad, x, dx, probs, scales, k, qmin, qmax, zero_point, relu, need_dprobs,
                                    need_dscales)
    lay = layout_for(x, axis, "mixed_fake_quant_backward")
    f32 = dict(dtype=torch.float32, device=x.device)
    part_p = torch.empty((lay.programs, k), **f32) if need_dprobs else None
    if not need_dscales:
        part_s = None
    elif lay.channel_on_rows:
        part_s = torch.empty((k, lay.col_blocks, lay.rows), **f32)
    else:
        part_s = torch.empty((k, lay.row_blocks, lay.cols), **f32)
    with device_guard(x):
        # a pointer that is not needed is never dereferenced (constexpr flags); pass x in its place
        _mixed_fake_quant_backward_kernel[(lay.programs,)](
            grad, x, x if dx is None else dx, probs, scales,
            x if part_p is None else part_p, x if part_s is None else part_s,
            qmin, qmax,
            lay.rows, lay.cols, lay.channels, lay.inner, lay.col_blocks, lay.row_blocks,
            K=k, ZERO_POINT=zero_point, CHANNEL_ON_ROWS=lay.channel_on_rows, RELU=relu,
            NEED_DX=need_dx, NEED_DP=need_dprobs, NEED_DS=need_dscales,
            BLOCK_R=lay.block_rows, BLOCK_J=lay.block_cols, num_warps=lay.num_warps, **LAUNCH_OPTIONS,
        )
    dprobs = part_p.sum(dim=0) if need_dprobs else None
    dscales = None
    if need_dscales:
        if lay.channel_on_rows:
            per_channel = part_s.view(k, lay.col_blocks, lay.outer, lay.channels).sum(dim=(1, 2))
        else:
            per_channel = part_s.view(k, lay.row_blocks, lay.channels, lay.inner).sum(dim=(1, 3))
        dscales = per_channel.reshape(scales.shape)
    return dx, dprobs, dscales


def _per_tensor_backward(grad, x, dx, probs, scales, k, qmin, qmax, zero_point, relu, need_dprobs, need_dscales):
    """(dx, dprobs, dscales) with per-tensor scales: the persistent kernel, each program's sums
    added in a fixed order. Its programs fill the GPU once (:func:`_persistent_wave`; at most
    REDUCE_PROGRAMS under the interpreter), each taking ROUNDS blocks, as evenly as whole blocks
    allow. ROUNDS is a compile-time constant (as in the batch-norm kernels): Triton's interpreter
    takes no loop bound from a kernel argument, and a network has few distinct tensor sizes."""
    tile = tile_size(x.numel(), "mixed_fake_quant_backward_per_tensor")
    tiles = triton.cdiv(x.numel(), tile.elements)
    wave = REDUCE_PROGRAMS
    if x.is_cuda and not _INTERPRETED.value and tiles > 1:
        with device_guard(x):
            wave = _persistent_wave(x.device.index, x.dtype, k, zero_point, relu, dx is not None, need_dprobs,
                                    need_dscales, tile)
    rounds = triton.cdiv(tiles, wave)
    programs = triton.cdiv(tiles, rounds)
    f32 = dict(dtype=torch.float32, device=x.device)
    part_p = torch.empty((programs, k), **f32) if need_dprobs else None
    part_s = torch.empty((programs, k), **f32) if need_dscales else None
    with device_guard(x):
        # a pointer that is not needed is never dereferenced (constexpr flags); pass x in its place
        _mixed_fake_quant_backward_per_tensor_kernel[(programs,)](
            grad, x, x if dx is None else dx, probs, scales,
            x if part_p is None else part_p, x if part_s is None else part_s,
            qmin, qmax, x.numel(), programs,
            K=k, ZERO_POINT=zero_point, RELU=relu, NEED_DX=dx is not None, NEED_DP=need_dprobs, NEED_DS=need_dscales,
            ROUNDS=rounds, BLOCK=tile.elements, num_warps=tile.num_warps, **LAUNCH_OPTIONS,
        )
    return dx, (part_p.sum(dim=0) if need_dprobs else None), (part_s.sum(dim=0) if need_dscales else None)


@functools.lru_cache(maxsize=None)
def _persistent_wave(device_index: int, dtype: torch.dtype, k: int, zero_point: float, relu: bool, need_dx: bool,
                     need_dprobs: bool, need_dscales: bool, tile: TileSize) -> int:
    """Programs of the per-tensor backward that ``device_index`` runs at once (the current device).

    A fixed count fits no GPU: 1024 programs with K = 3 (80 registers a thread, ptxas for sm_90) are
    6 per SM on an H100 or H200, 792 on 132 SMs, so the last 232 would run as a second wave filling
    29 % of its slots. The registers are read off a compile of the kernel with ROUNDS = 3, which ptxas
    gives the registers of any ROUNDS >= 3 (40, 64, 80, 96 for K = 1..4 in fp32 with 1024 elements
    and 4 warps, Triton 3.6; up to 128 for K = 4 in fp16 and bf16; at most as many for 1 and 2
    rounds): one compile per specialisation, not per size. Should Triton's API for that fail, one
    warning, and the 1024 programs as before."""
    try:
        compiled = _mixed_fake_quant_backward_per_tensor_kernel.warmup(
            dtype, dtype, dtype, torch.float32, torch.float32, torch.float32, torch.float32,
            (0.0,) * k, (1.0,) * k, 1 << 20, REDUCE_PROGRAMS,
            K=k, ZERO_POINT=zero_point, RELU=relu, NEED_DX=need_dx, NEED_DP=need_dprobs, NEED_DS=need_dscales, ROUNDS=3,
            BLOCK=tile.elements, num_warps=tile.num_warps, grid=(1,), **LAUNCH_OPTIONS,
        )
        return programs_in_one_wave(compiled, torch.device("cuda", device_index))
    except Exception as e:  # the program count is a matter of speed: any count gives the same sums' terms
        warnings.warn(f"qdarts_kernels: could not read the per-tensor backward's occupancy from Triton "
                      f"({type(e).__name__}: {e}); it runs on {REDUCE_PROGRAMS} programs", RuntimeWarning,
                      stacklevel=2)
        return REDUCE_PROGRAMS
