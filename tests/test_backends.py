"""Every backend against the pure-PyTorch reference: forward and every gradient.

One parametrised matrix serves all backends (reference, cpu, triton, cuda; see conftest.py). The
forward is compared *exactly* (every backend computes the same fp32 operations in the same order,
with no fused multiply-add), so a wrong rounding tie or a wrong clamp shows up as a mismatch. The
input gradient is exact for K = 1 (it is g * in) and within a few ulps otherwise; the reduced
gradients (probs, scales, weights) differ from the reference only by summation order, so they are
compared with a tolerance far below the contribution of a single wrongly quantized element.
"""

import zlib

import pytest
import torch

import qdarts_kernels as qk
from qdarts_kernels import reference as ref
from qdarts_kernels._validation import grid_params, GRIDS

BIT_SETS = [(8,), (2, 4), (2, 4, 8), (1, 3, 5, 16)]
GRID_NAMES = list(GRIDS)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _scales_for(x: torch.Tensor, bits, grid: str, axis, gen) -> torch.Tensor:
    """Per-bit scales that put part of x outside the clip range (so masks are exercised)."""
    code = GRIDS[grid]
    base = x.detach().float().abs().mean().clamp_min(1e-3) * 2.0
    rows = []
    for b in bits:
        qmax = grid_params(code, b).qmax
        s = base / max(qmax, 1.0)
        if axis is None:
            rows.append(s * (0.5 + torch.rand((), generator=gen)))
        else:
            rows.append(s * (0.5 + torch.rand(x.shape[axis], generator=gen)))
    return torch.stack(rows).float()


def _probs(k: int, gen) -> torch.Tensor:
    return torch.softmax(torch.randn(k, generator=gen), 0)


def _leaf(t: torch.Tensor, device, requires_grad: bool = True) -> torch.Tensor:
    """A fresh leaf copy of t on device (never t itself, so the reference's inputs stay untouched)."""
    return t.detach().to(device).clone().requires_grad_(requires_grad)


