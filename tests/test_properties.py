"""Property-based tests (hypothesis): every backend against the reference on random inputs.

Where tests/test_backends.py checks a fixed matrix, these draw the inputs: shapes of 0-4 dims
(zero-size and size-1 dims included), arbitrary strides (permuted, stepped, offset and broadcast
views, for x, probs, scales and the outputs alike), every axis (negative too), grids, bit sets of
1..4 widths in [1, 16] (repeats allowed), scales from 1e-30 to 1e30 (powers of two too, so that
rounding ties occur), fp32/bf16/fp16 data, parameters in fp32/bf16/fp16/fp64, arbitrary probs and
weights (zeros, negatives), and NaN / +-inf in x and in the outputs.

What must hold (DESIGN section 4):
  * forward: bit for bit the reference (NaN where the reference has NaN);
  * dx of mixed_fake_quant with K = 1 and d outputs of mixed_op_sum: bit for bit;
  * dx with K > 1 (sum over k in another order) and the reduced gradients dprobs, dscales,
    dweights (sums in another order): |backend - reference| <= rtol * sum |terms| (+ one rounding
    to the gradient's dtype), with the sum of absolute terms computed in float64. A single wrongly
    quantized element moves these sums by far more. NaN exactly where the reference has NaN.

``derandomize=True``: every run draws the same examples (CI reproducible); the number of examples
per backend keeps the file within its time budget (the Triton interpreter is slow, so it gets few
examples of small tensors).
"""

from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qdarts_kernels as qk
from qdarts_kernels import reference as ref
from qdarts_kernels._validation import GRIDS
from test_backends import _assert_exact, _leaf

# NaN and inf inputs make numpy (the Triton interpreter) warn about invalid and overflowing operations
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

#: examples per backend, and the most elements a drawn x (or one output) may have
EXAMPLES = {"reference": 40, "cpu": 120, "cuda": 120, "triton": 30}
MAX_NUMEL = {"reference": 20000, "cpu": 40000, "cuda": 40000, "triton": 600}

DATA_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PARAM_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
#: decimal exponents of the scales each parameter dtype can hold (fp16 stops near 6e-5 and 6.5e4)
SCALE_EXPONENTS = {torch.float16: (-3, 3)}
SCALE_EXPONENTS_WIDE = (-30, 30)
#: relative tolerance of a fp32 reduction summed in another order, against the sum of |terms|
SUM_RTOL = 3e-5
FP32_EPS = torch.finfo(torch.float32).eps
SPECIALS = (float("nan"), float("inf"), -float("inf"))


def _run(backend, strategy, check):
    """Run ``check(case)`` on the examples of ``strategy``, with the example count of ``backend``."""

    @settings(max_examples=EXAMPLES[backend], deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(case=strategy(MAX_NUMEL[backend]))
    def run(case):
        check(case)

    run()


# --------------------------------------------------------------------------------------------------
# strided views
# --------------------------------------------------------------------------------------------------


class View(NamedTuple):
    """How a tensor of ``shape`` sits in a 1-D storage: its dims stored in the order ``perm``
    (outermost first), each with a step, after ``offset`` elements; an ``expanded`` dim is stored
    once and broadcast (stride 0)."""

    shape: Tuple[int, ...]
    perm: Tuple[int, ...]
    steps: Tuple[int, ...]
    offset: int
    expanded: Tuple[bool, ...]

    def stored_shape(self) -> List[int]:
        return [1 if self.expanded[d] else self.shape[d] * self.steps[d] for d in self.perm]

    def storage_numel(self) -> int:
        return self.offset + math.prod(self.stored_shape())

    def apply(self, storage: torch.Tensor) -> torch.Tensor:
        t = storage[self.offset: self.storage_numel()].view(self.stored_shape())
        t = t[tuple(slice(None, None, self.steps[d]) for d in self.perm)]
        t = t.permute([self.perm.index(d) for d in range(len(self.shape))])
        return t.expand(self.shape)


@st.composite
def views(draw, shape: Sequence[int]) -> View:
    n = len(shape)
    contiguous = draw(st.booleans())
    if contiguous:
        return View(tuple(shape), tuple(range(n)), (1,) * n, 0, (False,) * n)
    return View(
        tuple(shape),
        tuple(draw(st.permutations(range(n)))),
        tuple(draw(st.lists(st.integers(1, 3), min_size=n, max_size=n))),
        draw(st.integers(0, 3)),
        tuple(draw(st.lists(st.sampled_from([False, False, False, True]), min_size=n, max_size=n))),
    )


class Arg(NamedTuple):
    """A tensor argument: its values in a CPU storage, and the view that the call sees."""

    storage: torch.Tensor
    view: View

    def on(self, device, requires_grad: bool) -> torch.Tensor:
        """The view over a copy of the storage on ``device``: a leaf with the drawn strides."""
        return self.view.apply(self.storage.to(device)).requires_grad_(requires_grad)

    def for_reference(self, requires_grad: bool) -> torch.Tensor:
        """A contiguous CPU leaf with the same values."""
        return _leaf(self.view.apply(self.storage), "cpu", requires_grad)


@st.composite
def args(draw, shape, make_values, dtype) -> Arg:
    """An Arg of ``shape`` and ``dtype``; ``make_values(n)`` gives n float64 values for the storage."""
    view = draw(views(shape))
    return Arg(make_values(view.storage_numel()).to(dtype), view)


@st.composite
def shapes(draw, max_numel: int, min_dims: int = 0) -> Tuple[int, ...]:
    """0-4 dims, mostly tiny (0, 1, a few) with now and then a long one, at most max_numel elements."""
    dims = []
    budget = max_numel
    for _ in range(draw(st.integers(min_dims, 4))):
        size = draw(st.one_of(st.integers(0, 5), st.integers(6, 300)))
        size = min(size, max(budget, 1))
        budget //= max(size, 1)
        dims.append(size)
    return tuple(dims)


def _generator(draw) -> torch.Generator:
    return torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))


