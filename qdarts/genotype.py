"""The derived architecture with its bit-widths, and its JSON file format (``genotype.json``).

Format ``{"format": "qdarts-genotype", "version": 1, ...}``::

    primitives      the candidate-op names of the search, in order
    bit_choices     the bit-widths searched, e.g. [2, 4, 8] (the cells' bits may be others in 1..16:
                    a hand-made genotype may try bit-widths the search did not)
    quantizer       "paper" | "lsq"  (quantizer family used in search; retraining uses it too)
    act_grid        "follow" | "official"  (activation grid rule, see qdarts.ops)
    normal, reduce  the two cell types: a list of edges {"node": n, "input": i, "op": name},
                    two per intermediate node n = 2..steps+1 from a search (a hand-made genotype
                    may give a node one or more); inputs 0 and 1 are the outputs of the
                    previous-but-one and previous cell, input i >= 2 is intermediate node i
    normal_concat, reduce_concat   the nodes concatenated into the cell output
    cells           one entry per searched cell, in depth order:
                    {"reduction": bool,
                     "preprocess0": [[a, w], ...], "preprocess1": [[a, w], ...],
                     "edges": [[[a, w], ...], ...]}  -- for each edge of the cell's type (same order
                    as normal/reduce), one [act_bits, weight_bits] pair per quantized conv of its op,
                    in the op's conv order (empty for pooling and identity)
    search          the search settings retraining needs by default (data, input_shape,
                    num_classes, layers, channels, steps) and the search's results

A network of another depth maps its cells onto the searched ones by type, stage, preprocessing and
relative position (see :func:`Genotype.cell_bits_for`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

from .data import DATASETS

__all__ = ["PRIMITIVES", "Edge", "Genotype", "FORMAT", "VERSION", "MAX_BITS", "load_genotype", "reduction_cells"]

FORMAT = "qdarts-genotype"
VERSION = 1

PRIMITIVES = (
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
)

BitPairs = List[Tuple[int, int]]

#: the widest bit-width the quantized ops of qdarts_kernels accept (they take 1..MAX_BITS)
MAX_BITS = 16


@dataclass(frozen=True)
class Edge:
    node: int
    input: int
    op: str


@dataclass
class CellBits:
    reduction: bool
    preprocess0: BitPairs
    preprocess1: BitPairs
    edges: List[BitPairs]


@dataclass
class Genotype:
    normal: List[Edge]
    reduce: List[Edge]
    normal_concat: List[int]
    reduce_concat: List[int]
    cells: List[CellBits]
    bit_choices: List[int]
    quantizer: str = "paper"
    act_grid: str = "follow"
    primitives: List[str] = field(default_factory=lambda: list(PRIMITIVES))
    search: Dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ structure

    def edges(self, reduction: bool) -> List[Edge]:
        return self.reduce if reduction else self.normal

    def cell_bits_for(self, index: int, layers: int) -> CellBits:
        """Bits for cell ``index`` of a network with ``layers`` cells: those of the genotype's cell
        that :meth:`searched_cell_for` chooses.

        When the chosen cell's preprocess0 has another conv count, its pairs are fitted: one conv
        takes the wider bits of the two (the larger act and the larger weight bits, so that neither
        half of the input gets fewer bits than the search chose), two convs both take the one pair.

        Raises ``ValueError`` as :meth:`searched_cell_for` does.
        """
        chosen = self.cells[self.searched_cell_for(index, layers)]
        reduction_prev = _cell_layout(layers)[index][2]
        return CellBits(chosen.reduction, _fit_pairs(chosen.preprocess0, 2 if reduction_prev else 1),
                        chosen.preprocess1, chosen.edges)

    def searched_cell_for(self, index: int, layers: int) -> int:
        """The index of the genotype's cell that gives its bits to cell ``index`` of a network with
        ``layers`` cells (reductions at :func:`reduction_cells`).

        The cells of a network are in stages: the normal cells before, between and after the
        reduction cells, each reduction cell a stage of its own. Cell ``index`` takes the bits of the
        searched cell of the same type, stage and ``reduction_prev`` (whether the cell before it is a
        reduction cell: its preprocess0 is then a FactorizedReduce with 2 convs, else a 1x1
        ReLUConvBN with 1) at the same relative position among the cells of that kind; failing one,
        of the same type and stage; then of the same type and ``reduction_prev`` in any stage; then of
        the same type anywhere. A network of the searched depth so takes each searched cell's own bits.

        Raises ``ValueError`` when the genotype has no searched cell of the type the network needs (a
        1- or 2-cell search has reduction cells only, and a network of 3 or more cells has normal ones).
        """
        searched, wanted = _cell_layout(len(self.cells)), _cell_layout(layers)
        reduction = wanted[index][0]
        for key in (lambda c: c, lambda c: c[:2], lambda c: (c[0], c[2]), lambda c: c[0]):
            candidates = [i for i, c in enumerate(searched) if key(c) == key(wanted[index])]
            if candidates:
                break
        else:
            kinds = "".join("R" if r else "N" for r, _, _ in searched)
            raise ValueError(f"the genotype has no searched {'reduction' if reduction else 'normal'} cell (its "
                             f"searched cells: {kinds or 'none'}), which a network of {layers} cells needs: "
                             "retrain it with --layers 1 or 2, or search with --layers >= 3")
        group = [j for j, c in enumerate(wanted) if key(c) == key(wanted[index])]
        return candidates[group.index(index) * len(candidates) // len(group)]

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> Dict[str, Any]:
        edge = lambda e: {"node": e.node, "input": e.input, "op": e.op}  # noqa: E731
        pairs = lambda ps: [[int(a), int(w)] for a, w in ps]  # noqa: E731
        return {
            "format": FORMAT,
            "version": VERSION,
            "primitives": list(self.primitives),
            "bit_choices": list(self.bit_choices),
            "quantizer": self.quantizer,
            "act_grid": self.act_grid,
            "normal": [edge(e) for e in self.normal],
            "normal_concat": list(self.normal_concat),
            "reduce": [edge(e) for e in self.reduce],
            "reduce_concat": list(self.reduce_concat),
            "cells": [
                {
                    "reduction": c.reduction,
                    "preprocess0": pairs(c.preprocess0),
                    "preprocess1": pairs(c.preprocess1),
                    "edges": [pairs(e) for e in c.edges],
                }
                for c in self.cells
            ],
            "search": self.search,
        }

    @classmethod
    def from_dict(cls, d: Dict[str, Any], source: str = "genotype") -> "Genotype":
        def fail(msg):
            raise ValueError(f"{source}: {msg}")

        if not isinstance(d, dict) or d.get("format") != FORMAT:
            fail(f"not a genotype file (expected \"format\": \"{FORMAT}\")")
        if type(d.get("version")) is not int or d["version"] != VERSION:  # true == 1 in Python, not a version
            fail(f"unsupported genotype version {d.get('version')!r} (this qdarts reads version {VERSION})")
        try:
            prims = list(d["primitives"])
            edges = {k: [Edge(_integer(e["node"], f"{k} edge node"), _integer(e["input"], f"{k} edge input"),
                              str(e["op"])) for e in d[k]] for k in ("normal", "reduce")}
            cells = [
                CellBits(_flag(c["reduction"], f"cell {i} reduction"), _read_pairs(c["preprocess0"], f"cell {i} preprocess0"),
                         _read_pairs(c["preprocess1"], f"cell {i} preprocess1"),
                         [_read_pairs(e, f"cell {i} edge {j}") for j, e in enumerate(c["edges"])])
                for i, c in enumerate(d["cells"])
            ]
            g = cls(edges["normal"], edges["reduce"], _integers(d["normal_concat"], "normal_concat"),
                    _integers(d["reduce_concat"], "reduce_concat"), cells, _integers(d["bit_choices"], "bit_choices"),
                    str(d.get("quantizer", "paper")), str(d.get("act_grid", "follow")), prims, dict(d.get("search", {})))
        except (KeyError, TypeError, ValueError) as e:
            fail(f"malformed genotype ({type(e).__name__}: {e})")
        for kind in ("normal", "reduce"):
            kept = g.edges(kind == "reduce")
            if not kept:
                fail(f"{kind} has no edges")
            for e in kept:
                if e.op not in PRIMITIVES or e.op == "none":
                    fail(f"{kind} edge {e} has unknown op {e.op!r}")
                if not 0 <= e.input < e.node:
                    fail(f"{kind} edge {e} reads input {e.input}, must be below node {e.node}")
                if e.node < 2:
                    fail(f"{kind} edge {e} ends at node {e.node}: nodes 0 and 1 are the cell inputs")
            nodes = range(2, max(e.node for e in kept) + 1)
            bare = [n for n in nodes if all(e.node != n for e in kept)]
            if bare:
                fail(f"{kind} node {bare[0]} has no edges (each intermediate node 2..{nodes[-1]} needs one)")
            concat = g.reduce_concat if kind == "reduce" else g.normal_concat
            if not concat or any(n not in nodes for n in concat):
                fail(f"{kind}_concat must list nodes of the cell (2..{nodes[-1]}), got {concat}")
        if not g.cells:
            fail("cells is empty: a genotype has one entry per searched cell")
        if not g.bit_choices or not all(1 <= b <= MAX_BITS for b in g.bit_choices):
            fail(f"bit_choices must be bit-widths in 1..{MAX_BITS}, got {g.bit_choices}")
        # the search settings that retraining takes when their options are left out (qdarts.train)
        search = g.search
        for name in ("layers", "channels"):
            if name in search and not (type(search[name]) is int and search[name] >= 1):  # a bool is an int too
                fail(f"search.{name} must be an integer >= 1, got {search[name]!r}")
        if "data" in search and search["data"] not in DATASETS:
            fail(f"search.data must be one of {', '.join(DATASETS)}, got {search['data']!r}")
        if search.get("data_dir") is not None and not isinstance(search["data_dir"], str):
            fail(f"search.data_dir must be a folder name or null, got {search['data_dir']!r}")
        for i, (c, (reduction, _, reduction_prev)) in enumerate(zip(g.cells, _cell_layout(len(g.cells)))):
            if c.reduction != reduction:
                fail(f"cell {i} has reduction {c.reduction}, but in a {len(g.cells)}-cell network the reduction "
                     f"cells are {sorted(set(reduction_cells(len(g.cells))))}")
            if len(c.edges) != len(g.edges(c.reduction)):
                fail(f"cell {i} has bits for {len(c.edges)} edges, its cell type has {len(g.edges(c.reduction))}")
            if len(c.preprocess0) != (2 if reduction_prev else 1) or len(c.preprocess1) != 1:
                fail(f"cell {i} has {len(c.preprocess0)} preprocess0 and {len(c.preprocess1)} preprocess1 bit pairs, "
                     f"its preprocessing has {2 if reduction_prev else 1} and 1 convs")
            for a, w in [p for e in c.edges for p in e] + c.preprocess0 + c.preprocess1:
                if not (1 <= a <= MAX_BITS and 1 <= w <= MAX_BITS):
                    fail(f"cell {i} has bit-widths ({a}, {w}) outside 1..{MAX_BITS}")
        return g

    def save(self, path: str) -> None:
        from .checkpoint import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    def describe(self) -> str:
        """A short human-readable text: the edges of each cell type and the bits of each searched cell."""
        lines = []
        for kind in ("normal", "reduce"):
            ops = ", ".join(f"{e.op}({e.input}->{e.node})" for e in self.edges(kind == "reduce"))
            lines.append(f"{kind}: {ops}")
        for i, c in enumerate(self.cells):
            bits = " ".join(_pairs_text(ps) for ps in c.edges)
            pre = " ".join(_pairs_text(ps) for ps in (c.preprocess0, c.preprocess1))
            lines.append(f"cell {i} ({'reduce' if c.reduction else 'normal'}): preprocess {pre}; edges a/w {bits}")
        return "\n".join(lines)


def _read_pairs(pairs, where: str) -> BitPairs:
    """[[a, w], ...] of a genotype file as (a, w) tuples; a ValueError naming ``where`` for anything else."""
    if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
        raise ValueError(f"{where} must be a list of [act_bits, weight_bits] pairs, got {pairs!r}")
    return [(_integer(a, where), _integer(w, where)) for a, w in pairs]


def _integer(value, where: str) -> int:
    """``value`` when it is an integer (not a bool); a ValueError naming ``where`` for anything else, rather than
    int()'s silent truncation of a hand-edited 4.5."""
    if type(value) is not int:
        raise ValueError(f"{where} must hold integers, got {value!r}")
    return value


