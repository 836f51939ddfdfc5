"""The cost model against hand-computed values."""

import pytest
import torch
from torch import nn

from qdarts.cost import ExpectedCost, network_cost
from qdarts.supernet import SearchNetwork, SupernetConfig
from qdarts_kernels.nn import QuantConv2d


class _Hand(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)  # excluded (fp32 stem)
        self.body = QuantConv2d(4, 8, 3, padding=1, bias=False, act_bits=2, weight_bits=4)
        self.dw = QuantConv2d(8, 8, 3, padding=1, groups=8, bias=False, act_bits=4, weight_bits=8)
        self.fp = nn.Conv2d(8, 8, 1, bias=False)  # an unquantized conv counts 32/32
        self.classifier = nn.Linear(8, 3)  # a Linear: not counted

    def forward(self, x):
        return self.classifier(self.fp(self.dw(self.body(self.stem(x)))).mean((2, 3)))


def test_network_cost_by_hand():
    c = network_cost(_Hand(), (1, 8, 8), device=torch.device("cpu"))
    # body: 8*4*9 MACs per pixel * 64 pixels = 18432; weights 288 at 4 bits, input 4*64 at 2 bits
    # dw:   8*1*9*64 = 4608 (groups counted);        weights 72 at 8 bits,  input 8*64 at 4 bits
    # fp:   8*8*64 = 4096 at 32x32 bits;             weights 64 at 32 bits, input 8*64 at 32 bits
    assert c["macs"] == 18432 + 4608 + 4096
    assert c["bitops"] == 18432 * 2 * 4 + 4608 * 4 * 8 + 4096 * 32 * 32
    assert c["bitops_fp32"] == (18432 + 4608 + 4096) * 1024
    assert c["memory_bytes"] == (288 * 4 + 256 * 2 + 72 * 8 + 512 * 4 + (64 + 512) * 32) / 8
    assert c["memory_bytes_fp32"] == (288 + 256 + 72 + 512 + 64 + 512) * 4
    assert [r["name"] for r in c["layers"]] == ["body", "dw", "fp"]


def _supernet(k):
    torch.manual_seed(0)
    net = SearchNetwork(SupernetConfig(input_shape=(1, 8, 8), num_classes=10, channels=4, layers=3, steps=2,
                                       partial_channels=k, bits=(2, 4)))
    net(torch.randn(2, 1, 8, 8))
    return net


def _by_hand(net, kind, bits_product=9.0):
    """(sum_m pi_m F_m b_a b_w, F_m0) from each conv's shapes; pi_m = softmax(alpha) of the conv's cell type, edge
    and op (zero alphas give pi = 1/8)."""
    k = net.cfg.partial_channels
    total, first = 0.0, None
    for _, conv, where in net.quant_layers():
        kh, kw = conv.kernel_size
        h, w = conv.input_hw
        out_pixels = ((h + 2 * conv.padding[0] - conv.dilation[0] * (kh - 1) - 1) // conv.stride[0] + 1) * \
                     ((w + 2 * conv.padding[1] - conv.dilation[1] * (kw - 1) - 1) // conv.stride[1] + 1)
        if kind == "official":  # dense count of what the supernet computes
            f, pi = conv.out_channels * conv.in_channels * kh * kw * out_pixels, 1.0
        else:  # grouped count at the derived network's channel width
            scale = 1 if where is None else (k if conv.groups > 1 else k * k)
            f = conv.out_channels * conv.in_channels // conv.groups * kh * kw * out_pixels * scale
            pi = 1.0 if where is None else float(net.op_probs(where[0]).detach()[where[1], where[2]])
        first = f if first is None else first
        total += pi * f * bits_product
    return total, first


@pytest.mark.parametrize("kind", ["official", "improved"])
@pytest.mark.parametrize("k", [1, 2])
def test_expected_cost_by_hand(kind, k):
    net = _supernet(k)
    with torch.no_grad():
        net.alphas_normal.zero_()
        net.alphas_reduce.zero_()
    total, first = _by_hand(net, kind)  # uniform gammas over (2, 4): E_a = E_w = 3
    assert ExpectedCost(net, kind)().item() == pytest.approx(total / first, rel=1e-6)


def test_expected_cost_gradients_and_bitops():
    net = _supernet(2)
    improved, official = ExpectedCost(net, "improved"), ExpectedCost(net, "official")
    gammas = net.gamma_parameters()
    g_imp = torch.autograd.grad(improved(), gammas + net.alpha_parameters())
    g_off = torch.autograd.grad(official(), gammas + net.alpha_parameters(), allow_unused=True)
    # more probability on the higher bit-width raises the cost: d C / d logit(4 bits) > 0 > d C / d logit(2 bits)
    assert all(g[1] > 0 > g[0] for g in g_imp[: len(gammas)])
    assert all(g[1] > 0 > g[0] for g in g_off[: len(gammas)])
    assert any(g.abs().sum() > 0 for g in g_imp[len(gammas):])  # improved: alpha-dependent
    assert all(g is None for g in g_off[len(gammas):])  # official: not
    # every logit towards 2 bits: expected BitOps = sum_m pi_m F_m * 2 * 2 in absolute units
    with torch.no_grad():
        for p in gammas:
            p.copy_(torch.tensor([30.0, -30.0]))
        net.alphas_normal.zero_()
        net.alphas_reduce.zero_()
    assert improved.expected_bitops().item() == pytest.approx(_by_hand(net, "improved", 4.0)[0], rel=1e-5)


def test_expected_cost_weights_each_conv_by_the_probability_of_its_own_op():
    """Alphas that differ per cell type, edge and op: each conv counts with softmax(alpha) of its own cell type
    (normal or reduce), edge and op (none first in PRIMITIVES); the official cost does not depend on them."""
    net = _supernet(2)
    with torch.no_grad():
        net.alphas_normal.copy_(torch.randn(net.alphas_normal.shape, generator=torch.Generator().manual_seed(1)))
        net.alphas_reduce.copy_(3 * torch.randn(net.alphas_reduce.shape, generator=torch.Generator().manual_seed(2)))
    improved, official = ExpectedCost(net, "improved"), ExpectedCost(net, "official")
    total, first = _by_hand(net, "improved")
    assert improved().item() == pytest.approx(total / first, rel=1e-5)
    assert improved.expected_bitops().item() == pytest.approx(total, rel=1e-5)
    dense, dense_first = _by_hand(net, "official")
    assert official().item() == pytest.approx(dense / dense_first, rel=1e-5)
    # expected BitOps are reported with the improved formula whichever cost the search minimises
    assert official.expected_bitops().item() == improved.expected_bitops().item()


def test_expected_cost_needs_a_forward_first():
    net = SearchNetwork(SupernetConfig(input_shape=(1, 8, 8), num_classes=10, channels=4, layers=1, steps=2,
                                       partial_channels=2, bits=(2, 4)))
    with pytest.raises(RuntimeError, match="forward pass"):
        ExpectedCost(net)()
    with pytest.raises(ValueError, match="cost kind"):
        ExpectedCost(net, "cheap")
