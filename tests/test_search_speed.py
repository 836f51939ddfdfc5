"""The fast search step: grouped weight quantization, compiled steps, bf16 activations, no host sync.

Compiled steps are tested with torch.compile's ``aot_eager`` backend (forward and backward graphs
traced with fullgraph=True through AOTAutograd, no code generation): inductor takes minutes to
compile the supernet on a 2-core CPU. The inductor and CUDA-graph modes run only on a GPU.
"""

import dataclasses
import functools

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from qdarts import fastpath, search
from qdarts.search import SearchConfig, Searcher
from qdarts.supernet import SearchNetwork, SupernetConfig

TINY_NET = SupernetConfig(input_shape=(1, 8, 8), num_classes=10, channels=4, layers=3, steps=2, partial_channels=2)
TINY_SEARCH = dict(data="synthetic", epochs=1, warmup_epochs=0, batch_size=32, channels=4, layers=1, steps=2,
                   partial_channels=2, bits=(2, 4))


def _pair(**kw):
    """The same supernet (same parameters) with grouped and with per-conv weight quantization."""
    cfg = dataclasses.replace(TINY_NET, **kw)
    torch.manual_seed(0)
    grouped = SearchNetwork(dataclasses.replace(cfg, grouped_weights=True))
    per_conv = SearchNetwork(dataclasses.replace(cfg, grouped_weights=False))
    per_conv.load_state_dict(grouped.state_dict())
    return grouped, per_conv


