"""The Triton batch norm (qdarts_kernels.triton.batch_norm) and the module that takes it.

Against PyTorch's own batch norm (``native_batch_norm`` and its backward, the definition) and
against fp64 sums: forward output, invstd, running statistics and the input gradient, on odd shapes,
with a mean far from zero, with channels split over many reduction programs (several tiles each, some
past the last), fp32/fp16/bf16; run-to-run determinism; which kernel the module chooses. On CPU the
kernels run under TRITON_INTERPRET=1 (set by conftest.py); on a GPU they run compiled.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qdarts_kernels as qk
import qdarts_kernels.nn as qnn

pytest.importorskip("triton")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

pytestmark = pytest.mark.skipif(
    "triton" not in qk.available_backends(), reason="the triton backend is not available here"
)

SHAPES = [(4, 3, 5, 7), (1, 3, 1, 9), (9, 2, 3, 1), (3, 2, 1, 1), (2, 5, 33), (5, 4, 17, 19), (2, 1, 64, 70)]


@pytest.fixture
def bn():
    from qdarts_kernels.triton import batch_norm

    return batch_norm


@pytest.fixture
def few_reduction_programs(bn, monkeypatch):
    """Plans with at most 3 reduction programs in all: channels of several tiles per program, and
    programs whose last tiles lie past the channel's end."""
    monkeypatch.setattr(bn, "_REDUCE_PROGRAMS", 3)
    bn.plan.cache_clear()
    yield
    bn.plan.cache_clear()


def _fp64_statistics(x):
    dims = [0] + list(range(2, x.dim()))
    x64 = x.double()
    var, mean = torch.var_mean(x64, dim=dims, correction=0)
    return mean, var


def _native(x, running_mean, running_var, g, eps=1e-5, momentum=0.1):
    y, _, invstd = torch.native_batch_norm(x, None, None, running_mean, running_var, True, momentum, eps)
    unit = torch.zeros_like(invstd), torch.ones_like(invstd)
    dx, _, _ = torch.ops.aten.native_batch_norm_backward(g, y, invstd, None, None, *unit, True, eps,
                                                          [True, False, False])
    return y, invstd, dx


def _ulp(dtype):
    return torch.finfo(dtype).eps


def _check_against_native(bn, shape, dtype, offset=1.0, scale=3.0):
    gen = torch.Generator().manual_seed(len(shape) * 100 + shape[1])
    x = (torch.randn(shape, generator=gen) * scale + offset).to(dtype).to(DEVICE)
    g = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    c = shape[1]
    rm, rv = torch.randn(c, generator=gen).to(DEVICE), (torch.rand(c, generator=gen) + 0.5).to(DEVICE)
    rm_native, rv_native = rm.clone(), rv.clone()

    y, invstd = bn.batch_norm_train_forward(x, rm, rv, 0.1, 1e-5)
    dx = bn.batch_norm_train_backward(g, y, invstd)
    y_native, invstd_native, dx_native = _native(x, rm_native, rv_native, g)

    # statistics against fp64; the native kernels' error (which may be the larger) widens the
    # comparisons with them
    mean64, var64 = _fp64_statistics(x)
    invstd64 = (var64 + 1e-5).rsqrt()
    torch.testing.assert_close(invstd.double(), invstd64, rtol=2e-6, atol=0)
    native_error = ((invstd_native.double() - invstd64) / invstd64).abs().max().item()
    torch.testing.assert_close(invstd, invstd_native, rtol=2e-6 + native_error, atol=0)
    torch.testing.assert_close(rm, rm_native, rtol=1e-6, atol=1e-6 * (1 + abs(offset)))
    torch.testing.assert_close(rv, rv_native, rtol=1e-5 + native_error * 2, atol=1e-6)
    # outputs: within a unit or two in the last place of the output dtype
    tol = (2 * _ulp(dtype) if dtype != torch.float32 else 8 * _ulp(dtype)) + native_error
    # x - mean is as exact as the mean, which fp32 holds to half a unit of the offset's last place
    centring = 2 * _ulp(torch.float32) * abs(offset) * invstd64.max().item()
    torch.testing.assert_close(y.float(), y_native.float(), rtol=tol, atol=tol * 4 + centring)
    torch.testing.assert_close(dx.float(), dx_native.float(), rtol=tol,
                               atol=(tol + centring) * dx_native.float().abs().max().item())
    assert y.dtype == dx.dtype == dtype and y.shape == dx.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_native_batch_norm(bn, shape, dtype):
    _check_against_native(bn, shape, dtype)