def _assert_exact(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


def _abs_term_sums(x, probs, scales, bits, grid, axis, g):
    """sum |g * Q_k| and sum |g * p_k * ((q_k - z) - in_k * x / s_k)| (per channel), in fp64.

    The scale of each reduced gradient's rounding error: the sums may cancel to a small value while
    their terms are large (16-bit grids with tiny scales), so tolerances are relative to these.
    """
    code = GRIDS[grid]
    ax = -1 if axis is None else axis % x.dim()
    xf, gd = x.float(), g.double()
    dp, ds = [], []
    for k, b in enumerate(bits):
        s = ref.broadcast_scale(scales[k].float(), xf, ax)
        q_minus_z, inside, inv_s = ref.quantize_parts(xf, s, b, code)
        dp.append((gd * (q_minus_z * s).double()).abs().sum())
        t = (gd * float(probs[k]) * (q_minus_z - torch.where(inside, xf * inv_s, 0.0)).double()).abs()
        ds.append(t.sum() if ax < 0 else t.sum_to_size(s.shape).reshape(-1))
    return torch.stack(dp), torch.stack(ds)


def _assert_reduction_close(actual, expected, abs_sum, what):
    bound = 4e-6 * abs_sum + 1e-6
    err = (actual.double() - expected.double()).abs()
    bad = ~(err <= bound) & ~(actual.isnan() & expected.isnan())
    assert not bool(bad.any()), f"{what}: |error| {err[bad].tolist()} exceeds {bound[bad].tolist()}"


def check_mixed_fake_quant(backend, device, x, probs, scales, bits, grid, axis, grad=None, needs=(True, True, True)):
    """Compare forward and the requested gradients of one call with the reference on CPU."""
    gen = torch.Generator().manual_seed(1)
    xb, pb, sb = (_leaf(t, device, n) for t, n in zip((x, probs, scales), needs))
    xr, pr, sr = (_leaf(t, "cpu", n) for t, n in zip((x, probs, scales), needs))
    yb = qk.mixed_fake_quant(xb, pb, sb, bits, grid=grid, axis=axis, backend=backend)
    yr = ref.mixed_fake_quant(xr, pr, sr, bits, grid=grid, axis=axis)
    assert yb.dtype == x.dtype and yb.shape == x.shape
    _assert_exact(yb.cpu(), yr, f"forward {backend} bits={bits} grid={grid} axis={axis} {x.dtype}")
    if not any(needs):
        return
    g = grad if grad is not None else torch.randn(x.shape, generator=gen).to(x.dtype)
    yb.backward(g.to(device))
    yr.backward(g)
    if needs[0]:
        if len(bits) == 1:
            _assert_exact(xb.grad.cpu(), xr.grad, "dx")
        else:
            tol = 1e-6 if x.dtype == torch.float32 else 1e-2
            torch.testing.assert_close(xb.grad.cpu(), xr.grad, rtol=tol, atol=tol, msg=lambda m: f"dx: {m}")
    if needs[1] or needs[2]:
        dp_abs, ds_abs = _abs_term_sums(x, probs, scales, bits, grid, axis, g)
    if needs[1]:
        _assert_reduction_close(pb.grad.cpu(), pr.grad, dp_abs, "dprobs")
    if needs[2]:
        _assert_reduction_close(sb.grad.cpu(), sr.grad, ds_abs.reshape(sr.grad.shape), "dscales")


@pytest.mark.parametrize("bits", BIT_SETS, ids=lambda b: "b" + "-".join(map(str, b)))
@pytest.mark.parametrize("grid", GRID_NAMES)
@pytest.mark.parametrize("axis", [None, 1])
def test_mixed_fake_quant_matrix(backend_device, bits, grid, axis):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(zlib.crc32(repr((bits, grid, axis)).encode()))
    x = torch.randn(3, 5, 7, 11, generator=gen) * 2
    scales = _scales_for(x, bits, grid, axis, gen)
    check_mixed_fake_quant(backend, device, x, _probs(len(bits), gen), scales, bits, grid, axis)


@pytest.mark.parametrize(
    "shape,axis",
    [((0,), None), ((1,), None), ((7,), None), ((4097,), None), ((0, 3), 1), ((5, 1), 1), ((13, 6), 0),
     ((2, 3, 17, 5), -1), ((2, 3, 17, 5), 2), ((1, 1, 1), 0)],
    ids=str,
)
def test_mixed_fake_quant_shapes(backend_device, shape, axis):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=gen) * 3
    bits = (2, 4, 8)
    scales = _scales_for(x, bits, "signed", axis, gen) if x.numel() else torch.ones(
        (3,) if axis is None else (3, x.shape[axis]))
    check_mixed_fake_quant(backend, device, x, _probs(3, gen), scales, bits, "signed", axis)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("axis", [None, 0])
def test_mixed_fake_quant_dtypes(backend_device, dtype, axis):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(9, 301, generator=gen) * 2).to(dtype)
    for bits in [(4,), (2, 4, 8)]:
        scales = _scales_for(x, bits, "unsigned", axis, gen)
        check_mixed_fake_quant(backend, device, x, _probs(len(bits), gen), scales, bits, "unsigned", axis)


@pytest.mark.parametrize("grid", GRID_NAMES)
def test_rounding_ties_are_half_to_even(backend_device, grid):
    """x placed exactly on the midpoints between levels: a floor(v + 0.5) rounding fails here."""
    backend, device = backend_device
    z = grid_params(GRIDS[grid], 4).zero_point
    s = 0.25  # a power of two, so x * (1/s) + z is exact and lands exactly on .5
    n = torch.arange(-20, 21, dtype=torch.float32)
    x = (n + 0.5 - z) * s
    v = x / s + z
    assert torch.equal(v - v.floor(), torch.full_like(v, 0.5))
    scales = torch.tensor([s])
    check_mixed_fake_quant(backend, device, x, torch.ones(1), scales, (4,), grid, None)
    y = qk.mixed_fake_quant(x.to(device), torch.ones(1, device=device), scales.to(device), (4,), grid=grid,
                            backend=backend).cpu()
    qmin, qmax, _ = grid_params(GRIDS[grid], 4)
    expected = (torch.round(v).clamp(qmin, qmax) - z) * s
    assert torch.equal(y, expected)
    assert not torch.equal(y, (torch.floor(v + 0.5).clamp(qmin, qmax) - z) * s)


