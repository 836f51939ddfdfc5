"""The C++ CPU depthwise convolution (csrc/cpu/depthwise_conv.cpp) against PyTorch's, and the paths
the quantized convs of qdarts_kernels.nn take on CPU (depthwise: that kernel; 1x1: matrix products;
others: PyTorch's convolution).

PyTorch's convolution in float64 is the reference: the kernel sums in another order than oneDNN, so
values and gradients are compared within a few fp32 roundings of the float64 result; what the
kernel itself promises (the same bits for any thread count and with or without the other gradient)
is compared bit for bit. Every instruction set giving the same bits: tests/test_cpu_kernels.py.
"""

import pytest
import torch
import torch.nn.functional as F

import qdarts_kernels as qk
from qdarts_kernels import nn as qnn

if "cpu" not in qk.available_backends():
    pytest.skip("qdarts_kernels._C (the C++ CPU kernels) is not built", allow_module_level=True)

ops = torch.ops.qdarts_C

# (N, C, H, W), (KH, KW), stride, padding, dilation: odd and tiny planes, both paths of the kernel
# (stride 1: the padded plane; other strides: row by row), padding wider than the kernel reach,
# asymmetric everything, and the supernet's shapes
GEOMETRIES = [
    ((2, 3, 7, 9), (3, 3), (1, 1), (1, 1), (1, 1)),
    ((1, 2, 1, 1), (1, 1), (1, 1), (0, 0), (1, 1)),
    ((3, 1, 5, 4), (3, 3), (1, 1), (0, 0), (1, 1)),
    ((2, 4, 11, 6), (3, 3), (1, 1), (2, 2), (2, 2)),
    ((2, 3, 8, 8), (5, 5), (2, 2), (4, 4), (2, 2)),
    ((2, 2, 5, 5), (3, 3), (2, 2), (0, 0), (1, 1)),
    ((1, 5, 9, 13), (3, 5), (1, 2), (2, 0), (1, 2)),
    ((2, 3, 6, 7), (2, 3), (3, 1), (3, 1), (2, 1)),
    ((4, 4, 32, 32), (5, 5), (1, 1), (2, 2), (1, 1)),
    ((4, 8, 16, 16), (3, 3), (2, 2), (1, 1), (1, 1)),
    # by image blocks (>= 16 images, planes of <= 32 positions): a partial block, two blocks and a tail
    ((20, 3, 4, 4), (5, 5), (2, 2), (4, 4), (2, 2)),
    ((130, 2, 2, 3), (3, 3), (1, 1), (1, 1), (1, 1)),
    ((70, 3, 6, 5), (3, 5), (2, 1), (1, 3), (1, 2)),
    ((17, 2, 8, 8), (5, 5), (1, 1), (4, 4), (2, 2)),
    ((16, 3, 16, 15), (5, 5), (2, 2), (2, 2), (1, 1)),
]


def _by_image_blocks(shape, stride):
    """Whether the C++ kernel takes this shape by image blocks (csrc/cpu/depthwise_conv.cpp)."""
    return shape[0] >= 16 and shape[2] * shape[3] <= (64 if tuple(stride) == (1, 1) else 256)


BLOCK_GEOMETRIES = [g for g in GEOMETRIES if _by_image_blocks(g[0], g[2])]


def _reference(x, w, g, stride, padding, dilation):
    """PyTorch's forward, dx and dw in float64."""
    x64, w64, g64 = x.double(), w.double(), g.double()
    y = F.conv2d(x64, w64, None, stride, padding, dilation, x.shape[1])
    dx, dw, _ = torch.ops.aten.convolution_backward(g64, x64, w64, None, stride, padding, dilation, False, [0, 0],
                                                    x.shape[1], [True, True, False])
    return y, dx, dw