def _flag(value, where: str) -> bool:
    """``value`` when it is a bool; a ValueError naming ``where`` otherwise (bool("false") is True)."""
    if type(value) is not bool:
        raise ValueError(f"{where} must be true or false, got {value!r}")
    return value


def _integers(values, where: str) -> List[int]:
    if not isinstance(values, list):
        raise ValueError(f"{where} must be a list of integers, got {values!r}")
    return [_integer(v, where) for v in values]


def reduction_cells(layers: int) -> Tuple[int, ...]:
    """The indices of the reduction cells of a ``layers``-cell network (supernet and evaluation network)."""
    return (layers // 3, 2 * layers // 3)


def _cell_layout(layers: int) -> List[Tuple[bool, int, bool]]:
    """(reduction, stage, reduction_prev) of each cell of a ``layers``-cell network (see cell_bits_for)."""
    red = set(reduction_cells(layers))
    out, stage = [], 0
    for i in range(layers):
        if i in red:
            stage += 1
        out.append((i in red, stage, i - 1 in red))
        if i in red:
            stage += 1
    return out


def _fit_pairs(pairs: BitPairs, convs: int) -> BitPairs:
    """``pairs`` for an op of ``convs`` convs (1 or 2): the wider bits of two, or the one pair repeated."""
    if len(pairs) == convs:
        return list(pairs)
    if convs == 1:
        return [(max(a for a, _ in pairs), max(w for _, w in pairs))]
    return [pairs[0]] * convs


def _pairs_text(pairs: BitPairs) -> str:
    """'a/w' for the convs of one op: one pair when they agree, all of them otherwise, '-' when none."""
    if not pairs:
        return "-"
    if len(set(pairs)) == 1:
        return f"{pairs[0][0]}/{pairs[0][1]}"
    return ",".join(f"{a}/{w}" for a, w in pairs)


#: The file a search writes its genotype to, in its --out folder.
GENOTYPE_FILE = "genotype.json"


def genotype_path(path: str) -> str:
    """The genotype file that ``path`` names: the genotype.json of the search folder ``path`` where it has one,
    else ``path`` (so that both spellings of one genotype are one setting of a resumed run)."""
    in_folder = os.path.join(path, GENOTYPE_FILE)
    return in_folder if os.path.isdir(path) and os.path.isfile(in_folder) else path


def load_genotype(path: str) -> Genotype:
    """The genotype in the file ``path``, or in the genotype.json of the search folder ``path``."""
    path = genotype_path(path)
    if os.path.isdir(path):
        raise FileNotFoundError(f"genotype {path!r} is a folder without a {GENOTYPE_FILE}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"genotype file {path!r} does not exist")
    with open(path) as f:
        try:
            d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        except RecursionError:  # json's parser recurses per nesting level
            raise ValueError(f"{path}: not a genotype (JSON nested too deeply to read)") from None
    return Genotype.from_dict(d, source=path)


def edge_index(node: int, inp: int) -> int:
    """Index of the edge inp -> node among a cell's edges (node 2 has edges 0, 1; node 3 has 2, 3, 4; ...)."""
    return sum(range(2, node)) + inp


def edge_nodes(steps: int) -> List[Tuple[int, int]]:
    """(node, input) of every edge of a search cell with ``steps`` intermediate nodes, in edge order."""
    return [(n, i) for n in range(2, steps + 2) for i in range(n)]
