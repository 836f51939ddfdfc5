"""mixed_fake_quant_grouped: N tensors in one call, on every backend, against the single op.

Output i must equal ``mixed_fake_quant(xs[i], probs[i], scales[i], ...)`` bit for bit, and the
gradients those of the reference up to the order of the sums (same tolerances as
test_backends.py). The groups mix shapes (odd sizes, empty tensors, different ranks) so that the
fused kernels' per-tensor tables, tiling and segment reductions are exercised. On a GPU the last
test checks the point of the op with the profiler: one kernel forward whatever N, the main kernel
plus one reduction backward, and no host sync.
"""

import contextlib
import zlib

import pytest
import torch

import qdarts_kernels as qk
from qdarts_kernels import reference as ref
from test_backends import (
    BIT_SETS,
    GRID_NAMES,
    _abs_term_sums,
    _assert_exact,
    _assert_reduction_close,
    _leaf,
    _probs,
    _scales_for,
)
from conftest import require_backend
from test_ops import CPU_SIDE_BACKENDS

# Groups of shapes; per channel along axis 1 or -1 (each x normalises it for itself). "large"
# spans several tiles per tensor per tensor, "tall" several row blocks per channel (kept apart:
# a per-channel group with thousands of channels is slow under the Triton interpreter).
GROUPS = {
    "one": [(5, 6, 3)],
    "mixed": [(7, 3, 3, 3), (0, 3), (1, 1), (4, 5, 2), (2, 9)],
    "seven": [(3, 4), (17, 2), (2, 1, 3), (0, 5, 1), (8, 3), (1, 7), (6, 2, 2)],
    "large": [(2, 4100), (3, 5), (64, 37)],
    "tall": [(40, 6, 9), (130, 2)],
}
PER_TENSOR_ONLY, PER_CHANNEL_ONLY = {"large"}, {"tall"}


def _group(shapes, bits, grid, axis, dtype, gen):
    xs = [(torch.randn(s, generator=gen) * 2).to(dtype) for s in shapes]
    scales = [
        _scales_for(x, bits, grid, axis, gen) if x.numel()
        else torch.ones((len(bits),) if axis is None else (len(bits), x.shape[axis]))
        for x in xs
    ]
    return xs, [_probs(len(bits), gen) for _ in xs], scales


def check_grouped(backend, device, xs, probs, scales, bits, grid, axis, needs=(True, True, True), stacked=False):
    """Forward of every tensor exactly the single op's; gradients close to the reference's."""
    gen = torch.Generator().manual_seed(3)
    n = len(xs)
    xb = [_leaf(x, device, needs[0]) for x in xs]
    sb = [_leaf(s, device, needs[2]) for s in scales]
    pb = _leaf(torch.stack(probs), device, needs[1]) if stacked else [_leaf(p, device, needs[1]) for p in probs]
    ys = qk.mixed_fake_quant_grouped(xb, pb, sb, bits, grid=grid, axis=axis, backend=backend)
    assert len(ys) == n
    what = f"{backend} bits={bits} grid={grid} axis={axis} {xs[0].dtype}"
    for i in range(n):
        assert ys[i].shape == xs[i].shape and ys[i].dtype == xs[i].dtype
        single = qk.mixed_fake_quant(xb[i].detach(), probs[i].to(device), scales[i].to(device), bits, grid=grid,
                                     axis=axis, backend=backend)
        _assert_exact(ys[i].cpu(), single.cpu(), f"forward[{i}] vs single op, {what}")
        yr = ref.mixed_fake_quant(xs[i], probs[i], scales[i], bits, grid=grid, axis=axis)
        _assert_exact(ys[i].cpu(), yr, f"forward[{i}] vs reference, {what}")
    if not any(needs):
        return
    gs = [torch.randn(x.shape, generator=gen).to(x.dtype) for x in xs]
    torch.autograd.backward(ys, [g.to(device) for g in gs])
    dprobs = pb.grad.cpu() if stacked else None
    for i in range(n):
        xr, pr, sr = (_leaf(t, "cpu", need) for t, need in zip((xs[i], probs[i], scales[i]), needs))
        ref.mixed_fake_quant(xr, pr, sr, bits, grid=grid, axis=axis).backward(gs[i])
        if needs[0]:
            if len(bits) == 1:
                _assert_exact(xb[i].grad.cpu(), xr.grad, f"dx[{i}]")
            else:
                tol = 1e-6 if xs[i].dtype == torch.float32 else 1e-2
                torch.testing.assert_close(xb[i].grad.cpu(), xr.grad, rtol=tol, atol=tol,
                                           msg=lambda m: f"dx[{i}]: {m}")
        dp_abs, ds_abs = _abs_term_sums(xs[i], probs[i], scales[i], bits, grid, axis, gs[i])
        if needs[1]:
            got = dprobs[i] if stacked else pb[i].grad.cpu()
            _assert_reduction_close(got, pr.grad, dp_abs, f"dprobs[{i}]")
        if needs[2]:
            assert sb[i].grad.shape == scales[i].shape
            _assert_reduction_close(sb[i].grad.cpu(), sr.grad, ds_abs.reshape(sr.grad.shape), f"dscales[{i}]")