def _assert_fp32_close(got, want, terms):
    """got (fp32) within the rounding of `terms` fp32 multiply-adds of the float64 result."""
    assert got.dtype == torch.float32 and got.shape == want.shape
    scale = want.abs().max().clamp_min(1e-30)
    err = ((got.double() - want).abs().max() / scale).item()
    assert err <= 4 * terms * 2.0 ** -24, f"relative error {err:.2e} for {terms} terms"


@pytest.mark.parametrize("shape,kernel,stride,padding,dilation", GEOMETRIES)
def test_forward_and_gradients_equal_pytorch_s(shape, kernel, stride, padding, dilation):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    w = torch.randn(shape[1], 1, *kernel, generator=gen)
    y = ops.depthwise_conv2d_forward(x, w, list(stride), list(padding), list(dilation))
    g = torch.randn(y.shape, generator=gen)
    y_ref, dx_ref, dw_ref = _reference(x, w, g, stride, padding, dilation)
    taps = kernel[0] * kernel[1]
    _assert_fp32_close(y, y_ref, taps)
    dx, dw = ops.depthwise_conv2d_backward(g, x, w, list(stride), list(padding), list(dilation), True, True)
    _assert_fp32_close(dx, dx_ref, taps)
    _assert_fp32_close(dw, dw_ref, shape[0] * y.shape[2] * y.shape[3])
    # each gradient alone: the same bits, and nothing for the other
    dx_only, none_w = ops.depthwise_conv2d_backward(g, x, w, list(stride), list(padding), list(dilation), True, False)
    none_x, dw_only = ops.depthwise_conv2d_backward(g, x, w, list(stride), list(padding), list(dilation), False, True)
    assert torch.equal(dx_only, dx) and torch.equal(dw_only, dw)
    assert none_w.numel() == 0 and none_x.numel() == 0


