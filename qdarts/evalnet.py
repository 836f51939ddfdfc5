"""The evaluation network of a genotype: the derived cells with fixed bits (or fp32), for retraining.

DARTS evaluation network: fp32 stem (3x3 conv + BN), ``layers`` cells with reduction cells at
layers//3 and 2*layers//3, global average pooling, fp32 linear classifier. Each cell preprocesses
its two inputs (a 1x1 ReLU-conv-BN, or a factorized reduce after a reduction cell), applies the two
kept edges of each intermediate node and sums them, and concatenates the nodes of ``concat``.

Every conv (preprocessing and ops) is a QuantConv2d with the genotype's bits of the matching
searched cell (:meth:`Genotype.cell_bits_for`), or an ``nn.Conv2d`` with ``fp32=True``. Options:
an auxiliary head (fp32, on the cell at 2/3 of the depth, training only) and drop-path.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .genotype import Genotype, reduction_cells
from .ops import BitPairsError, ConvMaker, FactorizedReduce, ReLUConvBN, build_op, set_layer_backend

__all__ = ["EvalNetwork", "drop_path"]


def drop_path(x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    """Zero whole samples with probability ``drop_prob`` and rescale the rest (DARTS drop-path)."""
    keep = 1.0 - drop_prob
    mask = torch.empty(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x * mask / keep


class EvalCell(nn.Module):
    def __init__(self, genotype: Genotype, bits, C_pp: int, C_p: int, C: int, reduction: bool,
                 reduction_prev: bool, fp32: bool, backend: Optional[str]):
        super().__init__()
        self.reduction = reduction

        def maker(pairs):
            if fp32:
                return ConvMaker(fp32=True)
            return ConvMaker(pairs=pairs, quantizer=genotype.quantizer, act_grid=genotype.act_grid, backend=backend,
                             searched_bits=genotype.bit_choices)

        def built(where, build, pairs):
            # a hand-edited genotype's bit pairs that do not fit: say which ones
            try:
                return build(maker(pairs))
            except BitPairsError as error:
                raise BitPairsError(f"{where}: {error}") from None

        self.preprocess0 = built("preprocess0", lambda m: m.finish(
            FactorizedReduce(C_pp, C, m) if reduction_prev else ReLUConvBN(C_pp, C, 1, 1, 0, m)), bits.preprocess0)
        self.preprocess1 = built("preprocess1", lambda m: m.finish(ReLUConvBN(C_p, C, 1, 1, 0, m)), bits.preprocess1)
        edges = genotype.edges(reduction)
        self.ops = nn.ModuleList(
            built(f"edge {j} ({e.op}, input {e.input} to node {e.node})",
                  lambda m, e=e: build_op(e.op, C, 2 if reduction and e.input < 2 else 1, m), pairs)
            for j, (e, pairs) in enumerate(zip(edges, bits.edges)))
        self.edges = [(e.node, e.input) for e in edges]
        self.concat = list(genotype.reduce_concat if reduction else genotype.normal_concat)
        self.steps = max(n for n, _ in self.edges) - 1
        self.multiplier = len(self.concat)

    def forward(self, s0, s1, drop_prob: float):
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for node in range(2, self.steps + 2):
            total = None
            for (n, inp), op in zip(self.edges, self.ops):
                if n != node:
                    continue
                h = op(states[inp])
                if self.training and drop_prob > 0 and not isinstance(op, nn.Identity):
                    h = drop_path(h, drop_prob)
                total = h if total is None else total + h
            states.append(total)
        return torch.cat([states[i] for i in self.concat], dim=1)


class AuxiliaryHead(nn.Module):
    """fp32 auxiliary classifier: DARTS's CIFAR head (1x1 conv to 128, 2x2 conv to 768, linear), with its
    5x5 stride-3 average pooling of the 8x8 map to 2x2 replaced by adaptive pooling to 2x2, so that it
    fits any input resolution (the 2x2 map of the digits, too)."""

    def __init__(self, C: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(2), nn.Conv2d(C, 128, 1, bias=False), nn.BatchNorm2d(128),
            nn.ReLU(inplace=True), nn.Conv2d(128, 768, 2, bias=False), nn.BatchNorm2d(768), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class EvalNetwork(nn.Module):
    """The derived network; ``forward`` returns logits, and (logits, aux_logits) when training with an aux head."""

    def __init__(self, genotype: Genotype, input_shape: Tuple[int, int, int], num_classes: int, channels: int,
                 layers: int, *, fp32: bool = False, auxiliary: bool = False, stem_multiplier: int = 3,
                 backend: Optional[str] = None):
        super().__init__()
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        self.drop_path_prob = 0.0
        c_curr = stem_multiplier * channels
        self.stem = nn.Sequential(nn.Conv2d(input_shape[0], c_curr, 3, padding=1, bias=False), nn.BatchNorm2d(c_curr))
        C_pp, C_p, c_curr = c_curr, c_curr, channels
        reductions = reduction_cells(layers)
        self.cells = nn.ModuleList()
        reduction_prev = False
        self.aux_index = 2 * layers // 3
        self.auxiliary_head = None
        for i in range(layers):
            reduction = i in reductions
            if reduction:
                c_curr *= 2
            bits = genotype.cell_bits_for(i, layers)
            try:
                cell = EvalCell(genotype, bits, C_pp, C_p, c_curr, reduction, reduction_prev, fp32, backend)
            except BitPairsError as error:  # the edges' own cell in the genotype file, and the network's
                raise BitPairsError(f"the genotype's cell {genotype.searched_cell_for(i, layers)} (for cell {i} of "
                                    f"the network): {error}") from None
            self.cells.append(cell)
            reduction_prev = reduction
            C_pp, C_p = C_p, cell.multiplier * c_curr
            if auxiliary and i == self.aux_index:
                self.auxiliary_head = AuxiliaryHead(C_p, num_classes)
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_p, num_classes)
        set_layer_backend(self, backend)

    def forward(self, x):
        s0 = s1 = self.stem(x)
        aux = None
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if i == self.aux_index and self.auxiliary_head is not None and self.training:
                aux = self.auxiliary_head(s1)
        logits = self.classifier(self.global_pooling(s1).flatten(1))
        return (logits, aux) if aux is not None else logits