@pytest.mark.parametrize("group", list(GROUPS))
@pytest.mark.parametrize("axis", [None, 1, -1])
def test_grouped_shapes(backend_device, group, axis):
    if (axis is None and group in PER_CHANNEL_ONLY) or (axis is not None and group in PER_TENSOR_ONLY):
        pytest.skip("group not used with this layout")
    backend, device = backend_device
    shapes = GROUPS[group]
    if axis is not None:
        shapes = [s for s in shapes if len(s) > 1]
    bits = (2, 4, 8)
    gen = torch.Generator().manual_seed(zlib.crc32(repr((group, axis)).encode()))
    check_grouped(backend, device, *_group(shapes, bits, "signed", axis, torch.float32, gen), bits, "signed", axis)


@pytest.mark.parametrize("bits", BIT_SETS, ids=lambda b: "b" + "-".join(map(str, b)))
@pytest.mark.parametrize("grid", GRID_NAMES)
@pytest.mark.parametrize("axis", [None, 0])
def test_grouped_bits_and_grids(backend_device, bits, grid, axis):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(zlib.crc32(repr((bits, grid, axis)).encode()))
    xs, probs, scales = _group([(3, 5, 7), (6, 11), (2, 3)], bits, grid, axis, torch.float32, gen)
    check_grouped(backend, device, xs, probs, scales, bits, grid, axis)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("axis", [None, 1])
def test_grouped_dtypes_and_stacked_probs(backend_device, dtype, axis):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(17)
    xs, probs, scales = _group([(4, 9, 3), (5, 2), (2, 33)], (2, 8), "unsigned", axis, dtype, gen)
    check_grouped(backend, device, xs, probs, scales, (2, 8), "unsigned", axis, stacked=True)


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True),
                                   (False, True, True), (False, False, False)], ids=str)
def test_grouped_partial_gradients(backend_device, needs):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(5)
    xs, probs, scales = _group([(6, 33), (3, 2)], (2, 4), "midrise", 0, torch.float32, gen)
    check_grouped(backend, device, xs, probs, scales, (2, 4), "midrise", 0, needs=needs)


def test_grouped_unused_output_and_deterministic(backend_device):
    """An output left out of the loss gets zero gradients; two backward passes agree bit for bit."""
    backend, device = backend_device
    gen = torch.Generator().manual_seed(9)
    xs, probs, scales = _group([(40, 30), (7, 3)], (2, 4, 8), "signed", None, torch.float32, gen)
    grads = []
    for _ in range(2):
        pb = _leaf(torch.stack(probs), device)
        sb = [_leaf(s, device) for s in scales]
        ys = qk.mixed_fake_quant_grouped([x.to(device) for x in xs], pb, sb, (2, 4, 8), backend=backend)
        (ys[0] * 3).sum().backward()
        grads.append((pb.grad.cpu(), [s.grad.cpu() for s in sb]))
    assert torch.equal(grads[0][0][1], torch.zeros(3)) and torch.equal(grads[0][1][1], torch.zeros(3))
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.equal(a, b) for a, b in zip(grads[0][1], grads[1][1]))


# --------------------------------------------------------------------------------------------------
# as a PyTorch operator
# --------------------------------------------------------------------------------------------------


def _op_args(backend, per_channel):
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(s, generator=gen).requires_grad_() for s in [(4, 3, 5), (2, 3), (0, 3)]]
    probs = torch.softmax(torch.randn(3, 2, generator=gen), 1).requires_grad_()
    scales = [(torch.rand((2, 3) if per_channel else (2,), generator=gen) * 0.2 + 0.05).requires_grad_()
              for _ in xs]
    return xs, probs, scales, [2, 4], 0, [1, 1, 1] if per_channel else [-1, -1, -1], backend


@pytest.mark.parametrize("backend", CPU_SIDE_BACKENDS)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("straight_through", [False, True])
def test_opcheck_grouped(backend, per_channel, straight_through):
    args = _op_args(backend, per_channel)
    torch.library.opcheck(torch.ops.qdarts.mixed_fake_quant_grouped.default, args + (straight_through,))
    xs, probs, scales, *rest = args
    grads = [torch.randn(x.shape) for x in xs]
    probs_t = probs.detach().t().contiguous().t()  # [N, K] with strides (1, N): the gradient is contiguous
    for p, needs in [(probs, (True, True, True)), (probs, (False, True, False)), (probs, (False, False, True)),
                     (probs_t, (False, True, False))]:
        torch.library.opcheck(torch.ops.qdarts.mixed_fake_quant_grouped_backward.default,
                              (grads, [x.detach() for x in xs], p.detach(), [s.detach() for s in scales],
                               *rest, *needs))