def _batch(n=16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("quantizer", ["paper", "lsq"])
@pytest.mark.parametrize("bits", [(2, 4), (2, 4, 8)], ids=["per_tensor", "per_channel_8bit"])
def test_grouped_weights_give_the_per_conv_loss_and_gradients(bits, quantizer):
    grouped, per_conv = _pair(bits=bits, quantizer=quantizer)
    assert grouped.weight_quantizer.num_groups == 1 and per_conv.weight_quantizer is None
    x, y = _batch()
    logits_g, logits_p = grouped(x), per_conv(x)
    assert torch.equal(logits_g, logits_p)  # the mixed weights are bit for bit the per-conv ones
    F.cross_entropy(logits_g, y).backward()
    F.cross_entropy(logits_p, y).backward()
    for (name, a), b in zip(grouped.named_parameters(), per_conv.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:  # logits shared by several convs sum their gradients in another order
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6 * b.grad.abs().max().item(), msg=name)


def _quantizer_calls(net, x, y):
    """Calls of the mixed_fake_quant and mixed_fake_quant_grouped ops in one forward + backward."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        F.cross_entropy(net(x), y).backward()
    names = [e.name for e in prof.events()]
    # _QuantizedInputConv2d: an input quantized, then a conv; _ChainedQuantizedConv2d: that twice
    single = (names.count("_MixedFakeQuantFunction") + names.count("_QuantizedInputConv2d")
              + 2 * names.count("_ChainedQuantizedConv2d"))
    return single, names.count("_MixedFakeQuantGroupedFunction")


def test_grouped_weights_quantize_all_conv_weights_in_one_call():
    grouped, per_conv = _pair()
    n_convs = len(grouped.quant_layers())
    x, y = _batch()
    assert _quantizer_calls(per_conv, x, y) == (2 * n_convs, 0)  # an activation and a weight per conv
    assert _quantizer_calls(grouped, x, y) == (n_convs, 1)  # the activations, and one grouped call


def _dispatched(net, x, y, names, phases=("forward", "backward")):
    """How many times each aten op of ``names`` runs in the forward and in the backward of ``net``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts = {phase: dict.fromkeys(names, 0) for phase in phases}

    class Count(TorchDispatchMode):
        def __init__(self, phase):
            super().__init__()
            self.counts = counts[phase]

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in self.counts:
                self.counts[name] += 1
            return func(*args, **(kwargs or {}))

    with Count("forward"):
        loss = F.cross_entropy(net(x), y)
    with Count("backward"):
        loss.backward()
    return counts


def test_grouped_bit_probabilities_take_one_softmax_per_step():
    grouped, per_conv = _pair(share_gamma=False)
    n_convs = len(grouped.quant_layers())
    x, y = _batch()
    arch = 2 + 2 * grouped.cfg.steps  # alpha (normal, reduce), beta (each node, normal and reduce)
    # per conv: the activation's and the weight's softmax; grouped: one for all activations, one for all
    # weights, whatever the number of convs; forward and backward alike
    for net, quantizers in ((per_conv, 2 * n_convs), (grouped, 2)):
        counts = _dispatched(net, x, y, ["_softmax", "_softmax_backward_data"])
        assert counts["forward"]["_softmax"] == counts["backward"]["_softmax_backward_data"] == arch + quantizers


def test_quantizers_on_one_input_share_its_activation_scales(monkeypatch):
    """The supernet's forward computes the activation scales once per (input, configuration): the
    same loss and gradients bit for bit as with every quantizer computing its own, with about half
    the scale reductions in this small supernet (614 instead of 1478 per CIFAR-size step)."""
    from contextlib import nullcontext

    from qdarts import supernet

    (shared, _), (own, _) = _pair(), _pair()  # the same grouped supernet twice
    x, y = _batch()
    with_sharing = _dispatched(shared, x, y, ["amax", "linalg_vector_norm"])["forward"]
    monkeypatch.setattr(supernet, "shared_activation_scales", nullcontext)
    without = _dispatched(own, x, y, ["amax", "linalg_vector_norm"])["forward"]
    # the first convs of the candidate ops quantize relu(partial head): one max (amax) per head
    assert 0 < with_sharing["amax"] < 0.6 * without["amax"], (with_sharing, without)
    assert with_sharing["linalg_vector_norm"] == without["linalg_vector_norm"]  # no shared input
    for net in (shared, own):
        net.zero_grad()
    own.load_state_dict(shared.state_dict())
    losses = []
    for net, sharing in ((shared, supernet.shared_activation_scales), (own, nullcontext)):
        monkeypatch.setattr(supernet, "shared_activation_scales", sharing)
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        losses.append(loss.detach())
    assert torch.equal(losses[0], losses[1])
    for (name, a), b in zip(shared.named_parameters(), own.parameters()):
        assert (a.grad is None) == (b.grad is None) and (a.grad is None or torch.equal(a.grad, b.grad)), name


def test_edges_share_one_contiguous_copy_of_each_state_s_partial_channels():
    """Every edge reading a node state works on the same first C/K channels (supernet.partial_head):
    one copy per state read by an edge, none inside the quantized convs or the mixed-op sums, forward
    or backward (a strided slice would be copied by each of them); a node's channel shuffle is made
    by its concatenation (supernet.shuffled_cat), not by a copy after it. The only other copies: on
    CPU each stride-2 1x1 conv (the FactorizedReduce ones) gathers the pixels it reads for its matrix
    products, in the forward and for its weight gradient (qdarts_kernels.nn.layers._pointwise_grid)."""
    from qdarts_kernels.nn import QuantConv2d

    net, _ = _pair()
    x, y = _batch()
    states_read_per_cell = net.cfg.steps + 1  # the two cell inputs and every node but the last
    nodes = net.cfg.layers * net.cfg.steps
    strided_1x1 = sum(isinstance(m, QuantConv2d) and m.kernel_size == (1, 1) and m.stride != (1, 1)
                      for m in net.modules())
    assert strided_1x1 > 0
    sliced = _dispatched(net, x, y, ["clone", "cat"])
    assert sliced["forward"]["clone"] == net.cfg.layers * states_read_per_cell + strided_1x1
    unsliced = _dispatched(_pair(partial_channels=1)[0], x, y, ["clone", "cat"])
    assert unsliced["forward"]["clone"] == strided_1x1
    # forward, per node: the shuffled concatenation of its two sums (and one per cell: its output)
    assert sliced["forward"]["cat"] - unsliced["forward"]["cat"] == nodes
    # backward, per node: the gradient of its candidates' sum (its channels of the node's
    # gradient, strided) made contiguous once for the sum; without partial channels only the last
    # node's gradient is strided (a slice of the cell output's)
    assert sliced["backward"]["clone"] == nodes + strided_1x1
    assert unsliced["backward"]["clone"] == net.cfg.layers + strided_1x1


def test_a_disabled_weight_quantizer_passes_its_weight_through():
    grouped, per_conv = _pair()
    for net in (grouped, per_conv):
        for _, conv, _ in net.quant_layers()[:3]:
            conv.weight_quant.disable_fake_quant()
    x, _ = _batch()
    assert torch.equal(grouped(x), per_conv(x))


def test_bf16_activations_reach_the_quantizers_and_keep_fp32_logits():
    torch.manual_seed(0)
    net = SearchNetwork(dataclasses.replace(TINY_NET, act_dtype="bf16"))
    seen = []
    for _, conv, _ in net.quant_layers():
        conv.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))  # what act_quant sees
    x, y = _batch()
    logits = net(x)
    assert logits.dtype == torch.float32 and set(seen) == {torch.bfloat16}
    F.cross_entropy(logits, y).backward()
    assert all(p.grad.dtype == torch.float32 for p in net.parameters() if p.grad is not None)
    with pytest.raises(ValueError, match="act_dtype"):
        SearchNetwork(dataclasses.replace(TINY_NET, act_dtype="fp8"))


