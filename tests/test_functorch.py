"""torch.func over the public ops, every backend: grad, vmap, vmap(grad) and jacrev give what ordinary
autograd and per-sample calls of the same backend give (bit for bit: the same kernels on the same
values), and a second derivative of a fused backend is refused only when it is asked for."""

from __future__ import annotations

import pytest
import torch

import qdarts_kernels as qk
import qdarts_kernels.nn as qnn

BITS = (2, 4, 8)


def _inputs(device, per_channel=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, 5, generator=gen) * 2
    probs = torch.softmax(torch.randn(3, generator=gen), 0)
    scales = torch.tensor([0.5, 0.1, 0.01])
    if per_channel:  # along dim 1 of x (4 channels)
        scales = scales[:, None] * torch.linspace(0.5, 2.0, 4)
    return tuple(t.to(device) for t in (x, probs, scales))


def _autograd(fn, *args):
    """(fn(*args), the gradients of fn(*args) w.r.t. every arg) by ordinary autograd."""
    leaves = [a.detach().clone().requires_grad_() for a in args]
    out = fn(*leaves)
    out.backward()
    return out.detach(), tuple(leaf.grad for leaf in leaves)


def _loss(y):
    return (y * torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)).sum()


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
def test_grad_of_mixed_fake_quant_is_autograds(backend_device, per_channel):
    backend, device = backend_device
    axis = 1 if per_channel else None

    def f(x, p, s):
        return _loss(qk.mixed_fake_quant(x, p, s, BITS, axis=axis, backend=backend))

    args = _inputs(device, per_channel)
    grads = torch.func.grad(f, argnums=(0, 1, 2))(*args)
    _, expected = _autograd(f, *args)
    for got, want in zip(grads, expected):
        assert torch.equal(got, want)


def test_grad_of_mixed_op_sum_and_grouped_is_autograds(backend_device):
    backend, device = backend_device
    x, probs, scales = _inputs(device)
    outs = [x, x * 2, x - 1]

    def mos(w, o0):
        return _loss(qk.mixed_op_sum([o0, *outs[1:]], w, backend=backend))

    grads = torch.func.grad(mos, argnums=(0, 1))(probs, outs[0])
    assert all(torch.equal(g, e) for g, e in zip(grads, _autograd(mos, probs, outs[0])[1]))

    xs = [x, x[0, :2]]
    probs_nk = torch.stack([probs, probs.flip(0)])

    def grouped(p, x1, s0):
        ys = qk.mixed_fake_quant_grouped([xs[0], x1], p, [s0, scales * 2], BITS, backend=backend)
        return _loss(ys[0]) + _loss(ys[1])

    grads = torch.func.grad(grouped, argnums=(0, 1, 2))(probs_nk, xs[1], scales)
    assert all(torch.equal(g, e) for g, e in zip(grads, _autograd(grouped, probs_nk, xs[1], scales)[1]))


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
def test_vmap_over_x_is_one_call_on_the_batch(backend_device, per_channel):
    """Batched x under shared probs and scales: the batch goes into x's dims (axis shifted by one)."""
    backend, device = backend_device
    x, probs, scales = _inputs(device, per_channel)
    in_axis, batch_axis = (0, 1) if per_channel else (None, None)
    batched = torch.func.vmap(lambda xi: qk.mixed_fake_quant(xi, probs, scales, BITS, axis=in_axis,
                                                             backend=backend))(x)
    assert torch.equal(batched, qk.mixed_fake_quant(x, probs, scales, BITS, axis=batch_axis, backend=backend))
    # the batch dimension elsewhere than in front
    axis = 1 if per_channel else None  # a sample [3, 4] keeps its channels on dim 1
    moved = torch.func.vmap(lambda xi: qk.mixed_fake_quant(xi, probs, scales, BITS, axis=axis, backend=backend),
                            in_dims=2, out_dims=2)(x)
    assert torch.equal(moved, qk.mixed_fake_quant(x, probs, scales, BITS, axis=axis, backend=backend))


def test_vmap_over_probs_and_scales_is_per_sample_calls(backend_device):
    backend, device = backend_device
    x, probs, scales = _inputs(device)
    probs_b = torch.stack([probs, probs.flip(0)])
    scales_b = torch.stack([scales, scales * 3])
    batched = torch.func.vmap(lambda p, s: qk.mixed_fake_quant(x, p, s, BITS, backend=backend))(probs_b, scales_b)
    for i in range(2):
        assert torch.equal(batched[i], qk.mixed_fake_quant(x, probs_b[i], scales_b[i], BITS, backend=backend))


