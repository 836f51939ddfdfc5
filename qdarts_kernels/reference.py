"""Pure-PyTorch definitions of every op: the specification all backends are tested against.

These functions are differentiable with ordinary autograd and give exactly the gradients of the op
contract (DESIGN section 4); they are slow (one temporary per bit-width and per step) but obviously
right. Every fused backend must match them: bit for bit where the maths is exact, to a few ulps of
fp32 where only the order of a floating-point sum differs.

Quantizer ``Q(x; s, b)`` on a grid with integer range [qmin, qmax] and zero point z::

    inv_s = 1 / s                      (in fp32, as PyTorch's fake-quant kernels compute it)
    v     = x * inv_s + z
    r     = round_half_to_even(v)
    q     = clamp(r, qmin, qmax)
    Q     = (q - z) * s               (q - z = +0.0 for level 0, as PyTorch's integer levels give)
    in    = (qmin <= r <= qmax)        (the mask is taken on the rounded value, as in PyTorch)

The ``relu`` grid is ``Q(relu(x))`` on the unsigned grid with the ReLU's gradient folded in:
``in`` is also 0 where x <= 0 (exactly ``torch.relu`` followed by the unsigned quantizer, values,
zero signs and gradients alike; a quantized layer after a ReLU then keeps x, not the ReLU's output).

Arithmetic is fp32 for fp32/fp16/bf16 inputs (results cast back to the input dtype) and fp64 for
fp64 inputs (so that ``torch.autograd.gradcheck`` can run on the reference).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch

from ._functorch import AutogradForms, forward_ad_active
from ._validation import (
    check_mixed_fake_quant,
    check_mixed_fake_quant_grouped,
    check_mixed_op_sum,
    RELU_GRID,
    UNSIGNED_GRID,
    grid_params,
    single_bit_scales,
)

__all__ = ["fake_quant", "mixed_fake_quant", "mixed_fake_quant_grouped", "mixed_op_sum"]


def quantize_parts(x: torch.Tensor, s: torch.Tensor, bits: int, grid: int):
    """The pieces of ``Q(x; s, b)``: ``(q - z, in, inv_s)``, so that ``Q = (q - z) * s``."""
    if grid == RELU_GRID:
        q_minus_z, inside, inv_s = quantize_parts(torch.relu(x), s, bits, UNSIGNED_GRID)
        return q_minus_z, inside & (x > 0), inv_s  # relu's gradient: 0 where x <= 0
    qmin, qmax, z = grid_params(grid, bits)
    inv_s = 1.0 / s
    r = torch.round(x * inv_s + z)  # round half to even
    q = torch.clamp(r, qmin, qmax)
    # level 0 is +0.0, as PyTorch's fake-quant ops give it (their levels are integers), where round
    # gives -0.0 to a v in [-0.5, 0); q - z for z = 0.5 (midrise) is never 0
    return (q + 0.0 if z == 0 else q - z), (r >= qmin) & (r <= qmax), inv_s


def mixed_fake_quant_jvp(x, probs, scales, dx, dprobs, dscales, bits, grid: int, axis: int) -> torch.Tensor:
    """The forward-mode derivative of ``mixed_fake_quant`` (a tangent None is zero), the transpose of
    :func:`mixed_fake_quant_grads`, so that ``jacfwd`` and ``jacrev`` give one Jacobian::

        dy = dx * sum_k p_k in_k + sum_k (dp_k Q_k + p_k ((q_k - z) - (x * inv_s_k if in_k else 0)) ds_k)

    All tensors in one math dtype; ``axis`` -1 for per-tensor scales (then ds_k is one number per k)."""
    through_x = torch.zeros_like(x) if dx is not None else None
    dy = torch.zeros_like(x)
    for k, b in enumerate(bits):
        s = broadcast_scale(scales[k], x, axis)
        q_minus_z, inside, inv_s = quantize_parts(x, s, b, grid)
        if through_x is not None:
            through_x = through_x + probs[k] * inside
        if dprobs is not None:
            dy = dy + dprobs[k] * (q_minus_z * s)
        if dscales is not None:
            ds = broadcast_scale(dscales[k], x, axis)
            dy = dy + probs[k] * (q_minus_z - torch.where(inside, x * inv_s, 0.0)) * ds
    return dy if through_x is None else dy + through_x * dx


def _math_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def mixed_fake_quant_grads(grad, x, probs, scales, bits, grid: int, axis: int, need_dx, need_dprobs, need_dscales):
    """The contract's gradients of ``mixed_fake_quant``, written out (DESIGN section 4)::

        dx   = g * sum_k p_k in_k
        dp_k = sum(g * Q_k)
        ds_k = sum(g * p_k * ((q_k - z) - (x * inv_s_k if in_k else 0)))   (per channel when per channel)

    All arguments in one math dtype (fp32, or fp64); ``axis`` is -1 for per-tensor scales. The
    straight-through estimate is spelled out rather than left to autograd through ``round``: that
    would give dx = g * p * s * (1/s), and s * (1/s) is not exactly 1 in floating point, while
    PyTorch's learnable fake-quant gives exactly g * in. The select in ds (not in * x * inv_s) makes
    an out-of-range x = +-inf contribute (q - z) rather than NaN. Returns None where not needed.
    """
    dx = torch.zeros_like(x) if need_dx else None
    dps, dss = [], []
    for k, b in enumerate(bits):
        s = broadcast_scale(scales[k], x, axis)
        q_minus_z, inside, inv_s = quantize_parts(x, s, b, grid)
        if need_dx:
            dx = dx + probs[k] * inside
        if need_dprobs:
            dps.append((grad * (q_minus_z * s)).sum())
        if need_dscales:
            per_elem = grad * probs[k] * (q_minus_z - torch.where(inside, x * inv_s, 0.0))
            dss.append(per_elem.sum() if axis < 0 else per_elem.sum_to_size(s.shape).reshape(-1))
    return (
        grad * dx if need_dx else None,
        torch.stack(dps) if need_dprobs else None,
        torch.stack(dss) if need_dscales else None,
    )


@AutogradForms
class _MixedFakeQuant(torch.autograd.Function):
    """``sum_k p_k Q(x; s_k, b_k)`` in the math dtype, with the gradients of ``mixed_fake_quant_grads``."""

    # torch.func: setup_context for its grad, and vmap's rule generated from the torch ops below
    generate_vmap_rule = True

    @staticmethod
    def forward(x, probs, scales, bits, grid: int, axis: int):
        y = None
        for k, b in enumerate(bits):
            s = broadcast_scale(scales[k], x, axis)
            q_minus_z, _, _ = quantize_parts(x, s, b, grid)
            term = probs[k] * (q_minus_z * s)
            y = term if y is None else y + term
        return y

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, probs, scales, bits, grid, axis = inputs
        ctx.save_for_backward(x, probs, scales)
        if forward_ad_active():
            ctx.save_for_forward(x, probs, scales)
        ctx.args = (bits, grid, axis)

    @staticmethod
    def jvp(ctx, dx, dprobs, dscales, *_):
        return mixed_fake_quant_jvp(*ctx.saved_tensors, dx, dprobs, dscales, *ctx.args)

    @staticmethod
    def backward(ctx, grad):
        x, probs, scales = ctx.saved_tensors
        dx, dp, ds = mixed_fake_quant_grads(grad, x, probs, scales, *ctx.args, *ctx.needs_input_grad[:3])
        return dx, dp, ds, None, None, None


def broadcast_scale(scale_row: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    """A per-tensor scale as a 0-d tensor, or a per-channel row [C] shaped to broadcast on ``axis``."""
    if axis < 0:
        return scale_row.reshape(())
    shape = [1] * x.dim()
    shape[axis] = scale_row.numel()
    return scale_row.reshape(shape)


def mixed_fake_quant(
    x: torch.Tensor,
    probs: torch.Tensor,
    scales: torch.Tensor,
    bits: Sequence[int],
    *,
    grid: str = "signed",
    axis: Optional[int] = None,
) -> torch.Tensor:
    """Mixed-precision fake quantization, ``y = sum_k probs[k] * Q(x; scales[k], bits[k])``.

    Args:
        x: input, fp32/fp16/bf16 (fp64 accepted here for gradcheck), any shape.
        probs: shape [K], the weight of each bit-width (usually a softmax; not renormalised here).
        scales: shape [K] (per tensor) or [K, C] with C = x.shape[axis] (per channel).
        bits: K in 1..4 bit-widths, each in [1, 16].
        grid: "signed" | "unsigned" | "midrise" | "relu" (see module docstring).
        axis: channel dimension of x for per-channel scales, None for per-tensor.

    Gradients (g = incoming gradient)::

        dx    = g * sum_k p_k * in_k
        dp_k  = sum(g * Q_k)
        ds_k  = sum(g * p_k * ((q_k - z) - in_k * x / s_k))   (summed per channel when per channel)

    Returns a tensor of x's shape and dtype; accumulation in fp32 (fp64 for fp64 input).
    """
    bits, code, ax = check_mixed_fake_quant(x, probs, scales, bits, grid, axis)
    md = _math_dtype(x)
    return _MixedFakeQuant.apply(x.to(md), probs.to(md), scales.to(md), bits, code, ax).to(x.dtype)


def mixed_fake_quant_grouped(
    xs: Sequence[torch.Tensor],
    probs: Union[Sequence[torch.Tensor], torch.Tensor],
    scales: Sequence[torch.Tensor],
    bits: Sequence[int],
    *,
    grid: str = "signed",
    axis: Optional[int] = None,
    straight_through: bool = False,
) -> List[torch.Tensor]:
    """``mixed_fake_quant`` of N tensors that share one bit set and grid, by definition a loop::

        ys[i] = mixed_fake_quant(xs[i], probs[i], scales[i], bits, grid=grid, axis=axis)

    With ``straight_through`` the gradient of each x is the identity (the straight-through
    estimator that the paper's weight quantizers take), and the same values are returned::

        ys[i] = with_identity_gradient(mixed_fake_quant(xs[i].detach(), ...), xs[i])   (y's bits)

    Args:
        xs: N >= 1 tensors of any shapes (0 elements allowed), one dtype and one device.
        probs: N tensors [K], or one tensor [N, K] (row i for xs[i]).
        scales: N tensors, [K] (per tensor) or [K, C_i] with C_i = xs[i].shape[axis] (per channel).
        bits, grid, axis: as for ``mixed_fake_quant``, shared by all N (axis is normalised for
            each x separately, so axis=-1 means the last dimension of each).

    Gradients are those of the N single calls. The fused backends compute all N in one kernel
    launch (and one launch of a small reduction for the gradients of probs and scales).
    """
    xs, probs, scales, bits, _, _ = check_mixed_fake_quant_grouped(xs, probs, scales, bits, grid, axis)
    rows = probs.unbind(0) if isinstance(probs, torch.Tensor) else probs
    if not straight_through:
        return [mixed_fake_quant(x, p, s, bits, grid=grid, axis=axis) for x, p, s in zip(xs, rows, scales)]
    return [with_identity_gradient(mixed_fake_quant(x.detach(), p, s, bits, grid=grid, axis=axis), x)
            for x, p, s in zip(xs, rows, scales)]


@AutogradForms
class _IdentityGradient(torch.autograd.Function):
    """y's values, the incoming gradient passed unchanged to both y and x."""

    generate_vmap_rule = True

    @staticmethod
    def forward(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return y.view_as(y)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def jvp(ctx, dy, dx):  # the transpose of backward's (grad, grad)
        return dx if dy is None else dy if dx is None else dy + dx

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, grad


def with_identity_gradient(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y``'s values with ``x``'s gradient passing through unchanged (the straight-through
    estimator), y itself keeping its own gradients (those of the probabilities and scales). The
    values are y's bit for bit, which ``y + (x - x.detach())`` would not give where x is infinite
    (inf - inf is NaN); and no kernel runs."""
    return _IdentityGradient.apply(y, x)


def fake_quant(
    x: torch.Tensor,
    scale: torch.Tensor,
    bits: int,
    *,
    grid: str = "signed",
    axis: Optional[int] = None,
) -> torch.Tensor:
    """Single bit-width fake quantization ``Q(x; scale, bits)`` with learnable (LSQ) scale.

    ``scale`` is a one-element tensor (per tensor, axis=None) or has shape [C] (per channel along
    ``axis``). For the signed grid this is bit for bit ``torch.fake_quantize_per_tensor_affine`` /
    ``torch.fake_quantize_per_channel_affine`` with zero point 0, and its gradients are those of
    ``torch._fake_quantize_learnable_per_tensor_affine`` / ``_per_channel_affine`` with
    grad_factor 1:  dx = g * in,  dscale = sum(g * ((q - z) - in * x / s)).
    """
    scales = single_bit_scales(scale, bits, axis)
    md = _math_dtype(x) if isinstance(x, torch.Tensor) else torch.float32
    probs = torch.ones(1, dtype=md, device=x.device if isinstance(x, torch.Tensor) else scale.device)
    return mixed_fake_quant(x, probs, scales, (bits,), grid=grid, axis=axis)


def mixed_op_sum(
    outputs: Union[Sequence[torch.Tensor], torch.Tensor], weights: torch.Tensor
) -> torch.Tensor:
    """Weighted sum of K candidate-op outputs, ``y = sum_k weights[k] * outputs[k]``.

    ``outputs`` is a list of K tensors of one shape, dtype and device, or one tensor stacked along
    dim 0; ``weights`` has shape [K]. Accumulation in fp32 in the order k = 0, 1, ..., K-1; output in
    the outputs' dtype. Gradients: d outputs[k] = w_k * g,  d w_k = sum(g * outputs[k]).
    """
    outs = check_mixed_op_sum(outputs, weights)
    md = _math_dtype(outs[0])
    wm = weights.to(md)
    y = None
    for k, o in enumerate(outs):
        term = wm[k] * o.to(md)
        y = term if y is None else y + term
    return y.to(outs[0].dtype)
