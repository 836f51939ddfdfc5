"""Derivation rules on fixed alpha/beta/gamma, the genotype file format, and the evaluation network."""

import dataclasses
import json

import pytest
import torch

from qdarts import evalnet
from qdarts.derive import derive_edges, derive_genotype
from qdarts.evalnet import EvalNetwork, drop_path
from qdarts.genotype import PRIMITIVES, CellBits, Edge, Genotype, edge_index, load_genotype
from qdarts.ops import quant_convs
from qdarts.supernet import SearchNetwork, SupernetConfig

P = PRIMITIVES.index


def _net():
    torch.manual_seed(0)
    return SearchNetwork(SupernetConfig(input_shape=(1, 8, 8), num_classes=10, channels=4, layers=3, steps=2,
                                        partial_channels=2, bits=(2, 4, 8)))


def _set_alphas(net, rows):
    with torch.no_grad():
        net.alphas_normal.fill_(-10.0)
        for (node, inp), (op, value) in rows.items():
            net.alphas_normal[edge_index(node, inp), P(op)] = value


ROWS = {
    (2, 0): ("sep_conv_3x3", 2.0),
    (2, 1): ("none", 5.0),  # none is strongest here; the edge must still take its best non-none op
    (3, 0): ("dil_conv_5x5", 1.0),
    (3, 1): ("avg_pool_3x3", 3.0),
    (3, 2): ("skip_connect", 2.0),
}


@pytest.mark.parametrize("beta_31, kept_node3", [(0.0, [(1, "avg_pool_3x3"), (2, "skip_connect")]),
                                                 (-3.0, [(0, "dil_conv_5x5"), (2, "skip_connect")])])
def test_derivation_keeps_top2_inputs_by_alpha_times_beta_and_never_none(beta_31, kept_node3):
    net = _net()
    _set_alphas(net, ROWS)
    with torch.no_grad():
        net.alphas_normal[edge_index(2, 1), P("max_pool_3x3")] = 1.0
        net.betas_normal.zero_()
        net.betas_normal[edge_index(3, 1)] = beta_31
    g = derive_genotype(net)
    assert [(e.node, e.input, e.op) for e in g.normal] == (
        [(2, 0, "sep_conv_3x3"), (2, 1, "max_pool_3x3")] + [(3, i, op) for i, op in kept_node3])
    assert g.normal_concat == [2, 3]


def test_derivation_breaks_ties_towards_the_earlier_input_and_op():
    """Equal strengths (uniform alpha and beta): each node keeps its two earliest inputs, each edge the first
    non-none op."""
    edges = derive_edges(torch.full((9, len(PRIMITIVES)), 1 / len(PRIMITIVES)), torch.ones(9), steps=3)
    assert [(e.node, e.input, e.op) for e in edges] == [(n, i, "max_pool_3x3") for n in (2, 3, 4) for i in (0, 1)]


def test_derived_bits_are_the_argmax_of_each_cells_gammas():
    net = _net()
    _set_alphas(net, ROWS)
    with torch.no_grad():
        net.betas_normal.zero_()
        net.betas_normal[edge_index(3, 1)] = -3.0
        for ci, (a, w) in enumerate([(1, 0), (2, 1), (0, 2)]):
            sep = net.cells[ci].edges[edge_index(2, 0)].ops[P("sep_conv_3x3") - 1]
            sep.gamma_a[a] = 1.0
            sep.gamma_w[w] = 1.0
        net.cells[0].preprocess1.gamma_w[2] = 1.0
    g = derive_genotype(net)
    # cell 0 is normal; edge (2,0) is sep_conv_3x3 with 4 convs sharing one pair
    assert g.cells[0].edges[0] == [(4, 2)] * 4
    assert g.cells[0].preprocess1 == [(2, 8)] and g.cells[0].preprocess0 == [(2, 2)]
    # the dil_conv_5x5 edge (3,0) and skip_connect (3,2): untouched gammas (all equal) -> first bit-width
    assert g.cells[0].edges[2] == [(2, 2)] * 2 and g.cells[0].edges[3] == []
    assert [c.reduction for c in g.cells] == [False, True, True]