#: Inputs where the relu grid's floor can go wrong: zeros of both signs, the smallest denormals
#: (x * inv_s underflows to 0 for the scale 4 below, yet x > 0 passes the gradient), ties at
#: +-0.5 levels, negatives that round to level 0 (in range for the unsigned grid, not for relu),
#: infinities; NaN separately (it makes the reduced gradients NaN).
RELU_FLOOR_VALUES = [-0.0, 0.0, -1e-45, 1e-45, -0.1, -0.125, 0.125, -0.375, 0.375, -1.0, 0.9, 3.0, 100.0, -100.0,
                     float("inf"), float("-inf")]


def _relu_floor_input(dtype, with_nan: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(11)
    special = torch.tensor(RELU_FLOOR_VALUES + ([float("nan")] if with_nan else []))
    x = torch.cat([special, torch.randn(6 * 29 - special.numel(), generator=gen) * 2]).reshape(6, 29)
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("axis", [None, 0])
def test_relu_grid_at_the_floor(backend_device, dtype, axis):
    """The relu grid equals relu followed by the unsigned grid where it matters most: at and
    around x = 0, zero signs included."""
    backend, device = backend_device
    scales = torch.tensor([[4.0], [0.25], [1.0]]) if axis is None else torch.tensor([[4.0] * 6, [0.25] * 6,
                                                                                      [0.5, 1, 2, 3, 4, 5]])
    scales = scales.reshape(3) if axis is None else scales
    probs = torch.tensor([0.2, 0.5, 0.3])
    x = _relu_floor_input(dtype, with_nan=False)
    check_mixed_fake_quant(backend, device, x, probs, scales, (2, 4, 8), "relu", axis)
    check_mixed_fake_quant(backend, device, x, probs[:1] / probs[0], scales[:1], (4,), "relu", axis)  # dx exact
    xn = _relu_floor_input(dtype, with_nan=True)
    check_mixed_fake_quant(backend, device, xn, probs, scales, (2, 4, 8), "relu", axis, needs=(True, False, False))
    y = qk.mixed_fake_quant(xn.to(device), probs.to(device), scales.to(device), (2, 4, 8), grid="relu", axis=axis,
                            backend=backend).cpu()
    want = ref.mixed_fake_quant(torch.relu(xn), probs, scales, (2, 4, 8), grid="unsigned", axis=axis)
    number = ~want.isnan()  # the sign of a NaN is not specified (bf16 relu flips it)
    assert torch.equal(torch.signbit(y)[number], torch.signbit(want)[number]), "zero signs differ from relu + unsigned"


@pytest.mark.parametrize("dtype", [torch.float64, *DTYPES], ids=str)
@pytest.mark.parametrize("axis", [None, 0])
def test_reference_relu_grid_is_relu_then_unsigned(dtype, axis):
    """The spec of the relu grid: torch.relu, then the unsigned grid; the same values (zero signs
    included) and the same gradients (up to the sign of a zero gradient) as autograd through the two."""
    x = _relu_floor_input(dtype, with_nan=False)
    probs = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    scales = (torch.tensor([4.0, 0.25, 1.0]) if axis is None else torch.rand(3, 6) + 0.1).to(probs.dtype)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    results = []
    for fused in (True, False):
        leaves = [t.clone().requires_grad_() for t in (x, probs, scales)]
        xin, p, s = leaves
        y = (ref.mixed_fake_quant(xin, p, s, (2, 4, 8), grid="relu", axis=axis) if fused
             else ref.mixed_fake_quant(torch.relu(xin), p, s, (2, 4, 8), grid="unsigned", axis=axis))
        results.append((y, *torch.autograd.grad(y, leaves, g)))
    (y, *grads), (y_want, *grads_want) = results
    assert torch.equal(y, y_want) and torch.equal(torch.signbit(y), torch.signbit(y_want))
    for got, want in zip(grads, grads_want):
        assert torch.equal(got, want)


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True),
                                   (True, True, False), (False, False, False)], ids=str)