@pytest.mark.parametrize("backend", CPU_SIDE_BACKENDS)
@pytest.mark.parametrize("scales_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_opcheck_grouped_backward_with_half_precision_scales(backend, scales_dtype):
    """The grouped backward's flat dscales is in the math dtype (fp32), whatever the scales' dtype (each
    part is cast back by _split_like): the fake says so, as compiled code trusts it."""
    xs, probs, scales, *rest = _op_args(backend, False)
    scales = [s.detach().to(scales_dtype) for s in scales]
    grads = [torch.randn(x.shape) for x in xs]
    args = (grads, [x.detach() for x in xs], probs.detach(), scales, *rest)
    for needs in [(False, False, True), (True, True, True)]:
        torch.library.opcheck(torch.ops.qdarts.mixed_fake_quant_grouped_backward.default, args + needs)
        assert torch.ops.qdarts.mixed_fake_quant_grouped_backward(*args, *needs)[-1].dtype == torch.float32


def _grouped_layouts_args(backend, per_channel):
    """_op_args with xs in other layouts: channels_last, a permuted 3-D tensor, contiguous, one with
    gaps (a slice of a channels_last tensor)."""
    gen = torch.Generator().manual_seed(6)
    xs = [torch.randn(2, 3, 4, 5, generator=gen).to(memory_format=torch.channels_last),
          torch.randn(5, 3, 4, generator=gen).permute(2, 1, 0),
          torch.randn(4, 3, generator=gen),
          torch.randn(2, 3, 4, 10, generator=gen).to(memory_format=torch.channels_last)[..., ::2]]
    probs = torch.softmax(torch.randn(len(xs), 2, generator=gen), 1)
    scales = [torch.rand((2, 3) if per_channel else (2,), generator=gen) * 0.2 + 0.05 for _ in xs]
    return xs, probs, scales, [2, 4], 0, [1] * len(xs) if per_channel else [-1] * len(xs), backend


@pytest.mark.parametrize("backend", CPU_SIDE_BACKENDS)
@pytest.mark.parametrize("per_channel", [False, True])
def test_grouped_keeps_each_tensor_s_layout(backend, per_channel):
    """Each y and dx has its x's strides where x is dense (contiguous where it is not), the fakes
    say so (opcheck), and the values are the single op's on x.contiguous(): bit for bit forward and
    for dx, the reductions within their tolerance."""
    xs, probs, scales, bits, grid, axes, _ = _grouped_layouts_args(backend, per_channel)
    axis = 1 if per_channel else None
    torch.library.opcheck(torch.ops.qdarts.mixed_fake_quant_grouped.default,
                          ([x.requires_grad_() for x in xs], probs, scales, bits, grid, axes, backend, False))
    gen = torch.Generator().manual_seed(7)
    gs = [torch.randn(x.shape, generator=gen) for x in xs]
    torch.library.opcheck(torch.ops.qdarts.mixed_fake_quant_grouped_backward.default,
                          (gs, [x.detach() for x in xs], probs, scales, bits, grid, axes, backend, True, True, True))
    # xs as they are (_leaf's clone would make the one with gaps dense)
    xl, pl, sl = [x.detach().requires_grad_() for x in xs], _leaf(probs, "cpu"), [_leaf(s, "cpu") for s in scales]
    ys = qk.mixed_fake_quant_grouped(xl, pl, sl, bits, axis=axis, backend=backend)
    grads = torch.autograd.grad(ys, [*xl, pl, *sl], gs)
    dxs, dp, dss = grads[:len(xs)], grads[len(xs)], grads[len(xs) + 1:]
    for i, (x, y, dx) in enumerate(zip(xl, ys, dxs)):
        strides = x.stride() if i < 3 else x.contiguous().stride()
        assert y.stride() == strides and dx.stride() == strides, (i, y.stride(), dx.stride(), strides)
        xc, pc, sc = _leaf(x.contiguous(), "cpu"), _leaf(probs[i], "cpu"), _leaf(scales[i], "cpu")
        yc = qk.mixed_fake_quant(xc, pc, sc, bits, axis=axis, backend=backend)
        dxc, dpc, dsc = torch.autograd.grad(yc, (xc, pc, sc), gs[i])
        _assert_exact(y.detach(), yc.detach(), f"forward[{i}]")
        _assert_exact(dx, dxc, f"dx[{i}]")
        dp_abs, ds_abs = _abs_term_sums(xs[i].detach(), probs[i], scales[i], bits, "signed", axis, gs[i])
        _assert_reduction_close(dp[i], dpc, dp_abs, f"dprobs[{i}]")
        _assert_reduction_close(dss[i], dsc, ds_abs.reshape(dsc.shape), f"dscales[{i}]")


class _GroupedNet(torch.nn.Module):
    """Two linear layers whose weights are quantized per channel by one grouped call."""

    def __init__(self, backend, straight_through=False):
        super().__init__()
        self.backend = backend
        self.straight_through = straight_through
        self.lin1, self.lin2 = torch.nn.Linear(8, 6), torch.nn.Linear(6, 4)
        self.logits = torch.nn.Parameter(torch.zeros(2, 3))
        self.scales = torch.nn.ParameterList([torch.nn.Parameter(torch.full((3, c), 0.05)) for c in (6, 4)])

    def forward(self, x):
        w1, w2 = qk.mixed_fake_quant_grouped([self.lin1.weight, self.lin2.weight], torch.softmax(self.logits, 1),
                                             list(self.scales), (2, 4, 8), axis=0, backend=self.backend,
                                             straight_through=self.straight_through)
        return torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(x, w1, self.lin1.bias)), w2,
                                          self.lin2.bias)