def _with_specials(values: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """About one value in four replaced by NaN, inf or -inf."""
    which = torch.randint(0, 12, values.shape, generator=gen)
    out = values.clone()
    for i, special in enumerate(SPECIALS):
        out[which == i] = special
    return out


def _grad_for(y_shape, dtype, gen) -> torch.Tensor:
    return torch.randn(y_shape, generator=gen, dtype=torch.float64).to(dtype)


# --------------------------------------------------------------------------------------------------
# tolerance of reordered sums
# --------------------------------------------------------------------------------------------------


def _assert_sum_close(actual, expected, abs_terms, what, rtol=SUM_RTOL):
    """``actual`` equals ``expected`` up to the reordering of a sum whose absolute terms add up to
    ``abs_terms`` (float64), plus one rounding to the result dtype; NaN and inf exactly where the
    reference has them."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (
        f"{what}: {actual.shape} {actual.dtype} vs {expected.shape} {expected.dtype}")
    a, e = actual.detach().cpu().double(), expected.detach().double()
    nan = e.isnan()
    assert torch.equal(a.isnan(), nan), f"{what}: NaN at different places\n{a}\n{e}"
    info = torch.finfo(expected.dtype)
    diff = torch.where(a == e, 0.0, (a - e).abs())  # equal infinities are equal
    tol = rtol * abs_terms.double() + info.eps * e.abs() + info.tiny
    bad = ~nan & ~(diff <= tol)
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {bad.numel()} differ beyond the tolerance; "
        f"actual {a[bad][:5].tolist()} expected {e[bad][:5].tolist()} tolerance {tol[bad][:5].tolist()}")


def _abs_terms(x, probs, scales, bits, grid, axis, g):
    """Sums of |terms| of dx, dprobs and dscales (float64), from the reference's own pieces.

    dx:  sum_k |g p_k| in_k;  dp_k: sum |g Q_k|;  ds_k: sum |g p_k| (|q_k - z| + in_k |x / s_k|),
    summed per channel for per-channel scales.
    """
    xm, pm, sm = x.detach().float(), probs.detach().float(), scales.detach().float()
    gm = g.float()
    ax = -1 if axis is None else axis % x.dim()
    dx = torch.zeros(x.shape, dtype=torch.float64)
    dp, ds = [], []
    for k, b in enumerate(bits):
        s = ref.broadcast_scale(sm[k], xm, ax)
        q_minus_z, inside, inv_s = ref.quantize_parts(xm, s, b, GRIDS[grid])
        gp = (gm * pm[k]).double().abs()
        dx += gp * inside
        dp.append((gm.double() * (q_minus_z * s).double()).abs().sum())
        per_elem = gp * (q_minus_z.double().abs() + torch.where(inside, (xm * inv_s).double().abs(), 0.0))
        ds.append(per_elem.sum() if ax < 0 else per_elem.sum_to_size(s.shape).reshape(-1))
    return dx, torch.stack(dp), torch.stack(ds)


# --------------------------------------------------------------------------------------------------
# mixed_fake_quant (and fake_quant, its K = 1 case)
# --------------------------------------------------------------------------------------------------


class QuantCase(NamedTuple):
    x: Arg
    probs: Arg
    scales: Arg
    bits: Tuple[int, ...]
    grid: str
    axis: Optional[int]
    needs: Tuple[bool, bool, bool]
    grad_seed: int


@st.composite
def quant_cases(draw, max_numel: int) -> QuantCase:
    gen = _generator(draw)
    shape = draw(shapes(max_numel))
    dim = len(shape)
    axis = draw(st.one_of(st.none(), st.integers(-dim, dim - 1))) if dim else None
    bits = tuple(draw(st.lists(st.integers(1, 16), min_size=1, max_size=4)))
    grid = draw(st.sampled_from(list(GRIDS)))
    k = len(bits)
    x_dtype = draw(st.sampled_from(DATA_DTYPES))
    param_dtype = draw(st.sampled_from(PARAM_DTYPES))
    channels = 1 if axis is None else shape[axis]

    lo, hi = SCALE_EXPONENTS.get(param_dtype, SCALE_EXPONENTS_WIDE)
    exponent = draw(st.one_of(st.sampled_from([lo, 0, hi]), st.integers(lo, hi)))
    power_of_two = draw(st.booleans())
    two_exponent = round(exponent * math.log2(10))

    def scale_values(n):
        if power_of_two:  # exact reciprocals: x on a midpoint gives a rounding tie
            return 2.0 ** (two_exponent + torch.randint(-1, 2, (n,), generator=gen).double())
        return 10.0**exponent * (0.5 + 1.5 * torch.rand(n, generator=gen, dtype=torch.float64))

    scales = draw(args((k,) if axis is None else (k, channels), scale_values, param_dtype))

    def prob_values(n):
        p = torch.randn(n, generator=gen, dtype=torch.float64) * 10.0 ** torch.randint(-2, 3, (n,), generator=gen)
        return torch.where(torch.rand(n, generator=gen) < 0.2, 0.0, p)

    probs = draw(args((k,), prob_values, param_dtype))

    # x around the scales' clip range (a fraction to beyond it), on midpoints, or anywhere
    x_kind = draw(st.sampled_from(["range", "midpoints", "anywhere"]))
    spread = draw(st.sampled_from([0.01, 0.3, 1.0, 3.0]))
    clip = 2.0 ** (max(bits) - 1)
    zero_point = 0.5 if grid == "midrise" else 0.0
    specials = draw(st.booleans()) and draw(st.booleans())

    def x_values(n):
        if x_kind == "anywhere":
            v = torch.randn(n, generator=gen, dtype=torch.float64) * 10.0 ** torch.randint(-30, 31, (n,), generator=gen)
        else:
            v = torch.randn(n, generator=gen, dtype=torch.float64) * 10.0**exponent * clip * spread
            if x_kind == "midpoints":
                level = torch.randint(-int(clip) - 2, int(clip) + 2, (n,), generator=gen).double()
                v = torch.where(torch.rand(n, generator=gen) < 0.7, (level + 0.5 - zero_point) * 2.0**two_exponent, v)
        return _with_specials(v, gen) if specials else v

    x = draw(args(shape, x_values, x_dtype))
    needs = tuple(draw(st.lists(st.booleans(), min_size=3, max_size=3)))
    return QuantCase(x, probs, scales, bits, grid, axis, needs, draw(st.integers(0, 2**32 - 1)))


def check_quant_case(backend, device, case: QuantCase):
    nx, np_, ns = case.needs
    xb, pb, sb = case.x.on(device, nx), case.probs.on(device, np_), case.scales.on(device, ns)
    xr, pr, sr = case.x.for_reference(nx), case.probs.for_reference(np_), case.scales.for_reference(ns)
    what = f"{backend} bits={case.bits} grid={case.grid} axis={case.axis} x {list(xr.shape)} {xr.dtype}"
    yb = qk.mixed_fake_quant(xb, pb, sb, case.bits, grid=case.grid, axis=case.axis, backend=backend)
    yr = ref.mixed_fake_quant(xr, pr, sr, case.bits, grid=case.grid, axis=case.axis)
    assert yb.shape == xr.shape and yb.dtype == xr.dtype, what
    _assert_exact(yb.cpu(), yr, f"forward {what}")
    if len(case.bits) == 1:  # fake_quant is the K = 1 case with probs = [1]
        scale = sr.detach()[0]
        _assert_exact(qk.fake_quant(xb.detach(), scale.to(device), case.bits[0], grid=case.grid, axis=case.axis,
                                    backend=backend).cpu(),
                      ref.fake_quant(xr.detach(), scale, case.bits[0], grid=case.grid, axis=case.axis),
                      f"fake_quant forward {what}")
    if not any(case.needs):
        return
    g = _grad_for(yr.shape, yr.dtype, torch.Generator().manual_seed(case.grad_seed))
    yb.backward(g.to(device))
    yr.backward(g)
    dx_terms, dp_terms, ds_terms = _abs_terms(xr, pr, sr, case.bits, case.grid, case.axis, g)
    if nx:
        if len(case.bits) == 1:
            _assert_exact(xb.grad.cpu(), xr.grad, f"dx {what}")
        else:
            _assert_sum_close(xb.grad, xr.grad, dx_terms, f"dx {what}", rtol=4 * len(case.bits) * FP32_EPS)
    if np_:
        _assert_sum_close(pb.grad, pr.grad, dp_terms, f"dprobs {what}")
    if ns:
        _assert_sum_close(sb.grad, sr.grad, ds_terms.reshape(sr.shape), f"dscales {what}")


def test_mixed_fake_quant_properties(backend_device):
    backend, device = backend_device
    _run(backend, quant_cases, lambda case: check_quant_case(backend, device, case))


# --------------------------------------------------------------------------------------------------
# mixed_op_sum
# --------------------------------------------------------------------------------------------------


class SumCase(NamedTuple):
    outputs: Tuple[Arg, ...]  # K tensors, or one stacked [K, ...] tensor
    stacked: bool
    weights: Arg
    needs_outputs: Tuple[bool, ...]  # requires_grad of each output (of the stacked tensor when stacked)
    needs_weights: bool
    grad_seed: int


@st.composite
def sum_cases(draw, max_numel: int) -> SumCase:
    gen = _generator(draw)
    k = draw(st.integers(1, 10))
    shape = draw(shapes(max(max_numel // k, 1)))
    dtype = draw(st.sampled_from(DATA_DTYPES))
    magnitude = 10.0 ** draw(st.sampled_from([-30, -3, 0, 3, 30]))
    specials = draw(st.booleans()) and draw(st.booleans())

    def output_values(n):
        v = torch.randn(n, generator=gen, dtype=torch.float64) * magnitude
        return _with_specials(v, gen) if specials else v

    stacked = draw(st.booleans())
    if stacked:
        outputs = (draw(args((k, *shape), output_values, dtype)),)
    else:
        outputs = tuple(draw(args(shape, output_values, dtype)) for _ in range(k))

    def weight_values(n):
        w = torch.randn(n, generator=gen, dtype=torch.float64) * 10.0 ** torch.randint(-2, 3, (n,), generator=gen)
        return torch.where(torch.rand(n, generator=gen) < 0.2, 0.0, w)

    weights = draw(args((k,), weight_values, draw(st.sampled_from(PARAM_DTYPES))))
    needs_outputs = tuple(draw(st.lists(st.booleans(), min_size=len(outputs), max_size=len(outputs))))
    return SumCase(outputs, stacked, weights, needs_outputs, draw(st.booleans()), draw(st.integers(0, 2**32 - 1)))


def check_sum_case(backend, device, case: SumCase):
    nw = case.needs_weights
    outs_b = [o.on(device, n) for o, n in zip(case.outputs, case.needs_outputs)]
    if case.stacked:
        arg_b = outs_b[0]
        stacked = case.outputs[0].view.apply(case.outputs[0].storage)
        outs_r = [_leaf(o, "cpu", case.needs_outputs[0]) for o in stacked.unbind(0)]
    else:
        arg_b = outs_b
        outs_r = [o.for_reference(n) for o, n in zip(case.outputs, case.needs_outputs)]
    wb, wr = case.weights.on(device, nw), case.weights.for_reference(nw)
    what = f"{backend} K={len(outs_r)} shape {list(outs_r[0].shape)} {outs_r[0].dtype} stacked={case.stacked}"
    yb = qk.mixed_op_sum(arg_b, wb, backend=backend)
    yr = ref.mixed_op_sum(outs_r, wr)
    assert yb.shape == yr.shape and yb.dtype == yr.dtype, what
    _assert_exact(yb.cpu(), yr, f"forward {what}")
    if not (nw or any(case.needs_outputs)):
        return
    g = _grad_for(yr.shape, yr.dtype, torch.Generator().manual_seed(case.grad_seed))
    yb.backward(g.to(device))
    yr.backward(g)
    if case.stacked:
        grads_b = list(outs_b[0].grad.unbind(0)) if case.needs_outputs[0] else [None] * len(outs_r)
    else:
        grads_b = [o.grad for o in outs_b]
    for k, (a, e) in enumerate(zip(grads_b, outs_r)):
        if e.grad is None:
            assert a is None, f"d outputs[{k}] {what}: a gradient for an output that does not require one"
        else:
            _assert_exact(a.cpu(), e.grad, f"d outputs[{k}] {what}")
    if nw:
        terms = torch.stack([(g.double() * o.detach().double()).abs().sum() for o in outs_r])
        _assert_sum_close(wb.grad, wr.grad, terms, f"dweights {what}")


def test_mixed_op_sum_properties(backend_device):
    backend, device = backend_device
    _run(backend, sum_cases, lambda case: check_sum_case(backend, device, case))


# --------------------------------------------------------------------------------------------------
# non-finite probs and incoming gradients (x and the outputs get NaN/inf in the properties above)
# --------------------------------------------------------------------------------------------------

#: x inside the range of both bit-widths (0.1), inside the 8-bit range only (+-5), and non-finite
SPECIAL_X = torch.tensor([0.1, 5.0, -5.0, float("nan"), float("inf"), -float("inf"), 0.0])
SPECIAL_BITS, SPECIAL_SCALES = (2, 8), torch.tensor([0.5, 0.1])

def _special_case(backend, device, probs, grad):
    """Forward exact and every gradient with NaN/inf where the reference has them."""
    xb, pb, sb = (t.to(device).clone().requires_grad_() for t in (SPECIAL_X, probs, SPECIAL_SCALES))
    xr, pr, sr = (t.clone().requires_grad_() for t in (SPECIAL_X, probs, SPECIAL_SCALES))
    yb = qk.mixed_fake_quant(xb, pb, sb, SPECIAL_BITS, backend=backend)
    yr = ref.mixed_fake_quant(xr, pr, sr, SPECIAL_BITS)
    _assert_exact(yb.cpu(), yr, "forward")
    yb.backward(grad.to(device))
    yr.backward(grad)
    dx_terms, dp_terms, ds_terms = _abs_terms(xr, pr, sr, SPECIAL_BITS, "signed", None, grad)
    _assert_sum_close(xb.grad, xr.grad, dx_terms, "dx", rtol=8 * FP32_EPS)
    _assert_sum_close(pb.grad, pr.grad, dp_terms, "dprobs")
    _assert_sum_close(sb.grad, sr.grad, ds_terms, "dscales")


@pytest.mark.parametrize("special", SPECIALS, ids=str)
def test_non_finite_probs(backend_device, special, request):
    backend, device = backend_device
    _special_case(backend, device, torch.tensor([special, 0.5]), torch.ones_like(SPECIAL_X))


@pytest.mark.parametrize("probs", [torch.tensor([1.0]), torch.tensor([0.25, 0.75])], ids=["K=1", "K=2"])
def test_non_finite_incoming_gradient(backend_device, probs, request):
    backend, device = backend_device
    bits = SPECIAL_BITS[: len(probs)]
    grad = torch.tensor([float("inf"), -float("inf"), float("nan"), 1.0, float("inf"), 2.0, -float("inf")])
    xb = SPECIAL_X.to(device).clone().requires_grad_()
    xr = SPECIAL_X.clone().requires_grad_()
    qk.mixed_fake_quant(xb, probs.to(device), SPECIAL_SCALES[: len(probs)].to(device), bits,
                        backend=backend).backward(grad.to(device))
    ref.mixed_fake_quant(xr, probs, SPECIAL_SCALES[: len(probs)], bits).backward(grad)
    _assert_exact(xb.grad.cpu(), xr.grad, "dx")