def test_mixed_fake_quant_partial_gradients(backend_device, needs):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 33, generator=gen)
    bits = (2, 8)
    check_mixed_fake_quant(backend, device, x, _probs(2, gen), _scales_for(x, bits, "midrise", 0, gen), bits,
                           "midrise", 0, needs=needs)


def test_mixed_fake_quant_non_contiguous(backend_device):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(11)
    base = torch.randn(8, 12, 10, generator=gen)
    x = base.transpose(0, 2)[:, ::2]  # non-contiguous view, shape [10, 6, 8]
    assert not x.is_contiguous()
    bits = (2, 4)
    check_mixed_fake_quant(backend, device, x, _probs(2, gen), _scales_for(x, bits, "signed", 1, gen), bits,
                           "signed", 1)


def _channels_last(shape, gen):
    return torch.randn(shape, generator=gen).to(memory_format=torch.channels_last)


def _permuted_3d(shape, gen):
    # dense, its dims in memory in the order (2, 0, 1): a permutation of a contiguous tensor
    return torch.randn(shape[2], shape[0], shape[1], generator=gen).permute(1, 2, 0)


# (x, per-channel axis): activations per tensor and per channel, weights [Co, Ci, kh, kw] per output
# channel, all channels_last; a permuted 3-D tensor; a channels_last tensor with H = 1 (size-1 dims)
LAYOUT_CASES = {
    "channels_last": (_channels_last, (2, 5, 4, 3), None),
    "channels_last-axis1": (_channels_last, (2, 5, 4, 3), 1),
    "channels_last-weights-axis0": (_channels_last, (6, 4, 3, 3), 0),
    "permuted_3d": (_permuted_3d, (7, 6, 5), None),
    "permuted_3d-axis2": (_permuted_3d, (7, 6, 5), 2),
    "channels_last-h1-axis1": (_channels_last, (3, 4, 1, 5), 1),
}


@pytest.mark.parametrize("case", LAYOUT_CASES)
def test_mixed_fake_quant_keeps_the_layout(backend_device, case):
    """A dense input that is not contiguous gives an output and dx with its strides (no copy to NCHW),
    the values those of the same op on x.contiguous(): bit for bit forward and for dx, the
    reductions within their tolerance; a grad in another layout gives dx in x's layout all the same."""
    backend, device = backend_device
    make, shape, axis = LAYOUT_CASES[case]
    gen = torch.Generator().manual_seed(13)
    x = make(shape, gen).to(device)
    assert not x.is_contiguous()
    bits = (2, 4, 8)
    probs, scales = _probs(3, gen).to(device), _scales_for(x.cpu(), bits, "signed", axis, gen).to(device)
    g = torch.randn(shape, generator=gen).to(device)
    results = []
    g_like_x = torch.empty_like(x).copy_(g)
    # first the baseline on x.contiguous(); then x with a grad in its layout, and in another (contiguous)
    for xi, gi in ((x.contiguous(), g), (x, g_like_x), (x, g)):
        xl, pl, sl = (_leaf(t, device) for t in (xi, probs, scales))
        y = qk.mixed_fake_quant(xl, pl, sl, bits, axis=axis, backend=backend)
        # autograd.grad: the .grad of a leaf takes the leaf's strides whatever the op returns
        dx, dp, ds = torch.autograd.grad(y, (xl, pl, sl), gi)
        assert y.stride() == xl.stride() and dx.stride() == xl.stride(), (y.stride(), dx.stride())
        results.append((y.detach(), dx, dp, ds))
    dp_abs, ds_abs = _abs_term_sums(x.cpu(), probs.cpu(), scales.cpu(), bits, "signed", axis, g.cpu())
    (y0, dx0, dp0, ds0), *others = results
    for y, dx, dp, ds in others:
        _assert_exact(y, y0, "forward against x.contiguous()")
        _assert_exact(dx, dx0, "dx against x.contiguous()")
        _assert_reduction_close(dp.cpu(), dp0.cpu(), dp_abs, "dprobs")
        _assert_reduction_close(ds.cpu(), ds0.cpu(), ds_abs.reshape(ds.shape), "dscales")
    check_mixed_fake_quant(backend, device, x.cpu(), probs.cpu(), scales.cpu(), bits, "signed", axis)


