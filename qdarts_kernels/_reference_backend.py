"""The ``reference`` backend: the backend interface (see ``_backends``) on top of ``reference``.

Forward runs the reference under no_grad; backward differentiates the reference with autograd, so
the gradients are by construction those of the specification.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from . import reference
from ._validation import GRIDS

_GRID_NAMES = {code: name for name, code in GRIDS.items()}


def _axis(axis: int) -> Optional[int]:
    return None if axis < 0 else axis


def mixed_fake_quant_forward(x, probs, scales, bits: Sequence[int], grid: int, axis: int) -> torch.Tensor:
    with torch.no_grad():
        return reference.mixed_fake_quant(x, probs, scales, tuple(bits), grid=_GRID_NAMES[grid], axis=_axis(axis))


def mixed_fake_quant_backward(
    grad, x, probs, scales, bits, grid, axis, need_dx: bool, need_dprobs: bool, need_dscales: bool
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    needs = (need_dx, need_dprobs, need_dscales)
    if not any(needs):
        return None, None, None
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_(need_dx), probs.detach().requires_grad_(need_dprobs),
                  scales.detach().requires_grad_(need_dscales)]
        y = reference.mixed_fake_quant(leaves[0], leaves[1], leaves[2], tuple(bits), grid=_GRID_NAMES[grid],
                                       axis=_axis(axis))
        wanted = [t for t, n in zip(leaves, needs) if n]
        got = iter(torch.autograd.grad(y, wanted, grad, allow_unused=True))
    out = []
    for t, n in zip(leaves, needs):
        g = next(got) if n else None
        if n and g is None:
            g = torch.zeros_like(t)
        out.append(g)
    dx, dp, ds = out
    return dx, (dp.float() if dp is not None else None), (ds.float() if ds is not None else None)


def mixed_op_sum_forward(outputs: List[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return reference.mixed_op_sum(outputs, weights)


def mixed_op_sum_backward(grad, outputs, weights, need_doutputs: bool, need_dweights: bool):
    douts = None
    if need_doutputs:
        w = weights.float()
        douts = [(w[k] * grad.float()).to(grad.dtype) for k in range(len(outputs))]
    dw = None
    if need_dweights:
        g = grad.float()
        dw = torch.stack([(g * o.float()).sum() for o in outputs])
    return douts, dw
