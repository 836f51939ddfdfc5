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
    """The contract's gradients written out (autograd is not available inside a custom op)::

        dx = g * sum_k p_k in_k,  dp_k = sum(g * Q_k),  ds_k = sum(g * p_k * ((q_k - z) - in_k x / s_k))
    """
    md = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf, g = x.to(md), grad.to(md)
    dx = torch.zeros_like(xf) if need_dx else None
    dps, dss = [], []
    for k, b in enumerate(bits):
        s = reference.broadcast_scale(scales[k], xf, axis)
        q_minus_z, inside, inv_s = reference.quantize_parts(xf, s, b, grid)
        if need_dx:
            dx = dx + probs[k] * inside
        if need_dprobs:
            dps.append((g * (q_minus_z * s)).sum())
        if need_dscales:
            per_elem = g * probs[k] * (q_minus_z - torch.where(inside, xf * inv_s, 0.0))
            dss.append(per_elem.sum() if axis < 0 else per_elem.sum_to_size(s.shape).reshape(-1))
    return (
        (g * dx).to(x.dtype) if need_dx else None,
        torch.stack(dps) if need_dprobs else None,
        torch.stack(dss) if need_dscales else None,
    )


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
