"""The fused batch norms (qdarts_kernels.triton.batch_norm and the C++ CPU kernels of
csrc/cpu/batch_norm.cpp) and the module that takes them.

Against PyTorch's own batch norm (``native_batch_norm`` and its backward, the definition) and
against fp64 sums: forward output, invstd, running statistics and the input gradient, on odd shapes,
with a mean far from zero, with channels split over many reduction programs (Triton: several tiles
each, some past the last; C++: planes of several runs), fp32/fp16/bf16 (the C++ kernels: fp32);
run-to-run determinism and, for the C++ kernels, the same bits for any thread count; which kernel
the module chooses. On CPU the Triton kernels run under TRITON_INTERPRET=1 (set by conftest.py); on
a GPU they run compiled. Every instruction set giving the C++ kernels' bits: test_cpu_kernels.py.
"""

from __future__ import annotations

from typing import NamedTuple, Tuple

import pytest
import torch
from torch import nn

import qdarts_kernels as qk
import qdarts_kernels.nn as qnn

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

needs_triton = pytest.mark.skipif("triton" not in qk.available_backends(),
                                  reason="the triton backend is not available here")
needs_cpp = pytest.mark.skipif("cpu" not in qk.available_backends(),
                               reason="qdarts_kernels._C (the C++ CPU kernels) is not built")

# (9, 2, 20, 30): 3 partials per channel, fewer than the power of two of them the merge loads
SHAPES = [(4, 3, 5, 7), (1, 3, 1, 9), (9, 2, 3, 1), (3, 2, 1, 1), (2, 5, 33), (5, 4, 17, 19), (2, 1, 64, 70),
          (9, 2, 20, 30)]


class Kernels(NamedTuple):
    """A set of batch-norm kernels (``batch_norm_train_forward`` / ``_backward``), the device their
    tensors live on and the dtypes they take."""

    ops: object
    device: torch.device
    dtypes: Tuple[torch.dtype, ...]


@pytest.fixture
def triton_bn():
    pytest.importorskip("triton")
    if "triton" not in qk.available_backends():
        pytest.skip("the triton backend is not available here")
    from qdarts_kernels.triton import batch_norm

    return batch_norm


@pytest.fixture(params=["triton", "cpu"])
def bn(request):
    if request.param == "triton":
        return Kernels(request.getfixturevalue("triton_bn"), DEVICE,
                       (torch.float32, torch.float16, torch.bfloat16))
    if "cpu" not in qk.available_backends():
        pytest.skip("qdarts_kernels._C (the C++ CPU kernels) is not built")
    return Kernels(torch.ops.qdarts_C, torch.device("cpu"), (torch.float32,))


@pytest.fixture
def few_reduction_programs(triton_bn, monkeypatch):
    """Plans with at most 3 reduction programs in all: channels of several tiles per program, and
    programs whose last tiles lie past the channel's end."""
    monkeypatch.setattr(triton_bn, "_REDUCE_PROGRAMS", 3)
    triton_bn.plan.cache_clear()
    yield
    triton_bn.plan.cache_clear()


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
    if dtype not in bn.dtypes:
        pytest.skip(f"these kernels take {bn.dtypes}")
    gen = torch.Generator().manual_seed(len(shape) * 100 + shape[1])
    x = (torch.randn(shape, generator=gen) * scale + offset).to(dtype).to(bn.device)
    g = torch.randn(shape, generator=gen).to(dtype).to(bn.device)
    c = shape[1]
    rm, rv = torch.randn(c, generator=gen).to(bn.device), (torch.rand(c, generator=gen) + 0.5).to(bn.device)
    rm_native, rv_native = rm.clone(), rv.clone()

    y, invstd = bn.ops.batch_norm_train_forward(x, rm, rv, 0.1, 1e-5)
    dx = bn.ops.batch_norm_train_backward(g, y, invstd)
    y_native, invstd_native, dx_native = _native(x, rm_native, rv_native, g)

    # statistics against fp64; the native kernels' error (which may be the larger) widens the
    # comparisons with them
    mean64, var64 = _fp64_statistics(x)
    invstd64 = (var64 + 1e-5).rsqrt()
    torch.testing.assert_close(invstd.double(), invstd64, rtol=2e-6, atol=0)
    # relative to the native value, as assert_close measures it (a native value below the exact one
    # makes the same error a larger share of it: 3.06 % against 2.97 % at an offset of -3e5 on an H200)
    native_error = ((invstd_native.double() - invstd64) / invstd_native.double()).abs().max().item()
    torch.testing.assert_close(invstd, invstd_native, rtol=4e-6 + native_error, atol=0)
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


