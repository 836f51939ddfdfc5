"""qdarts.ops and qdarts.supernet: quantized DARTS ops, shared gammas, grids, parameter groups."""

import pytest
import torch
import torch.nn.functional as F

import qdarts_kernels as qk
from qdarts.genotype import PRIMITIVES
from qdarts.ops import RELU_FIRST, ConvMaker, build_op, quant_convs
from qdarts.supernet import MixedOp, SearchNetwork, SupernetConfig, channel_shuffle
from qdarts_kernels.nn import MixedPrecisionFakeQuantize

CONV_COUNT = {"max_pool_3x3": 0, "avg_pool_3x3": 0, "skip_connect": 0, "sep_conv_3x3": 4, "sep_conv_5x5": 4,
              "dil_conv_3x3": 2, "dil_conv_5x5": 2}


@pytest.mark.parametrize("name", PRIMITIVES[1:])
@pytest.mark.parametrize("stride", [1, 2])
def test_ops_shapes_conv_counts_and_shared_gamma(name, stride):
    op = build_op(name, 4, stride, ConvMaker(bits=(2, 4, 8)), affine=False)
    y = op(torch.randn(2, 4, 7, 7))
    assert y.shape == (2, 4, 4 if stride == 2 else 7, 4 if stride == 2 else 7)
    convs = quant_convs(op)
    # a strided skip_connect is a factorized reduce: two 1x1 convs
    assert len(convs) == (2 if name == "skip_connect" and stride == 2 else CONV_COUNT[name])
    if convs:
        assert all(c.act_quant.logits is op.gamma_a and c.weight_quant.logits is op.gamma_w for c in convs)
        names = dict(op.named_parameters())
        assert names["gamma_a"] is op.gamma_a and "0.act_quant.logits" not in "".join(names)


@pytest.mark.parametrize("name", sorted(RELU_FIRST))
@pytest.mark.parametrize("stride", [1, 2])
def test_op_without_its_leading_relu_on_the_relu_of_its_input_is_the_op(name, stride):
    """What the supernet's edges do: one ReLU of the edge input for the four ops that begin with one."""
    whole = build_op(name, 4, stride, ConvMaker(bits=(2, 4)), affine=False)
    bare = build_op(name, 4, stride, ConvMaker(bits=(2, 4)), affine=False, leading_relu=False)
    assert len(bare) == len(whole) - 1 and isinstance(whole[0], torch.nn.ReLU)
    bare.load_state_dict(dict(zip(bare.state_dict(), whole.state_dict().values())))  # same order, keys shifted
    x = torch.randn(2, 4, 7, 7, requires_grad=True)
    g = torch.randn(2, 4, 4 if stride == 2 else 7, 4 if stride == 2 else 7)
    y_whole, y_bare = whole(x), bare(torch.relu(x))
    assert torch.equal(y_whole, y_bare)
    assert torch.equal(torch.autograd.grad(y_whole, x, g)[0], torch.autograd.grad(y_bare, x, g)[0])


