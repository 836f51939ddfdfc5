"""Training batch normalisation without affine parameters, for few channels, in Triton.

PyTorch's CUDA batch norm (``native_batch_norm`` and its backward, channels-first) reduces each
channel in ONE thread block: a tensor with 4 channels runs on 4 of an H100's 132 SMs. In a DARTS
supernet, where each candidate op ends in such a batch norm over a few partial channels, these
kernels took half of a CIFAR-size search step's GPU time (b256: 107 us per backward, 49 us per
statistics pass, for 1 MB tensors; ``bench/results/h100-2026-11-27-profile-cifar-b256.txt``). Here
each channel is split over many programs and reduced in two deterministic stages (per-program
partials at fixed places, then a fixed-order merge), so every SM takes part.

Maths, x viewed as [N, C, S] (S the product of the spatial sizes), per channel c over its
M = N * S elements, all in fp32::

    forward   mean = sum x / M,  var = sum (x - mean)^2 / M,  invstd = 1 / sqrt(var + eps)
              y = (x - mean) * invstd
              running_mean <- (1 - momentum) running_mean + momentum mean
              running_var  <- (1 - momentum) running_var  + momentum var M / (M - 1)
    backward  dx = invstd (g - sum g / M - y sum (g y) / M)

The backward needs only the output y and invstd (``OutputKeepingBatchNorm2d`` keeps them). The
variance is merged from per-tile (count, mean, sum of squared deviations) triples with Chan's
formula, not from sums of squares, so a large mean does not cancel the variance away; each tile's
triple comes from the corrected two-pass algorithm over the tile held in registers.

Launches: forward = one statistics pass (each program reduces its tiles of one channel to a
partial triple) + one normalising pass (each program merges its channel's partials, then
normalises one tile; the first program of a channel writes invstd and updates the running
statistics); backward likewise = partial sums of g and g y + the elementwise pass.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import LAUNCH_OPTIONS, REDUCE_PROGRAMS, cast_out, device_guard, next_pow2, split_channel_reduction

#: Elements of one tile (a [BLOCK_N, BLOCK_S] block of one channel).
_TILE = 4096
#: Reduction programs in all (see ``split_channel_reduction``); tests lower it.
_REDUCE_PROGRAMS = REDUCE_PROGRAMS
#: The kernels' integer arguments that only place programs and mask rows: compiled without Triton's
#: specialisation on their values (== 1, divisible by 16), which changes no load or store of S's
#: rows, so that a network's many shapes share compiles.
PROGRAM_INDEXING = ["N", "C", "TILES_S", "TILES", "P"]


class Plan(NamedTuple):
    """How x [N, C, S] is tiled: tiles of [block_n, block_s], tiles_s of them across S, tiles in
    all per channel; ``partials`` reduction programs per channel, each taking ``rounds`` tiles
    (some past the last, empty)."""

    block_n: int
    block_s: int
    tiles_s: int
    tiles: int
    partials: int
    partials_block: int
    rounds: int
    num_warps: int


@functools.lru_cache(maxsize=1024)
def plan(n: int, c: int, s: int) -> Plan:
    block_s = min(next_pow2(s), _TILE)
    block_n = min(next_pow2(n), max(1, _TILE // block_s))
    tiles_s = triton.cdiv(s, block_s)
    tiles = triton.cdiv(n, block_n) * tiles_s
    partials, rounds = split_channel_reduction(tiles, c, _REDUCE_PROGRAMS)
    return Plan(block_n, block_s, tiles_s, tiles, partials, next_pow2(partials), rounds,
                8 if block_n * block_s >= _TILE else 4)


@triton.jit
def _div(a, b):
    """a / b correctly rounded (Triton's ``/`` on fp32 is an approximate division)."""
    return tl.math.div_rn(a, b)


@triton.jit
def _channel_tile(tile, c, N, C, S, TILES_S, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    """int64 offsets and mask of tile ``tile`` of channel ``c`` of x [N, C, S]."""
    n = (tile // TILES_S) * BLOCK_N + tl.arange(0, BLOCK_N)
    s = (tile % TILES_S) * BLOCK_S + tl.arange(0, BLOCK_S)
    offsets = (n.to(tl.int64)[:, None] * C + c) * S + s[None, :]
    return offsets, (n < N)[:, None] & (s < S)[None, :]


@triton.jit
def _reduction_tile(pid, r, N, C, S, TILES_S, TILES, P, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    """Offsets and mask of round ``r`` of reduction program ``pid`` = (c, p): tile p + r P of
    channel c, empty past the channel's last tile."""
    tile = pid % P + r * P
    offsets, mask = _channel_tile(tile, pid // P, N, C, S, TILES_S, BLOCK_N, BLOCK_S)
    return offsets, mask & (tile < TILES)


@triton.jit
def _elementwise_program(PARTIAL, TILES, P, WIDTH: tl.constexpr, P_BLOCK: tl.constexpr):
    """This elementwise program's channel c and tile, and the pointers (with their mask) to the
    first fields of channel c's P partials of WIDTH floats each."""
    pid = tl.program_id(0)
    c = pid // TILES
    i = tl.arange(0, P_BLOCK)
    return c, pid % TILES, PARTIAL + (c.to(tl.int64) * P + i) * WIDTH, i < P


@triton.jit(do_not_specialize=PROGRAM_INDEXING)
def _statistics_kernel(X, PARTIAL, N, C, S, TILES_S, TILES, P,
                       ROUNDS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    """Program (c, p) merges tiles p, p + P, ... (ROUNDS of them at most) of channel c into
    PARTIAL[c, p] = (count, mean, sum of squared deviations), one tile after the other with Chan's
    formula. A tile past the last is empty, and merging it changes nothing."""
    pid = tl.program_id(0)
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for r in range(ROUNDS):
        offsets, mask = _reduction_tile(pid, r, N, C, S, TILES_S, TILES, P, BLOCK_N, BLOCK_S)
        x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
        tile_count = tl.sum(mask.to(tl.float32))
        divisor = tl.maximum(tile_count, 1.0)
        tile_mean = _div(tl.sum(x), divisor)
        # the corrected two-pass sum: the deviations' own sum takes out the rounding error of
        # tile_mean (to first order), from the mean and from the squared deviations
        deviation = tl.where(mask, x - tile_mean, 0.0)
        deviation_sum = tl.sum(deviation)
        tile_mean = tile_mean + _div(deviation_sum, divisor)
        tile_m2 = tl.sum(deviation * deviation) - _div(deviation_sum * deviation_sum, divisor)
        merged = count + tile_count
        weight = _div(tile_count, tl.maximum(merged, 1.0))
        delta = tile_mean - mean
        mean = mean + delta * weight
        m2 = m2 + tile_m2 + delta * delta * (count * weight)
        count = merged
    tl.store(PARTIAL + pid.to(tl.int64) * 3, count)
    tl.store(PARTIAL + pid.to(tl.int64) * 3 + 1, mean)
    tl.store(PARTIAL + pid.to(tl.int64) * 3 + 2, m2)


@triton.jit(do_not_specialize=PROGRAM_INDEXING)
def _normalize_kernel(X, Y, PARTIAL, INVSTD, RUNNING_MEAN, RUNNING_VAR, momentum, eps, N, C, S, TILES_S, TILES, P,
                      UPDATE_RUNNING: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
                      P_BLOCK: tl.constexpr):
    """Program (c, t): channel c's statistics from its P partials (in a fixed order), then tile t
    normalised; tile 0's program also writes invstd and the running statistics of channel c."""
    c, tile, part, valid = _elementwise_program(PARTIAL, TILES, P, 3, P_BLOCK)
    counts = tl.load(part, mask=valid, other=0.0)
    means = tl.load(part + 1, mask=valid, other=0.0)
    total = tl.sum(counts)
    mean = _div(tl.sum(counts * means), total)
    spread = means - mean
    m2 = tl.sum(tl.load(part + 2, mask=valid, other=0.0)) + tl.sum(counts * spread * spread)
    invstd = _div(1.0, tl.sqrt_rn(_div(m2, total) + eps))
    if tile == 0:
        tl.store(INVSTD + c, invstd)
        if UPDATE_RUNNING:
            tl.store(RUNNING_MEAN + c, (1.0 - momentum) * tl.load(RUNNING_MEAN + c) + momentum * mean)
            tl.store(RUNNING_VAR + c, (1.0 - momentum) * tl.load(RUNNING_VAR + c) + momentum * _div(m2, total - 1.0))
    offsets, mask = _channel_tile(tile, c, N, C, S, TILES_S, BLOCK_N, BLOCK_S)
    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offsets, cast_out((x - mean) * invstd, Y.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=PROGRAM_INDEXING)
def _grad_sums_kernel(G, OUT, PARTIAL, N, C, S, TILES_S, TILES, P,
                      ROUNDS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    """Program (c, p): PARTIAL[c, p] = (sum g, sum g y) over tiles p, p + P, ... of channel c."""
    pid = tl.program_id(0)
    sum_g = 0.0
    sum_gy = 0.0
    for r in range(ROUNDS):
        offsets, mask = _reduction_tile(pid, r, N, C, S, TILES_S, TILES, P, BLOCK_N, BLOCK_S)
        g = tl.load(G + offsets, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(OUT + offsets, mask=mask, other=0.0).to(tl.float32)
        sum_g = sum_g + tl.sum(g)
        sum_gy = sum_gy + tl.sum(g * y)
    tl.store(PARTIAL + pid.to(tl.int64) * 2, sum_g)
    tl.store(PARTIAL + pid.to(tl.int64) * 2 + 1, sum_gy)


@triton.jit(do_not_specialize=PROGRAM_INDEXING)
def _grad_input_kernel(G, OUT, DX, PARTIAL, INVSTD, count, N, C, S, TILES_S, TILES, P,
                       BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, P_BLOCK: tl.constexpr):
    """Program (c, t): channel c's means of g and g y from its P partials, then dx on tile t."""
    c, tile, part, valid = _elementwise_program(PARTIAL, TILES, P, 2, P_BLOCK)
    mean_g = _div(tl.sum(tl.load(part, mask=valid, other=0.0)), count)
    mean_gy = _div(tl.sum(tl.load(part + 1, mask=valid, other=0.0)), count)
    invstd = tl.load(INVSTD + c)
    offsets, mask = _channel_tile(tile, c, N, C, S, TILES_S, BLOCK_N, BLOCK_S)
    g = tl.load(G + offsets, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(OUT + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + offsets, cast_out((g - mean_g - y * mean_gy) * invstd, DX.dtype.element_ty), mask=mask)


def _shape(x: torch.Tensor) -> Tuple[int, int, int]:
    return x.shape[0], x.shape[1], x.numel() // (x.shape[0] * x.shape[1])


def batch_norm_train_forward(
    x: torch.Tensor, running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
    momentum: float, eps: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y, invstd fp32 [C]) of contiguous x [N, C, ...] with more than one element per channel;
    the running statistics (contiguous fp32 [C], both or neither) are updated in place."""
    n, c, s = _shape(x)
    p = plan(n, c, s)
    y = torch.empty_like(x)
    invstd = torch.empty(c, dtype=torch.float32, device=x.device)
    partial = torch.empty((c, p.partials, 3), dtype=torch.float32, device=x.device)
    update = running_mean is not None
    with device_guard(x):
        _statistics_kernel[(c * p.partials,)](
            x, partial, n, c, s, p.tiles_s, p.tiles, p.partials,
            ROUNDS=p.rounds, BLOCK_N=p.block_n, BLOCK_S=p.block_s, num_warps=p.num_warps, **LAUNCH_OPTIONS)
        # without running statistics the flag keeps their pointers from being dereferenced
        _normalize_kernel[(c * p.tiles,)](
            x, y, partial, invstd, running_mean if update else invstd, running_var if update else invstd,
            float(momentum), float(eps), n, c, s, p.tiles_s, p.tiles, p.partials,
            UPDATE_RUNNING=update, BLOCK_N=p.block_n, BLOCK_S=p.block_s, P_BLOCK=p.partials_block,
            num_warps=p.num_warps, **LAUNCH_OPTIONS)
    return y, invstd


def batch_norm_train_backward(grad: torch.Tensor, out: torch.Tensor, invstd: torch.Tensor) -> torch.Tensor:
    """dx from the incoming gradient and the forward's output y and invstd (contiguous, one shape
    and dtype for grad and out; invstd fp32 [C])."""
    n, c, s = _shape(out)
    p = plan(n, c, s)
    dx = torch.empty_like(out)
    partial = torch.empty((c, p.partials, 2), dtype=torch.float32, device=out.device)
    with device_guard(out):
        _grad_sums_kernel[(c * p.partials,)](
            grad, out, partial, n, c, s, p.tiles_s, p.tiles, p.partials,
            ROUNDS=p.rounds, BLOCK_N=p.block_n, BLOCK_S=p.block_s, num_warps=p.num_warps, **LAUNCH_OPTIONS)
        _grad_input_kernel[(c * p.tiles,)](
            grad, out, dx, partial, invstd, float(n * s), n, c, s, p.tiles_s, p.tiles, p.partials,
            BLOCK_N=p.block_n, BLOCK_S=p.block_s, P_BLOCK=p.partials_block, num_warps=p.num_warps,
            **LAUNCH_OPTIONS)
    return dx
