"""The weight gradient of a depthwise 2-D convolution, for few channels, in Triton.

PyTorch's CUDA depthwise convolution computes its weight gradient with one thread block per
(channel, kernel row, kernel column): a 3x3 depthwise conv over 4 channels runs 36 blocks, each
summing over the whole batch. In a DARTS supernet (separable and dilated convs on a few partial
channels) that kernel took 59 ms of a CIFAR-size step's GPU time at batch 256 (1272 calls, 46 us
each; ``bench/results/h100-2026-11-27-profile-cifar-b256.txt``). Here each channel's sum is split over
many programs and finished by a fixed-order sum (deterministic, no atomics).

Maths, for input x [N, C, H, W], output gradient g [N, C, Ho, Wo], kernel KH x KW, stride (SH, SW),
padding (PH, PW), dilation (DH, DW), one filter per channel (groups = C = output channels)::

    dw[c, 0, i, j] = sum_{n, ho, wo} g[n, c, ho, wo] * x[n, c, ho SH - PH + i DH, wo SW - PW + j DW]

(x outside its bounds is the zero padding), summed in fp32. A work item is a block of BLOCK_H
output rows of one image plane; program (c, p) takes items p, p + P, ... of channel c and writes
its KH * KW partial sums; ``torch.sum`` over the P partials finishes them.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import torch
import triton
import triton.language as tl

from ._common import LAUNCH_OPTIONS, REDUCE_PROGRAMS, device_guard, next_pow2, split_channel_reduction

#: Elements of the output-gradient block one program loads per item.
_TILE = 4096
#: Reduction programs in all (see ``split_channel_reduction``); tests lower it.
_REDUCE_PROGRAMS = REDUCE_PROGRAMS
#: Widest output row a block holds (wider maps take PyTorch's kernel).
MAX_WIDTH = _TILE


class Plan(NamedTuple):
    block_h: int
    block_w: int
    row_blocks: int
    items: int
    partials: int
    rounds: int
    num_warps: int


@functools.lru_cache(maxsize=1024)
def plan(n: int, c: int, ho: int, wo: int) -> Plan:
    block_w = next_pow2(wo)
    block_h = min(next_pow2(ho), max(1, _TILE // block_w))
    row_blocks = triton.cdiv(ho, block_h)
    items = n * row_blocks
    partials, rounds = split_channel_reduction(items, c, _REDUCE_PROGRAMS)
    return Plan(block_h, block_w, row_blocks, items, partials, rounds, 8 if block_h * block_w >= _TILE else 4)


# C and the program counts only place programs (C multiplies whole planes): compiled without Triton's
# specialisation on their values, which changes no load, so that a network's many shapes share compiles.
@triton.jit(do_not_specialize=["C", "ROW_BLOCKS", "ITEMS", "P"])
def _weight_grad_kernel(G, X, PARTIAL, C, H, W, HO, WO, ROW_BLOCKS, ITEMS, P,
                        KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                        PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                        TAPS_BLOCK: tl.constexpr, ROUNDS: tl.constexpr, BLOCK_H: tl.constexpr,
                        BLOCK_W: tl.constexpr):
    """Program (c, p): PARTIAL[c, p, i * KW + j] = the sum over its items of g * (x shifted by tap
    (i, j)); the item's g block is loaded once, x once per tap (from cache after the first)."""
    pid = tl.program_id(0)
    c = pid // P
    taps = tl.arange(0, TAPS_BLOCK)
    acc = tl.zeros([TAPS_BLOCK], dtype=tl.float32)
    for r in range(ROUNDS):
        item = pid % P + r * P
        plane = (item // ROW_BLOCKS).to(tl.int64) * C + c  # image n, channel c
        ho = (item % ROW_BLOCKS) * BLOCK_H + tl.arange(0, BLOCK_H)
        wo = tl.arange(0, BLOCK_W)
        out_mask = ((ho < HO)[:, None] & (wo < WO)[None, :]) & (item < ITEMS)
        g = tl.load(G + (plane * HO + ho[:, None]) * WO + wo[None, :], mask=out_mask, other=0.0).to(tl.float32)
        for tap in tl.static_range(KH * KW):
            hi = ho * SH - PH + (tap // KW) * DH
            wi = wo * SW - PW + (tap % KW) * DW
            in_mask = out_mask & ((hi >= 0) & (hi < H))[:, None] & ((wi >= 0) & (wi < W))[None, :]
            x = tl.load(X + (plane * H + hi[:, None]) * W + wi[None, :], mask=in_mask, other=0.0).to(tl.float32)
            acc = acc + tl.where(taps == tap, tl.sum(g * x), 0.0)
    tl.store(PARTIAL + pid.to(tl.int64) * (KH * KW) + taps, acc, mask=taps < KH * KW)


def supports(x: torch.Tensor, weight_shape: Sequence[int], groups: int, output_width: int) -> bool:
    """Whether this kernel computes the weight gradient of ``conv2d(x, w, groups=groups)``: a
    depthwise conv with one filter per channel, x 4-D in fp32/fp16/bf16, rows of at most MAX_WIDTH."""
    return (x.dim() == 4 and groups == x.shape[1] == weight_shape[0] and weight_shape[1] == 1
            and x.dtype in (torch.float32, torch.float16, torch.bfloat16) and 0 < output_width <= MAX_WIDTH)


def depthwise_conv2d_weight_grad(grad: torch.Tensor, x: torch.Tensor, kernel_size: Sequence[int],
                                 stride: Sequence[int], padding: Sequence[int],
                                 dilation: Sequence[int]) -> torch.Tensor:
    """dw [C, 1, KH, KW] in fp32 of a depthwise conv (see :func:`supports`), from contiguous grad
    [N, C, Ho, Wo] and x [N, C, H, W] of one dtype."""
    n, c, h, w = x.shape
    ho, wo = grad.shape[2], grad.shape[3]
    kh, kw = kernel_size
    if grad.numel() == 0:
        return torch.zeros((c, 1, kh, kw), dtype=torch.float32, device=x.device)
    p = plan(n, c, ho, wo)
    partial = torch.empty((c, p.partials, kh * kw), dtype=torch.float32, device=x.device)
    with device_guard(x):
        _weight_grad_kernel[(c * p.partials,)](
            grad, x, partial, c, h, w, ho, wo, p.row_blocks, p.items, p.partials,
            KH=kh, KW=kw, SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1], DH=dilation[0], DW=dilation[1],
            TAPS_BLOCK=next_pow2(kh * kw), ROUNDS=p.rounds, BLOCK_H=p.block_h, BLOCK_W=p.block_w,
            num_warps=p.num_warps, **LAUNCH_OPTIONS)
    return partial.sum(dim=1).reshape(c, 1, kh, kw)