@pytest.mark.parametrize("straight_through", [False, True])
@pytest.mark.parametrize("backend", [b for b in CPU_SIDE_BACKENDS if b != "triton"])
def test_grouped_torch_compile_fullgraph(backend, straight_through):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _GroupedNet(backend, straight_through)
    x = torch.randn(5, 8)
    eager = model(x)
    eager.sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    out = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager)
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g)


@pytest.mark.parametrize("axis", [None, 0])
def test_grouped_straight_through(backend_device, axis):
    """The same values; each x's gradient is its output's gradient as it is (also on the
    reference, and for an output outside the loss: none); probs and scales get the same gradients
    as without, bit for bit."""
    backend, device = backend_device
    gen = torch.Generator().manual_seed(7)
    xs = [torch.randn(s, generator=gen) for s in [(5, 3, 2), (4, 3), (6, 3, 1, 1)]]
    probs = torch.softmax(torch.randn(3, 3, generator=gen), 1)
    scales = [torch.rand((3,) if axis is None else (3, x.shape[0]), generator=gen) * 0.3 + 0.05 for x in xs]
    gs = [torch.randn(x.shape, generator=gen).to(device) for x in xs]
    results = {}
    for name, fn, st in [("plain", qk.mixed_fake_quant_grouped, False), ("st", qk.mixed_fake_quant_grouped, True),
                         ("reference", ref.mixed_fake_quant_grouped, True)]:
        xl = [x.to(device, copy=True).requires_grad_() for x in xs]
        pl = probs.to(device, copy=True).requires_grad_()
        sl = [t.to(device, copy=True).requires_grad_() for t in scales]
        kwargs = {} if fn is ref.mixed_fake_quant_grouped else {"backend": backend}
        ys = fn(xl, pl, sl, (2, 4, 8), axis=axis, straight_through=st, **kwargs)
        torch.autograd.backward(ys[:2], gs[:2])  # the last output takes no part
        results[name] = (ys, [x.grad for x in xl], pl.grad, [t.grad for t in sl])
    plain, st, reference = results["plain"], results["st"], results["reference"]
    for y, y_st, y_ref in zip(plain[0], st[0], reference[0]):
        assert torch.equal(y, y_st) and torch.equal(y_ref.cpu(), y_st.cpu())
    for got in (st, reference):
        assert torch.equal(got[1][0], gs[0]) and torch.equal(got[1][1], gs[1])
        assert got[1][2] is None or torch.equal(got[1][2], torch.zeros_like(xs[2]).to(device))
    assert not torch.equal(plain[1][0], gs[0])  # the quantizer's own gradient differs
    assert torch.equal(st[2], plain[2]) and all(torch.equal(a, b) for a, b in zip(st[3][:2], plain[3][:2]))
    torch.testing.assert_close(reference[2].cpu(), st[2].cpu(), rtol=1e-5, atol=1e-6)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    # torch.equal calls -0.0 and +0.0 equal and NaN unequal to itself; a NaN's sign and payload are
    # not specified (a GPU's differ from a CPU's), its place is
    nan = a.isnan()
    return (a.shape == b.shape and torch.equal(nan, b.isnan())
            and torch.equal(a[~nan].view(torch.int32), b[~nan].view(torch.int32)))


