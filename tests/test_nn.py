"""qdarts_kernels.nn: quantizer modules, composite layers, quantize_ and the torch.ao QAT path.

The modules use the automatic backend (the C++ kernels when built, else the reference); both are
bit-exact in the forward pass, so the equalities below hold for either.
"""

import copy
import math
import os
import re
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.ao.quantization as tq
from torch import nn

import qdarts_kernels as qk
from qdarts_kernels import nn as qnn
from qdarts_kernels.nn import quantizers as quantizers_module


def _fq(bits, grid, per_channel, c=4, scale=None):
    """A FakeQuantize with a fixed scale (observer off) for comparison with PyTorch's ops."""
    fq = qnn.FakeQuantize(bits, grid=grid, ch_axis=1 if per_channel else None, num_channels=c if per_channel else None)
    fq.disable_observer()
    with torch.no_grad():
        fq.scales.copy_(scale.reshape(fq.scales.shape))
    return fq


# ------------------------------------------------------------------------------------------------
# FakeQuantize against PyTorch's fake-quant ops
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("grid", ["signed", "unsigned"])
@pytest.mark.parametrize("bits", [8, 4])
def test_fake_quantize_equals_torch_fake_quantize_bit_for_bit(bits, grid, per_channel):
    torch.manual_seed(0)
    x = torch.randn(8, 4, 5, 5) * 3
    scale = torch.rand(4 if per_channel else 1) * 0.2 + 0.01
    fq = _fq(bits, grid, per_channel, scale=scale)
    qmin, qmax = fq.quant_min, fq.quant_max
    if per_channel:
        expected = torch.fake_quantize_per_channel_affine(x, scale, torch.zeros(4, dtype=torch.int32), 1, qmin, qmax)
    else:
        expected = torch.fake_quantize_per_tensor_affine(x, float(scale), 0, qmin, qmax)
    torch.testing.assert_close(fq(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
def test_fake_quantize_gradients_equal_torch_learnable_fake_quant(per_channel):
    """LSQ gradients (with LSQ gradient scaling) = PyTorch's learnable op with grad_factor 1/sqrt(n Qp)."""
    torch.manual_seed(1)
    c = 4
    x = (torch.randn(8, c, 5, 5) * 2).requires_grad_()
    g = torch.randn_like(x)
    scale = torch.rand(c if per_channel else 1) * 0.05 + 0.01
    fq = _fq(8, "signed", per_channel, c=c, scale=scale)
    (fq(x) * g).sum().backward()

    x_t = x.detach().clone().requires_grad_()
    s_t = scale.clone().requires_grad_()
    if per_channel:
        z_t = torch.zeros(c)
        factor = 1.0 / math.sqrt(x.numel() / c * 127)
        y_t = torch._fake_quantize_learnable_per_channel_affine(x_t, s_t, z_t, 1, -128, 127, factor)
    else:
        z_t = torch.zeros(1)
        factor = 1.0 / math.sqrt(x.numel() * 127)
        y_t = torch._fake_quantize_learnable_per_tensor_affine(x_t, s_t, z_t, -128, 127, factor)
    (y_t * g).sum().backward()
    torch.testing.assert_close(x.grad, x_t.grad, rtol=0, atol=0)
    torch.testing.assert_close(fq.scales.grad.reshape(-1), s_t.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
def test_mixed_quantizer_is_the_mixed_op_with_softmax_probs_and_lsq_gradient_scaling(per_channel):
    torch.manual_seed(13)
    bits, c = (2, 4, 8), 3
    mq = qnn.MixedPrecisionFakeQuantize(bits, grid="signed", quantizer="lsq",
                                        per_channel_axis=1 if per_channel else None,
                                        num_channels=c if per_channel else None)
    x = torch.randn(5, c, 4, 4).requires_grad_()
    g = torch.randn_like(x)
    mq(x)  # LSQ initialisation
    with torch.no_grad():
        mq.logits.copy_(torch.randn(3))
    (mq(x) * g).sum().backward()

    logits = mq.logits.detach().clone().requires_grad_()
    scales = mq.scales.detach().clone().requires_grad_()
    x_r = x.detach().clone().requires_grad_()
    y_r = qk.reference.mixed_fake_quant(x_r, torch.softmax(logits, 0), scales, bits, grid="signed",
                                        axis=1 if per_channel else None)
    (y_r * g).sum().backward()
    n = x.numel() // c if per_channel else x.numel()
    factor = torch.tensor([1 / math.sqrt(n * (2 ** (b - 1) - 1)) for b in bits])
    torch.testing.assert_close(mq(x), y_r, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, x_r.grad, rtol=1e-6, atol=1e-7)  # sum_k p_k in_k: order of the sum
    torch.testing.assert_close(mq.logits.grad, logits.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mq.scales.grad, scales.grad * (factor[:, None] if per_channel else factor),
                               rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# LSQ initialisation and switches
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid,top", [("signed", lambda b: 2 ** (b - 1) - 1), ("unsigned", lambda b: 2**b - 1),
                                      ("midrise", lambda b: 2 ** (b - 1) - 0.5)])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
def test_lsq_scales_initialised_from_first_batch(grid, top, per_channel):
    torch.manual_seed(2)
    bits = (2, 4, 8)
    mq = qnn.MixedPrecisionFakeQuantize(bits, grid=grid, quantizer="lsq", per_channel_axis=1 if per_channel else None)
    x = torch.randn(6, 3, 4, 4)
    mq(x)
    mean_abs = x.abs().mean(dim=(0, 2, 3)) if per_channel else x.abs().mean().reshape(1)
    expected = torch.stack([2 * mean_abs / math.sqrt(top(b)) for b in bits])
    torch.testing.assert_close(mq.scales.detach().reshape(expected.shape), expected, rtol=1e-6, atol=0)
    assert int(mq.initialized) == 1
    first = mq.scales.detach().clone()
    mq(x * 10)
    torch.testing.assert_close(mq.scales.detach(), first, rtol=0, atol=0)
    mq.reset_scales()
    mq(x * 10)
    torch.testing.assert_close(mq.scales.detach(), first * 10, rtol=1e-6, atol=0)


@pytest.mark.parametrize("grid", ["signed", "relu"])
def test_lsq_scales_are_not_initialised_from_zeros(grid):
    """Zeros say nothing about a scale: an all-zero first batch leaves the scales at 1 (not the floor
    MIN_SCALE, which would clip every later input); a channel all zeros in the first batch (dead after
    a ReLU, or negative on the relu grid) takes the whole batch's mean."""
    bits = (2, 4, 8)
    mq = qnn.MixedPrecisionFakeQuantize(bits, grid=grid)
    assert torch.equal(mq(torch.zeros(4, 3)), torch.zeros(4, 3))
    assert torch.equal(mq.scales.detach(), torch.ones(3))
    per_channel = qnn.MixedPrecisionFakeQuantize(bits, grid=grid, per_channel_axis=1)
    x = torch.rand(6, 3, 4, 4) + 0.5
    x[:, 1] = 0 if grid == "signed" else -x[:, 1]
    per_channel(x)
    magnitudes = x.abs() if grid == "signed" else torch.relu(x)
    factor = per_channel._init_factor[:, None]
    expected = factor * magnitudes.mean(dim=(0, 2, 3))[None, :]
    expected[:, 1] = factor[:, 0] * magnitudes.mean()
    torch.testing.assert_close(per_channel.scales.detach(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("grid", ["signed", "relu"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
def test_lsq_scales_are_initialised_from_the_finite_elements(bad, per_channel, grid):
    """One overflowed element in the first batch (an fp16 step a loss scaler skips) does not set
    the scales for good: they come from the finite elements (inf made them inf, and every later
    batch was refused; NaN read as "all zero" and left them at 1). A channel with no finite element
    takes the batch's mean, as an all-zero one does."""
    torch.manual_seed(3)
    bits = (2, 4, 8)
    mq = qnn.MixedPrecisionFakeQuantize(bits, grid=grid, per_channel_axis=1 if per_channel else None)
    x = torch.randn(6, 3, 4, 4)
    x[2, 1, 0, 3] = bad
    if per_channel:
        x[:, 2] = bad
    y = mq(x)
    magnitudes = x.abs() if grid == "signed" else torch.relu(x)
    finite = torch.where(magnitudes.isfinite(), magnitudes, math.nan)
    mean_abs = finite.nanmean().reshape(1)
    if per_channel:
        mean_abs = finite.nanmean(dim=(0, 2, 3))
        mean_abs[2] = finite.nanmean()  # no finite element (or, relu(-inf) = 0, all zero): the batch's
    expected = mq._init_factor[:, None] * mean_abs[None, :]
    torch.testing.assert_close(mq.scales.detach().reshape(expected.shape), expected, rtol=1e-6, atol=0)
    assert torch.isfinite(mq.scales).all()
    assert torch.isfinite(y[x.isfinite()]).all()
    assert torch.isfinite(mq(torch.randn(6, 3, 4, 4))).all()


def test_one_bit_weights_and_signed_activations_take_the_midrise_grid():
    """The signed 1-bit levels are {-s, 0}: every positive weight would become 0. By default 1-bit
    weights (and activations of either sign) take the mid-rise levels +-s/2; an explicit
    grid="signed" stays signed (PyTorch's quant_min -1, quant_max 0)."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Linear(6, 5))
    qnn.quantize_(model, weight_bits=1, act_bits=(1, 4))
    y = model(torch.randn(2, 3, 8, 8))
    assert torch.isfinite(y).all()
    for layer in (model[0], model[2]):
        assert (layer.weight_quant.grid, layer.act_quant.grid) == ("midrise", "midrise")
        levels = layer.weight_quant(layer.weight).detach()
        scales = layer.weight_quant.scales.detach()[0].reshape(-1, *[1] * (levels.dim() - 1))
        torch.testing.assert_close(levels.abs(), (scales / 2).expand_as(levels), rtol=0, atol=0)
        assert torch.equal(levels > 0, layer.weight > 0)
    for kwargs in (dict(weight_bits=(2, 4), act_bits=(2, 4), act_signed=True), dict(act_bits=1, act_signed=False)):
        layer = qnn.QuantConv2d(3, 4, 3, quantizer="lsq", **kwargs)
        assert layer.weight_quant.grid == ("midrise" if 1 in kwargs.get("weight_bits", (8,)) else "signed")
        assert layer.act_quant.grid == ("signed" if kwargs["act_signed"] else "unsigned")
    assert qnn.MixedPrecisionFakeQuantize(1, grid="signed", role="weight").grid == "signed"
    paper = qnn.QuantConv2d(3, 4, 3, quantizer="paper", weight_bits=(1, 2), act_bits=(1, 2), act_signed=True)
    assert paper.act_quant.grid == "midrise" and torch.isfinite(paper(torch.randn(2, 3, 8, 8))).all()


def test_bit_widths_of_a_quantizer_must_be_distinct():
    with pytest.raises(ValueError, match=r"bits must be distinct, got \(4, 4\)"):
        qnn.MixedPrecisionFakeQuantize((4, 4))
    with pytest.raises(ValueError, match="weight_bits must be distinct"):
        qnn.QuantConv2d(3, 4, 3, weight_bits=(2, 8, 2))


@pytest.mark.parametrize("kwargs", [dict(quantizer="lsq"), dict(quantizer="lsq", per_channel_axis=1),
                                    dict(quantizer="paper"), dict(quantizer="paper", grid="relu"),
                                    dict(quantizer="paper", grid="signed")], ids=str)
def test_an_empty_batch_passes_through_and_observes_nothing(kwargs):
    """As nn.Conv2d and PyTorch's FakeQuantize: an empty batch gives an empty output (and an empty
    gradient); LSQ scales are then initialised by the first non-empty batch, not from nothing (the
    mean of nothing is NaN)."""
    torch.manual_seed(3)
    bits = (2, 4, 8)  # 8 bits: the paper activation scale by the max, a reduction that refuses empty input
    ours, fresh = (qnn.MixedPrecisionFakeQuantize(bits, **kwargs) for _ in range(2))
    empty = torch.randn(0, 3, 4, requires_grad=True)
    y = ours(empty)
    y.sum().backward()
    assert y.shape == empty.shape and empty.grad.shape == empty.shape
    x = torch.randn(5, 3, 4)
    assert torch.equal(ours(x), fresh(x))
    if kwargs["quantizer"] == "lsq":
        assert torch.equal(ours.scales, fresh.scales) and int(ours.initialized) == 1
    conv = qnn.QuantConv2d(3, 4, 3, quantizer=kwargs["quantizer"])
    assert conv(torch.randn(0, 3, 8, 8)).shape == (0, 4, 6, 6)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
@pytest.mark.parametrize("quantizer", ["lsq", "paper"])
@pytest.mark.parametrize("bits", [8, (2, 4, 8)], ids=str)
def test_a_layer_without_inputs_is_its_bias(quantizer, bits):
    """As nn.Linear(0, n): the output is the bias (the per-channel max of an empty weight row, which
    the 8-bit paper scale takes, is no reduction error), the weight's gradient is empty."""
    layer = qnn.QuantLinear(0, 4, quantizer=quantizer, weight_bits=bits, act_bits=bits)
    y = layer(torch.randn(3, 0))
    y.sum().backward()
    assert torch.equal(y, layer.bias.detach().expand(3, 4)) and layer.weight.grad.shape == (4, 0)
    assert torch.equal(layer.bias.grad, torch.full((4,), 3.0))


@pytest.mark.parametrize("quantizer", ["lsq", "paper"])
@pytest.mark.parametrize("layer", ["conv", "linear"])
def test_fuse_relu_is_relu_then_the_unsigned_layer(quantizer, layer):
    """fuse_relu=True: the layer on relu(x), bit for bit (forward and every gradient), with the
    scales observed on relu(x) (LSQ initialisation; the by-max scale of 8 bits); with fake
    quantization off, relu(x) goes to the layer unquantized."""
    torch.manual_seed(4)
    make = ((lambda **kw: qnn.QuantConv2d(3, 5, 3, padding=1, weight_bits=(2, 4), act_bits=(2, 4, 8), **kw))
            if layer == "conv" else (lambda **kw: qnn.QuantLinear(6, 5, weight_bits=(2, 4), act_bits=(2, 4, 8), **kw)))
    fused, explicit = make(quantizer=quantizer, fuse_relu=True), make(quantizer=quantizer)
    explicit.load_state_dict(fused.state_dict())
    assert fused.act_quant.grid == "relu" and explicit.act_quant.grid == "unsigned"
    x = torch.randn((4, 3, 6, 6) if layer == "conv" else (4, 6)) - 0.3
    for fake_quant in (True, False):
        for m in (fused, explicit):
            m.act_quant.enable_fake_quant(fake_quant)
        xf, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, y_want = fused(xf), explicit(torch.relu(xe))
        assert torch.equal(y, y_want)
        g = torch.randn_like(y)
        got = torch.autograd.grad(y, [xf, *fused.parameters()], g, allow_unused=True)
        want = torch.autograd.grad(y_want, [xe, *explicit.parameters()], g, allow_unused=True)
        for a, b in zip(got, want):
            assert (a is None and b is None) or torch.equal(a, b)
    if quantizer == "lsq":  # initialised on relu(x): mean |x| would give larger scales
        assert torch.equal(fused.act_quant.scales, explicit.act_quant.scales)


def test_relu_grid_is_for_activations_only_and_excludes_signed():
    with pytest.raises(ValueError, match="relu"):
        qnn.MixedPrecisionFakeQuantize((2, 4), grid="relu", role="weight")
    with pytest.raises(ValueError, match="act_signed"):
        qnn.QuantConv2d(3, 3, 3, fuse_relu=True, act_signed=True)
    with pytest.raises(ValueError, match="act_bits"):
        qnn.QuantLinear(3, 3, fuse_relu=True, act_bits=None)


def test_scales_kept_positive_and_two_forwards_before_one_backward():
    lin = qnn.QuantLinear(8, 4, weight_bits=(2, 4), act_bits=8, quantizer="lsq")
    x = torch.randn(3, 8)
    lin(x)
    with torch.no_grad():
        lin.weight_quant.scales[0, 0] = -1.0
    (lin(x).sum() + lin(2 * x).sum()).backward()  # gradient accumulation over two forwards
    assert float(lin.weight_quant.scales[0, 0].detach()) == qnn.quantizers.MIN_SCALE
    assert torch.isfinite(lin.weight_quant.scales.grad).all()


def test_observer_off_keeps_scales_and_fake_quant_off_is_identity():
    x = torch.randn(4, 8)
    fq = qnn.FakeQuantize(4)
    tq.disable_observer(fq)
    fq(x)
    assert torch.equal(fq.scales.detach(), torch.ones(1)) and int(fq.initialized) == 0
    tq.disable_fake_quant(fq)
    assert fq(x) is x


def test_switches_and_scales_survive_state_dict_round_trip():
    torch.manual_seed(3)
    x = torch.randn(4, 8)
    src = qnn.FakeQuantize(4, ch_axis=1)  # per-channel scales created on the first batch
    src(x)
    src.disable_fake_quant()
    dst = qnn.FakeQuantize(4, ch_axis=1)
    dst.load_state_dict(src.state_dict())
    assert dst(x) is x
    dst.enable_fake_quant()
    src.enable_fake_quant()
    torch.testing.assert_close(dst(x * 5), src(x * 5), rtol=0, atol=0)  # initialised: no re-init on x*5


def test_a_quantizer_that_has_not_seen_a_batch_saves_and_loads_its_state(tmp_path):
    """Per-channel scales made on the first batch have no shape before it: state_dict() leaves them out
    (it failed on them), the file loads with torch.load's default weights_only, into a quantizer that has
    not seen a batch either (strict), which then initialises on its first batch as the original does;
    a quantizer that has scales still reports them missing."""
    torch.manual_seed(4)
    x = torch.randn(4, 8)
    never = qnn.FakeQuantize(4, ch_axis=1)
    state = never.state_dict()
    assert "scales" not in state and "initialized" in state
    torch.save(state, tmp_path / "q.pt")
    fresh = qnn.FakeQuantize(4, ch_axis=1)
    fresh.load_state_dict(torch.load(tmp_path / "q.pt"))
    torch.testing.assert_close(fresh(x), never(x), rtol=0, atol=0)
    assert fresh.scales.shape == (1, 8)
    with pytest.raises(RuntimeError, match='Missing key.*"scales"'):
        fresh.load_state_dict(state)


# ------------------------------------------------------------------------------------------------
# The paper quantizers against their formulas
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6])
def test_paper_activation_is_hwgq(bits):
    torch.manual_seed(4)
    x = torch.randn(4, 3, 8, 8).requires_grad_()
    mq = qnn.MixedPrecisionFakeQuantize(bits, quantizer="paper", role="act")
    y = mq(x)
    y.sum().backward()
    steps = qnn.HWGQ_STEPS
    step = steps.get(bits, steps[4] * (steps[4] / steps[3]) ** (bits - 4))
    top = 2**bits - 1
    xd = x.detach()
    torch.testing.assert_close(y, step * torch.round(torch.clamp(xd, 0, top * step) / step), rtol=0, atol=0)
    r = torch.round(xd / step)
    torch.testing.assert_close(x.grad, ((r >= 0) & (r <= top)).float(), rtol=0, atol=0)


def test_paper_activation_8_bits_scales_by_max():
    torch.manual_seed(5)
    x = torch.randn(4, 3, 8, 8).relu()
    mq = qnn.MixedPrecisionFakeQuantize(8, quantizer="paper", role="act")
    s = x.abs().max() / 255
    torch.testing.assert_close(mq(x), qk.reference.fake_quant(x, s, 8, grid="unsigned"), rtol=0, atol=0)


@pytest.mark.parametrize("grid", ["relu", "unsigned", "signed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paper_activation_scales_are_the_max_scaled_or_the_table_step_bit_for_bit(grid, dtype):
    """The mixed activation scales: max|x| / top (at least MIN_SCALE) for the bit-widths scaled by the
    max, the HWGQ / Gaussian table step for the others, exactly as the three-step formula gives them
    (the quantizer computes them in fewer launches); zero and tiny inputs included."""
    torch.manual_seed(6)
    bits = (2, 4, 8)
    mq = qnn.MixedPrecisionFakeQuantize(bits, quantizer="paper", role="act", grid=grid)
    for x in (torch.randn(4, 3, 5, 5), torch.zeros(2, 3), torch.full((7,), 1e-30), -torch.rand(9) * 1e3):
        x = x.to(dtype)
        largest = (x.amax() if grid == "relu" else x.abs().amax()).float()
        by_max = (largest / mq._top).clamp_min(torch.finfo(torch.float32).eps)
        want = torch.where(mq._by_max, by_max, mq._steps)
        assert torch.equal(mq._paper_scales(x, None), want), (x.flatten()[:3], mq._paper_scales(x, None), want)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_paper_weight_is_gaussian_midrise_with_identity_gradient(bits):
    torch.manual_seed(6)
    w = (torch.randn(8, 4, 3, 3) * 0.1).requires_grad_()
    mq = qnn.MixedPrecisionFakeQuantize(bits, quantizer="paper", role="weight")
    y = mq(w)
    (y * torch.arange(w.numel()).reshape(w.shape)).sum().backward()
    wd = w.detach()
    step = qnn.GAUSSIAN_STEPS[bits] * wd.std()
    top = (2 ** (bits - 1) - 0.5) * step
    expected = torch.clamp((torch.round(wd / step + 0.5) - 0.5) * step, -top, top)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    torch.testing.assert_close(w.grad, torch.arange(w.numel()).reshape(w.shape).float(), rtol=0, atol=0)


@pytest.mark.parametrize("weight", ["constant", "zero", "one element"])
def test_paper_weight_without_a_spread_is_quantized_by_its_largest_magnitude(weight):
    """A weight whose std is 0 (constant, a zero-initialised head) or undefined (a single one) has no
    Gaussian step: its scale is max|W| / top, which represents a constant exactly (0 or NaN before),
    in the layer's own quantizer and in the grouped one alike."""
    from qdarts_kernels.nn import GroupedWeightQuantizer

    layer = qnn.QuantLinear(1, 1) if weight == "one element" else qnn.QuantLinear(4, 3)
    layer.weight_quant = qnn.MixedPrecisionFakeQuantize((2, 4), quantizer="paper", role="weight")
    with torch.no_grad():
        layer.weight.fill_({"constant": -0.5, "zero": 0.0, "one element": 0.37}[weight])
    w = layer.weight.detach()
    for y in (layer.weight_quant(layer.weight), GroupedWeightQuantizer([layer])()[0]):
        # the mid-rise grid has no 0: a zero weight becomes +-MIN_SCALE / 2, the levels nearest to it
        torch.testing.assert_close(y.detach(), w, rtol=1e-6, atol=1e-7)
        assert torch.isfinite(layer(torch.ones(2, layer.in_features))).all()


def test_paper_weight_8_bits_scales_per_output_channel_by_max():
    torch.manual_seed(7)
    w = torch.randn(8, 4, 3, 3) * torch.rand(8, 1, 1, 1)
    only_8_bits = nn.Parameter(torch.tensor([-1e4, 0.0]))  # softmax: exactly [0, 1]
    mq = qnn.MixedPrecisionFakeQuantize((2, 8), quantizer="paper", role="weight", logits=only_8_bits)
    s = w.abs().amax(dim=(1, 2, 3)) / 127.5
    expected = qk.reference.fake_quant(w, s, 8, grid="midrise", axis=0)
    torch.testing.assert_close(mq(w), expected, rtol=0, atol=0)
    assert w.abs().amax(dim=(1, 2, 3)).equal(mq(w).abs().amax(dim=(1, 2, 3)))  # the extreme is a level


# ------------------------------------------------------------------------------------------------
# Composite layers
# ------------------------------------------------------------------------------------------------


def _paper_scales(mq, t):
    """The paper scales from the module docstring's formulas, written out independently."""
    rows = []
    for b in mq.bits:
        if mq.role == "act":
            rows.append(t.abs().max() / (2**b - 1) if b >= 8 else torch.tensor(qnn.HWGQ_STEPS[b]))
        elif b >= 8:
            rows.append(t.abs().amax(dim=(1, 2, 3)) / (2 ** (b - 1) - 0.5))
        else:
            rows.append(qnn.GAUSSIAN_STEPS[b] * t.std() * torch.ones(t.shape[0]))
    return rows


@pytest.mark.parametrize("quantizer", ["lsq", "paper"])
def test_composite_conv_equals_sum_of_pairwise_quantized_convs(quantizer):
    """EdMIPS: conv(sum_i pa_i Q_i(x), sum_j pw_j Q_j(W)) = sum_i sum_j pa_i pw_j conv(Q_i(x), Q_j(W))."""
    torch.manual_seed(8)
    a_bits, w_bits = (2, 4, 8), (2, 8)
    conv = qnn.QuantConv2d(3, 6, 3, padding=1, act_bits=a_bits, weight_bits=w_bits, quantizer=quantizer)
    with torch.no_grad():
        conv.act_quant.logits.copy_(torch.randn(3))
        conv.weight_quant.logits.copy_(torch.randn(2))
    x = torch.randn(2, 3, 9, 9).relu()
    y = conv(x)
    w = conv.weight.detach()
    pa, pw = conv.act_quant.probs().detach(), conv.weight_quant.probs().detach()
    if quantizer == "lsq":
        sa, sw = conv.act_quant.scales.detach(), conv.weight_quant.scales.detach()
    else:
        sa, sw = _paper_scales(conv.act_quant, x), _paper_scales(conv.weight_quant, w)
    expected = 0
    for i, ba in enumerate(a_bits):
        xq = qk.reference.fake_quant(x, sa[i], ba, grid="unsigned")
        for j, bw in enumerate(w_bits):
            wq = qk.reference.fake_quant(w, sw[j], bw, grid=conv.weight_quant.grid, axis=0)
            # the bias enters every pair once; the probabilities of each set sum to one
            expected = expected + pa[i] * pw[j] * nn.functional.conv2d(xq, wq, conv.bias, padding=1)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_bits_queries_and_shared_logits():
    shared_a, shared_w = nn.Parameter(torch.tensor([0.0, 1.0])), nn.Parameter(torch.tensor([2.0, 0.0]))
    block = nn.Sequential(
        qnn.QuantConv2d(4, 4, 3, groups=4, act_bits=(2, 4), weight_bits=(2, 4), act_logits=shared_a,
                        weight_logits=shared_w),
        qnn.QuantConv2d(4, 8, 1, act_bits=(2, 4), weight_bits=(2, 4), act_logits=shared_a, weight_logits=shared_w),
    )
    names = [n for n, _ in block.named_parameters()]
    assert names.count("0.act_quant.logits") == 1 and "1.act_quant.logits" not in names
    e = block[1].expected_act_bits() * block[1].expected_weight_bits()
    e.backward()
    pa, pw = torch.softmax(shared_a.detach(), 0), torch.softmax(shared_w.detach(), 0)
    ea, ew = (pa * torch.tensor([2.0, 4.0])).sum(), (pw * torch.tensor([2.0, 4.0])).sum()
    torch.testing.assert_close(e.detach(), ea * ew)
    assert shared_a.grad is not None and shared_w.grad is not None
    assert block[1].chosen_bits() == (4, 2)
    block(torch.randn(2, 4, 10, 10))
    assert block[0].macs == 4 * 1 * 9 * 8 * 8 and block[0].input_hw == (10, 10)
    assert block[1].macs == 8 * 4 * 8 * 8
    unq = qnn.QuantLinear(5, 3, act_bits=None, weight_bits=4)
    unq(torch.randn(2, 7, 5))
    assert unq.act_quant is None and unq.chosen_bits() == (None, 4) and unq.macs == 5 * 3 * 7
    assert float(unq.expected_act_bits()) == 32.0


def test_no_host_sync_in_any_quantizer_forward_or_backward():
    """On the meta device any value read (.item(), bool(), data-dependent control flow) raises."""
    for quantizer in ("paper", "lsq"):
        for signed in (False, True):
            conv = qnn.QuantConv2d(3, 8, 3, act_bits=(2, 4, 8), weight_bits=(2, 4, 8), quantizer=quantizer,
                                   act_signed=signed, device="meta")
            lin = qnn.QuantLinear(8, 4, act_bits=8, weight_bits=(1, 8), quantizer=quantizer, device="meta")
            y = lin(conv(torch.randn(2, 3, 6, 6, device="meta")).mean((2, 3)))
            y.sum().backward()
            assert conv.weight.grad.shape == conv.weight.shape
            assert lin.weight_quant.logits.grad.shape == (2,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_sync_on_cuda_training_step():
    """CUDA's sync debug mode raises on any synchronising call (.item(), bool(), nonzero, ...)."""
    model = nn.Sequential(
        qnn.QuantConv2d(3, 8, 3, act_bits=(2, 4, 8), weight_bits=(2, 4, 8), quantizer="paper", device="cuda"),
        qnn.QuantConv2d(8, 8, 3, act_bits=(2, 4, 8), weight_bits=(2, 4, 8), quantizer="lsq", act_signed=True,
                        device="cuda"),
    )
    x = torch.randn(2, 3, 10, 10, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):  # the first step initialises the LSQ scales
            model(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert model[1].act_quant.scales.grad is not None


# ------------------------------------------------------------------------------------------------
# quantize_ and the torch.ao QAT path
# ------------------------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)


def test_quantize_swaps_layers_in_place_keeping_weights_and_changes_outputs():
    torch.manual_seed(9)
    model = SmallCNN()
    x, _ = _batch()
    ref = model(x)
    weights = [model.features[0].weight, model.features[3].weight, model.fc.weight]
    out = qnn.quantize_(model, weight_bits=4, act_bits=4, act_signed=False,
                        filter_fn=lambda m, fqn: fqn != "features.3")
    assert out is model
    assert type(model.features[0]) is qnn.QuantConv2d and type(model.fc) is qnn.QuantLinear
    assert type(model.features[3]) is nn.Conv2d
    assert model.features[0].weight is weights[0] and model.fc.weight is weights[2]
    y = model(x)
    assert not torch.allclose(y, ref, atol=1e-3)
    torch.testing.assert_close(y, ref, atol=0.5, rtol=0.5)  # quantized, not broken


def test_quantize_fuse_relu_folds_a_relu_before_a_layer_with_the_same_results():
    """quantize_(fuse_relu=True): each nn.ReLU directly before a swapped layer of a Sequential
    becomes an Identity and the layer quantizes relu(x): the same outputs and gradients as without
    folding (on the unsigned grid), less kept for backward. A ReLU before a layer filter_fn leaves
    alone, and one not followed by a layer, stay."""
    torch.manual_seed(12)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True),
                        nn.Conv2d(8, 4, 1), nn.ReLU(), nn.Flatten(), nn.ReLU(), nn.Linear(4 * 36, 10), nn.ReLU(),
                        nn.Linear(10, 5))
    skip_last = lambda m, fqn: fqn != "10"  # noqa: E731
    plain = qnn.quantize_(copy.deepcopy(net), weight_bits=4, act_bits=(4, 8), act_signed=False, filter_fn=skip_last)
    folded = qnn.quantize_(net, weight_bits=4, act_bits=(4, 8), act_signed=False, filter_fn=skip_last, fuse_relu=True)
    kinds = [type(m).__name__ for m in folded]
    assert kinds == ["QuantConv2d", "Identity", "QuantConv2d", "Identity", "QuantConv2d", "ReLU", "Flatten",
                     "Identity", "QuantLinear", "ReLU", "Linear"]
    assert [m.act_quant.grid for m in folded if isinstance(m, (qnn.QuantConv2d, qnn.QuantLinear))] == \
        ["unsigned", "relu", "relu", "relu"]
    x, g = torch.randn(2, 3, 6, 6), torch.randn(2, 5)
    kept = []
    for model in (plain, folded):
        xi = x.clone().requires_grad_()
        counted = {}

        def count(t):
            counted[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
            y = model(xi)
        kept.append(sum(counted.values()))
        model.results = (y, *torch.autograd.grad(y, [xi, *model.parameters()], g))
    for a, b in zip(plain.results, folded.results):
        assert torch.equal(a, b)
    assert kept[1] < kept[0]
    with pytest.raises(ValueError, match="act_bits"):
        qnn.quantize_(nn.Sequential(nn.ReLU(), nn.Linear(3, 3)), act_bits=None, fuse_relu=True)


def test_quantize_keeps_a_shared_layer_shared_and_refuses_an_uninitialised_lazy_one():
    """A module used in two places becomes one quantized module used in both (so the two uses keep
    sharing their quantizer too); a shared nn.ReLU folds into each layer after it; a shared layer that
    would be folded in one place only is refused; a LazyConv2d needs a forward pass first."""
    torch.manual_seed(13)
    conv, relu = nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()
    net = nn.Sequential(conv, relu, conv)
    x = torch.randn(2, 4, 5, 5)
    qnn.quantize_(net, weight_bits=4, act_bits=8)
    assert type(net[0]) is qnn.QuantConv2d and net[2] is net[0]
    assert torch.equal(net(x), net[0](torch.relu(net[0](x))))
    with pytest.raises(ValueError, match="0 and 2 are one module"):
        qnn.quantize_(nn.Sequential(conv, relu, conv), weight_bits=4, act_bits=8, fuse_relu=True)
    net = nn.Sequential(nn.Conv2d(4, 4, 1), relu, nn.Conv2d(4, 4, 1), relu, nn.Conv2d(4, 4, 1))
    qnn.quantize_(net, weight_bits=4, act_bits=8, fuse_relu=True)
    assert [type(m).__name__ for m in net] == ["QuantConv2d", "Identity", "QuantConv2d", "Identity", "QuantConv2d"]
    lazy = nn.Sequential(nn.LazyConv2d(4, 3))
    with pytest.raises(ValueError, match="0 is a LazyConv2d whose parameters are not initialised"):
        qnn.quantize_(lazy)
    lazy(x)
    qnn.quantize_(lazy)
    assert type(lazy[0]) is qnn.QuantConv2d


@pytest.mark.filterwarnings("ignore:.*torch.nn.utils.weight_norm. is deprecated:FutureWarning")  # the old style
def test_quantize_carries_hooks_and_buffers_and_refuses_a_weight_made_by_a_hook():
    """The swapped layer takes the original's forward and backward hooks and extra buffers (a mask the hooks
    read); a weight made by an old-style hook (weight_norm, spectral_norm, prune) is refused by name."""
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    calls = []
    m[0].register_buffer("mask", torch.ones(4))
    m[0].register_forward_pre_hook(lambda mod, args: calls.append("pre"))
    m[0].register_forward_hook(lambda mod, args, out: calls.append("forward") or out * mod.mask[:, None, None])
    m[2].register_full_backward_hook(lambda mod, grad_in, grad_out: calls.append("backward"))
    qnn.quantize_(m)
    assert isinstance(m[0], qnn.QuantConv2d) and torch.equal(m[0].mask, torch.ones(4)) and "0.mask" in m.state_dict()
    m(torch.randn(2, 3, 3, 3)).sum().backward()
    assert calls == ["pre", "forward", "backward"]
    old_style = nn.Sequential(nn.Sequential(torch.nn.utils.weight_norm(nn.Linear(3, 3))))
    with pytest.raises(ValueError, match=r"quantize_: 0\.0: its weight is computed by a hook"):
        qnn.quantize_(old_style)


def test_quantize_keeps_each_layer_s_training_mode():
    """A swapped layer and its quantizers take the original's mode: quantize_ of a model in evaluation (or
    of one whose head is) leaves those layers in evaluation, where a paper activation quantizer scaled by
    the max reads its running range and does not update it."""
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.Flatten(), nn.Linear(12, 2))
    model[2].eval()
    qnn.quantize_(model, quantizer="paper")
    assert all(m.training for m in model[0].modules()) and not any(m.training for m in model[2].modules())
    model[2](torch.randn(4, 12))
    assert not model[2].act_quant.largest_observed
    model = qnn.quantize_(nn.Sequential(nn.Conv2d(2, 3, 1), nn.Linear(3, 2)).eval())
    assert not any(m.training for m in model.modules())


def test_quantize_fuse_relu_folds_only_plain_relus():
    """fuse_relu folds nn.ReLU only: a ReLU6 (which clips at 6) or a LeakyReLU (which passes negatives)
    before a layer stays, and that layer keeps its grid for inputs of either sign."""
    net = nn.Sequential(nn.ReLU6(), nn.Linear(4, 4), nn.LeakyReLU(0.1), nn.Linear(4, 4))
    qnn.quantize_(net, weight_bits=4, act_bits=8, fuse_relu=True)
    assert [type(m).__name__ for m in net] == ["ReLU6", "QuantLinear", "LeakyReLU", "QuantLinear"]
    assert [net[i].act_quant.grid for i in (1, 3)] == ["signed", "signed"]


def test_quantize_swaps_exact_types_only_and_once():
    """Only modules of exactly nn.Conv2d / nn.Linear are swapped: a subclass (a user's own conv,
    MultiheadAttention's out_proj, whose weight the attention reads directly) is left alone, and so is a
    layer quantized already (QuantConv2d subclasses nn.Conv2d): a second quantize_ changes nothing."""

    class MyConv(nn.Conv2d):
        pass

    model = nn.Sequential(MyConv(2, 2, 1), nn.Conv2d(2, 2, 1), nn.MultiheadAttention(4, 2))
    out_proj = type(model[2].out_proj)
    qnn.quantize_(model, weight_bits=4, act_bits=8)
    assert type(model[0]) is MyConv and type(model[1]) is qnn.QuantConv2d and type(model[2].out_proj) is out_proj
    quantized = model[1]
    qnn.quantize_(model, weight_bits=4, act_bits=8)
    assert model[1] is quantized and model[1].act_quant is quantized.act_quant


def test_a_disabled_activation_quantizer_passes_its_input_on_the_training_path():
    """With the activation quantizer's fake quantization off, a QuantConv2d forward that records a graph
    (the eager path that keeps only x) convolves x itself with the quantized weight, as one without a
    graph does; and so does a chain of two (chained_quant_convs)."""
    torch.manual_seed(21)
    a, b = (qnn.QuantConv2d(3, 3, 3, padding=1, weight_bits=4, act_bits=4) for _ in range(2))
    for conv in (a, b):
        conv.act_quant.disable_fake_quant()
    x = torch.randn(2, 3, 5, 5, requires_grad=True)

    def plain(conv, t):
        return nn.functional.conv2d(t, conv.weight_quant(conv.weight), conv.bias, padding=1)

    y = a(x)
    assert torch.equal(y, plain(a, x))
    with torch.no_grad():
        assert torch.equal(a(x), y)
    assert torch.equal(qnn.chained_quant_convs(a, b, x), plain(b, plain(a, x)))
    (dx,) = torch.autograd.grad(y.sum(), x)
    (dx_plain,) = torch.autograd.grad(plain(a, x).sum(), x)
    assert torch.equal(dx, dx_plain)


@pytest.mark.parametrize("stride", [1, 2])
def test_quantized_pointwise_conv_output_takes_in_place_changes(stride):
    """A ReLU(inplace=True) or a residual += after a 1x1 conv (the CPU's matrix products): as after nn.Conv2d."""
    m = qnn.quantize_(nn.Sequential(nn.Conv2d(8, 8, 1, stride=stride, bias=False), nn.ReLU(inplace=True)))
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    m(x).sum().backward()
    conv = m[0]
    y = conv(x)
    y += 1.0  # as a residual connection adds its shortcut
    y.sum().backward()
    with qk.eager_reference():
        expected = conv(x) + 1.0
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_quantized_conv_without_bias_on_meta_tensors():
    """Shape propagation on meta tensors, with or without bias (the CPU kernels' choice asked meta's autocast)."""
    for bias in (False, True):
        m = qnn.quantize_(nn.Sequential(nn.Conv2d(4, 4, 3, bias=bias, device="meta")))
        assert m(torch.empty(2, 4, 5, 5, device="meta")).shape == (2, 4, 3, 3)


def test_per_channel_scales_on_meta_tensors_before_a_first_batch():
    """Shape inference of a per-channel LSQ quantizer before any batch: built on the meta device, or with
    num_channels, it works; moved there with .to("meta") before its scales were sized, PyTorch has made
    them an empty Parameter, and the error says so (it was an IndexError from the shape check)."""
    x = torch.empty(4, 6, device="meta")
    for q in (qnn.MixedPrecisionFakeQuantize((2, 4), per_channel_axis=1, factory_kwargs={"device": "meta"}),
              qnn.MixedPrecisionFakeQuantize((2, 4), per_channel_axis=1, num_channels=6).to("meta")):
        assert q(x).shape == (4, 6) and q.scales.shape == (2, 6)
    moved = qnn.MixedPrecisionFakeQuantize((2, 4), per_channel_axis=1).to("meta")
    with pytest.raises(ValueError, match=r"the per-channel scales have shape \[0\]: the quantizer was moved with "
                                         r"\.to\('meta'\) before a first batch sized them"):
        moved(x)


def test_quantize_training_steps_lower_the_loss_and_state_dict_round_trips():
    torch.manual_seed(10)
    model = qnn.quantize_(SmallCNN(), weight_bits=4, act_bits=8)
    x, t = _batch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = nn.functional.cross_entropy(model(x), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.2
    assert all(bool((p > 0).all()) for n, p in model.named_parameters() if n.endswith("scales"))
    fresh = qnn.quantize_(SmallCNN(), weight_bits=4, act_bits=8)
    fresh.load_state_dict(model.state_dict())
    x2, _ = _batch(1)
    torch.testing.assert_close(fresh(x2), model(x2), rtol=0, atol=0)


def test_quantized_model_compiles_fullgraph_forward_and_backward():
    torch.manual_seed(11)
    model = qnn.quantize_(SmallCNN(), weight_bits=(2, 4), act_bits=(4, 8), act_signed=False)
    model.features[3] = qnn.QuantConv2d(8, 16, 3, padding=1, weight_bits=(2, 8), act_bits=(2, 8), quantizer="paper")
    eager = qnn.quantize_(SmallCNN(), weight_bits=(2, 4), act_bits=(4, 8), act_signed=False)
    eager.features[3] = qnn.QuantConv2d(8, 16, 3, padding=1, weight_bits=(2, 8), act_bits=(2, 8), quantizer="paper")
    eager.load_state_dict(model.state_dict())  # not yet initialised: both initialise on the batch
    x, t = _batch()
    compiled = torch.compile(model, fullgraph=True)
    for m in (compiled, eager):
        nn.functional.cross_entropy(m(x), t).backward()
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=0, msg=name)  # scales: compiled mean|x|
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


class _ChainedConvs(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.first = qnn.QuantConv2d(8, 8, 3, padding=1, groups=8, bias=False, **kwargs)
        self.second = qnn.QuantConv2d(8, 8, 1, bias=False, **kwargs)

    def forward(self, x):
        return qnn.chained_quant_convs(self.first, self.second, x)


@pytest.mark.parametrize("make", [
    lambda: qnn.OutputKeepingBatchNorm2d(8, affine=False), lambda: qnn.OutputKeepingBatchNorm2d(8),
    lambda: qnn.InputKeepingMaxPool2d(3, 1, 1), lambda: qnn.InputFreeAvgPool2d(3, 1, 1, count_include_pad=False),
], ids=["batch_norm", "batch_norm_affine", "max_pool", "avg_pool"])
def test_batch_norm_and_pools_keep_channels_last(make):
    """The few-channel batch norm and pools compute in NCHW; a channels_last input takes PyTorch's
    kernels instead, and its output and gradient stay channels_last, with the NCHW call's values."""
    torch.manual_seed(14)
    x, g = torch.randn(4, 8, 6, 6), torch.randn(4, 8, 6, 6)
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        xi = x.to(memory_format=layout).requires_grad_()
        y = make()(xi)
        dx, = torch.autograd.grad(y, xi, g.to(memory_format=layout))
        assert y.is_contiguous(memory_format=layout) and dx.is_contiguous(memory_format=layout)
        results.append((y, dx))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", [8, (4, 8)], ids=["fixed", "mixed"])
@pytest.mark.parametrize("quantizer", ["lsq", "paper"])
def test_quantized_channels_last_model_keeps_channels_last_end_to_end(quantizer, bits):
    """A channels_last model after quantize_ keeps channels_last activations, layer after layer, and
    gradients, in training and in evaluation: the ops keep their input's layout, and the few-channel
    CPU convs (1x1 and depthwise without bias, which compute in NCHW) leave channels_last inputs
    to PyTorch's convolution. The values are those of the NCHW model, up to the convolutions'
    rounding (PyTorch's CPU convolution may sum in another order per layout)."""
    torch.manual_seed(13)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1, bias=False),
                        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.MaxPool2d(2),
                        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.ReLU())
    qnn.quantize_(net, weight_bits=bits, act_bits=bits, quantizer=quantizer)
    net.append(_ChainedConvs(weight_bits=bits, act_bits=bits, quantizer=quantizer))
    nchw = copy.deepcopy(net)
    net = net.to(memory_format=torch.channels_last)
    layouts = {}
    for name, module in net.named_modules():
        if isinstance(module, (qnn.QuantConv2d, qnn.MixedPrecisionFakeQuantize)) and "weight" not in name:
            module.register_forward_hook(lambda m, i, o, name=name: layouts.__setitem__(
                name, o.is_contiguous(memory_format=torch.channels_last)))
    x = torch.randn(2, 3, 8, 8)
    g = torch.randn(2, 8, 4, 4)
    for training in (True, False):
        results = []
        for model, xi in ((nchw, x), (net, x.to(memory_format=torch.channels_last))):
            model.train(training)
            xi = xi.clone().requires_grad_()
            with torch.set_grad_enabled(training):
                y = model(xi)
            results.append((y, *(torch.autograd.grad(y, xi, g) if training else ())))
        (y_nchw, *dx_nchw), (y, *dx) = results
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert all(d.is_contiguous(memory_format=torch.channels_last) for d in dx)
        assert layouts and all(layouts.values()), {k: v for k, v in layouts.items() if not v}
        for a, b in ((y, y_nchw), *zip(dx, dx_nchw)):
            # on average: a value the convolution's rounding moves across a rounding boundary of the
            # next quantizer moves by a whole quantization step
            assert float((a - b).detach().abs().mean()) <= 1e-3 * float(b.detach().abs().mean())
        layouts.clear()


def test_prepare_qat_with_our_fake_quantize_then_convert_to_int8():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
            self.body = SmallCNN()

        def forward(self, x):
            return self.dequant(self.body(self.quant(x)))

    torch.manual_seed(12)
    model = Net().train()
    # PyTorch's int8 kernels take quint8 activations: the signed levels stored with zero point 128
    model.qconfig = tq.QConfig(activation=qnn.FakeQuantize.with_args(bits=8, grid="signed", dtype=torch.quint8),
                               weight=qnn.FakeQuantize.with_args(bits=8, ch_axis=0))
    tq.prepare_qat(model, inplace=True)
    assert isinstance(model.body.features[0].weight_fake_quant, qnn.FakeQuantize)
    assert isinstance(model.body.fc.activation_post_process, qnn.FakeQuantize)
    x, t = _batch()
    model(x)  # creates the per-channel weight scales
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(x), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is not None for n, p in model.named_parameters() if n.endswith("scales"))
    model.eval()
    y_qat = model(x)
    engines = torch.backends.quantized.supported_engines
    torch.backends.quantized.engine = "x86" if "x86" in engines else ("fbgemm" if "fbgemm" in engines else "qnnpack")
    int8 = tq.convert(model)
    assert type(int8.body.fc).__name__ == "Linear" and int8.body.fc.__module__.startswith("torch.ao.nn.quantized")
    scale = float(model.body.fc.activation_post_process.scale.detach())
    assert int8.body.fc.zero_point == 128 and int8.body.fc.scale == scale
    torch.testing.assert_close(int8(x), y_qat, rtol=0, atol=2 * scale)


@pytest.mark.parametrize("kwargs,message", [
    (dict(bits=(2, 4), quantizer="hwgq"), "quantizer"),
    (dict(bits=(2, 4), role="bias"), "role"),
    (dict(bits=(2, 4), quantizer="paper", role="weight", grid="signed"), "midrise"),
    (dict(bits=(2, 4), quantizer="paper", role="act", per_channel_axis=1), "per_channel_axis"),
    (dict(bits=(2, 4), logits=nn.Parameter(torch.zeros(3))), "logits"),
    (dict(bits=4, logits=nn.Parameter(torch.zeros(2))), "logits"),
    (dict(bits=(2, 4), grid="ternary"), "grid"),
    (dict(bits=(2, 17)), "bits"),
    (dict(bits=(2, 4), num_channels=4), "num_channels"),
    (dict(bits=(2, 4), backend="gpu"), r"backend must be one of \['reference', 'cpu', 'cuda', 'triton'\] or None"),
])
def test_bad_arguments_raise_naming_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        qnn.MixedPrecisionFakeQuantize(**kwargs)


def test_bad_layer_and_quantize_arguments():
    with pytest.raises(ValueError, match="quantizer"):
        qnn.QuantConv2d(3, 3, 3, quantizer="dorefa")
    # a misspelt backend, when the module is built rather than at its first forward
    for build in (lambda: qnn.QuantConv2d(3, 3, 3, backend="gpu"), lambda: qnn.QuantLinear(3, 3, backend="Triton"),
                  lambda: qnn.OutputKeepingBatchNorm2d(3, backend="gpu")):
        with pytest.raises(ValueError, match="backend must be one of"):
            build()
    with pytest.raises(ValueError, match="act_logits"):
        qnn.QuantLinear(3, 3, act_bits=None, act_logits=nn.Parameter(torch.zeros(2)))
    with pytest.raises(ValueError, match="grid"):
        qnn.FakeQuantize(4, grid="midrise")
    with pytest.raises(ValueError, match="dtype"):
        qnn.FakeQuantize(4, grid="unsigned", dtype=torch.qint8)
    with pytest.raises(ValueError, match="wrap"):
        qnn.quantize_(nn.Linear(3, 3))
    fq = qnn.MixedPrecisionFakeQuantize(4, per_channel_axis=1, num_channels=3)
    with pytest.raises(ValueError, match="channels"):
        fq(torch.randn(2, 5))


@pytest.mark.parametrize("quantizer", ["lsq", "paper"])
def test_eager_reference_runs_modules_on_the_reference_ops_with_the_same_results(quantizer):
    """qk.eager_reference(): the QAT modules compute with qdarts_kernels.reference under ordinary
    autograd (QuantConv2d leaves its fused input-quantizing path), with the same outputs and
    gradients as the fused ops; outside the block nothing is routed or counted."""
    torch.manual_seed(9)
    conv = qnn.QuantConv2d(3, 6, 3, padding=1, act_bits=(2, 4, 8), weight_bits=(2, 8), quantizer=quantizer)
    x = torch.randn(2, 3, 9, 9).relu().requires_grad_()
    results = []
    for use_reference in (False, True):
        conv.zero_grad(set_to_none=True)
        x.grad = None
        with qk.eager_reference() if use_reference else torch.autograd.graph.saved_tensors_hooks(
                lambda t: t, lambda t: t) as calls:
            y = conv(x)
            assert ("_QuantizedInputConv2d" in type(y.grad_fn).__name__) != use_reference
            y.square().sum().backward()
        results.append([y.detach(), x.grad] + [p.grad for p in conv.parameters()])
        if use_reference:
            assert calls["mixed_fake_quant"] >= 2 and not qk.ops.eager_reference_active()
    for fused, referenced in zip(*results):
        torch.testing.assert_close(referenced, fused, rtol=1e-5, atol=1e-5)
    with qk.eager_reference() as calls:
        qk.mixed_op_sum([x, x], torch.ones(2))
        qk.fake_quant(x, torch.tensor([0.1]), 4)
        qk.mixed_fake_quant_grouped([x, x], torch.ones(2, 1), [torch.ones(1), torch.ones(1)], (4,))
    assert calls == {"mixed_op_sum": 1, "fake_quant": 1, "mixed_fake_quant_grouped": 1}


def test_eager_reference_inside_torch_compile_traces_the_reference():
    x = torch.randn(4, 6, requires_grad=True)
    probs = torch.tensor([0.3, 0.7], requires_grad=True)
    scales = torch.tensor([0.5, 0.1], requires_grad=True)
    f = torch.compile(lambda x, p, s: qk.mixed_fake_quant(x, p, s, (2, 4)).square().sum(), backend="aot_eager",
                      fullgraph=True)
    with qk.eager_reference() as calls:
        y = f(x, probs, scales)
    expected = qk.reference.mixed_fake_quant(x, probs, scales, (2, 4)).square().sum()
    assert torch.equal(y, expected) and not calls  # traced calls are not counted
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------------
# OutputKeepingBatchNorm2d
# --------------------------------------------------------------------------------------------------


def _bn_pair(channels, dtype, backend=None, **kwargs):
    torch.manual_seed(0)
    return (qnn.OutputKeepingBatchNorm2d(channels, backend=backend, **kwargs).to(dtype),
            nn.BatchNorm2d(channels, **kwargs).to(dtype))


def _kept_storages(fn, x):
    kept = []

    def pack(t):
        kept.append(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    return y, set(kept)


@pytest.mark.parametrize("backend", ["reference", None], ids=["reference", "automatic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(4, 5, 7, 6), (1, 3, 1, 9), (9, 2, 3, 1)], ids=str)
@pytest.mark.parametrize("setting", ["train", "affine", "eval"])
def test_output_keeping_batchnorm_matches_batchnorm(dtype, shape, setting, backend):
    """The same outputs, running statistics and gradients as nn.BatchNorm2d; in training without
    affine parameters it keeps its output and not its input for backward, otherwise it is
    nn.BatchNorm2d (which keeps the input). PyTorch's kernels (backend reference) give its bits;
    the fused ones (on CPU the C++ kernels, for fp32 in training) sum in another order: within a
    few units in the last place (tests/test_batch_norm.py compares them with fp64 sums)."""
    ours, plain = _bn_pair(shape[1], dtype, affine=setting == "affine", backend=backend)
    if setting == "eval":
        ours.running_mean.uniform_(-1, 1)
        ours.running_var.uniform_(0.5, 2)
        plain.load_state_dict(ours.state_dict())
        ours.eval()
        plain.eval()
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=gen, dtype=dtype) * 3 + 1)
    g = torch.randn(shape, generator=gen, dtype=dtype)
    grads = []
    for m in (ours, plain):
        xl = x.clone().requires_grad_()
        y, kept = _kept_storages(m, xl)
        keeps_output = y.untyped_storage().data_ptr() in kept and xl.untyped_storage().data_ptr() not in kept
        assert keeps_output == (m is ours and setting == "train")
        y.backward(g)
        grads.append((y.detach(), xl.grad, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()))
    (y, dx, mean, var, n), (yr, dxr, meanr, varr, nr) = grads
    eps = torch.finfo(dtype).eps
    assert torch.equal(n, nr)
    if backend == "reference" or setting != "train" or dtype != torch.float32:
        assert torch.equal(y, yr) and torch.equal(mean, meanr) and torch.equal(var, varr)
    else:
        for ours_value, plain_value in ((y, yr), (mean, meanr), (var, varr)):
            torch.testing.assert_close(ours_value, plain_value, rtol=8 * eps, atol=8 * eps)
    torch.testing.assert_close(dx, dxr, rtol=8 * eps, atol=8 * eps * dxr.abs().max().item())


def test_output_keeping_batchnorm_gradcheck_float64():
    bn = qnn.OutputKeepingBatchNorm2d(3, affine=False).double()
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(bn, (x,))


def test_output_keeping_batchnorm_is_plain_batchnorm_in_eager_reference():
    bn = qnn.OutputKeepingBatchNorm2d(3, affine=False)
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    with qk.eager_reference():
        y, kept = _kept_storages(bn, x)
    assert x.untyped_storage().data_ptr() in kept and "NativeBatchNorm" in type(y.grad_fn).__name__


def test_batch_norms_counted_together_count_what_ran_in_one_add_per_count(monkeypatch):
    bns = [qnn.OutputKeepingBatchNorm2d(3, affine=False) for _ in range(4)]
    idle, evaluated = bns[2], bns[3]
    evaluated.eval()
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    adds = []
    foreach_add = torch._foreach_add_
    monkeypatch.setattr(torch, "_foreach_add_", lambda ts, n: (adds.append((len(ts), n)), foreach_add(ts, n)))
    with qnn.counted_together():
        with qnn.counted_together():  # nested: counted by the outer block
            bns[0](x)
        bns[0](x)
        bns[1](x)
        evaluated(x)  # eval: no batch counted, as nn.BatchNorm2d
        assert all(int(b.num_batches_tracked) == 0 for b in bns)
    assert [int(b.num_batches_tracked) for b in bns] == [2, 1, 0, 0] and idle is bns[2]
    assert sorted(adds) == [(1, 1), (1, 2)]
    bns[1](x)  # outside a block: counted at once
    assert int(bns[1].num_batches_tracked) == 2
    with pytest.raises(RuntimeError, match="stop"):
        with qnn.counted_together():
            bns[1](x)
            raise RuntimeError("stop")
    assert int(bns[1].num_batches_tracked) == 3


def test_output_keeping_batchnorm_compiles_fullgraph():
    torch._dynamo.reset()
    ours, plain = _bn_pair(4, torch.float32, affine=False)
    conv = nn.Conv2d(3, 4, 3)
    x = torch.randn(2, 3, 8, 8)
    r = torch.randn(2, 4, 6, 6)  # a loss whose gradient does not cancel (sum(o^2) is constant for a normalised o)
    results = []
    for m in (torch.compile(nn.Sequential(conv, ours), backend="aot_eager", fullgraph=True), nn.Sequential(conv, plain)):
        conv.zero_grad()
        y = m(x)
        (y * r).sum().backward()
        results.append((y.detach(), conv.weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-6 * results[1][1].abs().max().item())
    assert torch.equal(ours.running_mean, plain.running_mean) and torch.equal(ours.running_var, plain.running_var)
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------------
# InputKeepingMaxPool2d
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [dict(kernel_size=3, stride=1, padding=1), dict(kernel_size=3, stride=2, padding=1),
                                    dict(kernel_size=2, stride=2, ceil_mode=True),
                                    dict(kernel_size=(3, 2), stride=(1, 2), padding=(1, 0), dilation=(2, 1))], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_input_keeping_max_pool_matches_max_pool_bit_for_bit(kwargs, dtype):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 9, 7, generator=gen, dtype=dtype).round()  # rounded: windows with tied maxima
    g = torch.randn(nn.MaxPool2d(**kwargs)(x).shape, generator=gen, dtype=dtype)
    results = []
    for pool in (qnn.InputKeepingMaxPool2d(**kwargs), nn.MaxPool2d(**kwargs)):
        xl = x.clone().requires_grad_()
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.dtype) or t, lambda t: t):
            y = pool(xl)
        assert (torch.int64 in kept) == (type(pool) is nn.MaxPool2d)  # no argmax indices kept
        y.backward(g)
        results.append((y.detach(), xl.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_input_keeping_max_pool_is_plain_max_pool_in_eager_reference_and_compiles():
    pool = qnn.InputKeepingMaxPool2d(3, stride=1, padding=1)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    with qk.eager_reference():
        assert "MaxPool2DWithIndices" in type(pool(x).grad_fn).__name__
    torch._dynamo.reset()
    compiled = torch.compile(pool, fullgraph=True, backend="aot_eager")
    g = torch.randn(2, 3, 6, 6)
    assert torch.equal(torch.autograd.grad(compiled(x), x, g)[0], torch.autograd.grad(nn.MaxPool2d(3, 1, 1)(x), x, g)[0])
    torch._dynamo.reset()


def test_shared_activation_scales_once_per_input_and_configuration():
    """Inside the block a second quantizer of the same configuration on the same input takes the
    first one's scales (the same tensor); another input, an input changed in place, another
    configuration, or no block, computes its own; the values are those it would compute itself."""
    q1, q2 = (qnn.MixedPrecisionFakeQuantize((2, 4, 8), quantizer="paper", role="act", grid="relu") for _ in range(2))
    q4 = qnn.MixedPrecisionFakeQuantize((2, 4, 8), quantizer="paper", role="act", grid="signed")
    x = torch.randn(2, 3, 4, 4)
    other = x.clone()
    own = q2._op_inputs(x)[1]
    with qnn.shared_activation_scales():
        first = q1._op_inputs(x)[1]
        with qnn.shared_activation_scales():  # nested: the outer block's
            assert q2._op_inputs(x)[1] is first
        assert q2._op_inputs(other)[1] is not first and q4._op_inputs(x)[1] is not first
        assert torch.equal(first, own)
        x.mul_(2)  # a new version: computed anew
        again = q2._op_inputs(x)[1]
        assert again is not first and torch.equal(again, q1._op_inputs(x.clone())[1])
    assert q2._op_inputs(x)[1] is not q1._op_inputs(x)[1]


def test_shared_activation_scales_keep_no_input_alive_and_know_a_new_tensor_at_a_freed_id(monkeypatch):
    """The block refers to its inputs weakly: an input nothing else holds is freed inside it (a forward
    without a graph would otherwise keep every quantized activation to its end); and a new tensor that
    Python places at a freed input's id gets its own scales, not the dead one's."""
    q1, q2 = (qnn.MixedPrecisionFakeQuantize((2, 8), quantizer="paper", role="act", grid="relu") for _ in range(2))
    with qnn.shared_activation_scales():
        x = torch.randn(2, 3, 4, 4)
        first = q1._op_inputs(x)[1]
        gone = weakref.ref(x)
        del x
        assert gone() is None
        # the new tensor at the same id, as CPython may allocate it: forced here by giving id that value
        y = 3 * torch.randn(2, 3, 4, 4)
        dead_id = next(iter(quantizers_module._shared_scales))[0]
        monkeypatch.setattr(quantizers_module, "id", lambda t: dead_id if t is y else id(t), raising=False)
        scales = q2._op_inputs(y)[1]
        assert scales is not first and torch.equal(scales, q1._op_inputs(y.clone())[1])


def _conv_pair(quantizer, bits, act_grid_first="relu", bias=False, stride=1, dilation=1):
    torch.manual_seed(0)
    c = 6
    first = qnn.QuantConv2d(c, c, 3, stride, dilation, dilation, groups=c, bias=bias, weight_bits=bits,
                            act_bits=bits, quantizer=quantizer, fuse_relu=act_grid_first == "relu")
    second = qnn.QuantConv2d(c, 5, 1, bias=bias, weight_bits=bits, act_bits=bits, quantizer=quantizer,
                             act_signed=True)
    return first, second


def _pair_grads(first, second, x, run):
    """(run(x), the gradients of x and of the pair's parameters for a fixed random output gradient)."""
    y = run(x)
    leaves = [x] + [p for m in (first, second) for p in m.parameters() if p.requires_grad]
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.device, y.dtype)
    return y, torch.autograd.grad(y, leaves, g, allow_unused=True)


@pytest.mark.parametrize("quantizer,bits", [("paper", (2, 4, 8)), ("paper", (2, 4)), ("lsq", (2, 4, 8)), ("lsq", 4)],
                         ids=["paper-max-scaled", "paper-steps", "lsq", "lsq-fixed"])
@pytest.mark.parametrize("shape", [dict(), dict(bias=True, stride=2, dilation=2)], ids=["plain", "bias-strided"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_chained_quant_convs_equal_the_two_calls_keeping_only_the_input(quantizer, bits, shape, autocast):
    """chained_quant_convs(first, second, x) = second(first(x)): the same values and gradients
    (bit for bit: the same kernels in the same order), keeping only x of the activations."""
    first, second = _conv_pair(quantizer, bits, **shape)
    x = torch.randn(3, 6, 11, 9, requires_grad=True)
    if quantizer == "lsq":  # a first forward initialises the LSQ scales (until then the pair runs unchained)
        second(first(x))
    kept = []

    def pack(t):
        kept.append(t)
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        want, want_grads = _pair_grads(first, second, x, lambda x: second(first(x)))
        macs = (first.macs, second.macs, first.input_hw, second.input_hw)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            got, got_grads = _pair_grads(first, second, x, lambda x: qnn.chained_quant_convs(first, second, x))
    assert (first.macs, second.macs, first.input_hw, second.input_hw) == macs
    assert got.grad_fn.name() == "_ChainedQuantizedConv2dBackward"
    assert torch.equal(got, want)
    for a, b in zip(got_grads, want_grads):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))
    activations = [t for t in kept if t.dim() == 4 and t.shape[0] == x.shape[0]]
    assert len(activations) == 1 and activations[0] is x


def test_quant_conv_checks_each_kind_of_input_in_full_once(monkeypatch):
    """The training path validates the activation quantizer's call as mixed_fake_quant does the first
    time a kind of input is seen, then reuses the result; a new kind (dtype, shape, backend setting)
    is validated in full, so a bad one is still refused with the argument named."""
    torch.manual_seed(0)
    conv = qnn.QuantConv2d(3, 4, 3, padding=1, bias=False, weight_bits=(2, 4), act_bits=(2, 8))
    checked = []
    full = qk.ops._checked_mixed_fake_quant_args

    def counted(x, *args):
        result = full(x, *args)
        if x.requires_grad:  # the activation's call (the weight quantizer's op takes the weight detached)
            checked.append((x.shape, result[-1]))
        return result

    monkeypatch.setattr(qk.ops, "_checked_mixed_fake_quant_args", counted)
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    first = conv(x)
    for _ in range(2):
        assert torch.equal(conv(x), first)
    conv(torch.randn(3, 3, 7, 4, requires_grad=True))  # another batch and size: the same kind of call
    assert len(checked) == 1
    monkeypatch.setenv("QDARTS_BACKEND", "reference")
    assert torch.equal(conv(x), first)  # the reference: the same bits
    assert len(checked) == 2 and checked[-1][1] == "reference"
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        conv._quant_args(torch.ones(2, 3, 5, 5, dtype=torch.int32), *conv.act_quant._op_inputs(x))


def test_chained_quant_convs_fall_back_to_the_two_calls():
    """Not chained (the two calls in turn) where the second conv's activation scales need its input
    (LSQ scales not initialised yet), out of training, in eager_reference, or for plain convs."""
    first, second = _conv_pair("lsq", (2, 4))
    x = torch.randn(2, 6, 8, 8, requires_grad=True)
    y = qnn.chained_quant_convs(first, second, x)  # initialises the scales of both
    assert y.grad_fn.name() != "_ChainedQuantizedConv2dBackward"
    assert qnn.chained_quant_convs(first, second, x).grad_fn.name() == "_ChainedQuantizedConv2dBackward"
    with torch.no_grad():
        assert torch.equal(qnn.chained_quant_convs(first, second, x), second(first(x)))
    with qk.eager_reference():
        assert qnn.chained_quant_convs(first, second, x).grad_fn.name() != "_ChainedQuantizedConv2dBackward"
    plain = nn.Conv2d(6, 6, 1)
    assert torch.equal(qnn.chained_quant_convs(plain, second, x), second(plain(x)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_chained_quant_convs_on_the_gpu_equal_the_two_calls(backend, autocast):
    """On CUDA tensors (the depthwise weight gradient on the Triton kernel there), bit for bit."""
    if backend not in qk.available_backends():
        pytest.skip(f"backend {backend} is not available")
    first, second = _conv_pair("paper", (2, 4, 8))
    first.cuda().act_quant.backend = first.weight_quant.backend = backend
    second.cuda().act_quant.backend = second.weight_quant.backend = backend
    x = torch.randn(8, 6, 32, 32, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        want, want_grads = _pair_grads(first, second, x, lambda x: second(first(x)))
        got, got_grads = _pair_grads(first, second, x, lambda x: qnn.chained_quant_convs(first, second, x))
    assert got.grad_fn.name() == "_ChainedQuantizedConv2dBackward"
    assert torch.equal(got, want)
    for a, b in zip(got_grads, want_grads):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))


def test_the_qat_example_runs_and_learns():
    """examples/qat_small_cnn.py as a user runs it (one epoch): every variant trains, above chance."""
    script = Path(__file__).resolve().parents[1] / "examples" / "qat_small_cnn.py"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(script.parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(script), "--epochs", "1"], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = dict(re.findall(r"^(fp32|ours quantize_|ours prepare_qat|torch FakeQuantize|torch LearnableFQ)\s+"
                           r"[\d.]+\s+\d+\s+([\d.]+)$", proc.stdout, flags=re.M))
    assert len(rows) == 5, proc.stdout
    assert all(float(acc) > 0.2 for acc in rows.values()), rows  # 10 classes: chance is 0.1


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_torch_export_of_an_lsq_model(mode):
    """torch.export (non-strict, its default) of a quantize_ model and of a FakeQuantize: the scales' clamp,
    in place through .data in eager mode, is a clamp of a copy in the exported graph; same outputs."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5))
    qnn.quantize_(model, weight_bits=4, act_bits=8, quantizer="lsq")
    model(x)  # the LSQ scales' initialisation from a first batch
    getattr(model, mode)()
    assert torch.equal(torch.export.export(model, (x,)).module()(x), model(x))
    fq, y = qnn.FakeQuantize(bits=8), torch.randn(4, 3)
    fq(y)
    getattr(fq, mode)()
    assert torch.equal(torch.export.export(fq, (y,)).module()(y), fq(y))


def _paper_act(bits=(2, 4, 8)):
    return qnn.MixedPrecisionFakeQuantize(bits, quantizer="paper", role="act")


def test_paper_activations_scaled_by_the_max_evaluate_on_the_running_range():
    """In training the largest magnitude of each batch (the official code's); in evaluation its moving
    average over the training batches, so that a sample's output does not depend on its batch."""
    torch.manual_seed(5)
    quant = _paper_act()
    batches = [torch.randn(32, 6) * (i + 1) for i in range(3)]
    want = batches[0].abs().max()
    for x in batches:
        batch_scales = torch.maximum(x.abs().max() / quant._top_or_inf, quant._floor_or_step)
        assert torch.equal(quant(x), qk.mixed_fake_quant(x, quant.probs(), batch_scales, (2, 4, 8), grid="unsigned"))
    for x in batches[1:]:
        want = torch.lerp(want, x.abs().max(), quantizers_module.RUNNING_RANGE_MOMENTUM)
    assert torch.equal(quant.running_largest, want) and bool(quant.largest_observed)
    quant.eval()
    x = torch.randn(17, 6) * 2
    whole = quant(x)
    assert torch.equal(whole, torch.cat([quant(x[:1]), quant(x[1:9]), quant(x[9:])]))
    scales = torch.maximum(want / quant._top_or_inf, quant._floor_or_step)
    assert torch.equal(whole, qk.mixed_fake_quant(x, quant.probs(), scales, (2, 4, 8), grid="unsigned"))


def test_the_running_range_is_kept_only_where_it_can_be():
    torch.manual_seed(6)
    x = torch.randn(8, 6)
    # a quantizer that saw no training batch evaluates on the batch's own range, as before
    fresh = _paper_act().eval()
    assert not torch.equal(fresh(x)[:1], fresh(x[:1]))
    # the observer off: no range is kept; an empty batch observes nothing
    off = _paper_act()
    off.disable_observer()
    off(x)
    _paper_act()(x[:0])
    assert not bool(off.largest_observed) and float(off.running_largest) == 0.0
    # an overflowed batch (which a loss scaler would skip) leaves the range as it was
    quant = _paper_act()
    quant._observe_largest(torch.tensor(math.inf))
    assert not bool(quant.largest_observed)
    quant._observe_largest(torch.tensor(3.0))
    quant._observe_largest(torch.tensor(math.nan))
    assert float(quant.running_largest) == 3.0 and bool(quant.largest_observed)
    # quantizers without a bit-width scaled by the max (or LSQ, or weights) keep no range
    for other in (_paper_act((2, 4)), qnn.MixedPrecisionFakeQuantize((2, 8)),
                  qnn.MixedPrecisionFakeQuantize((2, 8), quantizer="paper", role="weight")):
        assert "running_largest" not in other.state_dict()


def test_a_state_saved_before_the_running_range_loads_and_evaluates_as_before():
    torch.manual_seed(7)
    trained = _paper_act()
    trained(torch.randn(8, 6))
    old = {k: v for k, v in trained.state_dict().items() if k not in ("running_largest", "largest_observed")}
    loaded = _paper_act()
    loaded.load_state_dict(old)  # strict
    loaded.eval()
    x = torch.randn(8, 6)
    assert torch.equal(loaded(x), _paper_act().eval()(x))  # the batch's range: nothing observed
    again = _paper_act()
    again.load_state_dict(trained.state_dict())
    assert torch.equal(again.eval()(x), trained.eval()(x))


def test_quantizers_sharing_scales_each_keep_their_running_range():
    torch.manual_seed(8)
    first, second = _paper_act(), _paper_act()
    x = torch.randn(8, 6)
    with qnn.shared_activation_scales():
        first(x), second(x)
    assert float(second.running_largest) == float(x.abs().max()) == float(first.running_largest)
    with qnn.shared_activation_scales():  # in evaluation each takes its own range, not the other's
        first.running_largest.fill_(1.0)
        first.eval(), second.eval()
        assert not torch.equal(first(x), second(x))
        assert torch.equal(second(x), _paper_act().train()(x))


@pytest.mark.filterwarnings("ignore:.*may not match this installation")
def test_the_derived_network_evaluates_each_sample_alone_and_the_supernet_keeps_no_range():
    """Test accuracy must not depend on how the test set is batched (it did, through the 8-bit
    activations' batch max); the search's supernet keeps no running ranges (no launches for them)."""
    from qdarts.evalnet import EvalNetwork
    from qdarts.genotype import Genotype
    from qdarts.supernet import SearchNetwork, SupernetConfig

    torch.manual_seed(9)
    supernet = SearchNetwork(SupernetConfig(input_shape=(1, 8, 8), num_classes=4, channels=4, layers=2, steps=2,
                                            partial_channels=1, bits=(2, 4, 8)))
    paper_acts = [m for m in supernet.modules() if isinstance(m, qnn.MixedPrecisionFakeQuantize)
                  and m.quantizer == "paper" and m.role == "act"]
    assert paper_acts and not any(m._observer_on for m in paper_acts)
    # nor after loading a state saved with them on (a search's checkpoint of before)
    state = supernet.state_dict()
    for name in state:
        if name.endswith("act_quant.observer_enabled"):
            state[name] = torch.ones_like(state[name])
    supernet.load_state_dict(state)
    assert not any(m._observer_on for m in paper_acts)
    from qdarts.derive import derive_genotype

    genotype = Genotype.from_dict(derive_genotype(supernet).to_dict())
    for cell in genotype.cells:  # 8-bit activations everywhere
        cell.preprocess0[:] = [(8, 4)] * len(cell.preprocess0)
        cell.edges[:] = [[(8, 4)] * len(pairs) for pairs in cell.edges]
    net = EvalNetwork(genotype, (1, 8, 8), 4, 4, 2)
    for _ in range(2):
        net(torch.randn(16, 1, 8, 8)).sum().backward()
    net.eval()
    x = torch.randn(9, 1, 8, 8)
    with torch.no_grad():  # (convs of other batch sizes may sum in another order: not bit for bit)
        torch.testing.assert_close(net(x), torch.cat([net(x[:1]), net(x[1:])]), rtol=1e-5, atol=1e-6)


def test_the_running_range_is_that_of_the_buffers_the_module_is_handed():
    """functional_call hands a module other buffers: the evaluation takes theirs (a where() on the
    device), not what the module itself observed; under torch.func's transforms in training the range
    is not kept (a statistic kept in place; as BatchNorm's), and vmap works."""
    torch.manual_seed(10)
    trained, fresh = _paper_act(), _paper_act()
    trained(torch.randn(16, 6) * 3)
    trained.eval(), fresh.eval()
    x = torch.randn(5, 6)
    state = dict(trained.named_buffers())
    handed = torch.func.functional_call(fresh, state, (x,))
    assert torch.equal(handed, trained(x))
    assert torch.equal(handed[:1], torch.func.functional_call(fresh, state, (x[:1],)))
    fresh.train()
    out = torch.func.vmap(fresh)(x[:, None, :])
    assert out.shape == (5, 1, 6) and not bool(fresh.largest_observed)


def test_a_quantizer_pickled_before_the_running_range_unpickles_with_none_observed():
    import pickle

    old = _paper_act()
    del old._buffers["running_largest"], old._buffers["largest_observed"]  # as an earlier version pickled it
    new = pickle.loads(pickle.dumps(old))
    assert float(new.running_largest) == 0.0 and not bool(new.largest_observed)
    x = torch.randn(4, 6)
    assert torch.equal(new.eval()(x), _paper_act().eval()(x))