def test_vmap_over_an_empty_batch(backend_device):
    """A batch of no samples gives an empty batch of outputs of the right shape, on both kinds of rule."""
    backend, device = backend_device
    x, probs, scales = _inputs(device)
    y = torch.func.vmap(lambda xi: qk.mixed_fake_quant(xi, probs, scales, BITS, backend=backend))(x[:0])
    assert y.shape == (0, 4, 5)
    y = torch.func.vmap(lambda s: qk.mixed_fake_quant(x, probs, s, BITS, backend=backend))(scales[None][:0])
    assert y.shape == (0, 3, 4, 5) and y.dtype == x.dtype and y.device == x.device
    if backend == "reference":  # its backward is torch ops under PyTorch's own vmap, which fails on an
        return                  # empty batch in them (torch 2.13: select() on the batched scales)
    dp = torch.func.vmap(torch.func.grad(lambda p, s: _loss(qk.mixed_fake_quant(x, p, s, BITS, backend=backend))),
                         in_dims=(None, 0))(probs, scales[None][:0])
    assert dp.shape == (0, 3)


def test_vmap_of_mixed_op_sum(backend_device):
    backend, device = backend_device
    x, probs, _ = _inputs(device)
    shared = x[0] * 3
    batched = torch.func.vmap(lambda o: qk.mixed_op_sum([o, shared, o * 2], probs, backend=backend))(x)
    expected = qk.mixed_op_sum([x, shared.expand_as(x), x * 2], probs, backend=backend)
    assert torch.equal(batched, expected)
    weights_b = torch.stack([probs, probs.flip(0)])
    batched = torch.func.vmap(lambda w: qk.mixed_op_sum([x, shared.expand_as(x)], w[:2], backend=backend))(weights_b)
    for i in range(2):
        assert torch.equal(batched[i], qk.mixed_op_sum([x, shared.expand_as(x)], weights_b[i, :2], backend=backend))


def test_per_sample_gradients_by_vmap_of_grad(backend_device):
    """Each sample's gradients of probs and scales (the reductions per sample, not over the batch)."""
    backend, device = backend_device
    x, probs, scales = _inputs(device)

    def f(xi, p, s):
        return _loss(qk.mixed_fake_quant(xi, p, s, BITS, backend=backend))

    per_sample = torch.func.vmap(torch.func.grad(f, argnums=(1, 2)), in_dims=(0, None, None))(x, probs, scales)
    for i in range(x.shape[0]):
        _, (_, dp, ds) = _autograd(f, x[i], probs, scales)
        assert torch.equal(per_sample[0][i], dp) and torch.equal(per_sample[1][i], ds)


def test_jacrev_is_one_backward_per_output(backend_device):
    backend, device = backend_device
    x, probs, scales = _inputs(device)
    x = x[0, :2, :3]

    def f(s):
        return qk.mixed_fake_quant(x, probs, s, BITS, backend=backend)

    jac = torch.func.jacrev(f)(scales)
    assert jac.shape == (2, 3, 3)
    leaf = scales.clone().requires_grad_()
    y = f(leaf)
    for i in range(2):
        for j in range(3):
            (row,) = torch.autograd.grad(y[i, j], leaf, retain_graph=True)
            assert torch.equal(jac[i, j], row)


