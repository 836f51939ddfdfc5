"""The mixed weights of many quantized layers from one grouped launch (instead of one per layer).

:class:`GroupedWeightQuantizer` takes the :class:`QuantConv2d` / :class:`QuantLinear` layers of a
model and computes every layer's ``weight_quant(weight)`` with one ``mixed_fake_quant_grouped`` call
per group of layers that share a quantizer configuration (bits, grid, quantizer, per-channel axis,
backend, dtype, device; in a supernet: all of them). The inputs of that call are batched too:

- probs: one softmax over the stacked distinct logits (layers that share logits share a row);
- paper scales: the weights of one shape are stacked, and ``D_b = g_b * std(W)`` and the
  per-channel ``max|W_c| / (2^(b-1) - 1/2)`` (bit-widths >= 8) are computed for the whole stack:
  a few launches per distinct weight shape instead of several per layer. Each row is the same
  reduction as the layer's own (``Tensor.std`` of the layer's weight, ``amax`` over its channel);
  a batched reduction may sum in another order, so a scale can differ in the last bit from the
  per-layer one (on the CPU the two are equal);
- lsq scales: each layer's own (learnable, clamped in place): nothing to batch.

The paper weights take the identity (straight-through) gradient, as in the per-layer path: the
grouped op's ``straight_through`` hands each mixed weight's gradient to its weight as it is, with no
launch and no copy.

Use ``with precomputed_weights(q.layers, q()): model(x)``; the layers then skip their own weight
quantization. The result equals the per-layer path forward (bit for bit where the scales are) and
backward (up to the order of the sums for logits shared by several layers).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator, List, Sequence, Tuple

import torch
from torch import Tensor

from .. import ops
from .layers import _QuantizedLayer
from .quantizers import MIN_SCALE, MixedPrecisionFakeQuantize, gaussian_weight_scales, set_plain_attribute

__all__ = ["GroupedWeightQuantizer", "GroupedBitProbs", "precomputed_probs"]


def _distinct_logits(quantizers: Sequence[MixedPrecisionFakeQuantize]) -> Tuple[List[Tensor], List[int]]:
    """(the distinct logits Parameters of ``quantizers`` in first-use order, each quantizer's index
    among them); quantizers without logits (one bit-width) are skipped."""
    logits: List[Tensor] = []
    rows = []
    for quantizer in quantizers:
        if quantizer.logits is None:
            continue
        for i, p in enumerate(logits):
            if p is quantizer.logits:
                rows.append(i)
                break
        else:
            rows.append(len(logits))
            logits.append(quantizer.logits)
    return logits, rows


class GroupedBitProbs:
    """The bit-width probabilities ``softmax(logits)`` of many quantizers in one softmax per number
    of bit-widths, instead of one softmax (and one softmax backward) per quantizer and forward.

    ``probs()`` returns one row per quantizer with logits (:attr:`quantizers`), in that order;
    quantizers that share logits get equal rows, each its own tensor: a row that several quantizers
    used would have their gradients summed by autograd one small ``add`` at a time (a CIFAR-size
    supernet shares one pair of logits among the 2-4 convs of each op: some 900 launches per
    backward), where rows taken apart by one ``index_select`` have them summed by its backward, one
    ``index_add``. Use ``with precomputed_probs(g.quantizers, g.probs()): model(x)``. The rows equal
    each quantizer's own ``probs()`` bit for bit (softmax is computed row by row), and so do the
    logits' gradients up to the order in which the gradients of quantizers sharing logits are summed.
    """

    def __init__(self, quantizers: Sequence[MixedPrecisionFakeQuantize]):
        self.quantizers = [q for q in quantizers if q.logits is not None]
        by_k: Dict[Tuple[int, torch.dtype], List[int]] = {}
        for i, q in enumerate(self.quantizers):
            by_k.setdefault((q.logits.shape[0], q.logits.dtype), []).append(i)
        self._groups = []
        for members in by_k.values():
            logits, rows = _distinct_logits([self.quantizers[i] for i in members])
            self._groups.append((members, logits, None if len(logits) == len(rows) else rows))
        self._row_index: Dict[Tuple[int, torch.device], Tensor] = {}

    def probs(self) -> List[Tensor]:
        out: List[Tensor] = [None] * len(self.quantizers)  # type: ignore[list-item]
        for g, (members, logits, rows) in enumerate(self._groups):
            probs = torch.softmax(torch.stack(logits), -1)
            if rows is not None:  # shared logits: one row per quantizer (class docstring)
                key = (g, probs.device)
                index = self._row_index.get(key)
                if index is None:
                    index = self._row_index[key] = torch.tensor(rows, device=probs.device)
                probs = probs.index_select(0, index)
            for i, row in zip(members, probs.unbind(0)):
                out[i] = row
        return out


@contextmanager
def precomputed_probs(quantizers: Sequence[MixedPrecisionFakeQuantize], probs: Sequence[Tensor]) -> Iterator[None]:
    """Within the block, ``quantizers[i].probs()`` returns ``probs[i]`` (which must equal its own
    softmax(logits), gradients included: see :class:`GroupedBitProbs`)."""
    if len(quantizers) != len(probs):
        raise ValueError(f"precomputed_probs needs one row per quantizer, got {len(probs)} for {len(quantizers)}")
    for q, p in zip(quantizers, probs):
        set_plain_attribute(q, "probs_override", p)
    try:
        yield
    finally:
        for q in quantizers:
            set_plain_attribute(q, "probs_override", None)


class _Group:
    """Layers whose weight quantizers share one configuration: one grouped launch."""

    def __init__(self, layers: List[_QuantizedLayer]):
        self.layers = layers
        self.quantizers = [layer.weight_quant for layer in layers]
        q = self.quantizers[0]
        self.axis = q._axis(layers[0].weight)
        self.logits, self._rows = _distinct_logits(self.quantizers)
        self._row_index: Dict[torch.device, Tensor] = {}
        #: the grouped op's validated arguments by kind of call (ops._mixed_fake_quant_grouped_of_a_kind)
        self._checked: Dict[tuple, tuple] = {}
        by_shape: Dict[Tuple[int, ...], List[int]] = {}
        for i, layer in enumerate(layers):
            by_shape.setdefault(tuple(layer.weight.shape), []).append(i)
        self.by_shape = list(by_shape.values())

    def _probs(self) -> Tensor:
        """[N, K]: each layer's softmax(logits), one softmax for the distinct logits."""
        if not self.logits:
            return self.quantizers[0]._unit_probs.expand(len(self.layers), 1)
        device = self.logits[0].device
        index = self._row_index.get(device)
        if index is None:
            index = self._row_index[device] = torch.tensor(self._rows, device=device)
        return torch.softmax(torch.stack(self.logits), -1).index_select(0, index)

    def _paper_scales(self) -> List[Tensor]:
        """The scales of MixedPrecisionFakeQuantize._paper_scales (weights), per stack of one shape."""
        q = self.quantizers[0]
        scales: List[Tensor] = [None] * len(self.layers)  # type: ignore[list-item]
        for members in self.by_shape:
            w = torch.stack([self.layers[i].weight.detach() for i in members]).float()
            if self.axis is None:
                scaled = gaussian_weight_scales(q._steps, q._top, w.flatten(1))  # [G, K]
            else:  # the channel axis is self.axis + 1 in the stack
                max_c = w.abs().amax(dim=tuple(d for d in range(1, w.dim()) if d != self.axis + 1))  # [G, C]
                scaled = gaussian_weight_scales(q._steps, q._top, w.flatten(1), max_c)
                by_max = (max_c[:, None, :] / q._top[None, :, None]).clamp_min(MIN_SCALE)
                scaled = torch.where(q._by_max[None, :, None], by_max, scaled[:, :, None])  # [G, K, C]
            for row, i in enumerate(members):
                scales[i] = scaled[row]
        return scales

    def __call__(self) -> List[Tensor]:
        q = self.quantizers[0]
        weights = [layer.weight for layer in self.layers]
        if q.quantizer == "lsq":
            scales = [quantizer._lsq_scales(w, self.axis) for quantizer, w in zip(self.quantizers, weights)]
        else:
            scales = self._paper_scales()
        # the paper's weights take the identity gradient (straight through), LSQ's the quantizer's
        return ops._mixed_fake_quant_grouped_of_a_kind(self._checked, weights, self._probs(), scales, q.bits,
                                                       grid=q.grid, axis=self.axis, backend=q.backend,
                                                       straight_through=q.quantizer != "lsq")