def test_grouped_straight_through_keeps_the_values_bit_for_bit_on_special_values(backend_device):
    """Straight through returns the quantized values as they are, also where x is infinite (no
    inf - inf): on every backend and in the spec."""
    backend, device = backend_device
    x = torch.tensor([float("inf"), -float("inf"), float("nan"), -0.3, 0.3, 5.0, -1e-3])
    probs, scales = torch.tensor([[1.0]]), [torch.tensor([1.0])]
    want = qk.mixed_fake_quant_grouped([x], probs, scales, (4,), backend="reference")[0]
    assert torch.isinf(want[:2]).sum() == 0  # the case this is about: infinite x, finite levels
    g = torch.arange(1.0, 8.0)
    for fn, kwargs in [(qk.mixed_fake_quant_grouped, {"backend": backend}), (ref.mixed_fake_quant_grouped, {})]:
        xl = x.to(device, copy=True).requires_grad_()
        y = fn([xl], probs.to(device), [scales[0].to(device)], (4,), straight_through=True, **kwargs)[0]
        assert _same_bits(y.detach().cpu(), want), (fn, y)
        y.backward(g.to(device))
        assert torch.equal(xl.grad.cpu(), g)


# --------------------------------------------------------------------------------------------------
# bad input: the error names the argument and its index
# --------------------------------------------------------------------------------------------------

XS = [torch.randn(4, 3), torch.randn(2, 3)]
PS = [torch.tensor([0.5, 0.5])] * 2
SS = [torch.tensor([0.1, 0.2])] * 2


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(xs=[]), ValueError, "xs must hold at least one"),
        (dict(xs=XS[0]), TypeError, "xs must be a list"),
        (dict(xs=[XS[0], "x"]), TypeError, r"xs\[1\] must be a torch.Tensor"),
        (dict(xs=[XS[0], XS[1].double()]), TypeError, r"xs\[1\] has dtype"),
        (dict(xs=[XS[0], XS[1].to("meta")]), ValueError, r"probs\[1\] is on cpu but xs\[1\] is on meta"),
        (dict(probs=PS[:1]), ValueError, "probs must hold one entry per x"),
        (dict(probs=torch.ones(3, 2)), ValueError, r"probs as one tensor must have shape \[2, 2\]"),
        (dict(probs=torch.ones(2, 3)), ValueError, r"probs as one tensor must have shape \[2, 2\]"),
        (dict(probs=torch.ones(2, 2, device="meta")), ValueError, r"probs is on meta but xs\[0\] is on cpu"),
        (dict(probs=torch.ones(2, 2, dtype=torch.int64)), TypeError, r"probs must have a floating dtype"),
        (dict(probs=[PS[0], None]), TypeError, r"probs\[1\] must be a torch.Tensor"),
        (dict(probs=[PS[0], torch.ones(3)]), ValueError, r"probs\[1\] must have shape \[2\]"),
        (dict(scales=[SS[0], torch.ones(3)]), ValueError, r"scales\[1\] must have shape \[2\]"),
        (dict(scales=[SS[0], torch.tensor([0.1, 0.0])]), ValueError, r"scales\[1\] must be > 0"),
        (dict(axis=0), ValueError, r"scales\[0\] must have shape \[2, 4\]"),
        (dict(bits=(2, 17)), ValueError, "bits must be in"),
        (dict(grid="asym"), ValueError, "grid must be one of"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_grouped_bad_input(kwargs, exc, match):
    args = dict(xs=XS, probs=PS, scales=SS, bits=(2, 4), grid="signed", axis=None)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        qk.mixed_fake_quant_grouped(args.pop("xs"), args.pop("probs"), args.pop("scales"), args.pop("bits"), **args)


# --------------------------------------------------------------------------------------------------
# on a GPU: the point of the op, few launches and no host sync
# --------------------------------------------------------------------------------------------------


def _kernel_names(fn):
    """Names of the CUDA kernels ``fn`` launches (copies and memsets left out)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("axis", [None, 0])
def test_grouped_launches_once_without_sync(backend, axis):
    """Forward is one kernel whatever N; backward is the main kernel plus one reduction; neither
    waits for the device (sync debug mode "error")."""
    require_backend(backend, "cuda")
    gen = torch.Generator().manual_seed(0)
    counts = {}
    for n in (3, 7):
        shapes = [(16, 8, 3, 3), (32, 16, 3, 3), (10, 64), (0, 4), (8, 3, 3, 3), (64, 32, 1, 1), (5,)][:n]
        xs, probs, scales = _group([s for s in shapes if axis is None or len(s) > 1], (2, 4, 8), "signed", axis,
                                   torch.float32, gen)
        xs = [x.cuda().requires_grad_() for x in xs]
        p = torch.stack(probs).cuda().requires_grad_()
        ss = [s.cuda().requires_grad_() for s in scales]
        gs = [torch.randn_like(x) for x in xs]

        def forward():
            return qk.mixed_fake_quant_grouped(xs, p, ss, (2, 4, 8), axis=axis, backend=backend)

        def step():
            # no gradient to accumulate into (an add per tensor): only the op's own kernels
            for t in (*xs, p, *ss):
                t.grad = None
            torch.autograd.backward(forward(), gs)

        step()  # compiles the kernels
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        forward_kernels = _kernel_names(forward)
        assert len(forward_kernels) == 1, forward_kernels
        step_kernels = _kernel_names(step)
        assert sum("grouped" in name for name in step_kernels) == 3, step_kernels
        counts[n] = len(step_kernels)
    assert counts[3] == counts[7], counts


def test_grouped_under_graph_capture_calls_the_single_op_per_tensor(backend_device, monkeypatch):
    """While a CUDA graph is captured the grouped op runs one single-tensor call per tensor (its grouped
    kernels would copy a host descriptor table that replays read again after it is reused; see
    ops._grouped_pair), with the grouped op's values: here the capture is simulated on any device."""
    backend, device = backend_device
    b = qk._backends.get(backend)

    def grouped_kernel(*args, **kwargs):
        raise AssertionError("the grouped kernel ran under a capture")

    monkeypatch.setattr(qk.ops, "_graph_capturing", lambda device: True)
    monkeypatch.setattr(b, "mixed_fake_quant_grouped_forward", grouped_kernel)
    monkeypatch.setattr(b, "mixed_fake_quant_grouped_backward", grouped_kernel)
    gen = torch.Generator().manual_seed(11)
    for axis in (None, 1):
        xs, probs, scales = _group([(4, 9, 3), (0, 5), (5, 2), (2, 33)], (2, 4, 8), "signed", axis, torch.float32,
                                   gen)
        check_grouped(backend, device, xs, probs, scales, (2, 4, 8), "signed", axis, stacked=axis is None)


def test_straight_through_asks_the_kernels_for_no_dx(backend_device, monkeypatch):
    """straight_through=True gives each x its output's gradient as it is, "with no kernel": the
    backward asks the kernels for the probabilities' and scales' gradients only (a dx computed and
    thrown away would be a full pass over every weight, every step)."""
    backend, device = backend_device
    asked = []
    backward = qk.ops._mfqg_backward
    monkeypatch.setattr(qk.ops, "_mfqg_backward", lambda *args: asked.append(args[-3:]) or backward(*args))
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, 6, generator=gen).to(device).requires_grad_(),
          torch.randn(9, generator=gen).to(device).requires_grad_()]
    probs = torch.softmax(torch.randn(2, 2, generator=gen), 1).to(device).requires_grad_()
    scales = [torch.tensor([0.3, 0.05], device=device).requires_grad_(),
              torch.tensor([0.2, 0.04], device=device).requires_grad_()]
    ys = qk.mixed_fake_quant_grouped(xs, probs, scales, (2, 4), backend=backend, straight_through=True)
    grads = [torch.randn(y.shape, generator=gen).to(device) for y in ys]
    torch.autograd.backward(ys, grads)
    assert asked == [(False, True, True)]  # (need_dx, need_dprobs, need_dscales)
    assert all(torch.equal(x.grad, g) for x, g in zip(xs, grads))
    assert probs.grad is not None and all(s.grad is not None for s in scales)