@pytest.mark.parametrize("shape", [(2, 3, 6, 6), (20, 3, 4, 4)], ids=["by planes", "by image blocks"])
@pytest.mark.parametrize("what", ["inf input", "nan input", "inf weight", "nan weight", "inf gradient"])
@pytest.mark.parametrize("stride,padding", [((1, 1), (0, 0)), ((1, 1), (1, 1)), ((2, 1), (1, 1))])
def test_non_finite_values_reach_only_the_gradients_pytorch_s_reach(what, stride, padding, shape):
    """Stride 1 works in a padded layout whose scratch columns hold zero gradients; an inf or NaN
    multiplied by them must not reach the gradients (an inf in the last column is read only by the
    taps of the last kernel column: PyTorch's other weight-gradient taps stay finite). The blocks of
    small planes hold padding zeros as well: a block with an inf or NaN takes the per-plane kernels."""
    gen = torch.Generator().manual_seed(12)
    x, w = torch.randn(shape, generator=gen), torch.randn(3, 1, 3, 3, generator=gen)
    bad = float("inf") if what.startswith("inf") else float("nan")
    if what.endswith("input"):
        x[0, 1, 2, shape[3] - 1] = bad
    elif what.endswith("weight"):
        w[1, 0, 0, 0] = bad
    y = ops.depthwise_conv2d_forward(x, w, list(stride), list(padding), [1, 1])
    g = torch.randn(y.shape, generator=gen)
    if what.endswith("gradient"):
        g[0, 1, 0, 0] = bad
    dx, dw = ops.depthwise_conv2d_backward(g, x, w, list(stride), list(padding), [1, 1], True, True)
    _, dx_ref, dw_ref = _reference(x, w, g, list(stride), list(padding), [1, 1])
    for got, want in ((dx, dx_ref), (dw, dw_ref)):
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
        finite = want.isfinite()
        torch.testing.assert_close(got[finite].double(), want[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,kernel,stride,padding,dilation", BLOCK_GEOMETRIES)
def test_image_blocks_give_the_per_plane_bits(shape, kernel, stride, padding, dilation):
    """Small planes of >= 16 images go by blocks of images; the forward and dx add the same terms in
    the same order as the per-plane kernels (which one image at a time takes): the same bits."""
    gen = torch.Generator().manual_seed(5)
    args = (list(stride), list(padding), list(dilation))
    x = torch.randn(shape, generator=gen)
    w = torch.randn(shape[1], 1, *kernel, generator=gen)
    y = ops.depthwise_conv2d_forward(x, w, *args)
    g = torch.randn(y.shape, generator=gen)
    dx, dw = ops.depthwise_conv2d_backward(g, x, w, *args, True, True)
    one = [(ops.depthwise_conv2d_forward(x[i:i + 1], w, *args),
            ops.depthwise_conv2d_backward(g[i:i + 1], x[i:i + 1], w, *args, True, False)[0]) for i in range(len(x))]
    assert torch.equal(y, torch.cat([o[0] for o in one])) and torch.equal(dx, torch.cat([o[1] for o in one]))
    dx_only, _ = ops.depthwise_conv2d_backward(g, x, w, *args, True, False)
    _, dw_only = ops.depthwise_conv2d_backward(g, x, w, *args, False, True)
    assert torch.equal(dx_only, dx) and torch.equal(dw_only, dw)


def test_non_contiguous_inputs_and_empty_batch():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 9, 10, 4, generator=gen).permute(0, 3, 1, 2)  # [3, 4, 9, 10], not contiguous
    w = torch.randn(4, 1, 3, 3, generator=gen)
    y = ops.depthwise_conv2d_forward(x, w, [1, 1], [1, 1], [1, 1])
    assert torch.equal(y, ops.depthwise_conv2d_forward(x.contiguous(), w, [1, 1], [1, 1], [1, 1]))
    g = torch.randn(y.shape, generator=gen).transpose(2, 3).contiguous().transpose(2, 3)
    got = ops.depthwise_conv2d_backward(g, x, w, [1, 1], [1, 1], [1, 1], True, True)
    want = ops.depthwise_conv2d_backward(g.contiguous(), x.contiguous(), w, [1, 1], [1, 1], [1, 1], True, True)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    empty = torch.empty(0, 4, 9, 10)
    assert ops.depthwise_conv2d_forward(empty, w, [1, 1], [1, 1], [1, 1]).shape == (0, 4, 9, 10)
    dx, dw = ops.depthwise_conv2d_backward(torch.empty(0, 4, 9, 10), empty, w, [1, 1], [1, 1], [1, 1], True, True)
    assert dx.shape == (0, 4, 9, 10) and torch.equal(dw, torch.zeros_like(w))


@pytest.mark.parametrize("plane", [32, 4], ids=["by planes", "by image blocks"])
@pytest.mark.parametrize("stride", [(1, 1), (2, 2)])
def test_same_bits_for_any_thread_count(stride, plane):
    gen = torch.Generator().manual_seed(2)
    images = 16 if plane == 32 else 150
    x, w = torch.randn(images, 4, plane, plane, generator=gen), torch.randn(4, 1, 5, 5, generator=gen)
    g = torch.randn(ops.depthwise_conv2d_forward(x, w, list(stride), [2, 2], [1, 1]).shape, generator=gen)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append([ops.depthwise_conv2d_forward(x, w, list(stride), [2, 2], [1, 1]),
                            *ops.depthwise_conv2d_backward(g, x, w, list(stride), [2, 2], [1, 1], True, True)])
    finally:
        torch.set_num_threads(threads)
    for run in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(run, results[0]))