# (5, 1, 64, 70): 10 tiles over 3 programs of 4 rounds, the last two tiles past the channel's end
@pytest.mark.parametrize("shape", [(5, 4, 17, 19), (7, 2, 3, 33), (2, 1, 64, 70), (5, 1, 64, 70)], ids=str)
def test_matches_native_with_many_tiles_per_reduction_program(triton_bn, few_reduction_programs, shape):
    p = triton_bn.plan(shape[0], shape[1], shape[2] * shape[3] if len(shape) == 4 else shape[2])
    assert p.rounds > 1 or p.tiles == 1
    if shape == (5, 1, 64, 70):
        assert p.partials * p.rounds > p.tiles > (p.partials - 1) * p.rounds
    _check_against_native(Kernels(triton_bn, DEVICE, (torch.float32,)), shape, torch.float32)


def test_plans_split_channels_and_merge_every_tile(triton_bn):
    # the CIFAR-size case: 4 channels of 256 x 32 x 32 spread over hundreds of programs
    p = triton_bn.plan(256, 4, 1024)
    assert p.partials * 4 >= 256 and p.partials * p.rounds >= p.tiles and p.block_n * p.block_s == 4096
    for n, c, s in [(1, 1, 1 << 24), (3, 1000, 49), (513, 3, 7), (1, 7, 1)]:
        p = triton_bn.plan(n, c, s)
        assert p.partials * p.rounds >= p.tiles > (p.partials - 1) * p.rounds
        assert p.rounds & (p.rounds - 1) == 0 and p.partials <= p.partials_block
        assert p.tiles == -(-n // p.block_n) * p.tiles_s and p.tiles_s * p.block_s >= s


@pytest.mark.parametrize("offset", [1e4, -3e5], ids=str)
def test_large_mean_keeps_the_variance(bn, offset):
    """Variance from merged (count, mean, squared deviations), not from sums of squares: a mean of
    1e4 over a spread of 1e-1 loses nothing that fp32 inputs hold. (8, 3, 9, 11): one partial run
    per plane in the C++ kernels; (2, 2, 40, 41): several runs, the last one partial."""
    for shape in [(8, 3, 9, 11), (2, 2, 40, 41)]:
        _check_against_native(bn, shape, torch.float32, offset=offset, scale=0.1)


def test_without_running_statistics(bn):
    x = torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(2)).to(bn.device)
    y, invstd = bn.ops.batch_norm_train_forward(x, None, None, 0.1, 1e-3)
    y_native, _, invstd_native = torch.native_batch_norm(x, None, None, None, None, True, 0.1, 1e-3)
    torch.testing.assert_close(y, y_native, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(invstd, invstd_native, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_output_is_the_fp32_output_rounded(triton_bn, dtype):
    """y in fp16/bf16 is the fp32 kernel's y on the same values rounded to nearest even, as torch's
    ``.to``. The data keep every sum exact in any order (small integers, each channel's sum 0), so
    both runs have the same statistics bit for bit, also compiled."""
    half = torch.randint(-20, 21, (3, 4, 9, 13), generator=torch.Generator().manual_seed(5)).float()
    x = torch.cat([half, -half]).to(dtype).to(DEVICE)
    y, invstd = triton_bn.batch_norm_train_forward(x, None, None, 0.1, 1e-5)
    y32, invstd32 = triton_bn.batch_norm_train_forward(x.float(), None, None, 0.1, 1e-5)
    assert torch.equal(invstd, invstd32)
    assert y.dtype == dtype and torch.equal(y, y32.to(dtype))


def _forward_backward(ops, x, g):
    y, invstd = ops.batch_norm_train_forward(x, None, None, 0.1, 1e-5)
    return y, invstd, ops.batch_norm_train_backward(g, y, invstd)


def test_bit_for_bit_run_to_run(triton_bn, few_reduction_programs):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 3, 13, 21, generator=gen).to(DEVICE)
    g = torch.randn(6, 3, 13, 21, generator=gen).to(DEVICE)
    runs = [_forward_backward(triton_bn, x, g) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@needs_cpp
def test_cpp_kernels_same_bits_for_any_thread_count():
    """Planes of 1, 2 and 3 runs (some partial), and enough of them to be split between threads."""
    gen = torch.Generator().manual_seed(3)
    threads = torch.get_num_threads()
    try:
        for shape in [(64, 4, 32, 32), (40, 3, 600), (300, 2, 7, 7)]:
            x, g = torch.randn(shape, generator=gen) * 2 - 1, torch.randn(shape, generator=gen)
            runs = []
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                runs.append(_forward_backward(torch.ops.qdarts_C, x, g))
            assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1])), shape
            assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[2])), shape
    finally:
        torch.set_num_threads(threads)