def test_mixed_fake_quant_not_dense_input_gives_contiguous_results(backend_device):
    """An input with gaps (a slice of a channels_last tensor) has no memory order to keep: it is copied to
    a contiguous tensor, as before, and so are the output and dx."""
    backend, device = backend_device
    gen = torch.Generator().manual_seed(14)
    x = _channels_last((2, 5, 6, 3), gen).to(device)[:, :, ::2]
    bits = (2, 4)
    probs, scales = _probs(2, gen).to(device), _scales_for(x.cpu(), bits, "signed", 1, gen).to(device)
    xl = x.detach().requires_grad_()
    y = qk.mixed_fake_quant(xl, probs, scales, bits, axis=1, backend=backend)
    dx, = torch.autograd.grad(y, xl, torch.ones_like(y))
    assert y.is_contiguous() and dx.is_contiguous()
    _assert_exact(y, qk.mixed_fake_quant(x.contiguous(), probs, scales, bits, axis=1, backend=backend), "forward")


def test_mixed_fake_quant_special_values(backend_device):
    """NaN and +-inf behave as in the reference (no crash, no silent change)."""
    backend, device = backend_device
    x = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 1e-30, 3.0])
    bits = (2, 4)
    scales = torch.tensor([0.5, 0.125])
    probs = torch.tensor([0.25, 0.75])
    grad = torch.ones_like(x)
    check_mixed_fake_quant(backend, device, x, probs, scales, bits, "signed", None, grad=grad,
                           needs=(True, True, False))
    finite = x[torch.isfinite(x)]
    check_mixed_fake_quant(backend, device, finite, probs, scales, bits, "signed", None)