def test_a_rehearsed_capture_takes_the_kernels_of_a_capture_for_cuda_tensors_only():
    """Under qdarts_kernels.rehearse_graph_capture the grouped op on CUDA tensors runs as it runs in a
    capture (one single-tensor call per tensor), so that a warm-up step launches, and loads, those
    kernels before the capture; CPU tensors are not concerned."""
    b = qk._backends.get("reference")
    grouped = (b.mixed_fake_quant_grouped_forward, b.mixed_fake_quant_grouped_backward)
    with qk.rehearse_graph_capture():
        forward, backward = qk.ops._grouped_pair("reference", torch.device("cuda"))
        assert (forward.func, backward.func) == (qk._backends.loop_grouped_forward,
                                                 qk._backends.loop_grouped_backward)
        assert forward.args == (b.mixed_fake_quant_forward,) and backward.args == (b.mixed_fake_quant_backward,)
        assert qk.ops._grouped_pair("reference", torch.device("cpu")) == grouped
    assert qk.ops._grouped_pair("reference", torch.device("cpu")) == grouped


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_grouped_in_a_cuda_graph_replays_the_eager_values(backend):
    """Forward and backward captured into a CUDA graph and replayed on new values, with pinned host
    memory taken and written in between (what would recycle a captured copy's host buffer), give the
    eager op's values."""
    require_backend(backend, "cuda")
    gen = torch.Generator().manual_seed(4)
    xs, probs, scales = _group([(16, 8, 3, 3), (10, 64), (8, 3, 3, 3), (5,)], (2, 4, 8), "signed", None,
                               torch.float32, gen)
    xs = [x.cuda().requires_grad_() for x in xs]
    p = torch.stack(probs).cuda().requires_grad_()
    ss = [s.cuda() for s in scales]
    gs = [torch.randn_like(x) for x in xs]

    def step():
        for t in (*xs, p):
            t.grad = None
        ys = qk.mixed_fake_quant_grouped(xs, p, ss, (2, 4, 8), backend=backend)
        torch.autograd.backward(ys, gs)
        return [y.detach() for y in ys], [x.grad for x in xs], p.grad

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(3):  # warm-up off the default stream, as torch.cuda.graphs asks
            # the last one on the capture's kernels: a Triton kernel must not be loaded in a capture
            with qk.rehearse_graph_capture() if i == 2 else contextlib.nullcontext():
                step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for round_ in range(2):
        with torch.no_grad():
            for x, g in zip(xs, gs):
                x.copy_(torch.randn_like(x))
                g.copy_(torch.randn_like(g))
        for _ in range(4):  # pinned blocks handed out and overwritten
            torch.full((4096,), -1.0).pin_memory().to("cuda", non_blocking=True)
        graph.replay()
        torch.cuda.synchronize()
        eager = step()
        for got, want in zip(captured[0], eager[0]):
            assert torch.equal(got, want), f"forward, replay {round_}"
        for got, want in zip(captured[1], eager[1]):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=lambda m: f"dx, replay {round_}: {m}")
        torch.testing.assert_close(captured[2], eager[2], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_the_grouped_cuda_kernels_called_directly_refuse_a_capture():
    """The C++ grouped op, called directly inside a capture (not through the public op, which runs
    one kernel per tensor there), refuses with a clear error instead of recording a copy from a host
    block that the replays would read after it was handed out again."""
    require_backend("cuda", "cuda")
    from qdarts_kernels import _cpp

    x = torch.randn(8, 3, device="cuda")
    probs, scales = torch.ones(1, 1, device="cuda"), [torch.full((1,), 0.1, device="cuda")]
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot be captured into a CUDA graph"):
        with torch.cuda.graph(graph):
            _cpp.mixed_fake_quant_grouped_forward_cuda([x], probs, scales, (8,), 0, (-1,))


# ---------------------------------------------------------------------------------- GroupedBitProbs


def test_grouped_bit_probs_equal_each_quantizer_s_softmax_and_its_gradients():
    from qdarts_kernels.nn import GroupedBitProbs, MixedPrecisionFakeQuantize, precomputed_probs

    torch.manual_seed(0)
    shared = torch.nn.Parameter(torch.randn(3))
    quantizers = [MixedPrecisionFakeQuantize((2, 4, 8)), MixedPrecisionFakeQuantize((2, 4, 8), logits=shared),
                  MixedPrecisionFakeQuantize((2, 4)), MixedPrecisionFakeQuantize(8),  # no logits: left out
                  MixedPrecisionFakeQuantize((2, 4, 8), logits=shared)]
    for q in quantizers:
        if q.logits is not None:
            q.logits.data.normal_()
    grouped = GroupedBitProbs(quantizers)
    assert grouped.quantizers == [quantizers[i] for i in (0, 1, 2, 4)]
    rows = grouped.probs()
    # shared logits: equal rows, each its own tensor (autograd sums their gradients in one index_add)
    assert rows[1] is not rows[3] and torch.equal(rows[1], rows[3])
    for q, row in zip(grouped.quantizers, rows):
        assert torch.equal(row, torch.softmax(q.logits, 0))
    x = torch.randn(64)
    weights = torch.randn(len(grouped.quantizers), 1)

    def loss(use_grouped):
        for q in grouped.quantizers:
            q.logits.grad = None
        probs = grouped.probs() if use_grouped else [q.probs() for q in grouped.quantizers]
        with precomputed_probs(grouped.quantizers, probs):
            out = sum((w * q(x)).sum() for w, q in zip(weights, grouped.quantizers))
        out.backward()
        return out.detach(), [q.logits.grad.clone() for q in grouped.quantizers]

    (out_g, grads_g), (out_p, grads_p) = loss(True), loss(False)
    assert torch.equal(out_g, out_p)
    for a, b in zip(grads_g, grads_p):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)  # shared logits: their terms summed in another order
    assert all(q.probs_override is None for q in quantizers)  # reset after the block


