"""The derived architecture with its bit-widths, and its JSON file format (``genotype.json``).

Format ``{"format": "qdarts-genotype", "version": 1, ...}``::

    primitives      the candidate-op names of the search, in order
    bit_choices     the bit-widths searched, e.g. [2, 4, 8]
    quantizer       "paper" | "lsq"  (quantizer family used in search; retraining uses it too)
    act_grid        "follow" | "official"  (activation grid rule, see qdarts.ops)
    normal, reduce  the two cell types: a list of edges {"node": n, "input": i, "op": name},
                    two per intermediate node n = 2..steps+1; inputs 0 and 1 are the outputs of the
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

A network of another depth maps its cells onto the searched ones by stage and relative position
(see :func:`Genotype.cell_bits_for`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

__all__ = ["PRIMITIVES", "Edge", "Genotype", "FORMAT", "VERSION", "load_genotype"]

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
        """Bits for cell ``index`` of a network with ``layers`` cells (reductions at layers//3, 2*layers//3).

        Cell i of stage s (0, 1, 2 between reductions; a reduction cell is its own stage) takes the
        bits of the searched cell of the same stage and type at the same relative position.
        """
        def stages(n):
            red = {n // 3, 2 * n // 3}
            out, stage, pos = [], 0, 0
            for i in range(n):
                if i in red:
                    stage += 1
                    out.append(("r", stage, 0))
                    stage += 1
                    pos = 0
                else:
                    out.append(("n", stage, pos))
                    pos += 1
            return out

        searched = stages(len(self.cells))
        wanted = stages(layers)
        kind, stage, pos = wanted[index]
        count = sum(1 for k, s, _ in wanted if (k, s) == (kind, stage))
        candidates = [i for i, (k, s, _) in enumerate(searched) if (k, s) == (kind, stage)]
        if not candidates:  # a stage the search did not have (e.g. a 2-cell search): same type, any stage
            candidates = [i for i, (k, _, _) in enumerate(searched) if k == kind]
        return self.cells[candidates[min(len(candidates) - 1, pos * len(candidates) // max(count, 1))]]

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
        if d.get("version") != VERSION:
            fail(f"unsupported genotype version {d.get('version')!r} (this qdarts reads version {VERSION})")
        try:
            prims = list(d["primitives"])
            edges = {k: [Edge(int(e["node"]), int(e["input"]), str(e["op"])) for e in d[k]] for k in ("normal", "reduce")}
            cells = [
                CellBits(bool(c["reduction"]), [tuple(map(int, p)) for p in c["preprocess0"]],
                         [tuple(map(int, p)) for p in c["preprocess1"]],
                         [[tuple(map(int, p)) for p in e] for e in c["edges"]])
                for c in d["cells"]
            ]
            g = cls(edges["normal"], edges["reduce"], list(map(int, d["normal_concat"])),
                    list(map(int, d["reduce_concat"])), cells, list(map(int, d["bit_choices"])),
                    str(d.get("quantizer", "paper")), str(d.get("act_grid", "follow")), prims, dict(d.get("search", {})))
        except (KeyError, TypeError, ValueError) as e:
            fail(f"malformed genotype ({type(e).__name__}: {e})")
        for kind in ("normal", "reduce"):
            for e in g.edges(kind == "reduce"):
                if e.op not in PRIMITIVES or e.op == "none":
                    fail(f"{kind} edge {e} has unknown op {e.op!r}")
                if not 0 <= e.input < e.node:
                    fail(f"{kind} edge {e} reads input {e.input}, must be below node {e.node}")
        for i, c in enumerate(g.cells):
            if len(c.edges) != len(g.edges(c.reduction)):
                fail(f"cell {i} has bits for {len(c.edges)} edges, its cell type has {len(g.edges(c.reduction))}")
            for a, w in [p for e in c.edges for p in e] + c.preprocess0 + c.preprocess1:
                if not (1 <= a <= 32 and 1 <= w <= 32):
                    fail(f"cell {i} has bit-widths ({a}, {w}) outside 1..32")
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


def _pairs_text(pairs: BitPairs) -> str:
    """'a/w' for the convs of one op: one pair when they agree, all of them otherwise, '-' when none."""
    if not pairs:
        return "-"
    if len(set(pairs)) == 1:
        return f"{pairs[0][0]}/{pairs[0][1]}"
    return ",".join(f"{a}/{w}" for a, w in pairs)


def load_genotype(path: str) -> Genotype:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"genotype file {path!r} does not exist")
    with open(path) as f:
        try:
            d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
    return Genotype.from_dict(d, source=path)


def edge_index(node: int, inp: int) -> int:
    """Index of the edge inp -> node among a cell's edges (node 2 has edges 0, 1; node 3 has 2, 3, 4; ...)."""
    return sum(range(2, node)) + inp


def edge_nodes(steps: int) -> List[Tuple[int, int]]:
    """(node, input) of every edge of a search cell with ``steps`` intermediate nodes, in edge order."""
    return [(n, i) for n in range(2, steps + 2) for i in range(n)]