class GroupedWeightQuantizer:
    """Computes the mixed weights of ``layers`` (QuantConv2d / QuantLinear) in grouped launches.

    ``quantizer()`` returns one mixed weight per layer, in the order of :attr:`layers`: each equal to
    ``layer.weight_quant(layer.weight)`` (see the module docstring). Layers whose weight quantizer
    is switched off (``disable_fake_quant``) get their plain weight, as in their own forward.
    """

    def __init__(self, layers: Sequence[_QuantizedLayer]):
        self.layers = list(layers)
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, _QuantizedLayer):
                raise TypeError(f"layers[{i}] is a {type(layer).__name__}, not a QuantConv2d or QuantLinear")
        groups: Dict[tuple, List[int]] = {}
        for i, layer in enumerate(self.layers):
            q = layer.weight_quant
            key = (q.bits, q.grid, q.quantizer, q._axis(layer.weight), q.backend, layer.weight.dtype)
            groups.setdefault(key, []).append(i)
        self._groups = [(members, _Group([self.layers[i] for i in members])) for members in groups.values()]

    @property
    def num_groups(self) -> int:
        """Grouped launches per call (one per distinct quantizer configuration)."""
        return len(self._groups)

    def __call__(self) -> List[Tensor]:
        out: List[Tensor] = [None] * len(self.layers)  # type: ignore[list-item]
        for members, group in self._groups:
            if not all(q._fake_quant_on for q in group.quantizers):
                ys = [layer.weight_quant(layer.weight) for layer in group.layers]
            else:
                ys = group()
            for i, y in zip(members, ys):
                out[i] = y
        return out