def test_precomputed_probs_resets_on_error_and_checks_lengths():
    from qdarts_kernels.nn import MixedPrecisionFakeQuantize, precomputed_probs

    q = MixedPrecisionFakeQuantize((2, 4))
    with pytest.raises(ValueError, match="one row per quantizer"):
        with precomputed_probs([q], []):
            pass
    with pytest.raises(RuntimeError, match="inside"):
        with precomputed_probs([q], [torch.tensor([0.25, 0.75])]):
            assert torch.equal(q.probs(), torch.tensor([0.25, 0.75]))
            raise RuntimeError("inside")
    assert q.probs_override is None and torch.equal(q.probs(), torch.full((2,), 0.5))



# paper weights with 8 bits are always per channel (axis 0 unless another is given)
@pytest.mark.parametrize("quantizer, axis", [(q, a) for q in ("paper", "lsq") for a in (0, 1, -1, None)
                                             if q == "lsq" or a is not None])
def test_grouped_weight_quantizer_equals_each_layer_s_own_quantizer(quantizer, axis):
    """GroupedWeightQuantizer over layers of several shapes (two sharing one), any per-channel axis of the
    weight (paper 8-bit scales per channel by the max, lsq scales): each mixed weight the layer's own
    ``weight_quant(weight)`` bit for bit, and the weights', logits' and lsq scales' gradients close to it."""
    from qdarts_kernels.nn import GroupedWeightQuantizer, MixedPrecisionFakeQuantize, QuantConv2d, QuantLinear

    torch.manual_seed(0)
    layers = [QuantConv2d(4, 6, 3, weight_bits=(2, 4, 8)), QuantConv2d(4, 6, 3, weight_bits=(2, 4, 8)),
              QuantConv2d(6, 6, 1, weight_bits=(2, 4, 8)), QuantLinear(5, 3, weight_bits=(2, 4, 8))]
    for layer in layers:
        w = layer.weight
        channels = None if axis is None else w.shape[axis]
        layer.weight_quant = MixedPrecisionFakeQuantize((2, 4, 8), quantizer=quantizer, role="weight",
                                                        per_channel_axis=axis, num_channels=channels)
        with torch.no_grad():
            layer.weight_quant.logits.copy_(torch.randn(3))
            layer.weight_quant(w)  # lsq: the scales' first-batch initialisation
            if quantizer == "lsq":
                layer.weight_quant.scales.mul_(torch.rand_like(layer.weight_quant.scales) + 0.5)
    grads = [torch.randn(layer.weight.shape) for layer in layers]
    params = [p for layer in layers for p in (layer.weight, *layer.weight_quant.parameters())]

    def run(ys):
        dparams = torch.autograd.grad(ys, params, grads)
        return [y.detach() for y in ys], dparams

    grouped_ys, grouped_d = run(GroupedWeightQuantizer(layers)())
    own_ys, own_d = run([layer.weight_quant(layer.weight) for layer in layers])
    for i, (a, b) in enumerate(zip(grouped_ys, own_ys)):
        assert torch.equal(a, b), f"mixed weight {i}"
    for j, (a, b) in enumerate(zip(grouped_d, own_d)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"gradient of parameter {j}")


