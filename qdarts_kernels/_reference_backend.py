"""The ``reference`` backend: the backend interface (see ``_backends``) on top of ``reference``.

Forward runs the reference under no_grad; backward calls the reference's own gradient formulas, so
the gradients are by construction those of the specification.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from . import reference
from ._backends import loop_grouped_backward, loop_grouped_forward
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
    md = probs.dtype  # fp32, or fp64 for fp64 x
    dx, dp, ds = reference.mixed_fake_quant_grads(
        grad.to(md), x.to(md), probs, scales, tuple(bits), grid, axis, need_dx, need_dprobs, need_dscales
    )
    return (dx.to(x.dtype) if dx is not None else None), dp, ds


def mixed_op_sum_forward(outputs: List[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return reference.mixed_op_sum(outputs, weights)


def mixed_op_sum_backward(grad, outputs, weights, need_doutputs: bool, need_dweights: bool):
    md = weights.dtype  # fp32, or fp64 for fp64 outputs
    g = grad.to(md)
    douts = None
    if need_doutputs:
        douts = [(weights[k] * g).to(grad.dtype) for k in range(len(outputs))]
    dw = None
    if need_dweights:
        dw = torch.stack([(g * o.to(md)).sum() for o in outputs])
    return douts, dw


def mixed_fake_quant_grouped_forward(xs, probs, scales, bits, grid, axes):
    return loop_grouped_forward(mixed_fake_quant_forward, xs, probs, scales, bits, grid, axes)


def mixed_fake_quant_grouped_backward(grads, xs, probs, scales, bits, grid, axes, need_dx, need_dprobs, need_dscales):
    return loop_grouped_backward(mixed_fake_quant_backward, grads, xs, probs, scales, bits, grid, axes,
                                 need_dx, need_dprobs, need_dscales)