def test_bad_input_is_refused_with_the_argument_named():
    x, w = torch.randn(2, 3, 8, 8), torch.randn(3, 1, 3, 3)
    one = [1, 1]
    cases = [
        (lambda: ops.depthwise_conv2d_forward(x.double(), w, one, one, one), "x must be a float32"),
        (lambda: ops.depthwise_conv2d_forward(x, w.half(), one, one, one), "weight must be a float32"),
        (lambda: ops.depthwise_conv2d_forward(x[0], w, one, one, one), "x must be 4-D"),
        (lambda: ops.depthwise_conv2d_forward(x, torch.randn(3, 2, 3, 3), one, one, one), "weight must be"),
        (lambda: ops.depthwise_conv2d_forward(x, torch.randn(4, 1, 3, 3), one, one, one), "weight must be"),
        (lambda: ops.depthwise_conv2d_forward(x, w, [0, 1], one, one), "stride must be >= 1"),
        (lambda: ops.depthwise_conv2d_forward(x, w, one, [-1, 0], one), "padding must be >= 0"),
        (lambda: ops.depthwise_conv2d_forward(x, w, one, one, [1]), "dilation must have 2 values"),
        (lambda: ops.depthwise_conv2d_forward(x, torch.randn(3, 1, 11, 3), one, one, one), "larger than"),
        (lambda: ops.depthwise_conv2d_forward(x[:, :, :0], w, one, one, one), "non-zero channels, height and width"),
        (lambda: ops.depthwise_conv2d_backward(torch.randn(2, 3, 7, 8), x, w, one, one, one, True, True),
         "grad must have the output's shape"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


def _layer_grads(monkeypatch, kernels_on: bool, **conv):
    monkeypatch.setenv("QDARTS_FEW_CHANNEL_KERNELS", "1" if kernels_on else "0")
    torch.manual_seed(3)
    layer = qnn.QuantConv2d(6, conv.pop("out_channels", 6), bias=False, weight_bits=(2, 4, 8), act_bits=(2, 4, 8),
                            backend="cpu", **conv)
    x = torch.randn(5, 6, 13, 11, requires_grad=True)
    y = layer(x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(4)))
    return [y.detach(), x.grad] + [p.grad for p in layer.parameters() if p.grad is not None]


@pytest.mark.parametrize("conv", [dict(kernel_size=3, padding=1, groups=6), dict(kernel_size=5, padding=4, dilation=2,
                                                                                groups=6),
                                  dict(kernel_size=3, stride=2, padding=1, groups=6)])
def test_quantized_depthwise_conv_takes_the_kernel_with_pytorch_s_values_and_gradients(monkeypatch, conv):
    calls = []
    real = torch.ops.qdarts_C.depthwise_conv2d_backward

    def counted(*args):
        calls.append(args[-2:])
        return real(*args)

    monkeypatch.setattr(torch.ops.qdarts_C, "depthwise_conv2d_backward", counted)
    got = _layer_grads(monkeypatch, True, **dict(conv))
    assert calls == [(True, True)]  # the input's and the weight's gradient in one call
    want = _layer_grads(monkeypatch, False, **dict(conv))
    assert len(calls) == 1 and len(got) == len(want) == 5  # y, x, weight, and the two bit logits
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("out_channels,stride", [(6, 1), (11, 1), (6, 2), (11, (3, 2)), (5, (1, 4))])
def test_quantized_pointwise_conv_as_matrix_products_has_pytorch_s_values_and_gradients(monkeypatch, out_channels,
                                                                                          stride):
    """Strided too (on the 13x11 input: odd sizes, so the last row and column are read at stride 2 and
    skipped at 3 or 4), where the skipped pixels get a zero gradient."""

    def no_conv(*args, **kwargs):
        raise AssertionError("PyTorch's convolution ran where the matrix products should")

    monkeypatch.setattr(torch.ops.aten, "convolution_backward", no_conv)
    with monkeypatch.context() as m:
        m.setattr(torch.nn.functional, "conv2d", no_conv)
        got = _layer_grads(monkeypatch, True, kernel_size=1, out_channels=out_channels, stride=stride)
    monkeypatch.undo()
    want = _layer_grads(monkeypatch, False, kernel_size=1, out_channels=out_channels, stride=stride)
    assert len(got) == len(want) == 5
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("grad", [True, False])
def test_quantized_pointwise_conv_on_an_empty_batch(monkeypatch, stride, grad):
    """The matrix products name the output channels: a view with -1 cannot infer them for an empty batch."""
    layer = qnn.QuantConv2d(4, 8, 1, stride=stride, bias=False, backend="cpu")
    x = torch.randn(0, 4, 6, 6, requires_grad=grad)
    results = []
    for kernels in ("1", "0"):
        monkeypatch.setenv("QDARTS_FEW_CHANNEL_KERNELS", kernels)
        y = layer(x)
        if grad:
            y.sum().backward()
        results.append((y.shape, None if x.grad is None else x.grad.shape))
    assert results[0] == results[1] and results[0][0] == (0, 8, 6 // stride, 6 // stride)


@pytest.mark.parametrize("conv", [dict(kernel_size=3, padding=1, groups=6), dict(kernel_size=1, out_channels=9),
                                  dict(kernel_size=5, stride=2, padding=2, dilation=1, groups=6)])
@pytest.mark.parametrize("no_grad", [torch.no_grad, torch.inference_mode])
def test_quantized_conv_without_gradients_takes_the_kernels_with_pytorch_s_values(monkeypatch, conv, no_grad):
    """Evaluation (no graph): the depthwise kernel or the matrix products, PyTorch's values; inside
    eager_reference(), PyTorch's convolution."""
    torch.manual_seed(5)
    layer = qnn.QuantConv2d(6, conv.pop("out_channels", 6), bias=False, weight_bits=(2, 4, 8), act_bits=(2, 4, 8),
                            backend="cpu", **conv).eval()
    x = torch.randn(4, 6, 13, 11)
    monkeypatch.setenv("QDARTS_FEW_CHANNEL_KERNELS", "0")
    with no_grad():
        want = layer(x)
    monkeypatch.setenv("QDARTS_FEW_CHANNEL_KERNELS", "1")
    pytorch_convs = []
    real_conv2d = torch.nn.functional.conv2d
    monkeypatch.setattr(torch.nn.functional, "conv2d", lambda *a, **k: pytorch_convs.append(1) or real_conv2d(*a, **k))
    with no_grad():
        got = layer(x)
    assert pytorch_convs == []
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    with qk.eager_reference(), no_grad():
        layer(x)
    assert len(pytorch_convs) == 1


@pytest.mark.parametrize("conv", [dict(kernel_size=3, padding=1, groups=4), dict(kernel_size=1, out_channels=8)])
def test_an_unbatched_input_without_gradients_takes_pytorch_s_convolution(conv):
    """A [C, H, W] input (which F.conv2d takes) with no graph: PyTorch's convolution, the batched
    input's values (the kernels read H as the channels before: a wrong shape, or an error)."""
    torch.manual_seed(6)
    layer = qnn.QuantConv2d(4, conv.pop("out_channels", 4), bias=False, backend="cpu", **conv).eval()
    x = torch.randn(1, 4, 4, 6)  # H == C: the depthwise kernel took it for a 4-channel input
    with torch.no_grad():
        want = layer(x)[0]
        got = layer(x[0])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_autocast_and_dense_convs_keep_pytorch_s_convolution(monkeypatch):
    monkeypatch.setattr(torch.ops.qdarts_C, "depthwise_conv2d_forward",
                        lambda *a: pytest.fail("the depthwise kernel ran where PyTorch's conv should"))
    x = torch.randn(2, 4, 8, 8)
    dense = qnn.QuantConv2d(4, 4, 3, padding=1, bias=False, backend="cpu")
    dense(x.requires_grad_())
    padded_1x1 = qnn.QuantConv2d(4, 4, 1, padding=1, bias=False, backend="cpu")
    assert padded_1x1(x).shape == (2, 4, 10, 10)
    depthwise = qnn.QuantConv2d(4, 4, 3, padding=1, groups=4, bias=False, backend="cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert depthwise(x).dtype == torch.bfloat16
    with_bias = qnn.QuantConv2d(4, 4, 3, padding=1, groups=4, backend="cpu")
    with_bias(x)
