"""The public ops as PyTorch operators: opcheck, torch.compile, gradcheck, backend choice, bad input."""

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import qdarts_kernels as qk
from qdarts_kernels import reference as ref

CPU_SIDE_BACKENDS = [b for b in ("reference", "cpu", "triton") if b in qk.available_backends()
                     and (b != "triton" or os.environ.get("TRITON_INTERPRET") == "1")]


def _mfq_args(backend, per_channel=False, dtype=torch.float32, grid=0):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 3, 5, generator=gen) * 2).to(dtype).requires_grad_()
    probs = torch.softmax(torch.randn(3, generator=gen), 0).requires_grad_()
    scales = (torch.rand((3, 3) if per_channel else (3,), generator=gen) * 0.2 + 0.05).requires_grad_()
    return (x, probs, scales, [2, 4, 8], grid, 1 if per_channel else -1, backend)


@pytest.mark.parametrize("backend", CPU_SIDE_BACKENDS)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("grid", [0, 3], ids=["signed", "relu"])
def test_opcheck_mixed_fake_quant(backend, per_channel, grid):
    torch.library.opcheck(torch.ops.qdarts.mixed_fake_quant.default, _mfq_args(backend, per_channel, grid=grid))


@pytest.mark.parametrize("backend", CPU_SIDE_BACKENDS)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_opcheck_mixed_fake_quant_backward(backend, per_channel, param_dtype):
    """dprobs and dscales in the dtype of probs and scales, as the fake kernel says: eager autograd
    would cast a gradient of another dtype silently, compiled code trusts the fake."""
    x, probs, scales, bits, grid, axis, _ = _mfq_args(backend, per_channel)
    probs, scales = probs.detach().to(param_dtype), scales.detach().to(param_dtype)
    g = torch.randn(x.shape)
    op = torch.ops.qdarts.mixed_fake_quant_backward.default
    for needs in [(True, True, True), (True, False, False), (False, True, True)]:
        args = (g, x.detach(), probs, scales, bits, grid, axis, backend, *needs)
        _, dprobs, dscales = op(*args)
        assert [t.dtype for t, needed in zip((dprobs, dscales), needs[1:]) if needed] == [param_dtype] * sum(needs[1:])
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", CPU_SIDE_BACKENDS)
def test_opcheck_backward_of_non_contiguous_probs_and_scales(backend):
    """The gradients come back contiguous whatever the strides of probs and scales, and the fake
    kernels say so (compiled code checks the strides: a transposed scales view failed there)."""
    x, probs, scales, bits, grid, axis, _ = _mfq_args(backend, per_channel=True)
    scales_t = scales.detach().t().contiguous().t()  # [K, C] with strides (1, K)
    probs_strided = torch.stack([probs.detach(), probs.detach()], 1)[:, 0]  # stride 2
    assert not scales_t.is_contiguous() and not probs_strided.is_contiguous()
    torch.library.opcheck(torch.ops.qdarts.mixed_fake_quant_backward.default,
                          (torch.randn(x.shape), x.detach(), probs_strided, scales_t, bits, grid, axis, backend,
                           True, True, True))


# x in layouts the kernels see in memory order (their results take x's strides) and in one with gaps (a
# slice of a channels_last tensor: computed on a contiguous copy, the results contiguous)
X_LAYOUTS = {
    "channels_last": lambda t: t.to(memory_format=torch.channels_last),
    "permuted": lambda t: t.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2).transpose(2, 3),
    "not_dense": lambda t: torch.cat([t, t], 2).to(memory_format=torch.channels_last)[:, :, ::2],
}