@pytest.mark.parametrize("grouped_weights", [True, False], ids=["grouped", "per_conv"])
def test_a_quantized_conv_keeps_only_its_input_and_weight_for_backward(grouped_weights):
    """Per conv the backward keeps x itself (not the mixed activation: it is recomputed) and the
    weight and mixed weight; no per-bit copy of anything (the naive mixed layer keeps one per bit).
    A chained depthwise-pointwise pair keeps the depthwise conv's input only (the pointwise conv's
    is recomputed), and its weights."""
    net = _pair(bits=(2, 4, 8))[0 if grouped_weights else 1]
    x, y = _batch(7)  # a batch size that no weight dimension has
    inputs = []
    for _, conv, _ in net.quant_layers():
        conv.register_forward_pre_hook(lambda m, args: inputs.append(args[0].data_ptr()))
    loss = F.cross_entropy(net(x), y)
    convs_of = {"_QuantizedInputConv2dBackward": 1, "_ChainedQuantizedConv2dBackward": 2}
    nodes, todo, seen = [], [loss.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo += [n for n, _ in node.next_functions]
        if type(node).__name__ in convs_of:
            nodes.append(node)
    assert sum(convs_of[type(n).__name__] for n in nodes) == len(net.quant_layers())
    weight_shapes = {conv.weight.shape for _, conv, _ in net.quant_layers()}
    for node in nodes:
        tensors = [t for t in node.saved_tensors if t is not None]
        activations = [t for t in tensors if t.dim() == 4 and t.shape[0] == x.shape[0]]
        weights = [t for t in tensors if t.shape in weight_shapes and t.shape[0] != x.shape[0]]
        assert len(activations) == 1
        # a chained pair's input is the input of a conv called alone in the per-conv path
        assert activations[0].data_ptr() in inputs or type(node).__name__ == "_ChainedQuantizedConv2dBackward"
        assert len(weights) == convs_of[type(node).__name__]  # the mixed weights, nothing per bit
    loss.backward()


def test_the_fused_quantized_conv_equals_quantizer_then_conv():
    """QuantConv2d's training forward (mixed activation recomputed in backward) against its parts."""
    from qdarts_kernels.nn import QuantConv2d

    torch.manual_seed(0)
    conv = QuantConv2d(4, 6, 3, padding=1, groups=2, bias=True, act_bits=(2, 4, 8), weight_bits=(2, 4))
    x = torch.randn(5, 4, 7, 7, requires_grad=True)
    y = conv(x)
    grads = torch.autograd.grad(y.square().sum(), [x, conv.weight, conv.bias, conv.act_quant.logits])
    ref = F.conv2d(conv.act_quant(x), conv.weight_quant(conv.weight), conv.bias, 1, 1, 1, 2)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, conv.weight, conv.bias, conv.act_quant.logits])
    assert torch.equal(y, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _steps(searcher, x, y, xv, yv):
    stats = torch.zeros(4, device=x.device)
    searcher.step(x, y, xv, yv, 0.1, stats, update_arch=True)
    return stats


@pytest.mark.slow
def test_compiled_step_traces_as_one_graph_and_matches_eager(tmp_path, monkeypatch):
    monkeypatch.setattr(search, "compiled", functools.partial(fastpath.compiled, backend="aot_eager"))
    cfg = dict(TINY_SEARCH, layers=1)
    eager = Searcher(SearchConfig(**cfg), str(tmp_path / "e"), progress=False)
    comp = Searcher(SearchConfig(**cfg, compile="default"), str(tmp_path / "c"), progress=False)
    comp.net.load_state_dict(eager.net.state_dict())
    x, y, xv, yv = eager.train_x[:32], eager.train_y[:32], eager.val_x[:32], eager.val_y[:32]
    eager.net(x)  # the eager searcher records the conv shapes in its first step; the compiled one did at init
    for _ in range(2):
        stats_e, stats_c = _steps(eager, x, y, xv, yv), _steps(comp, x, y, xv, yv)
        torch.testing.assert_close(stats_c, stats_e, rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(comp.net.named_parameters(), eager.net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_compile_setting_is_checked():
    with pytest.raises(ValueError, match="compile"):
        SearchConfig(compile="fast").validate()
    with pytest.raises(ValueError, match="act_dtype"):
        SearchConfig(act_dtype="fp16").validate()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("grouped_weights", [True, False])
@pytest.mark.parametrize("order", ["first", "second"])
def test_no_device_sync_in_a_search_step_on_the_gpu(tmp_path, order, grouped_weights):
    s = Searcher(SearchConfig(**TINY_SEARCH, order=order, device="cuda", grouped_weights=grouped_weights),
                 str(tmp_path), progress=False)
    x, y, xv, yv = (t[:32].cuda() for t in (s.train_x, s.train_y, s.val_x, s.val_y))
    _steps(s, x, y, xv, yv)  # first step: the cost builds its tables, the optimisers their state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            _steps(s, x, y, xv, yv)
    finally:
        torch.cuda.set_sync_debug_mode("default")