def test_mixed_fake_quant_deterministic(backend_device):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(64, 129, generator=gen).to(device)
    probs, scales = _probs(3, gen).to(device), _scales_for(x, (2, 4, 8), "signed", None, gen).to(device)
    g = torch.randn(x.shape, generator=gen).to(device)
    grads = []
    for _ in range(2):
        p, s = probs.clone().requires_grad_(), scales.clone().requires_grad_()
        qk.mixed_fake_quant(x, p, s, (2, 4, 8), backend=backend).backward(g)
        grads.append((p.grad, s.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_fake_quant_matches_torch(backend_device):
    """Single-bit signed fake_quant is bit for bit PyTorch's fake-quant, forward and gradients."""
    backend, device = backend_device
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(4, 6, 9, generator=gen) * 2
    # level 0 from below (round gives -0.0 there, PyTorch +0.0), zeros of both signs, ties around 0
    x.view(-1)[:12] = torch.tensor([-1e-3, -0.005, -0.0185, -1e-30, -0.0, 0.0, 1e-3, -0.01855, 0.01855, -0.0371,
                                    -0.05565, 0.05565])
    g = torch.randn(x.shape, generator=gen)
    for bits in (2, 4, 8):
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        # per tensor
        s = torch.tensor([0.0371])
        xb, sb = _leaf(x, device), _leaf(s, device)
        y = qk.fake_quant(xb, sb, bits, backend=backend)
        want = torch.fake_quantize_per_tensor_affine(x, 0.0371, 0, qmin, qmax)
        _assert_exact(y.cpu(), want, "per-tensor fwd")
        assert torch.equal(torch.signbit(y.cpu()), torch.signbit(want)), "the sign of a zero differs from PyTorch's"
        y.backward(g.to(device))
        xt, st = x.clone().requires_grad_(), s.clone().requires_grad_()
        torch._fake_quantize_learnable_per_tensor_affine(xt, st, torch.zeros(1), qmin, qmax, 1.0).backward(g)
        _assert_exact(xb.grad.cpu(), xt.grad, "per-tensor dx")
        torch.testing.assert_close(sb.grad.cpu(), st.grad, rtol=1e-5, atol=1e-4)
        # per channel, on two different axes
        for axis in (0, 2):
            c = x.shape[axis]
            sc = 0.02 + torch.rand(c, generator=gen) * 0.1
            zp = torch.zeros(c, dtype=torch.int32)
            xb, sb = _leaf(x, device), _leaf(sc, device)
            y = qk.fake_quant(xb, sb, bits, axis=axis, backend=backend)
            want = torch.fake_quantize_per_channel_affine(x, sc, zp, axis, qmin, qmax)
            _assert_exact(y.cpu(), want, "per-channel fwd")
            assert torch.equal(torch.signbit(y.cpu()), torch.signbit(want)), "the sign of a zero differs"
            y.backward(g.to(device))
            xt, st = x.clone().requires_grad_(), sc.clone().requires_grad_()
            torch._fake_quantize_learnable_per_channel_affine(xt, st, zp.float(), axis, qmin, qmax, 1.0).backward(g)
            _assert_exact(xb.grad.cpu(), xt.grad, "per-channel dx")
            torch.testing.assert_close(sb.grad.cpu(), st.grad, rtol=1e-5, atol=1e-4)


def test_fake_quant_keeps_a_nan_where_pytorchs_clips_it(backend_device):
    """Where the README's "bit for bit PyTorch's" ends: a NaN in x stays NaN in y and reaches the scale's
    gradient (a diverging run shows it), while PyTorch's kernels put it on the lowest level; the other
    elements are PyTorch's, and their dx too."""
    backend, device = backend_device
    x = torch.tensor([float("nan"), 0.1, -0.3, 2.0])
    xb, sb = _leaf(x, device), _leaf(torch.tensor([0.1]), device)
    y = qk.fake_quant(xb, sb, 8, backend=backend)
    y.sum().backward()
    want = torch.fake_quantize_per_tensor_affine(x, 0.1, 0, -128, 127)
    assert want[0] == -12.8 and torch.isnan(y[0]) and torch.isnan(sb.grad).all()
    _assert_exact(y[1:].cpu(), want[1:], "finite elements")
    _assert_exact(xb.grad[1:].cpu(), torch.ones(3), "finite elements' dx")


# --------------------------------------------------------------------------------------------------
# mixed_op_sum
# --------------------------------------------------------------------------------------------------


def check_mixed_op_sum(backend, device, outputs, weights, needs=(True, True), stacked=False):
    gen = torch.Generator().manual_seed(4)
    ob = [_leaf(o, device, needs[0]) for o in outputs]
    orf = [_leaf(o, "cpu", needs[0]) for o in outputs]
    wb, wr = _leaf(weights, device, needs[1]), _leaf(weights, "cpu", needs[1])
    arg = torch.stack(ob) if stacked else ob
    yb = qk.mixed_op_sum(arg, wb, backend=backend)
    yr = ref.mixed_op_sum(orf, wr)
    _assert_exact(yb.cpu(), yr, f"mixed_op_sum forward {backend}")
    if not any(needs):
        return
    g = torch.randn(yr.shape, generator=gen).to(yr.dtype)
    yb.backward(g.to(device))
    yr.backward(g)
    if needs[0]:
        for a, b in zip(ob, orf):
            _assert_exact(a.grad.cpu(), b.grad, "d outputs")
    if needs[1]:
        abs_sum = torch.stack([(g.double() * o.double()).abs().sum() for o in outputs])
        _assert_reduction_close(wb.grad.cpu(), wr.grad, abs_sum, "d weights")


@pytest.mark.parametrize("k", [1, 2, 5, 8, 35])  # 35: the last node sum of a 4-step supernet cell
@pytest.mark.parametrize("shape", [(0,), (1,), (3, 7), (2, 5, 9, 7), (4099,)], ids=str)
def test_mixed_op_sum_matrix(backend_device, k, shape):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(k * 31 + len(shape))
    outs = [torch.randn(shape, generator=gen) for _ in range(k)]
    check_mixed_op_sum(backend, device, outs, torch.softmax(torch.randn(k, generator=gen), 0))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mixed_op_sum_dtypes_and_stacked(backend_device, dtype):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(8)
    outs = [torch.randn(3, 257, generator=gen).to(dtype) for _ in range(8)]
    w = torch.softmax(torch.randn(8, generator=gen), 0)
    check_mixed_op_sum(backend, device, outs, w)
    check_mixed_op_sum(backend, device, outs, w, stacked=True)


@pytest.mark.parametrize("needs", [(True, False), (False, True), (False, False)], ids=str)
def test_mixed_op_sum_partial_gradients(backend_device, needs):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(6)
    outs = [torch.randn(5, 31, generator=gen) for _ in range(3)]
    check_mixed_op_sum(backend, device, outs, torch.rand(3, generator=gen), needs=needs)


def test_mixed_op_sum_non_contiguous(backend_device):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(12)
    outs = [torch.randn(9, 14, generator=gen).t() for _ in range(4)]
    check_mixed_op_sum(backend, device, outs, torch.rand(4, generator=gen))


@pytest.mark.parametrize("needs", [(True, True), (True, False)], ids=["all", "outputs"])
def test_mixed_op_sum_keeps_the_layout(backend_device, needs):
    """channels_last outputs give a channels_last sum and d outputs (the outputs kept for d weights or
    not, whatever the layout of grad), the values those of contiguous outputs; outputs in differing
    layouts take the first one's (the others are brought to it)."""
    backend, device = backend_device
    gen = torch.Generator().manual_seed(15)
    outs = [_channels_last((2, 5, 4, 3), gen) for _ in range(3)]
    w = torch.softmax(torch.randn(3, generator=gen), 0)
    check_mixed_op_sum(backend, device, outs, w, needs=needs)
    g = torch.randn(2, 5, 4, 3, generator=gen)
    yr = ref.mixed_op_sum(outs, w)
    douts_r = [w[k] * g for k in range(3)]
    other_layout = outs[2].permute(0, 3, 2, 1).contiguous().permute(0, 3, 2, 1)
    for layouts in (outs, [outs[0], outs[1].contiguous(), other_layout], [o.contiguous() for o in outs]):
        for grad in (g, g.to(memory_format=torch.channels_last)):
            ob = [_leaf(o, device, needs[0]) for o in layouts]
            wb = _leaf(w, device, needs[1])
            y = qk.mixed_op_sum(ob, wb, backend=backend)
            douts = torch.autograd.grad(y, ob, grad.to(device))
            assert y.stride() == ob[0].stride()
            assert all(d.stride() == ob[0].stride() for d in douts), [d.stride() for d in douts]
            _assert_exact(y.cpu(), yr, "forward")
            for d, dr in zip(douts, douts_r):
                _assert_exact(d.cpu(), dr.to(d.dtype), "d outputs")