@pytest.mark.parametrize("backend", CPU_SIDE_BACKENDS)
@pytest.mark.parametrize("axis", [-1, 1, 0])
@pytest.mark.parametrize("layout", X_LAYOUTS)
def test_opcheck_mixed_fake_quant_in_other_layouts(backend, axis, layout):
    """The fake kernels give the strides of the real ones (x's, or contiguous where x is not dense),
    forward and backward, with the grad in x's layout and in another one."""
    gen = torch.Generator().manual_seed(2)
    x = X_LAYOUTS[layout](torch.randn(2, 3, 4, 5, generator=gen))
    assert not x.is_contiguous()
    probs = torch.softmax(torch.randn(2, generator=gen), 0)
    scales = torch.rand((2,) if axis < 0 else (2, x.shape[axis]), generator=gen) * 0.2 + 0.05
    args = (x, probs, scales, [2, 4], 0, axis, backend)
    torch.library.opcheck(torch.ops.qdarts.mixed_fake_quant.default,
                          (x.requires_grad_(), probs.requires_grad_(), scales.requires_grad_(), *args[3:]))
    y = torch.ops.qdarts.mixed_fake_quant.default(*args)
    assert y.stride() == (x.stride() if layout != "not_dense" else x.contiguous().stride())
    g = torch.randn(x.shape, generator=gen)
    for grad in (g, torch.empty_like(x).copy_(g)):
        torch.library.opcheck(torch.ops.qdarts.mixed_fake_quant_backward.default,
                              (grad, *(t.detach() for t in args[:3]), *args[3:], True, True, True))


@pytest.mark.parametrize("backend", CPU_SIDE_BACKENDS)
@pytest.mark.parametrize("weights_grad", [True, False], ids=["weights", "frozen_weights"])
def test_opcheck_mixed_op_sum_channels_last(backend, weights_grad):
    """channels_last outputs (the first; the others in another layout too): the fakes give the real
    strides, the first output's."""
    gen = torch.Generator().manual_seed(3)
    outs = [torch.randn(2, 3, 4, 5, generator=gen).to(memory_format=torch.channels_last) for _ in range(3)]
    outs[2] = outs[2].contiguous()
    outs = [o.requires_grad_() for o in outs]
    w = torch.softmax(torch.randn(3, generator=gen), 0).requires_grad_(weights_grad)
    torch.library.opcheck(torch.ops.qdarts.mixed_op_sum.default, (outs, w, backend))
    g = torch.randn(2, 3, 4, 5, generator=gen)
    for grad in (g, g.to(memory_format=torch.channels_last)):
        torch.library.opcheck(torch.ops.qdarts.mixed_op_sum_backward.default,
                              (grad, [o.detach() for o in outs], w.detach(), backend, True, weights_grad))


