"""The Triton depthwise-conv weight gradient (qdarts_kernels.triton.depthwise_conv) and the
quantized conv that takes it: against PyTorch's ``convolution_backward`` on odd shapes, kernel
sizes, strides, paddings and dilations (the DARTS separable and dilated convs among them), several
items per reduction program, fp32/fp16/bf16; run-to-run determinism; which convs take it. On CPU the
kernel runs under TRITON_INTERPRET=1 (set by conftest.py); on a GPU it runs compiled.
"""

from __future__ import annotations

import pytest
import torch

import qdarts_kernels as qk
import qdarts_kernels.nn as qnn

pytest.importorskip("triton")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

pytestmark = pytest.mark.skipif(
    "triton" not in qk.available_backends(), reason="the triton backend is not available here"
)

# (N, C, H, W, kernel, stride, padding, dilation): DARTS' sep_conv 3x3/5x5 and dil_conv 3x3/5x5,
# normal and reduction, then odd sizes, a 1x1 and a kernel larger than the map
CONVS = [(4, 4, 16, 16, 3, 1, 1, 1), (4, 4, 16, 16, 5, 2, 2, 1), (3, 2, 11, 8, 3, 2, 2, 2), (2, 5, 13, 13, 5, 1, 4, 2),
         (5, 2, 3, 3, 3, 1, 1, 1), (2, 3, 9, 10, 1, 2, 0, 1), (3, 3, 7, 17, 3, (1, 2), (2, 0), (1, 3)),
         (2, 2, 2, 3, 5, 1, 2, 1)]


@pytest.fixture
def dwc():
    from qdarts_kernels.triton import depthwise_conv

    return depthwise_conv


def _pair(v):
    return (v, v) if isinstance(v, int) else v


def _check(dwc, conv, dtype):
    n, c, h, w, k, stride, padding, dilation = conv
    (kh, kw), stride, padding, dilation = _pair(k), _pair(stride), _pair(padding), _pair(dilation)
    gen = torch.Generator().manual_seed(n * 100 + c * 10 + (k if isinstance(k, int) else 10 * kh + kw))
    x = torch.randn(n, c, h, w, generator=gen).to(dtype).to(DEVICE)
    weight = torch.randn(c, 1, kh, kw, generator=gen).to(DEVICE)
    y = torch.nn.functional.conv2d(x.float(), weight, None, stride, padding, dilation, c)
    g = torch.randn(y.shape, generator=gen).to(dtype).to(DEVICE)
    _, want, _ = torch.ops.aten.convolution_backward(g.float(), x.float(), weight, None, stride, padding, dilation,
                                                     False, [0, 0], c, [False, True, False])
    got = dwc.depthwise_conv2d_weight_grad(g, x, (kh, kw), stride, padding, dilation)
    assert got.dtype == torch.float32 and got.shape == weight.shape
    # fp32 sums of n * Ho * Wo products in another order: a few units in the last place of the
    # magnitudes summed
    scale = (g.float().abs().flatten(2).sum(-1).sum(0).max() * x.float().abs().max()).item()
    torch.testing.assert_close(got, want, rtol=0, atol=4 * torch.finfo(torch.float32).eps * scale)
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("conv", CONVS, ids=str)
def test_matches_convolution_backward(dwc, conv, dtype):
    _check(dwc, conv, dtype)


# kernels of KH != KW: a tap's row is tap // KW, its column tap % KW; the last on rows of MAX_WIDTH outputs
@pytest.mark.parametrize("conv", [(2, 3, 9, 11, (1, 3), 1, (0, 1), 1), (2, 2, 10, 7, (3, 5), (2, 1), (1, 2), (2, 1)),
                                  (3, 2, 8, 9, (5, 2), 1, (2, 1), (1, 2)), (1, 2, 3, 4096, (1, 3), 1, (0, 1), 1)],
                         ids=str)
def test_matches_with_non_square_kernels(dwc, conv):
    _check(dwc, conv, torch.float32)


@pytest.mark.parametrize("conv", [(9, 2, 16, 16, 3, 1, 1, 1), (7, 1, 70, 5, 3, 2, 1, 2)], ids=str)
def test_matches_with_several_items_per_reduction_program(dwc, monkeypatch, conv):
    monkeypatch.setattr(dwc, "_REDUCE_PROGRAMS", 3)
    dwc.plan.cache_clear()
    try:
        n, c, h, w, k, s, p, d = conv
        ho = (h + 2 * p - d * (k - 1) - 1) // s + 1
        wo = (w + 2 * p - d * (k - 1) - 1) // s + 1
        plan = dwc.plan(n, c, ho, wo)
        assert plan.rounds > 1 and plan.partials * plan.rounds >= plan.items
        first = _check(dwc, conv, torch.float32)
        assert torch.equal(first, _check(dwc, conv, torch.float32))  # bit for bit, run to run
    finally:
        dwc.plan.cache_clear()


def test_supports_depthwise_convs_only(dwc):
    x = torch.empty(2, 4, 8, 8)
    assert dwc.supports(x, (4, 1, 3, 3), 4, 8)
    assert not dwc.supports(x, (8, 1, 3, 3), 4, 8)  # two filters per channel
    assert not dwc.supports(x, (4, 2, 3, 3), 2, 8)  # grouped, not depthwise
    assert not dwc.supports(x, (4, 4, 3, 3), 1, 8)
    assert not dwc.supports(x.double(), (4, 1, 3, 3), 4, 8)
    assert not dwc.supports(x, (4, 1, 3, 3), 4, dwc.MAX_WIDTH + 1)
    assert dwc.supports(x, (4, 1, 3, 3), 4, dwc.MAX_WIDTH) and dwc.supports(x, (4, 1, 1, 3), 4, 1)
    assert not dwc.supports(x, (4, 1, 3, 3), 4, 0)


def _quant_conv_weight_grad(backend, groups, monkeypatch):
    from qdarts_kernels.triton import depthwise_conv

    calls = []
    kernel = depthwise_conv.depthwise_conv2d_weight_grad
    monkeypatch.setattr(depthwise_conv, "depthwise_conv2d_weight_grad", lambda *a: calls.append(1) or kernel(*a))
    torch.manual_seed(0)
    conv = qnn.QuantConv2d(4, 4, 3, 2, 1, groups=groups, bias=False, weight_bits=(2, 4), act_bits=(2, 4),
                           act_signed=True, backend=backend).to(DEVICE)
    x = torch.randn(3, 4, 9, 9, generator=torch.Generator().manual_seed(1)).to(DEVICE).requires_grad_()
    conv(x).pow(2).sum().backward()
    return conv.weight.grad, x.grad, len(calls)


def test_quantized_depthwise_conv_takes_the_kernel_on_the_triton_backend(monkeypatch):
    other = "reference" if DEVICE.type == "cpu" else "cuda"
    dw, dx, calls = _quant_conv_weight_grad("triton", 4, monkeypatch)
    dw_ref, dx_ref, calls_ref = _quant_conv_weight_grad(other, 4, monkeypatch)
    assert calls == 1 and calls_ref == (1 if other == "cuda" else 0)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-6)
    assert _quant_conv_weight_grad("triton", 1, monkeypatch)[2] == 0  # a dense conv: PyTorch's
    monkeypatch.setenv("QDARTS_FEW_CHANNEL_KERNELS", "0")  # the switch for timing PyTorch's
    assert _quant_conv_weight_grad("triton", 4, monkeypatch)[2] == 0