def _jacobians_agree(f, args, argnums):
    forward = torch.func.jacfwd(f, argnums=argnums)(*args)
    reverse = torch.func.jacrev(f, argnums=argnums)(*args)
    for fwd, rev in zip(forward, reverse):  # the same Jacobian, its sums taken in another order
        torch.testing.assert_close(fwd, rev, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("grid", ["signed", "relu"])
def test_forward_mode_is_the_transpose_of_the_backward(backend_device, per_channel, grid):
    """jacfwd (forward mode: the functions' jvp) and jacrev (the kernels' backward) give one Jacobian, and
    a jvp is the same on every backend (one formula, in torch ops)."""
    backend, device = backend_device
    x, probs, scales = _inputs(device, per_channel)
    x = x[:2]
    axis = 1 if per_channel else None

    def f(x, p, s):
        return qk.mixed_fake_quant(x, p, s, BITS, grid=grid, axis=axis, backend=backend)

    _jacobians_agree(f, (x, probs, scales), (0, 1, 2))
    tangents = (torch.ones_like(x), probs.flip(0), scales * 0.5)
    _, dy = torch.func.jvp(f, (x, probs, scales), tangents)
    _, dy_ref = torch.func.jvp(lambda x, p, s: qk.mixed_fake_quant(x, p, s, BITS, grid=grid, axis=axis,
                                                                   backend="reference"), (x, probs, scales), tangents)
    assert torch.equal(dy, dy_ref)


@pytest.mark.parametrize("straight_through", [False, True])
def test_forward_mode_of_mixed_op_sum_and_grouped(backend_device, straight_through):
    backend, device = backend_device
    x, probs, scales = _inputs(device)
    x = x[:2]
    _jacobians_agree(lambda w, o: qk.mixed_op_sum([o, x * 2, x - 1], w, backend=backend), (probs, x), (0, 1))

    def grouped(x0, p, s0):
        ys = qk.mixed_fake_quant_grouped([x0, x[0]], p, [s0, scales * 2], BITS, backend=backend,
                                         straight_through=straight_through)
        return torch.cat([y.flatten() for y in ys])

    _jacobians_agree(grouped, (x, torch.stack([probs, probs.flip(0)]), scales), (0, 1, 2))


def test_eager_forward_ad_and_half_precision(backend_device):
    """torch.autograd.forward_ad outside torch.func, no-grad calls included (they would otherwise go
    straight to a kernel and drop the tangent), with bf16 tensors: the tangent in the primal's dtype."""
    import torch.autograd.forward_ad as fwAD

    backend, device = backend_device
    x, probs, scales = _inputs(device)
    x16 = x.to(torch.bfloat16)
    with fwAD.dual_level(), torch.no_grad():
        y = qk.mixed_fake_quant(fwAD.make_dual(x16, torch.ones_like(x16)), probs, scales, BITS, backend=backend)
        s = qk.mixed_op_sum([fwAD.make_dual(x16, torch.ones_like(x16)), x16], probs[:2], backend=backend)
        dy, ds = fwAD.unpack_dual(y).tangent, fwAD.unpack_dual(s).tangent
    assert dy is not None and dy.dtype == torch.bfloat16 and ds is not None and ds.dtype == torch.bfloat16
    _, expected = torch.func.jvp(lambda t: qk.mixed_fake_quant(t, probs, scales, BITS, backend="reference"), (x16,),
                                 (torch.ones_like(x16),))
    assert torch.equal(dy, expected)
    assert torch.equal(ds, torch.full_like(x16, probs[0].item()))


def test_a_fused_second_derivative_is_refused_only_when_asked(backend_device):
    """A graph recorded through a fused backward (create_graph=True, as torch.func's transforms record it)
    gives the same first derivative; differentiating that again raises a clear error."""
    backend, device = backend_device
    x, probs, scales = _inputs(device)
    _, (dx_plain, _, _) = _autograd(lambda x, p, s: _loss(qk.mixed_fake_quant(x, p, s, BITS, backend=backend)),
                                    x, probs, scales)
    xg, pg = x.clone().requires_grad_(), probs.clone().requires_grad_()
    (dx,) = torch.autograd.grad(_loss(qk.mixed_fake_quant(xg, pg, scales, BITS, backend=backend)), xg,
                                create_graph=True)
    assert torch.equal(dx.detach(), dx_plain)
    if backend == "reference":  # differentiable torch ops: the second derivative exists
        dx.sum().backward()
        assert pg.grad is not None
        return
    with pytest.raises(RuntimeError, match=f"backend '{backend}' has no second derivative"):
        dx.sum().backward()
    # and in forward mode over the backward (a Hessian by jacfwd(jacrev))
    with pytest.raises(RuntimeError, match=f"backend '{backend}' has no second derivative"):
        torch.func.jacfwd(torch.func.jacrev(lambda s: _loss(qk.mixed_fake_quant(x, probs, s, BITS,
                                                                                backend=backend))))(scales)


@pytest.mark.parametrize("wrt", ["outputs", "weights", "both"])
def test_a_fused_mixed_op_sum_second_derivative_is_refused_only_when_asked(backend_device, wrt):
    """The same for mixed_op_sum, whose cpu backend runs its autograd in C++ (csrc/autograd.cpp): the
    gradients recorded with create_graph=True equal a plain backward's bit for bit, whichever are asked
    for, and only differentiating them raises."""
    backend, device = backend_device
    x, probs, _ = _inputs(device)
    outs = [(x * (k + 1)).requires_grad_() for k in range(3)]
    weights = probs.clone().requires_grad_()
    leaves = {"outputs": outs, "weights": [weights], "both": outs + [weights]}[wrt]
    loss = lambda: _loss(qk.mixed_op_sum(outs, weights, backend=backend))  # noqa: E731
    plain = torch.autograd.grad(loss(), leaves)
    recorded = torch.autograd.grad(loss(), leaves, create_graph=True)
    for got, want in zip(recorded, plain):
        assert torch.equal(got.detach(), want)
    if backend == "reference":
        sum(g.square().sum() for g in recorded).backward()
        assert any(t.grad is not None for t in outs + [weights])  # d outputs depend on weights, d weights on outputs
        return
    assert all(g.requires_grad for g in recorded)
    with pytest.raises(RuntimeError, match=f"mixed_op_sum: backend '{backend}' has no second derivative"):
        sum(g.square().sum() for g in recorded).backward()


def test_bad_scales_of_one_sample_are_refused_under_vmap():
    """The value checks read every sample's scales (on CPU, where reading them costs no sync); the message
    gives no index, as the samples' dimension is not the argument's own (it may sit on any axis)."""
    x, probs, scales = _inputs("cpu")
    scales_b = torch.stack([scales, -scales])
    with pytest.raises(ValueError, match=r"^scales must be > 0, got one sample's scales = -"):
        torch.func.vmap(lambda s: qk.mixed_fake_quant(x, probs, s, BITS))(scales_b)


def test_reference_functions_under_torch_func():
    """qdarts_kernels.reference, the spec, under grad and vmap (its vmap rule generated from torch ops)."""
    from qdarts_kernels import reference as ref

    x, probs, scales = _inputs("cpu")

    def f(s):
        return _loss(ref.mixed_fake_quant(x, probs, s, BITS))

    assert torch.equal(torch.func.grad(f)(scales), _autograd(f, scales)[1][0])
    scales_b = torch.stack([scales, scales * 2])
    batched = torch.func.vmap(lambda s: ref.mixed_fake_quant(x, probs, s, BITS))(scales_b)
    assert torch.equal(batched[1], ref.mixed_fake_quant(x, probs, scales_b[1], BITS))
    # the straight-through gradient of the grouped reference
    g = torch.func.grad(lambda x0: _loss(ref.mixed_fake_quant_grouped([x0], probs[None], [scales], BITS,
                                                                      straight_through=True)[0]))(x)
    assert torch.equal(g, torch.linspace(-1, 1, x.numel()).view_as(x))


def test_reference_straight_through_forward_mode_is_the_transpose_of_the_backward():
    """The spec's straight-through estimate (reference.with_identity_gradient, which the paper weight
    quantizers take too) in forward mode: x's tangent passes unchanged and adds to the quantizer's tangent
    of the probs and scales, so that jacfwd and jacrev give one Jacobian."""
    from qdarts_kernels import reference as ref

    x, probs, scales = _inputs("cpu")
    x = x[:2]

    def f(x0, p, s):
        return ref.mixed_fake_quant_grouped([x0], p[None], [s], BITS, straight_through=True)[0]

    _jacobians_agree(f, (x, probs, scales), (0, 1, 2))
    tangents = (torch.ones_like(x), probs.flip(0), scales * 0.5)
    _, dy = torch.func.jvp(f, (x, probs, scales), tangents)
    _, dq = torch.func.jvp(lambda p, s: ref.mixed_fake_quant(x, p, s, BITS), (probs, scales), tangents[1:])
    assert torch.equal(dy, dq + 1)


def _qat_model(backend, device, batch_norm: bool):
    """A small QAT model of qdarts_kernels.nn (mixed bits, LSQ scales initialised by one forward)."""
    from qdarts_kernels import nn as qnn

    torch.manual_seed(0)
    layers = [qnn.QuantConv2d(2, 4, 3, padding=1, weight_bits=(2, 4), act_bits=(4, 8), quantizer="lsq",
                              act_signed=True, backend=backend)]
    if batch_norm:
        layers.append(qnn.OutputKeepingBatchNorm2d(4, affine=False, backend=backend))
    layers += [qnn.InputKeepingMaxPool2d(2), qnn.InputFreeAvgPool2d(2), torch.nn.Flatten(),
               qnn.QuantLinear(16, 3, weight_bits=(2, 4), act_bits=8, quantizer="lsq", backend=backend)]
    model = torch.nn.Sequential(*layers).to(device)
    model(torch.randn(4, 2, 8, 8, device=device))  # the scales' initialisation reads their input: before any transform
    return model


def test_qat_layers_under_torch_func(backend_device, monkeypatch):
    """torch.func over a model of qdarts_kernels.nn: its layers take PyTorch's own modules there (their
    fused autograd functions have no vmap rules), the quantizers the public ops; gradients of every
    parameter equal ordinary autograd's, and per-sample gradients by vmap(grad) equal a loop."""
    backend, device = backend_device
    # the two paths take different conv algorithms (PyTorch's modules, the layers' own functions): on a
    # GPU in fp32, not TF32, and with tolerances for their other order of summation
    tol = dict(rtol=1e-5, atol=1e-6) if device.type == "cpu" else dict(rtol=1e-4, atol=1e-5)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    x = torch.randn(4, 2, 8, 8, device=device)
    model = _qat_model(backend, device, batch_norm=True)
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(params, x, buffers=None):  # BatchNorm's buffers, which it updates, passed in as torch.func asks
        return _loss(torch.func.functional_call(model, (params, buffers or {}), (x,)))

    grads = torch.func.grad(loss)(params, x, {name: b.clone() for name, b in model.named_buffers()})
    model.zero_grad()
    loss(dict(model.named_parameters()), x).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, **tol, msg=name)

    # forward mode through the model: jvp is the Jacobian (by reverse mode) times the tangent
    model.eval()  # (batch norm on its running statistics: the same function in both modes)
    v = torch.randn_like(x)
    no_tangents = {name: torch.zeros_like(p) for name, p in params.items()}

    def model_at(t, params):  # the parameters as inputs: the quantizers keep their scales positive in place
        return torch.func.functional_call(model, params, (t,))

    _, jv = torch.func.jvp(model_at, (x, params), (v, no_tangents))
    jacobian = torch.func.jacrev(model_at)(x, params)
    torch.testing.assert_close(jv, (jacobian * v).sum(dim=(2, 3, 4, 5)), rtol=1e-4, atol=1e-5)
    model.train()

    model = _qat_model(backend, device, batch_norm=False)  # (BatchNorm's running statistics do not vmap)
    params = {name: p.detach() for name, p in model.named_parameters()}
    per_sample = torch.func.vmap(torch.func.grad(lambda p, xi: loss(p, xi[None])), in_dims=(None, 0))(params, x)
    for i in range(x.shape[0]):
        expected = torch.func.grad(lambda p: loss(p, x[i:i + 1]))(params)
        for name in params:
            torch.testing.assert_close(per_sample[name][i], expected[name], **tol, msg=name)