@pytest.mark.parametrize("backend", [b for b in CPU_SIDE_BACKENDS if b != "triton"])
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_keeps_channels_last(backend, compiler):
    """Compiled (fullgraph), the ops on channels_last tensors give what they give in eager mode:
    channels_last results and gradients, the same values."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 4, 5, generator=gen).to(memory_format=torch.channels_last)
    probs = torch.softmax(torch.randn(2, generator=gen), 0)
    scales = torch.rand(2, 3, generator=gen) * 0.2 + 0.05
    w = torch.softmax(torch.randn(2, generator=gen), 0)

    def f(x, probs, scales, w):
        q = qk.mixed_fake_quant(x, probs, scales, (2, 4), axis=1, backend=backend)
        return qk.mixed_op_sum([q, qk.fake_quant(x, scales[1, :1], 8, backend=backend)], w, backend=backend)

    results = []
    for fn in (f, torch.compile(f, fullgraph=True, backend=compiler)):
        leaves = [t.detach().clone().requires_grad_() for t in (x, probs, scales, w)]
        y = fn(*leaves)
        grads = torch.autograd.grad(y, leaves, torch.randn(y.shape, generator=torch.Generator().manual_seed(5)))
        assert y.stride() == x.stride() and grads[0].stride() == x.stride(), (y.stride(), grads[0].stride())
        results.append((y, *grads))
    (y_eager, *grads_eager), (y_compiled, *grads_compiled) = results
    torch.testing.assert_close(y_compiled, y_eager, rtol=0, atol=0)
    for a, b in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", CPU_SIDE_BACKENDS)
def test_opcheck_mixed_op_sum(backend):
    gen = torch.Generator().manual_seed(0)
    outs = [torch.randn(3, 7, generator=gen).requires_grad_() for _ in range(5)]
    w = torch.softmax(torch.randn(5, generator=gen), 0).requires_grad_()
    torch.library.opcheck(torch.ops.qdarts.mixed_op_sum.default, (outs, w, backend))
    g = torch.randn(3, 7, generator=gen)
    torch.library.opcheck(torch.ops.qdarts.mixed_op_sum_backward.default,
                          (g, [o.detach() for o in outs], w.detach(), backend, True, True))


def test_compiled_mixed_op_sum_computes_no_output_gradient_that_is_not_needed(monkeypatch):
    """Frozen candidate outputs (only the weights learn): the backward asks the kernels for d weights
    only. (Compiled, autograd gives one needs-grad flag per output, a list.)"""
    from qdarts_kernels import ops

    asked = []
    real = ops._mixed_op_sum_backward_op
    monkeypatch.setattr(ops, "_mixed_op_sum_backward_op", lambda *a: asked.append(a[4:]) or real(*a))
    outs = [torch.randn(3, 5) for _ in range(2)]
    w = torch.rand(2, requires_grad=True)
    compiled = torch.compile(lambda o, w: qk.mixed_op_sum(o, w, backend="reference").square().sum(),
                             backend="aot_eager", fullgraph=True)
    compiled(outs, w).backward()
    torch.testing.assert_close(w.grad, torch.stack([(2 * (outs[0] * w[0] + outs[1] * w[1]) * o).sum() for o in outs]))
    assert asked and all(flags == (False, True) for flags in asked)


@pytest.mark.parametrize("backend", CPU_SIDE_BACKENDS)
def test_opcheck_mixed_op_sum_frozen_weights(backend):
    """Weights without a gradient (the weight step of a search): the outputs are not kept, the
    backward gets stand-ins (see ops._mos_saved_outputs)."""
    gen = torch.Generator().manual_seed(1)
    outs = [torch.randn(3, 7, generator=gen).requires_grad_() for _ in range(4)]
    torch.library.opcheck(torch.ops.qdarts.mixed_op_sum.default, (outs, torch.rand(4, generator=gen), backend))


@pytest.mark.parametrize("backend", CPU_SIDE_BACKENDS)
@pytest.mark.parametrize("custom_op", [False, True], ids=["eager", "custom_op"])
def test_mixed_op_sum_keeps_outputs_only_for_the_weight_gradient(backend, custom_op):
    """The backward reads the K outputs only for d weights: with frozen weights they are not kept for
    it, and d outputs are still right."""
    gen = torch.Generator().manual_seed(2)
    outs = [torch.randn(4, 9, generator=gen).requires_grad_() for _ in range(3)]
    g = torch.randn(4, 9, generator=gen)
    storages = {o.untyped_storage().data_ptr() for o in outs}
    for weights_need_grad in (False, True):
        w = torch.softmax(torch.randn(3, generator=gen), 0).requires_grad_(weights_need_grad)
        kept = set()

        def pack(t):
            kept.add(t.untyped_storage().data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if custom_op:
                y = torch.ops.qdarts.mixed_op_sum(outs, w, backend)
            else:
                y = qk.mixed_op_sum(outs, w, backend=backend)
        assert (kept & storages) == (storages if weights_need_grad else set())
        grads = torch.autograd.grad(y, outs + ([w] if weights_need_grad else []), g)
        wr = w.detach().requires_grad_(weights_need_grad)
        outs_r = [o.detach().requires_grad_() for o in outs]
        expected = torch.autograd.grad(ref.mixed_op_sum(outs_r, wr), outs_r + ([wr] if weights_need_grad else []), g)
        for a, b in zip(grads[:3], expected[:3]):
            assert torch.equal(a, b)
        if weights_need_grad:
            torch.testing.assert_close(grads[3], expected[3], rtol=1e-6, atol=1e-6)


requires_cpu_kernels = pytest.mark.skipif("cpu" not in qk.available_backends(), reason="C++ CPU kernels not built")


def _mos_leaves(gen, k, shape, dtype=torch.float32, weights_dtype=torch.float32):
    outs = [torch.randn(*shape, generator=gen).to(dtype) for _ in range(k)]
    return outs, torch.softmax(torch.randn(k, generator=gen), 0).to(weights_dtype)


@requires_cpu_kernels
@pytest.mark.parametrize("weights_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("needs", ["all", "outputs", "some_outputs", "weights"])
def test_cpu_mixed_op_sum_autograd_in_cpp(dtype, weights_dtype, needs):
    """The cpu backend's eager path is the C++ autograd of csrc/autograd.cpp (no Python node in the
    graph): the reference's values and gradients, in the leaves' dtypes, for every subset of leaves
    that needs a gradient."""
    gen = torch.Generator().manual_seed(5)
    outs, w = _mos_leaves(gen, 3, (5, 2, 7), dtype, weights_dtype)
    wants = {"all": (True, True, True, True), "outputs": (True, True, True, False),
             "some_outputs": (False, True, False, False), "weights": (False, False, False, True)}[needs]
    leaves = [t.requires_grad_(want) for t, want in zip(outs + [w], wants)]
    y = qk.mixed_op_sum(outs, w, backend="cpu")
    assert y.grad_fn.name() == "torch::autograd::CppNode<qdarts::(anonymous namespace)::MixedOpSum>"
    leaves_r = [t.detach().requires_grad_(t.requires_grad) for t in leaves]
    y_r = ref.mixed_op_sum(leaves_r[:-1], leaves_r[-1])
    assert y.dtype == y_r.dtype and torch.equal(y, y_r)
    g = torch.randn(y.shape, generator=gen).to(dtype)
    needed = [i for i, want in enumerate(wants) if want]
    grads = torch.autograd.grad(y, [leaves[i] for i in needed], g)
    expected = torch.autograd.grad(y_r, [leaves_r[i] for i in needed], g)
    for i, a, b in zip(needed, grads, expected):
        assert a.dtype == b.dtype and a.shape == b.shape
        if i < 3:
            assert torch.equal(a, b), f"d outputs[{i}]"
        else:
            tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2}.get(weights_dtype, 1e-5)
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@requires_cpu_kernels
def test_cpu_mixed_op_sum_without_autograd():
    """No graph under no_grad and inference mode (the op's kernel below autograd), the same values;
    the C++ op's registrations pass opcheck's schema and autograd-registration tests."""
    gen = torch.Generator().manual_seed(6)
    outs, w = _mos_leaves(gen, 4, (3, 5))
    expected = ref.mixed_op_sum(outs, w)
    leaves = [t.clone().requires_grad_() for t in outs + [w]]
    with torch.no_grad():
        y = qk.mixed_op_sum(leaves[:-1], leaves[-1], backend="cpu")
    assert y.grad_fn is None and torch.equal(y, expected)
    with torch.inference_mode():
        y = qk.mixed_op_sum(outs, w, backend="cpu")
    assert y.is_inference() and torch.equal(y, expected)
    torch.library.opcheck(torch.ops.qdarts_C.mixed_op_sum.default, (leaves[:-1], leaves[-1]),
                          test_utils=("test_schema", "test_autograd_registration"))


def test_mixed_fake_quant_without_a_graph_calls_the_kernel_alone(backend_device, monkeypatch):
    """Under no_grad, in inference mode and on inputs that need no gradient the op runs its kernel without
    the autograd function: the same bits as with a graph, and no graph."""
    from qdarts_kernels import ops as qops

    backend, device = backend_device
    gen = torch.Generator().manual_seed(12)
    x, probs = torch.randn(3, 5, 7, generator=gen), torch.softmax(torch.randn(3, generator=gen), 0)
    scales = torch.rand(3, 5, generator=gen) * 0.3 + 0.05
    x, probs, scales = x.to(device), probs.to(device), scales.to(device)
    expected = qk.mixed_fake_quant(x.requires_grad_(), probs, scales, (2, 4, 8), axis=1, backend=backend).detach()
    x.requires_grad_(False)
    monkeypatch.setattr(qops._MixedFakeQuantFunction, "apply", lambda *a: pytest.fail("the autograd function ran"))
    for context, leaf in ((torch.no_grad, True), (torch.inference_mode, True), (torch.enable_grad, False)):
        with context():
            y = qk.mixed_fake_quant(x.clone().requires_grad_(leaf and not torch.is_inference_mode_enabled()), probs,
                                    scales, (2, 4, 8), axis=1, backend=backend)
        assert y.grad_fn is None and torch.equal(y, expected)


def test_gradcheck_reference_float64():
    """Finite differences agree with the reference wherever the op is differentiable."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)
    probs = torch.rand(3, generator=gen, dtype=torch.float64).requires_grad_()
    scales = torch.rand(3, 4, generator=gen, dtype=torch.float64) * 0.3 + 0.05
    # Q is piecewise constant in x and s (its gradient there is the straight-through estimate, not
    # the derivative), but y is exactly linear in probs.
    assert torch.autograd.gradcheck(lambda p: ref.mixed_fake_quant(x, p, scales, (2, 4, 8), axis=1), (probs,))
    assert torch.autograd.gradcheck(
        lambda p: qk.mixed_fake_quant(x, p, scales, (2, 4, 8), axis=1, backend="reference"), (probs,))
    outs = [torch.randn(2, 3, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(4)]
    w = torch.rand(4, generator=gen, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda w, *o: ref.mixed_op_sum(list(o), w), (w, *outs))
    assert torch.autograd.gradcheck(lambda w, *o: qk.mixed_op_sum(list(o), w, backend="reference"), (w, *outs))


def test_straight_through_gradients_match_formula_float64():
    """In the interior of a quantization bin, ds equals the LSQ formula and dx the clip mask."""
    x = torch.tensor([0.26, -0.9, 5.0, -5.0], dtype=torch.float64, requires_grad=True)
    s = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
    y = ref.fake_quant(x, s, 3)  # signed 3 bit: q in [-4, 3]
    y.sum().backward()
    q = torch.tensor([1.0, -2.0, 3.0, -4.0], dtype=torch.float64)
    inside = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    assert torch.equal(x.grad, inside)
    expected_ds = (q - inside * x.detach() / 0.5).sum()
    torch.testing.assert_close(s.grad, expected_ds.reshape(1))


class _TinyQuantNet(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.backend = backend
        self.lin = torch.nn.Linear(16, 16)
        self.logits = torch.nn.Parameter(torch.zeros(3))
        self.scales = torch.nn.Parameter(torch.tensor([0.3, 0.1, 0.01]))
        self.alpha = torch.nn.Parameter(torch.zeros(3))

    def forward(self, x):
        h = self.lin(x)
        q = qk.mixed_fake_quant(h, torch.softmax(self.logits, 0), self.scales, (2, 4, 8), backend=self.backend)
        single = qk.fake_quant(h, self.scales[2:], 8, backend=self.backend)
        return qk.mixed_op_sum([q, torch.relu(h), single], torch.softmax(self.alpha, 0), backend=self.backend)


@pytest.mark.parametrize("backend", [b for b in CPU_SIDE_BACKENDS if b != "triton"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _TinyQuantNet(backend)
    x = torch.randn(8, 16)
    eager = model(x)
    eager.sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager)
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g)


@pytest.mark.parametrize("backend", CPU_SIDE_BACKENDS)
def test_compiled_code_refuses_bad_scale_values_when_it_runs(backend):
    """Compiled code calls the custom ops, whose bodies check the scale values at run time (tracing cannot
    read them): a bad scale is refused as in eager mode, on every backend (the Triton kernels would take
    any), for the single and the grouped op."""
    torch._dynamo.reset()
    x = torch.randn(6)
    single = torch.compile(lambda x, s: qk.fake_quant(x, s, 4, backend=backend), fullgraph=True, backend="aot_eager")
    grouped = torch.compile(lambda xs, p, ss: qk.mixed_fake_quant_grouped(xs, p, ss, (4,), backend=backend),
                            fullgraph=True, backend="aot_eager")
    half = torch.tensor([0.5])
    torch.testing.assert_close(single(x, half), qk.fake_quant(x, half, 4, backend=backend))
    grouped([x, x], torch.ones(2, 1), [torch.tensor([0.5])] * 2)
    for bad, match in [(0.0, "must be > 0"), (-1.0, "must be > 0"), (float("nan"), "must be finite")]:
        with pytest.raises(RuntimeError, match="scales " + match):
            single(x, torch.tensor([bad]))
        with pytest.raises(RuntimeError, match=r"scales\[1\] " + match):
            grouped([x, x], torch.ones(2, 1), [torch.tensor([0.5]), torch.tensor([bad])])


def test_float64_scales_are_checked_as_the_kernels_take_them():
    """fp64 scales reach the kernels as fp32 (fp64 only for fp64 x, on the reference): one beyond fp32's
    range is inf to them, and refused; with fp64 x it is a finite scale."""
    scales = torch.tensor([0.1, 1e39], dtype=torch.float64)
    for backend in CPU_SIDE_BACKENDS:
        with pytest.raises(ValueError, match=r"scales must be finite, got scales\[1\] = 1e\+39 \(as float32"):
            qk.mixed_fake_quant(X, P2, scales, (2, 4), backend=backend)
    y = qk.mixed_fake_quant(X.double(), P2.double(), scales, (2, 4))
    torch.testing.assert_close(y, ref.mixed_fake_quant(X.double(), P2.double(), scales, (2, 4)), rtol=0, atol=0)


@pytest.mark.parametrize("bad,match", [(float("nan"), "must be finite"), (float("-inf"), "must be finite"),
                                       (0.0, "must be > 0"), (-0.5, "must be > 0"),
                                       (2.0 ** -130, "must be >= 2\\*\\*-126")])
def test_a_bad_scale_among_many_is_named_by_its_index(bad, match):
    """With thousands of per-channel scales (a layer diverging in a user's own training loop), the error
    names the first bad one and its value: the first few scales, all good, would say nothing."""
    x = torch.randn(5, 3000)
    scales = torch.full((2, 3000), 0.1)
    scales[1, 2345] = bad
    scales[1, 2999] = bad  # a later one, that the message must not name instead
    if bad != 2.0 ** -130:
        scales[0, 2999] = 2.0 ** -130  # an earlier one, of the kind checked last: the worse kind is named
    for backend in CPU_SIDE_BACKENDS:
        with pytest.raises(ValueError, match=rf"scales {match}.*, got scales\[1, 2345\] = {re.escape(str(bad))}$"):
            qk.mixed_fake_quant(x, P2, scales, (2, 4), axis=1, backend=backend)


def test_torch_compile_inductor():
    """Inductor (the default compiler) also traces the ops as opaque custom ops, without graph breaks."""
    torch._dynamo.reset()
    model = _TinyQuantNet(None)
    x = torch.randn(8, 16)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x))


# --------------------------------------------------------------------------------------------------
# backend choice
# --------------------------------------------------------------------------------------------------


def test_available_backends_lists_reference():
    names = qk.available_backends()
    assert "reference" in names
    assert set(names) <= {"reference", "cpu", "cuda", "triton"}


def test_backend_env_override(monkeypatch):
    from qdarts_kernels import _backends

    monkeypatch.setenv("QDARTS_BACKEND", "reference")
    assert _backends.resolve(None, torch.device("cpu")) == "reference"
    monkeypatch.setenv("QDARTS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="QDARTS_BACKEND must be one of"):  # the variable named: no backend= given
        qk.mixed_op_sum([torch.ones(2)], torch.ones(1))
    with pytest.raises(ValueError, match="^backend must be one of"):
        qk.mixed_op_sum([torch.ones(2)], torch.ones(1), backend="nonsense")
    monkeypatch.delenv("QDARTS_BACKEND")
    expected = "cpu" if "cpu" in qk.available_backends() else "reference"
    assert _backends.resolve(None, torch.device("cpu")) == expected


def test_mixed_op_sum_input_limit_is_checked_before_the_extension(monkeypatch):
    """The cuda backend sums at most kMaxOpSumInputs outputs (csrc/cuda/kernels.h): asked for by name
    with more, a ValueError naming outputs before any kernel runs; chosen automatically, the next GPU
    backend takes them. Here on a CUDA device as the backends' loader and device check see it."""
    from qdarts_kernels import _backends

    header = open(os.path.join(os.path.dirname(__file__), "..", "csrc", "cuda", "kernels.h")).read()
    assert f"constexpr int kMaxOpSumInputs = {_backends.MIXED_OP_SUM_MAX_INPUTS['cuda']};" in header
    monkeypatch.delenv("QDARTS_BACKEND", raising=False)
    monkeypatch.setattr(_backends, "_load", lambda name: object())
    monkeypatch.setattr(_backends, "_check_device", lambda name, device: None)
    cuda = torch.device("cuda")
    assert _backends.resolve(None, cuda, torch.float32, op_sum_inputs=64) == "cuda"
    assert _backends.resolve(None, cuda, torch.float32, op_sum_inputs=65) == "triton"
    assert _backends.resolve("triton", cuda, torch.float32, op_sum_inputs=65) == "triton"
    with pytest.raises(ValueError, match=r"^outputs must hold at most 64 tensors on backend 'cuda' \(backend\), "
                                         r"got 65"):
        _backends.resolve("cuda", cuda, torch.float32, op_sum_inputs=65)
    monkeypatch.setenv("QDARTS_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"on backend 'cuda' \(QDARTS_BACKEND\), got 65"):
        _backends.resolve(None, cuda, torch.float32, op_sum_inputs=65)
    # a direct call of the custom op with backend 'cuda' is refused before the kernels too
    outs = [torch.zeros(2) for _ in range(65)]
    with pytest.raises(RuntimeError, match="outputs must hold at most 64 tensors on backend 'cuda', got 65"):
        torch.ops.qdarts.mixed_op_sum(outs, torch.ones(65), "cuda")


def test_the_automatic_choice_passes_over_a_backend_that_is_not_available(monkeypatch):
    """A GPU machine whose _C has no CUDA kernels takes triton, then the reference, for CUDA tensors; one
    without _C takes the reference for CPU tensors."""
    from qdarts_kernels import _backends

    monkeypatch.delenv("QDARTS_BACKEND", raising=False)
    present = {"reference", "cpu", "triton"}
    monkeypatch.setattr(_backends, "_load", lambda name: object() if name in present else None)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert _backends.resolve(None, cuda, torch.float32) == "triton"
    present.discard("triton")
    assert _backends.resolve(None, cuda, torch.float32) == "reference"
    assert _backends.resolve(None, cpu, torch.float32) == "cpu"
    present.discard("cpu")
    assert _backends.resolve(None, cpu, torch.float32) == "reference"


def test_triton_runs_on_a_gpu_without_its_interpreter_and_on_a_cpu_only_under_it(monkeypatch):
    from qdarts_kernels import _backends

    monkeypatch.setattr(_backends, "_load", lambda name: object())
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _backends.runnable("triton")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not _backends.runnable("triton") and _backends.runnable("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backends.runnable("triton")


def test_wrong_device_for_backend():
    if not torch.cuda.is_available():
        with pytest.raises((ValueError, RuntimeError), match="cuda"):
            qk.mixed_op_sum([torch.ones(2)], torch.ones(1), backend="cuda")


def test_missing_extension_falls_back_with_one_warning(tmp_path):
    """Without _C the library still works on the reference and says so once."""
    script = textwrap.dedent(
        """
        import sys, warnings, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "qdarts_kernels._C":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        import torch
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import qdarts_kernels as qk
            x = torch.randn(10)
            ys = [qk.mixed_fake_quant(x, torch.ones(1), torch.tensor([0.1]), (4,)) for _ in range(3)]
        msgs = [str(m.message) for m in w if "qdarts_kernels._C" in str(m.message)]
        assert len(msgs) == 1, msgs
        assert "cpu" not in qk.available_backends()
        assert torch.equal(ys[0], qk.reference.mixed_fake_quant(x, torch.ones(1), torch.tensor([0.1]), (4,)))
        print("OK")
        """
    )
    env = dict(os.environ, QDARTS_BACKEND="")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr


# --------------------------------------------------------------------------------------------------
# bad input: a clear error naming the argument
# --------------------------------------------------------------------------------------------------

X = torch.randn(4, 3)
P2 = torch.tensor([0.5, 0.5])
S2 = torch.tensor([0.1, 0.2])


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(bits=(0, 4)), ValueError, "bits must be in"),
        (dict(bits=(4, 17)), ValueError, "bits must be in"),
        (dict(bits=(2, 4, 8, 16, 3), probs=torch.ones(5) / 5, scales=torch.ones(5)), ValueError, "1..4"),
        (dict(bits=()), ValueError, "1..4"),
        (dict(bits=(2.0, 4)), ValueError, "bits must hold ints"),
        (dict(grid="asym"), ValueError, "grid must be one of"),
        (dict(probs=torch.ones(3)), ValueError, "probs must have shape"),
        (dict(scales=torch.ones(3)), ValueError, "scales must have shape"),
        (dict(axis=1), ValueError, r"scales must have shape \[2, 3\]"),
        (dict(axis=2, scales=torch.ones(2, 3)), ValueError, "axis 2 is out of range"),
        (dict(scales=torch.tensor([0.1, 0.0])), ValueError, "scales must be > 0"),
        (dict(scales=torch.tensor([0.1, -1.0])), ValueError, "scales must be > 0"),
        (dict(scales=torch.tensor([0.1, float("nan")])), ValueError, "scales must be finite"),
        (dict(scales=torch.tensor([float("inf"), 1.0])), ValueError, "scales must be finite"),
        (dict(scales=torch.tensor([0.1, 1e-40])), ValueError, r"scales must be >= 2\*\*-126"),
        (dict(x=torch.ones(4, 3, dtype=torch.int32)), TypeError, "x must have a floating dtype"),
        (dict(probs=torch.ones(2, dtype=torch.int64)), TypeError, "probs must have a floating dtype"),
        (dict(x=[1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
        (dict(probs=torch.ones(2, device="meta")), ValueError, "probs is on meta"),
        (dict(backend="gpu"), ValueError, "backend must be one of"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_mixed_fake_quant_bad_input(kwargs, exc, match):
    args = dict(x=X, probs=P2, scales=S2, bits=(2, 4), grid="signed", axis=None)
    args.update(kwargs)
    backend = args.pop("backend", None)
    with pytest.raises(exc, match=match):
        qk.mixed_fake_quant(args.pop("x"), args.pop("probs"), args.pop("scales"), args.pop("bits"), backend=backend,
                            **args)


def test_float64_takes_the_reference_backend(monkeypatch):
    """The kernels take float32/16 and bfloat16: asked for by name (or QDARTS_BACKEND), a fused backend
    refuses float64; the automatic choice takes the reference for it (gradcheck, .double() modules)."""
    monkeypatch.delenv("QDARTS_BACKEND", raising=False)
    x = torch.randn(5, dtype=torch.float64)
    s = torch.tensor([0.1], dtype=torch.float64)
    if "cpu" in qk.available_backends():
        with pytest.raises(TypeError, match="float64"):
            qk.fake_quant(x, torch.tensor([0.1]), 4, backend="cpu")
        monkeypatch.setenv("QDARTS_BACKEND", "cpu")
        with pytest.raises(TypeError, match="float64"):
            qk.fake_quant(x, s, 4)
        monkeypatch.delenv("QDARTS_BACKEND")
    y = qk.fake_quant(x, s, 4, backend="reference")
    assert y.dtype == torch.float64 and torch.equal(qk.fake_quant(x, s, 4), y)
    outs, w = [torch.randn(3, dtype=torch.float64) for _ in range(2)], torch.rand(2, dtype=torch.float64)
    assert torch.equal(qk.mixed_op_sum(outs, w), qk.mixed_op_sum(outs, w, backend="reference"))
    from qdarts_kernels import nn as qnn

    conv = qnn.QuantConv2d(2, 3, 3, padding=1).double()  # a whole module in float64, automatic backend
    xc = torch.randn(2, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    conv(xc).square().sum().backward()
    assert xc.grad.dtype == torch.float64 and conv.weight.grad.dtype == torch.float64


@pytest.mark.parametrize(
    "outputs,weights,exc,match",
    [
        ([], torch.ones(0), ValueError, "at least one"),
        ([torch.ones(3), torch.ones(4)], torch.ones(2), ValueError, r"outputs\[1\] has shape"),
        ([torch.ones(3), torch.ones(3, dtype=torch.float16)], torch.ones(2), TypeError, r"outputs\[1\] has dtype"),
        ([torch.ones(3), torch.ones(3)], torch.ones(3), ValueError, "weights must have shape"),
        ([torch.ones(3)], torch.ones(1, dtype=torch.int32), TypeError, "weights must have a floating dtype"),
        ("abc", torch.ones(1), TypeError, "outputs must be a list"),
        ([torch.ones(3), torch.ones(3, device="meta")], torch.ones(2), ValueError, r"outputs\[1\] is on meta"),
    ],
)
def test_mixed_op_sum_bad_input(outputs, weights, exc, match):
    with pytest.raises(exc, match=match):
        qk.mixed_op_sum(outputs, weights)


def test_fake_quant_bad_input():
    with pytest.raises(ValueError, match="one element"):
        qk.fake_quant(X, torch.ones(2), 4)
    with pytest.raises(ValueError, match="bits must be one int"):
        qk.fake_quant(X, torch.ones(1), (2, 4))
    with pytest.raises(TypeError, match="scale must be a torch.Tensor"):
        qk.fake_quant(X, 0.1, 4)
