"""qdarts.ops and qdarts.supernet: quantized DARTS ops, shared gammas, grids, parameter groups."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import qdarts_kernels as qk
from conftest import backend_cases, require_backend
from qdarts.derive import derive_genotype
from qdarts.evalnet import EvalNetwork
from qdarts.genotype import PRIMITIVES, edge_nodes
from qdarts.ops import ConvMaker, FactorizedReduce, ReLUConv2d, ReLUConvBN, build_op, quant_convs
from qdarts.supernet import MixedOp, SearchCell, SearchNetwork, SupernetConfig, channel_shuffle, shuffled_cat
from qdarts_kernels._validation import GRIDS
from qdarts_kernels.nn import MixedPrecisionFakeQuantize, QuantConv2d

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


@pytest.mark.parametrize("name, kernel, dilation", [("sep_conv_3x3", 3, 1), ("sep_conv_5x5", 5, 1),
                                                   ("dil_conv_3x3", 3, 2), ("dil_conv_5x5", 5, 2)])
def test_depthwise_convs_have_the_op_s_kernel_size_dilation_and_padding(name, kernel, dilation):
    """Each op's depthwise convs: its kernel size, dilation 2 for dil_conv (1 for sep_conv), and the padding
    that keeps the size; the pointwise convs after them are 1x1."""
    op = build_op(name, 4, 1, ConvMaker(bits=(2, 4)), affine=False)
    convs = quant_convs(op)
    pad = (kernel - 1) * dilation // 2
    assert [(c.kernel_size, c.dilation, c.padding) for c in convs[0::2]] == \
        [((kernel, kernel), (dilation, dilation), (pad, pad))] * (len(convs) // 2)
    assert all(c.groups == 4 for c in convs[0::2]) and all(c.kernel_size == (1, 1) for c in convs[1::2])


def test_factorized_reduce_reads_two_pixel_grids_offset_by_one():
    """conv_1 sees the even rows and columns, conv_2 the odd ones (DARTS's x[:, :, 1:, 1:]), after the ReLU."""
    reduce = FactorizedReduce(1, 2, ConvMaker(fp32=True), affine=False)
    with torch.no_grad():
        reduce.conv_1.weight.fill_(1.0)
        reduce.conv_2.weight.fill_(1.0)
    reduce.bn = torch.nn.Identity()
    x = torch.randn(2, 1, 6, 6)
    y = reduce(x)
    assert torch.equal(y[:, :1], x.relu()[:, :, 0::2, 0::2]) and torch.equal(y[:, 1:], x.relu()[:, :, 1::2, 1::2])


def _unfold_relus(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` in which every conv that folds a ReLU into its input quantizer
    (QuantConv2d with grid "relu", ReLUConv2d) is an explicit nn.ReLU followed by the same conv on
    the unsigned grid (a plain nn.Conv2d), with the same parameters."""
    module = copy.deepcopy(module)
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, QuantConv2d) and child.act_quant.grid == "relu":
                child.act_quant.grid, child.act_quant.grid_code = "unsigned", GRIDS["unsigned"]
                setattr(parent, name, torch.nn.Sequential(torch.nn.ReLU(), child))
            elif isinstance(child, ReLUConv2d):
                conv = torch.nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                                       child.padding, child.dilation, child.groups, bias=False)
                conv.weight = child.weight
                setattr(parent, name, torch.nn.Sequential(torch.nn.ReLU(), conv))
    return module


@pytest.mark.parametrize("name", ["sep_conv_3x3", "dil_conv_5x5", "skip_connect", "relu_conv_bn"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("mode", ["search", "fixed", "fp32", "official"])
def test_folded_relu_is_relu_then_conv(name, stride, mode):
    """Every ReLU of the DARTS ops is folded into the conv after it: the same output and the same
    gradients (input and parameters) as the explicit ReLU followed by the conv."""
    if name == "skip_connect" and stride == 1:
        pytest.skip("a stride-1 skip connection is the identity")
    maker = {"search": lambda: ConvMaker(bits=(2, 4)), "official": lambda: ConvMaker(bits=(2, 8), act_grid="official"),
             "fixed": lambda: ConvMaker(pairs=[(4, 2), (8, 4), (2, 2), (4, 8)][: 4 if "sep" in name else
                                                                                 1 if name == "relu_conv_bn" else 2]),
             "fp32": lambda: ConvMaker(fp32=True)}[mode]()
    if name == "relu_conv_bn":
        op = ReLUConvBN(4, 6, 3, stride, 1, maker, affine=False)
    else:
        op = build_op(name, 4, stride, maker, affine=False)
    explicit = _unfold_relus(op)
    assert sum(isinstance(m, torch.nn.ReLU) for m in explicit.modules()) > 0
    x = torch.randn(2, 4, 7, 7, requires_grad=True)
    y, y_explicit = op(x), explicit(x)
    assert torch.equal(y, y_explicit)
    g = torch.randn_like(y)
    params = [p for p in op.parameters() if p.requires_grad]
    got = torch.autograd.grad(y, [x, *params], g, allow_unused=True)
    want = torch.autograd.grad(y_explicit, [x, *explicit.parameters()], g, allow_unused=True)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("stride,partial", [(1, 1), (2, 2)])
def test_an_edge_keeps_no_relu_output_and_no_pool_indices(stride, partial):
    """The ReLUs of an edge's ops are folded into their convs: no ReLU node (and no ReLU output
    kept for backward) in the edge's graph; its max pools (the candidate op, and on a reduction
    edge the pool of the bypassed channels) keep no indices."""
    cfg = SupernetConfig(input_shape=(1, 8, 8), num_classes=10, channels=8, layers=1, bits=(2, 4),
                         partial_channels=partial)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    y = MixedOp(8, stride, cfg)(x, torch.softmax(torch.randn(len(PRIMITIVES)), 0))
    nodes, todo = [], [y.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in nodes:
            nodes.append(node)
            todo += [n for n, _ in node.next_functions]
    names = [type(n).__name__ for n in nodes]
    assert "ReluBackward0" not in names and "MaxPool2DWithIndicesBackward0" not in names
    assert names.count("_MaxPool2dKeepingInputBackward") == (2 if partial > 1 and stride == 2 else 1)
    # the depthwise-pointwise pairs of the two sep convs (2 each) and dil convs (1 each) chained,
    # the two convs of a factorized reduce (a strided skip_connect) alone
    assert names.count("_ChainedQuantizedConv2dBackward") == 6
    assert names.count("_QuantizedInputConv2dBackward") == (2 if stride == 2 else 0)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_activation_grid_follows_the_input_or_the_official_clamp():
    follow = quant_convs(build_op("sep_conv_3x3", 4, 1, ConvMaker(bits=(2, 4))))
    # relu -> depthwise (the relu folded in: relu grid), depthwise -> pointwise (signed), twice
    assert [c.act_quant.grid for c in follow] == ["relu", "signed", "relu", "signed"]
    official = quant_convs(build_op("sep_conv_3x3", 4, 1, ConvMaker(bits=(2, 4), act_grid="official")))
    assert [c.act_quant.grid for c in official] == ["relu", "unsigned", "relu", "unsigned"]


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


def test_a_loaded_supernet_keeps_no_running_activation_ranges():
    """A state saved with the activation quantizers' observers on (a checkpoint written before the supernet
    turned them off) loads with them off: training forwards observe no running range for evaluation."""
    state = _tiny(bits=(2, 4, 8)).state_dict()
    state = {k: torch.ones_like(v) if k.endswith("observer_enabled") else v for k, v in state.items()}
    net = _tiny(bits=(2, 4, 8))
    net.load_state_dict(state)
    net(torch.randn(2, 3, 8, 8))
    observed = [b for name, b in net.named_buffers() if name.endswith("largest_observed")]
    assert observed and not any(b.any() for b in observed)


def test_supernet_gradients_reach_every_group_and_mixed_op_sum_is_used(monkeypatch):
    calls = []
    original = qk.mixed_op_sum
    monkeypatch.setattr(qk, "mixed_op_sum", lambda outs, w, **kw: calls.append(len(outs)) or original(outs, w, **kw))
    net = _tiny()
    net(torch.randn(2, 3, 8, 8)).square().sum().backward()
    # per cell and node (2 and 3 inputs): one sum of its edges' 7 non-none candidate outputs each,
    # and one of its input states (the bypassed channels)
    assert calls == [14, 2, 21, 3] * 3
    for name, ps in net.param_groups().items():
        assert all(p.grad is not None for p in ps), name


def test_channel_shuffle_interleaves_groups():
    x = torch.arange(6.0).reshape(1, 6, 1, 1)
    assert channel_shuffle(x, 2).flatten().tolist() == [0, 3, 1, 4, 2, 5]


def test_shuffled_cat_is_the_channel_shuffle_of_the_concatenation():
    head, rest = torch.randn(2, 3, 4, 5), torch.randn(2, 9, 4, 5)
    assert torch.equal(shuffled_cat(head, rest, 4), channel_shuffle(torch.cat([head, rest], 1), 4))


def test_edge_weights_are_a_softmax_of_beta_over_each_node_s_inputs():
    """PC-DARTS edge normalisation: beta is normalised over the inputs of each intermediate node (2, 3, 4 of them
    here), not over all the edges of the cell."""
    net = _tiny(steps=3)
    beta = torch.randn(9, generator=torch.Generator().manual_seed(0))
    weights = net.edge_weights(beta)
    assert weights.shape == (9,)
    for start, n in ((0, 2), (2, 3), (5, 4)):
        assert torch.equal(weights[start: start + n], torch.softmax(beta[start: start + n], 0))


def _edge_by_definition(edge: MixedOp, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One PC-DARTS edge as written in the paper: the candidates on the first C/k channels weighted
    by softmax(alpha) (``none`` contributes zeros), the other channels bypassing them (max-pooled
    on a reduction edge), concatenated, channel-shuffled."""
    h = x.shape[1] // edge.k
    head, rest = x[:, :h], x[:, h:]
    mixed = sum(w * op(head) for w, op in zip(weights[1:], edge.ops))
    if edge.k == 1:
        return mixed
    if edge.stride == 2:
        rest = F.max_pool2d(rest, 2, 2, ceil_mode=True)
    return channel_shuffle(torch.cat([mixed, rest], 1), edge.k)


@pytest.mark.parametrize("reduction", [False, True], ids=["normal", "reduction"])
@pytest.mark.parametrize("k", [1, 4])
def test_a_cell_sums_each_node_s_edges_weighted_by_beta(reduction, k):
    """SearchCell (and MixedOp alone) against the definition: node = sum_j beta_j edge_j(state_j);
    the cell takes it as two mixed-op sums per node (supernet.mixed_node), values and gradients."""
    torch.manual_seed(0)
    cfg = SupernetConfig(input_shape=(3, 8, 8), num_classes=5, channels=8, layers=1, steps=3, partial_channels=k,
                         bits=(2, 4))
    cell = SearchCell(8, 8, 8, reduction, False, cfg)
    edges = edge_nodes(cfg.steps)
    s0, s1 = torch.randn(3, 8, 7, 7, requires_grad=True), torch.randn(3, 8, 7, 7, requires_grad=True)
    alpha = torch.randn(len(edges), len(PRIMITIVES), requires_grad=True)
    beta = torch.randn(len(edges), requires_grad=True)
    op_weights = torch.softmax(alpha, -1)
    node_edges = [[e for e, (node, _) in enumerate(edges) if node == n] for n in range(2, cfg.steps + 2)]
    edge_weights = torch.cat([torch.softmax(beta[ids], 0) for ids in node_edges])
    got = cell(s0, s1, op_weights, edge_weights)
    states = [cell.preprocess0(s0), cell.preprocess1(s1)]
    for ids in node_edges:
        states.append(sum(edge_weights[e] * _edge_by_definition(cell.edges[e], states[edges[e][1]], op_weights[e])
                          for e in ids))
    want = torch.cat(states[2:], 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cell.edges[0](states[0], op_weights[0]),
                               _edge_by_definition(cell.edges[0], states[0], op_weights[0]), rtol=1e-5, atol=1e-5)
    g = torch.randn_like(got)
    leaves = [s0, s1, alpha, beta, quant_convs(cell.edges[-1])[0].weight]
    for a, b in zip(torch.autograd.grad(got, leaves, g, retain_graph=True), torch.autograd.grad(want, leaves, g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


class _Namespaces(TorchDispatchMode):
    """The namespaces of the operators dispatched inside the block (aten, qdarts, qdarts_C, ...)."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(func.namespace)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend, device", backend_cases(), ids=lambda c: c if isinstance(c, str) else None)
def test_the_networks_backend_reaches_every_layer(backend, device):
    """A supernet and a retraining network built with backend reference (or triton) run none of the
    C++ kernels (torch.ops.qdarts_C): the mixed-op sums, pools and batch norms follow the networks'
    backend as the quantized convs do (the sums and pools had taken the automatic choice, the C++
    kernels on CPU, the cuda ones on a GPU). With backend cpu (or cuda) the same networks do run them."""
    require_backend(backend, device)
    torch.manual_seed(0)
    # one reduction cell: every kind of layer (the edges' pools, batch norms and sums, the bypass pool)
    supernet = SearchNetwork(SupernetConfig(input_shape=(1, 8, 8), num_classes=4, channels=4, layers=1, steps=2,
                                            partial_channels=2, bits=(2, 4), backend=backend)).to(device)
    genotype = derive_genotype(supernet)
    evalnet = EvalNetwork(genotype, (1, 8, 8), 4, channels=4, layers=1, backend=backend).to(device)
    for net in (supernet, evalnet):
        with _Namespaces() as mode:
            net(torch.randn(3, 1, 8, 8, device=device)).square().sum().backward()
        assert ("qdarts_C" in mode.seen) == (backend in ("cpu", "cuda")), (type(net).__name__, mode.seen)