def test_an_edge_makes_one_relu_of_its_input_for_its_ops():
    cfg = SupernetConfig(input_shape=(1, 8, 8), num_classes=10, channels=8, layers=1, bits=(2, 4), partial_channels=1)
    y = MixedOp(8, 1, cfg)(torch.randn(2, 8, 6, 6, requires_grad=True), torch.softmax(torch.randn(len(PRIMITIVES)), 0))
    nodes, todo = [], [y.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in nodes:
            nodes.append(node)
            todo += [n for n, _ in node.next_functions]
    # the edge's own ReLU, and the second ReLU inside each of the two separable convs
    assert sum(type(n).__name__ == "ReluBackward0" for n in nodes) == 3


def test_activation_grid_follows_the_input_or_the_official_clamp():
    follow = quant_convs(build_op("sep_conv_3x3", 4, 1, ConvMaker(bits=(2, 4))))
    # relu -> depthwise (unsigned), depthwise -> pointwise (signed), twice
    assert [c.act_quant.grid for c in follow] == ["unsigned", "signed", "unsigned", "signed"]
    official = quant_convs(build_op("sep_conv_3x3", 4, 1, ConvMaker(bits=(2, 4), act_grid="official")))
    assert [c.act_quant.grid for c in official] == ["unsigned"] * 4


def test_gamma_per_conv_and_fixed_pairs():
    per_conv = quant_convs(build_op("dil_conv_3x3", 4, 1, ConvMaker(bits=(2, 4), share_gamma=False)))
    assert per_conv[0].act_quant.logits is not per_conv[1].act_quant.logits
    fixed = quant_convs(build_op("dil_conv_3x3", 4, 1, ConvMaker(pairs=[(2, 4), (8, 2)])))
    assert [c.chosen_bits() for c in fixed] == [(2, 4), (8, 2)]
    with pytest.raises(ValueError, match="3 bit pairs for an op with 2 convs"):
        build_op("dil_conv_3x3", 4, 1, ConvMaker(pairs=[(2, 4)] * 3))
    with pytest.raises(ValueError, match="exactly one of"):
        ConvMaker(bits=(2, 4), fp32=True)
    with pytest.raises(ValueError, match="quantizer"):
        ConvMaker(bits=(2, 4), quantizer="bogus")


@pytest.mark.parametrize("quantizer", ["paper", "lsq"])
def test_composite_conv_of_an_op_equals_probability_weighted_sum_of_pairwise_convs(quantizer):
    torch.manual_seed(0)
    op = build_op("dil_conv_3x3", 4, 1, ConvMaker(bits=(2, 4), quantizer=quantizer))
    with torch.no_grad():
        op.gamma_a.copy_(torch.tensor([0.3, -0.2]))
        op.gamma_w.copy_(torch.tensor([-0.5, 0.4]))
    conv = quant_convs(op)[1]  # the pointwise conv: signed activation grid
    x = torch.randn(3, 4, 6, 6)
    y = conv(x)
    pa, pw = F.softmax(op.gamma_a, 0), F.softmax(op.gamma_w, 0)
    expected = torch.zeros_like(y)
    for i, ba in enumerate((2, 4)):
        for j, bw in enumerate((2, 4)):
            qa = MixedPrecisionFakeQuantize(ba, quantizer=quantizer, role="act", grid=conv.act_quant.grid)
            qw = MixedPrecisionFakeQuantize(bw, quantizer=quantizer, role="weight",
                                            per_channel_axis=conv.weight_quant.per_channel_axis,
                                            num_channels=conv.out_channels if quantizer == "lsq" else None)
            if quantizer == "lsq":  # the single-bit quantizers take the mixed one's learned scales
                with torch.no_grad():
                    qa.scales.copy_(conv.act_quant.scales[i: i + 1])
                    qw.scales.copy_(conv.weight_quant.scales[j: j + 1])
                qa.disable_observer()
                qw.disable_observer()
            expected += pa[i] * pw[j] * F.conv2d(qa(x), qw(conv.weight))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def _tiny(**kw):
    cfg = dict(input_shape=(3, 8, 8), num_classes=5, channels=4, layers=3, steps=2, partial_channels=2, bits=(2, 4))
    cfg.update(kw)
    return SearchNetwork(SupernetConfig(**cfg))


def test_supernet_param_groups_are_disjoint_and_complete():
    net = _tiny()
    groups = net.param_groups()
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) == len({id(p) for p in net.parameters()})
    assert [p.shape for p in groups["alpha"]] == [(5, 8), (5, 8)]
    assert [p.shape for p in groups["beta"]] == [(5,), (5,)]
    # per cell: 2 preprocessing pairs + one pair per conv-bearing op of every edge
    # (4 conv ops, plus skip_connect on the reduction edges from the cell inputs)
    per_cell = [2 + 5 * 4 + (4 if i in (1, 2) else 0) for i in range(3)]
    assert len(groups["gamma"]) == 2 * sum(per_cell)
    assert net(torch.randn(2, 3, 8, 8)).shape == (2, 5)


def test_supernet_gradients_reach_every_group_and_mixed_op_sum_is_used(monkeypatch):
    calls = []
    original = qk.mixed_op_sum
    monkeypatch.setattr(qk, "mixed_op_sum", lambda outs, w, **kw: calls.append(len(outs)) or original(outs, w, **kw))
    net = _tiny()
    net(torch.randn(2, 3, 8, 8)).square().sum().backward()
    # per cell: 5 edge sums of the 7 non-none ops, and 2 node sums (2 and 3 inputs)
    assert sorted(calls) == sorted([7] * 15 + [2, 3] * 3)
    for name, ps in net.param_groups().items():
        assert all(p.grad is not None for p in ps), name


def test_channel_shuffle_interleaves_groups():
    x = torch.arange(6.0).reshape(1, 6, 1, 1)
    assert channel_shuffle(x, 2).flatten().tolist() == [0, 3, 1, 4, 2, 5]
