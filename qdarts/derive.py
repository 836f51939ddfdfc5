"""Derivation of the genotype with its bits from a searched supernet (DESIGN section 2).

For each cell type, with ``P = softmax(alpha)`` [edges, ops] and ``B = softmax(beta)`` over the
inputs of each node, the strength of op o on edge e is ``P[e, o] * B[e]``. Each intermediate node
keeps its two inputs whose strongest non-``none`` op is strongest (ties: the earlier input), and
each kept edge takes that op. The bits of every conv of a kept op, and of the preprocessing convs,
are the argmax of its gamma_a and gamma_w; they are read per searched cell (gamma is per cell).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from .genotype import PRIMITIVES, CellBits, Edge, Genotype, edge_index
from .ops import quant_convs
from .supernet import SearchNetwork

__all__ = ["derive_edges", "derive_genotype"]

NONE_INDEX = PRIMITIVES.index("none")


def derive_edges(op_probs: torch.Tensor, edge_probs: torch.Tensor, steps: int, kind: str = "cell") -> List[Edge]:
    """The kept edges of one cell type from softmax(alpha) [edges, ops] and per-node softmax(beta) [edges].

    Raises ``ValueError`` when a probability is NaN (a diverged search: alpha or beta is NaN or inf),
    as every comparison with NaN is false and the argmax would pick ops that nothing chose.
    """
    strength = (op_probs * edge_probs[:, None]).detach().cpu().double()
    if not torch.isfinite(strength).all():
        raise ValueError(f"the {kind} cell's architecture parameters (alpha, beta) are not finite: the search "
                         "diverged (try a lower --arch-lr, --weight-lr or --lambda); no genotype can be derived")
    strength[:, NONE_INDEX] = -1.0
    edges = []
    for node in range(2, steps + 2):
        candidates = []
        for inp in range(node):
            row = strength[edge_index(node, inp)]
            op = int(torch.argmax(row))
            candidates.append((-float(row[op]), inp, op))
        for _, inp, op in sorted(candidates)[:2]:
            edges.append(Edge(node, inp, PRIMITIVES[op]))
    return sorted(edges, key=lambda e: (e.node, e.input))


def _pairs(module) -> List[tuple]:
    return [tuple(int(b) for b in conv.chosen_bits()) for conv in quant_convs(module)]


def derive_genotype(net: SearchNetwork, search_info: Optional[Dict[str, Any]] = None) -> Genotype:
    cfg = net.cfg
    kept = {}
    for reduction in (False, True):
        betas = net.betas_reduce if reduction else net.betas_normal
        kept[reduction] = derive_edges(net.op_probs(reduction), net.edge_weights(betas), cfg.steps,
                                       "reduce" if reduction else "normal")
    if not all(torch.isfinite(p).all() for p in net.gamma_parameters()):
        raise ValueError("the bit-width parameters (gamma) are not finite: the search diverged (try a lower "
                         "--gamma-lr or --lambda); no genotype can be derived")
    cells = []
    for cell in net.cells:
        edge_bits = [_pairs(cell.edges[edge_index(e.node, e.input)].ops[PRIMITIVES.index(e.op) - 1])
                     for e in kept[cell.reduction]]
        cells.append(CellBits(cell.reduction, _pairs(cell.preprocess0), _pairs(cell.preprocess1), edge_bits))
    concat = list(range(2, cfg.steps + 2))
    return Genotype(kept[False], kept[True], concat, list(concat), cells, list(cfg.bits), cfg.quantizer,
                    cfg.act_grid, list(PRIMITIVES), dict(search_info or {}))