def test_genotype_json_round_trip_and_errors(tmp_path):
    net = _net()
    g = derive_genotype(net, {"data": "digits", "layers": 3})
    path = tmp_path / "genotype.json"
    g.save(str(path))
    d = json.loads(path.read_text())
    assert d["format"] == "qdarts-genotype" and d["version"] == 1 and d["bit_choices"] == [2, 4, 8]
    assert load_genotype(str(path)).to_dict() == d

    def broken(change):
        bad = json.loads(path.read_text())
        change(bad)
        p = tmp_path / "bad.json"
        p.write_text(json.dumps(bad))
        return str(p)

    with pytest.raises(ValueError, match="not a genotype file"):
        load_genotype(broken(lambda b: b.update(format="other")))
    with pytest.raises(ValueError, match="unsupported genotype version 2"):
        load_genotype(broken(lambda b: b.update(version=2)))
    with pytest.raises(ValueError, match="unknown op 'conv_9x9'"):
        load_genotype(broken(lambda b: b["normal"][0].update(op="conv_9x9")))
    with pytest.raises(ValueError, match="reads input 2, must be below node 2"):
        load_genotype(broken(lambda b: b["normal"][0].update(input=2)))  # a node reading itself
    with pytest.raises(ValueError, match="cell 0 has bits for 3 edges"):
        load_genotype(broken(lambda b: b["cells"][0].update(edges=b["cells"][0]["edges"][:3])))
    with pytest.raises(ValueError, match=r"bad\.json: search\.layers must be an integer >= 1, got None"):
        load_genotype(broken(lambda b: b["search"].update(layers=None)))  # retraining's default depth
    with pytest.raises(FileNotFoundError):
        load_genotype(str(tmp_path / "missing.json"))