@pytest.mark.parametrize("shape", [(5, 4, 17, 19), (7, 2, 3, 33), (2, 1, 64, 70)], ids=str)
def test_matches_native_with_many_tiles_per_reduction_program(bn, few_reduction_programs, shape):
    p = bn.plan(shape[0], shape[1], shape[2] * shape[3] if len(shape) == 4 else shape[2])
    assert p.rounds > 1 or p.tiles == 1
    _check_against_native(bn, shape, torch.float32)


def test_plans_split_channels_and_merge_every_tile(bn):
    # the CIFAR-size case: 4 channels of 256 x 32 x 32 spread over hundreds of programs
    p = bn.plan(256, 4, 1024)
    assert p.partials * 4 >= 256 and p.partials * p.rounds >= p.tiles and p.block_n * p.block_s == 4096
    for n, c, s in [(1, 1, 1 << 24), (3, 1000, 49), (513, 3, 7), (1, 7, 1)]:
        p = bn.plan(n, c, s)
        assert p.partials * p.rounds >= p.tiles > (p.partials - 1) * p.rounds
        assert p.rounds & (p.rounds - 1) == 0 and p.partials <= p.partials_block
        assert p.tiles == -(-n // p.block_n) * p.tiles_s and p.tiles_s * p.block_s >= s


def test_large_mean_keeps_the_variance(bn):
    """Variance from merged (count, mean, squared deviations), not from sums of squares: a mean of
    1e4 over a spread of 1e-1 loses nothing that fp32 inputs hold."""
    _check_against_native(bn, (8, 3, 9, 11), torch.float32, offset=1e4, scale=0.1)


def test_without_running_statistics(bn):
    x = torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    y, invstd = bn.batch_norm_train_forward(x, None, None, 0.1, 1e-3)
    y_native, _, invstd_native = torch.native_batch_norm(x, None, None, None, None, True, 0.1, 1e-3)
    torch.testing.assert_close(y, y_native, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(invstd, invstd_native, rtol=1e-5, atol=0)


def test_bit_for_bit_run_to_run(bn, few_reduction_programs):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 3, 13, 21, generator=gen).to(DEVICE)
    g = torch.randn(6, 3, 13, 21, generator=gen).to(DEVICE)
    runs = []
    for _ in range(2):
        y, invstd = bn.batch_norm_train_forward(x, None, None, 0.1, 1e-5)
        runs.append((y, invstd, bn.batch_norm_train_backward(g, y, invstd)))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# --------------------------------------------------------------------------------------------------
# the module's choice of kernel
# --------------------------------------------------------------------------------------------------


def _saved_kernel(module, x):
    y = module(x)
    return y, y.grad_fn.saved_tensors if hasattr(y.grad_fn, "saved_tensors") else None


@pytest.mark.parametrize("shape", [(4, 3, 5, 7), (9, 2, 3, 1)], ids=str)
def test_module_on_triton_matches_batchnorm2d(shape):
    torch.manual_seed(0)
    ours = qnn.OutputKeepingBatchNorm2d(shape[1], affine=False, backend="triton").to(DEVICE)
    plain = nn.BatchNorm2d(shape[1], affine=False).to(DEVICE)
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(shape, generator=gen) * 3 + 1).to(DEVICE)
    g = torch.randn(shape, generator=gen).to(DEVICE)
    results = []
    for m in (ours, plain):
        for _ in range(2):  # two batches: the running statistics are updated from updated values
            xl = x.clone().requires_grad_()
            y = m(xl)
            y.backward(g)
        results.append((y.detach(), xl.grad, m.running_mean, m.running_var, m.num_batches_tracked))
    (y, dx, mean, var, n), (yr, dxr, meanr, varr, nr) = results
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dxr, rtol=1e-5, atol=1e-5 * dxr.abs().max().item())
    torch.testing.assert_close(mean, meanr, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var, varr, rtol=1e-5, atol=1e-6)
    assert torch.equal(n, nr)


def _kernels_chosen(monkeypatch, module, x):
    from qdarts_kernels.nn import batchnorm

    chosen = []
    choose = batchnorm._triton_kernels
    monkeypatch.setattr(batchnorm, "_triton_kernels", lambda *a: chosen.append(choose(*a)) or chosen[-1])
    module(x)
    return chosen


