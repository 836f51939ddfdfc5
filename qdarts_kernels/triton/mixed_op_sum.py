"""The DARTS mixed-op sum in Triton: forward and backward kernels with their wrappers.

Maths (DESIGN section 4, ``qdarts_kernels.reference.mixed_op_sum``), K candidate outputs o_k::

    y = w_0 o_0;  y = y + w_k o_k        (k = 1..K-1, fp32, the reference's order: bit-exact in fp32)
    d o_k = w_k g
    d w_k = sum g o_k                    (fp32; per-program partials, then a fixed-order torch.sum)

The K outputs are passed to the kernel as a tuple of K pointers (the kernel is specialised on K), so
a list of separate tensors is read in place: no stacking copy. Forward reads each o_k once and writes
y once, (K + 1) element transfers; backward reads g, reads each o_k once if d w is wanted, and writes
each d o_k once if d outputs are wanted, at most 2K + 1.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._common import LAUNCH_OPTIONS, cast_out, device_guard, flat_block, tile_size


# W's alignment is not specialised on: its K weights are read one scalar at a time, and a row of the
# supernet's [edges, K] weights is 16-byte aligned or not by its index (two compiles for one kernel).
@triton.jit(do_not_specialize_on_alignment=["W"])
def _mixed_op_sum_forward_kernel(OUTS, W, Y, numel, K: tl.constexpr, BLOCK: tl.constexpr):
    """y = sum_k w_k o_k on one block. OUTS: tuple of K tensors of one shape and dtype."""
    offsets, mask = flat_block(tl.program_id(0), numel, BLOCK)
    y = tl.load(W) * tl.load(OUTS[0] + offsets, mask=mask).to(tl.float32)
    for k in tl.static_range(1, K):
        y = y + tl.load(W + k) * tl.load(OUTS[k] + offsets, mask=mask).to(tl.float32)
    tl.store(Y + offsets, cast_out(y, Y.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize_on_alignment=["W"])
def _mixed_op_sum_backward_kernel(
    G, OUTS, DOUTS, W, PART_W, numel,
    K: tl.constexpr, NEED_DOUTPUTS: tl.constexpr, NEED_DWEIGHTS: tl.constexpr, BLOCK: tl.constexpr,
):
    """d o_k = w_k g on one block, and this block's partial sums of d w_k into PART_W [programs, K]."""
    pid = tl.program_id(0)
    offsets, mask = flat_block(pid, numel, BLOCK)
    g = tl.load(G + offsets, mask=mask, other=0.0).to(tl.float32)
    for k in tl.static_range(K):
        if NEED_DOUTPUTS:
            tl.store(DOUTS[k] + offsets, cast_out(tl.load(W + k) * g, DOUTS[k].dtype.element_ty), mask=mask)
        if NEED_DWEIGHTS:
            o = tl.load(OUTS[k] + offsets, mask=mask, other=0.0).to(tl.float32)
            tl.store(PART_W + pid.to(tl.int64) * K + k, tl.sum(g * o, axis=0))


def mixed_op_sum_forward(outputs: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """``y = sum_k weights[k] * outputs[k]`` (prepared: K contiguous tensors of one shape and dtype,
    contiguous fp32 weights [K])."""
    first = outputs[0]
    y = torch.empty_like(first)
    numel = first.numel()
    if numel == 0:
        return y
    tile = tile_size(numel, "mixed_op_sum_forward")
    with device_guard(first):
        _mixed_op_sum_forward_kernel[(triton.cdiv(numel, tile.elements),)](
            tuple(outputs), weights, y, numel,
            K=len(outputs), BLOCK=tile.elements, num_warps=tile.num_warps, **LAUNCH_OPTIONS,
        )
    return y


def mixed_op_sum_backward(
    grad: torch.Tensor,
    outputs: Sequence[torch.Tensor],
    weights: torch.Tensor,
    need_doutputs: bool,
    need_dweights: bool,
) -> Tuple[Optional[List[torch.Tensor]], Optional[torch.Tensor]]:
    """(d outputs as a list | None, d weights fp32 | None), only what is requested."""
    if not (need_doutputs or need_dweights):
        return None, None
    k = len(outputs)
    numel = grad.numel()
    douts = [torch.empty_like(grad) for _ in range(k)] if need_doutputs else None
    if numel == 0:
        return douts, (weights.new_zeros(k, dtype=torch.float32) if need_dweights else None)
    tile = tile_size(numel, "mixed_op_sum_backward")
    programs = triton.cdiv(numel, tile.elements)
    part_w = torch.empty((programs, k), dtype=torch.float32, device=grad.device) if need_dweights else None
    with device_guard(grad):
        # an argument that is not needed is never dereferenced (constexpr flags); pass what is there
        _mixed_op_sum_backward_kernel[(programs,)](
            grad, tuple(outputs), tuple(douts) if douts is not None else tuple(outputs), weights,
            grad if part_w is None else part_w, numel,
            K=k, NEED_DOUTPUTS=need_doutputs, NEED_DWEIGHTS=need_dweights, BLOCK=tile.elements,
            num_warps=tile.num_warps, **LAUNCH_OPTIONS,
        )
    return douts, (part_w.sum(dim=0) if need_dweights else None)