def _marked_genotype(layers):
    """A genotype whose searched cell i has preprocess1 bits (i+1, i+1), to see which cell a network uses."""
    normal = [Edge(2, 0, "sep_conv_3x3"), Edge(2, 1, "skip_connect"), Edge(3, 0, "dil_conv_3x3"), Edge(3, 2, "max_pool_3x3")]
    red = {layers // 3, 2 * layers // 3}
    cells = [CellBits(i in red, [(8, 8)] * (1 if i - 1 not in red else 2), [(i + 1, i + 1)],
                      [[(4, 4)] * 4, [(4, 4)] * (2 if i in red else 0), [(2, 4)] * 2, []]) for i in range(layers)]
    return Genotype(normal, list(normal), [2, 3], [2, 3], cells, [2, 4, 8])


def test_cells_of_a_deeper_network_take_the_bits_of_the_same_stage_and_position():
    g = _marked_genotype(5)  # searched: N R N R N
    used = [g.cell_bits_for(i, 8).preprocess1[0][0] - 1 for i in range(8)]  # 8 layers: N N R N N R N N
    assert used == [0, 0, 1, 2, 2, 3, 4, 4]


@pytest.mark.parametrize("fp32", [False, True])
def test_eval_network_uses_the_genotype_bits_or_fp32(fp32):
    g = _marked_genotype(3)
    net = EvalNetwork(g, (1, 8, 8), 10, channels=4, layers=3, fp32=fp32, auxiliary=True)
    net.drop_path_prob = 0.2
    logits, aux = net(torch.randn(2, 1, 8, 8))
    assert logits.shape == aux.shape == (2, 10)
    convs = quant_convs(net)
    if fp32:
        assert convs == []
    else:
        cell0 = quant_convs(net.cells[0])
        # preprocess0 (8/8), preprocess1 (1/1), sep_conv_3x3 4x(4/4), dil_conv_3x3 2x(2/4)
        assert [c.chosen_bits() for c in cell0] == [(8, 8), (1, 1)] + [(4, 4)] * 4 + [(2, 4)] * 2
    net.eval()
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_drop_path_zeroes_whole_samples_and_rescales_the_others():
    torch.manual_seed(0)
    out = drop_path(torch.ones(256, 2, 3, 3), 0.25)
    kept = out.flatten(1)[:, 0] != 0
    assert torch.equal(out[kept], torch.full_like(out[kept], 1 / 0.75)) and not out[~kept].any()
    assert 0 < int(kept.sum()) < 256


def test_drop_path_leaves_identity_edges_alone(monkeypatch):
    """As DARTS: in training, drop-path applies to every kept edge but skip_connect's identity."""
    dropped = []
    monkeypatch.setattr(evalnet, "drop_path", lambda h, p: dropped.append(p) or h)
    net = EvalNetwork(_marked_genotype(3), (1, 8, 8), 10, channels=4, layers=3)  # cells N R R
    net.drop_path_prob = 0.2
    net(torch.randn(2, 1, 8, 8))
    # the normal cell's skip_connect (2, 1) is an identity; in a reduction cell it reads a cell input: stride 2
    assert dropped == [0.2] * (3 + 4 + 4)
    net.eval()
    net(torch.randn(2, 1, 8, 8))
    assert len(dropped) == 11


def test_the_auxiliary_head_reads_the_cell_at_two_thirds_of_the_depth():
    net = EvalNetwork(_marked_genotype(5), (1, 8, 8), 10, channels=4, layers=5, auxiliary=True)
    seen = {}
    net.cells[2 * 5 // 3].register_forward_hook(lambda m, i, out: seen.setdefault("cell", out))
    net.auxiliary_head.register_forward_hook(lambda m, i, out: seen.setdefault("head", i[0]))
    net(torch.randn(2, 1, 8, 8))
    assert seen["head"] is seen["cell"]


@pytest.mark.parametrize("bit_choices, grid", [([2, 4, 8], "signed"), ([1, 2, 4, 8], "midrise")])
def test_retrained_convs_keep_the_search_s_two_sided_grid(bit_choices, grid):
    """A search over a bit set with 1 bit quantizes LSQ weights and two-sided activations on the
    mid-rise grid (quantizers.symmetric_grid); the retrained convs keep it at their own bits."""
    g = dataclasses.replace(_marked_genotype(3), quantizer="lsq", bit_choices=bit_choices)
    net = EvalNetwork(g, (1, 8, 8), 10, channels=4, layers=3)
    convs = quant_convs(net)
    assert {c.weight_quant.grid for c in convs} == {grid}
    two_sided = {c.act_quant.grid for c in convs} - {"relu"}  # the pointwise convs after a depthwise one
    assert two_sided == {grid}
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("searched, layers", [(3, 5), (3, 8), (5, 8), (8, 20), (1, 2), (2, 1), (8, 3)])
def test_a_network_of_another_depth_fits_each_cells_preprocessing(searched, layers):
    """A cell after a reduction cell has a 2-conv FactorizedReduce preprocess0, any other a 1-conv one;
    the searched cell a deeper or shallower network maps a cell onto may have the other kind."""
    g = _marked_genotype(searched)
    net = EvalNetwork(g, (1, 8, 8), 10, channels=4, layers=layers)
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_cells_take_the_searched_cell_with_the_same_preprocessing_within_their_stage():
    g = _marked_genotype(8)  # searched: N N R N' N R N' N (N': after a reduction)
    used = [g.cell_bits_for(i, 20).preprocess1[0][0] - 1 for i in range(20)]
    # 20 layers: N x6, R, N', N x5, R, N', N x5: each N' takes the searched N', the others the other N
    assert used == [0, 0, 0, 1, 1, 1, 2, 3] + [4] * 5 + [5, 6] + [7] * 5
    for layers in range(1, 10):  # at the searched depth, every cell keeps its own bits
        g = _marked_genotype(layers)
        assert [g.cell_bits_for(i, layers) for i in range(layers)] == g.cells


def test_a_preprocess0_of_another_conv_count_takes_the_wider_bits_or_repeats_the_pair():
    g = _marked_genotype(3)  # searched: N R R; cell 2's preprocess0 is a FactorizedReduce
    g.cells[2].preprocess0 = [(2, 8), (4, 2)]
    assert g.cell_bits_for(4, 8).preprocess0 == [(8, 8)]  # cell 4 of 8: normal, after a normal cell
    assert g.cell_bits_for(5, 8).preprocess0 == [(4, 8)]  # reduction after a normal cell, from cell 2
    g = _marked_genotype(1)  # searched: R
    g.cells[0].preprocess0 = [(2, 4)]
    assert g.cell_bits_for(1, 2).preprocess0 == [(2, 4), (2, 4)]  # reduction after a reduction cell


def test_a_network_needing_a_normal_cell_that_was_not_searched_is_refused():
    g = _marked_genotype(2)  # searched: R R
    with pytest.raises(ValueError, match="no searched normal cell .* --layers 1 or 2"):
        EvalNetwork(g, (1, 8, 8), 10, channels=4, layers=3)


@pytest.mark.parametrize("parameter", ["alphas_normal", "betas_reduce", "gamma"])
def test_derivation_refuses_non_finite_parameters(parameter):
    net = _net()
    with torch.no_grad():
        p = net.gamma_parameters()[3] if parameter == "gamma" else getattr(net, parameter)
        p.view(-1)[1] = float("nan")
    with pytest.raises(ValueError, match=("gamma" if parameter == "gamma" else "alpha, beta") + r"\) are not finite"):
        derive_genotype(net)