def test_module_kernel_choice(monkeypatch):
    from qdarts_kernels.triton import batch_norm

    x = torch.randn(2, 3, 4, 5, device=DEVICE, requires_grad=True)
    assert _kernels_chosen(monkeypatch, qnn.OutputKeepingBatchNorm2d(3, affine=False, backend="triton").to(DEVICE),
                           x) == [batch_norm]
    assert _kernels_chosen(monkeypatch, qnn.OutputKeepingBatchNorm2d(3, affine=False, backend="reference").to(DEVICE),
                           x) == [None]
    automatic = _kernels_chosen(monkeypatch, qnn.OutputKeepingBatchNorm2d(3, affine=False).to(DEVICE), x)
    assert automatic == [batch_norm if DEVICE.type == "cuda" else None]
    monkeypatch.setenv("QDARTS_BACKEND", "triton")
    assert _kernels_chosen(monkeypatch, qnn.OutputKeepingBatchNorm2d(3, affine=False).to(DEVICE), x) == [batch_norm]
    monkeypatch.setenv("QDARTS_FEW_CHANNEL_KERNELS", "0")  # the switch for timing PyTorch's
    assert _kernels_chosen(monkeypatch, qnn.OutputKeepingBatchNorm2d(3, affine=False).to(DEVICE), x) == [None]
    monkeypatch.delenv("QDARTS_FEW_CHANNEL_KERNELS")
    # an fp64 module (or input) takes PyTorch's kernels
    assert _kernels_chosen(monkeypatch, qnn.OutputKeepingBatchNorm2d(3, affine=False).double().to(DEVICE),
                           x.detach().double().requires_grad_()) == [None]


def test_module_refuses_one_value_per_channel():
    bn = qnn.OutputKeepingBatchNorm2d(3, affine=False, backend="triton")
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(torch.randn(1, 3, 1, 1, requires_grad=True))


def test_supernet_batch_norms_take_the_configured_backend():
    from qdarts.supernet import SearchNetwork, SupernetConfig

    net = SearchNetwork(SupernetConfig(input_shape=(1, 8, 8), channels=4, layers=1, steps=2, num_classes=3,
                                       bits=(2, 4), partial_channels=2, backend="triton"))
    bns = [m for m in net.modules() if isinstance(m, qnn.OutputKeepingBatchNorm2d)]
    assert bns and all(m.backend == "triton" for m in bns)


def test_module_second_derivative_on_triton_is_pytorchs():
    """Under create_graph=True the backward is PyTorch's (differentiable); first derivatives only
    would make the gradient of a gradient silently wrong."""
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randn(3, 2, 4, 5, generator=gen).to(DEVICE)
    w = torch.randn(3, 2, 4, 5, generator=gen).to(DEVICE)
    second = []
    for backend in ("triton", "reference"):
        bn = qnn.OutputKeepingBatchNorm2d(2, affine=False, backend=backend).to(DEVICE)
        x = x0.clone().requires_grad_()
        (dx,) = torch.autograd.grad((bn(x) * w).pow(2).sum(), x, create_graph=True)
        (ddx,) = torch.autograd.grad(dx.pow(2).sum(), x)
        second.append((dx.detach(), ddx))
    torch.testing.assert_close(second[0][0], second[1][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(second[0][1], second[1][1], rtol=1e-4, atol=1e-4)


def test_supernet_step_with_triton_batch_norms_matches_pytorchs():
    """A supernet forward and backward with the Triton batch norms (the quantized ops on one
    backend for both) gives PyTorch's batch norms' loss and gradients."""
    from qdarts.supernet import SearchNetwork, SupernetConfig

    cfg = SupernetConfig(input_shape=(1, 8, 8), channels=4, layers=3, steps=2, num_classes=3, bits=(2, 4),
                         partial_channels=2)
    gen = torch.Generator().manual_seed(6)
    x, y = torch.randn(6, 1, 8, 8, generator=gen).to(DEVICE), torch.randint(0, 3, (6,), generator=gen).to(DEVICE)
    results = []
    for bn_backend in ("triton", "reference"):
        torch.manual_seed(0)
        net = SearchNetwork(cfg).to(DEVICE)
        bns = [m for m in net.modules() if isinstance(m, qnn.OutputKeepingBatchNorm2d)]
        for m in bns:
            m.backend = bn_backend
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in net.parameters()], [m.running_var for m in bns]))
    (loss, grads, variances), (loss_r, grads_r, variances_r) = results
    torch.testing.assert_close(loss, loss_r, rtol=1e-5, atol=1e-6)
    for g, gr in zip(grads, grads_r):
        torch.testing.assert_close(g, gr, rtol=1e-3, atol=1e-5)
    for v, vr in zip(variances, variances_r):
        torch.testing.assert_close(v, vr, rtol=1e-5, atol=1e-6)