@needs_cpp
@pytest.mark.parametrize("offset", [1e4, 1000.3], ids=str)
def test_cpp_running_mean_takes_the_fp64_mean(offset):
    """The mean that updates running_mean is fp32's rounded mean plus the fp64 sum of x - m over M
    (the corrected two-pass formula): the update equals the one from the fp64 mean, to the last bit."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, 9, 11, generator=gen) * 0.1 + offset
    rm, rv = torch.ones(16), torch.ones(16)
    torch.ops.qdarts_C.batch_norm_train_forward(x, rm, rv, 0.1, 1e-5)
    assert torch.equal(rm, (0.9 + 0.1 * x.double().mean(dim=(0, 2, 3))).float())


@needs_cpp
def test_cpp_kernels_take_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 9, 3, 4, generator=gen).transpose(0, 1)  # [9, 5, 3, 4], channels not planes apart
    g = torch.randn(3, 4, 5, 9, generator=gen).permute(3, 2, 0, 1)
    contiguous = _forward_backward(torch.ops.qdarts_C, x.contiguous(), g.contiguous())
    assert all(torch.equal(a, b) for a, b in zip(_forward_backward(torch.ops.qdarts_C, x, g), contiguous))


@needs_cpp
def test_cpp_kernels_refuse_bad_input():
    ops = torch.ops.qdarts_C
    x, c = torch.randn(2, 3, 4, 4), torch.zeros(3)
    y, invstd = ops.batch_norm_train_forward(x, None, None, 0.1, 1e-5)
    for call, message in [
        (lambda: ops.batch_norm_train_forward(x.double(), None, None, 0.1, 1e-5), "x must be a float32 CPU tensor"),
        (lambda: ops.batch_norm_train_forward(x[0, 0, 0], None, None, 0.1, 1e-5), "x must have at least 2 dim"),
        (lambda: ops.batch_norm_train_forward(x[:0], None, None, 0.1, 1e-5), "x must not be empty"),
        (lambda: ops.batch_norm_train_forward(x, c, None, 0.1, 1e-5), "must be given together"),
        (lambda: ops.batch_norm_train_forward(x, torch.zeros(4), c, 0.1, 1e-5), r"running_mean must have shape \[3\]"),
        (lambda: ops.batch_norm_train_forward(x, c, c.double(), 0.1, 1e-5), "running_var must be a float32"),
        (lambda: ops.batch_norm_train_forward(x, torch.zeros(3, 2)[:, 0], c, 0.1, 1e-5), "must be contiguous"),
        (lambda: ops.batch_norm_train_forward(x[:1, :, :1, :1], c, c.clone(), 0.1, 1e-5), "more than 1 value"),
        (lambda: ops.batch_norm_train_backward(y[:1], y, invstd), "grad has shape"),
        (lambda: ops.batch_norm_train_backward(y, y, invstd[:2]), r"invstd must have shape \[3\]"),
        (lambda: ops.batch_norm_train_backward(y.half(), y, invstd), "grad must be a float32"),
    ]:
        with pytest.raises(RuntimeError, match=message):
            call()


# --------------------------------------------------------------------------------------------------
# the module's choice of kernel
# --------------------------------------------------------------------------------------------------


#: The module's backends with fused kernels, and the device they are tested on.
FUSED = [pytest.param("triton", DEVICE, marks=needs_triton, id="triton"),
         pytest.param("cpu", torch.device("cpu"), marks=needs_cpp, id="cpu")]


@pytest.mark.parametrize("backend,device", FUSED)
def test_module_on_an_empty_batch_does_what_batchnorm2d_does(backend, device):
    """An empty batch (which torch.native_batch_norm refuses): an empty output and gradient, and the
    running statistics and batch count as nn.BatchNorm2d leaves them."""
    results = []
    for m in (qnn.OutputKeepingBatchNorm2d(3, affine=False, backend=backend), nn.BatchNorm2d(3, affine=False)):
        m.to(device)
        x = torch.empty(0, 3, 4, 4, device=device, requires_grad=True)
        y = m(x)
        y.sum().backward()
        results.append((y.shape, x.grad.shape, m.running_mean, m.running_var, m.num_batches_tracked))
    for got, want in zip(*results):
        assert (torch.equal(got, want) if isinstance(got, torch.Tensor) else got == want), (got, want)


@pytest.mark.parametrize("backend,device", FUSED)
@pytest.mark.parametrize("shape", [(4, 3, 5, 7), (9, 2, 3, 1)], ids=str)
def test_module_on_fused_kernels_matches_batchnorm2d(shape, backend, device):
    torch.manual_seed(0)
    ours = qnn.OutputKeepingBatchNorm2d(shape[1], affine=False, backend=backend).to(device)
    plain = nn.BatchNorm2d(shape[1], affine=False).to(device)
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(shape, generator=gen) * 3 + 1).to(device)
    g = torch.randn(shape, generator=gen).to(device)
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


@pytest.mark.parametrize("backend,device", FUSED)
def test_module_without_a_gradient_takes_the_same_kernels(monkeypatch, backend, device):
    """In training with batch statistics, an input that needs no gradient (a supernet's first cell in an
    arch step, where the weights are out of autograd; a no_grad forward) takes the same kernels: the
    same output and running statistics, bit for bit, and no graph."""
    x = (torch.randn(6, 3, 5, 4, generator=torch.Generator().manual_seed(8)) * 2 + 1).to(device)
    results = []
    for needs_grad in (True, False, None):  # None: under no_grad
        m = qnn.OutputKeepingBatchNorm2d(3, affine=False, backend=backend).to(device)
        with torch.set_grad_enabled(needs_grad is not None):
            y = m(x.clone().requires_grad_(bool(needs_grad)))
        assert (y.grad_fn is not None) == bool(needs_grad)
        results.append((y.detach(), m.running_mean, m.running_var, m.num_batches_tracked))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
    chosen = _kernels_chosen(monkeypatch, qnn.OutputKeepingBatchNorm2d(3, affine=False, backend=backend).to(device), x)
    assert chosen[0] is not None


def _kernels_chosen(monkeypatch, module, x):
    from qdarts_kernels.nn import batchnorm

    chosen = []
    choose = batchnorm._fused_kernels
    monkeypatch.setattr(batchnorm, "_fused_kernels", lambda *a: chosen.append(choose(*a)) or chosen[-1])
    module(x)
    return chosen


@needs_triton
def test_module_kernel_choice_triton(monkeypatch):
    from qdarts_kernels.triton import batch_norm

    x = torch.randn(2, 3, 4, 5, device=DEVICE, requires_grad=True)
    assert _kernels_chosen(monkeypatch, qnn.OutputKeepingBatchNorm2d(3, affine=False, backend="triton").to(DEVICE),
                           x) == [batch_norm]
    assert _kernels_chosen(monkeypatch, qnn.OutputKeepingBatchNorm2d(3, affine=False, backend="reference").to(DEVICE),
                           x) == [None]
    if DEVICE.type == "cuda":
        assert _kernels_chosen(monkeypatch, qnn.OutputKeepingBatchNorm2d(3, affine=False).to(DEVICE), x) == [batch_norm]
    monkeypatch.setenv("QDARTS_BACKEND", "triton")
    assert _kernels_chosen(monkeypatch, qnn.OutputKeepingBatchNorm2d(3, affine=False).to(DEVICE), x) == [batch_norm]
    monkeypatch.setenv("QDARTS_FEW_CHANNEL_KERNELS", "0")  # the switch for timing PyTorch's
    assert _kernels_chosen(monkeypatch, qnn.OutputKeepingBatchNorm2d(3, affine=False).to(DEVICE), x) == [None]
    monkeypatch.delenv("QDARTS_FEW_CHANNEL_KERNELS")
    # an fp64 module (or input) takes PyTorch's kernels
    assert _kernels_chosen(monkeypatch, qnn.OutputKeepingBatchNorm2d(3, affine=False).double().to(DEVICE),
                           x.detach().double().requires_grad_()) == [None]


@needs_cpp
def test_module_kernel_choice_cpu(monkeypatch):
    monkeypatch.delenv("QDARTS_BACKEND", raising=False)
    ops = torch.ops.qdarts_C
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    assert _kernels_chosen(monkeypatch, qnn.OutputKeepingBatchNorm2d(3, affine=False), x) == [ops]  # automatic
    assert _kernels_chosen(monkeypatch, qnn.OutputKeepingBatchNorm2d(3, affine=False, backend="cpu"), x) == [ops]
    assert _kernels_chosen(monkeypatch, qnn.OutputKeepingBatchNorm2d(3, affine=False, backend="reference"),
                           x) == [None]
    # fp16 / bf16 / fp64 on CPU: PyTorch's
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        module = qnn.OutputKeepingBatchNorm2d(3, affine=False, backend="cpu").to(dtype)
        assert _kernels_chosen(monkeypatch, module, x.detach().to(dtype).requires_grad_()) == [None]
    monkeypatch.setenv("QDARTS_FEW_CHANNEL_KERNELS", "0")
    assert _kernels_chosen(monkeypatch, qnn.OutputKeepingBatchNorm2d(3, affine=False, backend="cpu"), x) == [None]


def test_module_refuses_one_value_per_channel():
    bn = qnn.OutputKeepingBatchNorm2d(3, affine=False)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(torch.randn(1, 3, 1, 1, requires_grad=True))


@pytest.mark.parametrize("eps", [0.0, -1e-5])
def test_module_refuses_an_eps_that_is_not_positive_in_training(eps):
    """As F.batch_norm does: a variance of 0 would give inf, then NaN, without a word."""
    bn = qnn.OutputKeepingBatchNorm2d(3, eps=eps, affine=False)
    with pytest.raises(ValueError, match="eps must be positive"):
        bn(torch.ones(4, 3, 2, 2, requires_grad=True))


@pytest.mark.parametrize("backend,device", FUSED)
def test_module_running_statistics_of_a_nan_batch_are_batchnorm2d_s(backend, device):
    """A NaN in a channel makes its variance, and so running_var, NaN, as in PyTorch (the C++ kernel's
    clamp of a rounding-negative variance to 0 had turned it into 0: a finite running_var)."""
    x = torch.randn(8, 3, 4, 4, device=device)
    x[0, 0, 0, 0] = float("nan")
    stats = []
    for m in (qnn.OutputKeepingBatchNorm2d(3, affine=False, backend=backend), nn.BatchNorm2d(3, affine=False)):
        m.to(device)
        y = m(x.clone().requires_grad_())
        stats.append((y.isnan().any(dim=(0, 2, 3)), m.running_mean, m.running_var))
    for got, want in zip(*stats):
        torch.testing.assert_close(got, want, equal_nan=True)


def test_supernet_batch_norms_take_the_configured_backend():
    from qdarts.supernet import SearchNetwork, SupernetConfig

    net = SearchNetwork(SupernetConfig(input_shape=(1, 8, 8), channels=4, layers=1, steps=2, num_classes=3,
                                       bits=(2, 4), partial_channels=2, backend="triton"))
    bns = [m for m in net.modules() if isinstance(m, qnn.OutputKeepingBatchNorm2d)]
    assert bns and all(m.backend == "triton" for m in bns)


@pytest.mark.parametrize("backend,device", FUSED)
def test_module_second_derivative_on_fused_kernels_is_pytorchs(backend, device):
    """Under create_graph=True the backward is PyTorch's (differentiable); first derivatives only
    would make the gradient of a gradient silently wrong."""
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randn(3, 2, 4, 5, generator=gen).to(device)
    w = torch.randn(3, 2, 4, 5, generator=gen).to(device)
    second = []
    for b in (backend, "reference"):
        bn = qnn.OutputKeepingBatchNorm2d(2, affine=False, backend=b).to(device)
        x = x0.clone().requires_grad_()
        (dx,) = torch.autograd.grad((bn(x) * w).pow(2).sum(), x, create_graph=True)
        (ddx,) = torch.autograd.grad(dx.pow(2).sum(), x)
        second.append((dx.detach(), ddx))
    torch.testing.assert_close(second[0][0], second[1][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(second[0][1], second[1][1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend,device", FUSED)
def test_supernet_step_with_fused_batch_norms_matches_pytorchs(backend, device):
    """A supernet forward and backward with the fused batch norms (the quantized ops on one
    backend for both) gives PyTorch's batch norms' loss and gradients."""
    from qdarts.supernet import SearchNetwork, SupernetConfig

    cfg = SupernetConfig(input_shape=(1, 8, 8), channels=4, layers=3, steps=2, num_classes=3, bits=(2, 4),
                         partial_channels=2)
    gen = torch.Generator().manual_seed(6)
    x, y = torch.randn(6, 1, 8, 8, generator=gen).to(device), torch.randint(0, 3, (6,), generator=gen).to(device)
    results = []
    for bn_backend in (backend, "reference"):
        torch.manual_seed(0)
        net = SearchNetwork(cfg).to(device)
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