@pytest.mark.parametrize("transform", ["grad", "vmap_of_grad", "jvp"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
def test_lsq_scales_not_yet_initialised_under_torch_func_are_refused_by_name(transform, per_channel):
    """The README asks for one forward before a transform; a quantizer without it gets an error that says
    so, not PyTorch's refusal of an in-place write to a captured tensor (which names neither), and is left
    as it was: a forward outside the transform then initialises it, and the transform runs."""
    quantizer = qnn.MixedPrecisionFakeQuantize((2, 4), quantizer="lsq", grid="signed",
                                               per_channel_axis=-1 if per_channel else None)
    x = torch.randn(4, 2, 3)

    def run():
        # the scales as an input, as torch.func asks of what a module changes in place (not yet made:
        # the per-channel ones, which the first batch sizes)
        params = {} if isinstance(quantizer.scales, torch.nn.UninitializedParameter) else {
            "scales": quantizer.scales.detach()}

        def out(x, params):
            return torch.func.functional_call(quantizer, params, (x,)).sum()

        if transform == "grad":
            return torch.func.grad(out, argnums=(0, 1))(x, params)
        if transform == "vmap_of_grad":
            return torch.func.vmap(torch.func.grad(out, argnums=(0, 1)), in_dims=(0, None))(x, params)
        zero_tangents = {k: torch.zeros_like(v) for k, v in params.items()}
        return torch.func.jvp(out, (x, params), (torch.ones_like(x), zero_tangents))

    with pytest.raises(RuntimeError, match="run the model once on a batch before the transform"):
        run()
    assert not bool(quantizer.initialized[0])
    quantizer(x)
    assert bool(quantizer.initialized[0])
    run()