def test_grouped_weight_quantizer_checks_each_kind_of_call_in_full_once(monkeypatch):
    """The grouped weight quantizer validates its grouped call as mixed_fake_quant_grouped does the
    first time a kind of call is seen, then reuses the result; a new kind (a backend setting, the
    weights' dtype) is validated in full again, and inside eager_reference() the public op runs."""
    from qdarts_kernels.nn import GroupedWeightQuantizer, QuantConv2d

    torch.manual_seed(0)
    layers = [QuantConv2d(4, 6, 3, weight_bits=(2, 4, 8)), QuantConv2d(6, 6, 1, weight_bits=(2, 4, 8))]
    quantizer = GroupedWeightQuantizer(layers)
    checked = []
    full = qk.ops._checked_grouped_args

    def counted(xs, *args):
        result = full(xs, *args)
        checked.append((xs[0].dtype, result[-1]))
        return result

    monkeypatch.setattr(qk.ops, "_checked_grouped_args", counted)
    first = quantizer()
    for _ in range(2):
        assert all(torch.equal(a, b) for a, b in zip(quantizer(), first))
    assert checked == [(torch.float32, "cpu" if "cpu" in qk.available_backends() else "reference")]
    monkeypatch.setenv("QDARTS_BACKEND", "reference")
    assert all(torch.equal(a, b) for a, b in zip(quantizer(), first))
    assert len(checked) == 2 and checked[-1][1] == "reference"
    monkeypatch.delenv("QDARTS_BACKEND")
    for layer in layers:
        layer.double()
    doubled = quantizer()
    assert checked[-1] == (torch.float64, "reference") and all(w.dtype == torch.float64 for w in doubled)
    with qk.eager_reference() as routed:
        quantizer()
    assert routed["mixed_fake_quant_grouped"] == 1  # the public op, on the reference

