"""The PC-DARTS supernet with quantized candidate ops: alpha, beta, gamma_a, gamma_w as parameters.

Structure (Xu et al., PC-DARTS, with every conv a mixed-precision composite convolution):

- stem: fp32 3x3 conv + BN (kept full precision and out of the cost, as in the paper);
- ``layers`` cells, reduction cells at layers//3 and 2*layers//3, ``steps`` intermediate nodes per
  cell, every node fed by all earlier nodes and the two cell inputs (14 edges for 4 steps);
- each edge is a :class:`MixedOp` on partial channels: the first C/K channels go through the
  candidate ops, the rest bypass them (max-pooled on reduction edges), then a channel shuffle;
- each node sums its input edges weighted by softmax(beta) over those inputs (edge normalisation);
- global average pooling and an fp32 linear classifier.

Parameters, in named groups (:meth:`SearchNetwork.param_groups`):
``alpha``: alphas_normal / alphas_reduce [edges, ops]; ``beta``: betas_normal / betas_reduce
[edges]; ``gamma``: every conv's (or op's, shared) activation and weight bit logits; ``weights``:
everything else (conv weights, BN, LSQ scales).

The mixed weights of all quantized convs are computed before the cells run, in one grouped launch
(:class:`qdarts_kernels.nn.GroupedWeightQuantizer`), and so are the activation quantizers' bit
probabilities, in one softmax (:class:`qdarts_kernels.nn.GroupedBitProbs`); ``grouped_weights=False``
lets every conv quantize its own weight and take its own softmax: the same values, launches per conv.
Every edge reading a node state works on the same first C/K channels, copied once per state
(:func:`partial_head`). The mixed-op sums (ops of an edge,
and edges of a node) are ``qdarts_kernels.mixed_op_sum`` calls.
The ``none`` op outputs zeros, so it contributes nothing to the sum: it is not computed and its
weight is dropped from the sum (mathematically identical to including it; the softmax still
runs over all ops, so ``none`` still competes for probability mass).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import qdarts_kernels as qk
from qdarts_kernels.nn import (GroupedBitProbs, GroupedWeightQuantizer, InputKeepingMaxPool2d, OutputKeepingBatchNorm2d,
                               counted_together, precomputed_probs, precomputed_weights, shared_activation_scales)

from .genotype import PRIMITIVES, edge_nodes, reduction_cells
from .ops import ConvMaker, FactorizedReduce, ReLUConvBN, build_op, quant_convs, set_layer_backend

__all__ = ["SearchNetwork", "SupernetConfig", "MixedOp", "channel_shuffle", "mixed_node", "reduction_cells",
           "shuffled_cat", "ACT_DTYPES"]

#: activation dtypes of the supernet forward: fp32, or bf16 under autocast
ACT_DTYPES = ("fp32", "bf16")


@dataclass(frozen=True)
class SupernetConfig:
    input_shape: Tuple[int, int, int]
    num_classes: int
    channels: int = 16
    layers: int = 5
    steps: int = 4
    stem_multiplier: int = 3
    partial_channels: int = 4
    bits: Tuple[int, ...] = (2, 4, 8)
    quantizer: str = "paper"
    act_grid: str = "follow"
    share_gamma: bool = True
    backend: Optional[str] = None
    grouped_weights: bool = True
    act_dtype: str = "fp32"


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def partial_head(x: torch.Tensor, k: int) -> torch.Tensor:
    """The first C/k channels of x, which an edge's candidate ops work on, as a contiguous tensor.

    Every op of every edge that reads a node state reads this same slice. Copied once and shared,
    the ops' kernels get a contiguous input: a channel slice of an NCHW batch is strided, and each
    quantized conv (and the mixed-op sum, for skip_connect) would copy it again in forward and in
    backward (2688 activation copies in a CIFAR-size search step become 224). The convs keep the 1/k
    copy for backward instead of the whole state the slice would hold on to, which in the weight
    half of a search step nothing else keeps."""
    return x[:, : x.shape[1] // k].contiguous()


def shuffled_cat(head: torch.Tensor, rest: torch.Tensor, groups: int) -> torch.Tensor:
    """``channel_shuffle(torch.cat([head, rest], 1), groups)`` written by one copy instead of two:
    the concatenation is made in the shuffled order directly (rest has groups - 1 times the
    channels of head)."""
    n, h, height, width = head.shape
    parts = [head.unsqueeze(2), rest.unflatten(1, (groups - 1, h)).transpose(1, 2)]  # [n, h, 1 | groups-1, H, W]
    return torch.cat(parts, dim=2).view(n, groups * h, height, width)


def mixed_node(candidates: List[List[torch.Tensor]], bypassed: List[torch.Tensor], op_weights: torch.Tensor,
               edge_weights: torch.Tensor, k: int, backend: Optional[str] = None) -> torch.Tensor:
    """A node state, ``sum_j edge_weights[j] * edge_j``, from the edges' parts.

    Edge j (:class:`MixedOp`) is ``channel_shuffle(cat(sum_o op_weights[j, o] * candidates[j][o],
    bypassed[j][:, C/k:]), k)``: its candidate ops' outputs on the first C/k channels of its input
    state (``op_weights`` [edges, PRIMITIVES], ``none`` first and skipped: it outputs zeros) and
    its input state (max-pooled on a reduction edge), whose other channels bypass the ops. Shuffle
    and concatenation only place channels, so the sum over edges is taken before them, as two
    mixed-op sums: the candidates' with the coefficients ``edge_weights[j] * op_weights[j, o]``,
    and the bypassed states' with ``edge_weights``. The same value as summing the edges (up to the
    order of fp32 additions), but no edge output is made: the node's sum kept every edge output
    (all C channels) for the gradient of beta, where now it reads tensors kept anyway (candidate
    outputs, node states) and one state per intermediate node: the CIFAR-size search step (batch
    64) kept 1292 MB for the arch half, 1111 MB so (2^20 bytes; fewer launches too, and one copy
    per node, not two per edge). With k == 1 nothing bypasses and ``bypassed`` is unused.
    """
    coefficients = (edge_weights[:, None] * op_weights[:, 1:]).flatten()
    head = qk.mixed_op_sum([o for outs in candidates for o in outs], coefficients, backend=backend)
    if k == 1:
        return head
    # the sum over all channels of the (contiguous) states, then its bypassed channels: no strided copy
    rest = qk.mixed_op_sum(bypassed, edge_weights, backend=backend)[:, head.shape[1]:]
    return shuffled_cat(head, rest, k)


class MixedOp(nn.Module):
    """One edge: the candidate ops (all but ``none``) on the first C/K channels, weighted-summed;
    the other channels bypass them (max-pooled on a reduction edge); then a channel shuffle. A cell
    sums its edges per node through :func:`mixed_node`, from :meth:`candidates` and :meth:`bypass`."""

    backend: Optional[str] = None  # of its mixed-op sums; the automatic choice for one pickled without it

    def __init__(self, C: int, stride: int, cfg: SupernetConfig):
        super().__init__()
        k = cfg.partial_channels
        if C % k:
            raise ValueError(f"channels per cell ({C}) must be divisible by partial_channels ({k})")
        self.k = k
        self.backend = cfg.backend
        self.stride = stride
        self.ops = nn.ModuleList()
        for name in PRIMITIVES[1:]:
            maker = ConvMaker(bits=cfg.bits, quantizer=cfg.quantizer, act_grid=cfg.act_grid,
                              share_gamma=cfg.share_gamma, backend=cfg.backend)
            op = build_op(name, C // k, stride, maker, affine=False)
            if "pool" in name:
                op = nn.Sequential(op, OutputKeepingBatchNorm2d(C // k, affine=False))
            self.ops.append(op)
        # a reduction edge's input, max-pooled for its bypassed channels, keeping (the node state) no indices
        self.bypass_pool = InputKeepingMaxPool2d(2, 2, ceil_mode=True) if stride == 2 else None

    def candidates(self, head: torch.Tensor) -> List[torch.Tensor]:
        """The candidate ops' outputs on ``head`` = ``partial_head(x, k)``."""
        return [op(head) for op in self.ops]

    def bypass(self, x: torch.Tensor) -> torch.Tensor:
        """The input state as its bypassed channels take it (all channels; see :func:`mixed_node`)."""
        return self.bypass_pool(x) if self.bypass_pool is not None else x

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """This edge alone; ``weights``: softmax(alpha) of this edge over all PRIMITIVES (``none`` first)."""
        head = partial_head(x, self.k)
        bypassed = [self.bypass(x)] if self.k > 1 else []
        return mixed_node([self.candidates(head)], bypassed, weights[None], weights.new_ones(1), self.k,
                          self.backend)


class SearchCell(nn.Module):
    def __init__(self, C_pp: int, C_p: int, C: int, reduction: bool, reduction_prev: bool, cfg: SupernetConfig):
        super().__init__()
        self.reduction = reduction
        self.steps = cfg.steps
        maker = lambda: ConvMaker(bits=cfg.bits, quantizer=cfg.quantizer, act_grid=cfg.act_grid,  # noqa: E731
                                  share_gamma=cfg.share_gamma, backend=cfg.backend)
        m0, m1 = maker(), maker()
        self.preprocess0 = m0.finish(FactorizedReduce(C_pp, C, m0, affine=False) if reduction_prev
                                     else ReLUConvBN(C_pp, C, 1, 1, 0, m0, affine=False))
        self.preprocess1 = m1.finish(ReLUConvBN(C_p, C, 1, 1, 0, m1, affine=False))
        self.edges = nn.ModuleList(
            MixedOp(C, 2 if reduction and inp < 2 else 1, cfg) for _, inp in edge_nodes(cfg.steps))

    def forward(self, s0, s1, op_weights: torch.Tensor, edge_weights: torch.Tensor) -> torch.Tensor:
        """op_weights [edges, ops] = softmax(alpha); edge_weights [edges] = softmax(beta) per node."""
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        # per state, made when an edge first reads it and shared by every edge reading it (the
        # edges reading one state have one stride): its partial_head, and its bypass
        heads: List[torch.Tensor] = []
        bypassed: List[torch.Tensor] = []
        k, backend = self.edges[0].k, self.edges[0].backend
        offset = 0
        for _ in range(self.steps):
            n = len(states)
            for j in range(len(heads), n):
                heads.append(partial_head(states[j], k))
                if k > 1:
                    bypassed.append(self.edges[offset + j].bypass(states[j]))
            edges = self.edges[offset: offset + n]
            states.append(mixed_node([edge.candidates(h) for edge, h in zip(edges, heads)], bypassed,
                                     op_weights[offset: offset + n], edge_weights[offset: offset + n], k, backend))
            offset += n
        return torch.cat(states[2:], dim=1)  # all intermediate nodes


class SearchNetwork(nn.Module):
    def __init__(self, cfg: SupernetConfig):
        super().__init__()
        if cfg.act_dtype not in ACT_DTYPES:
            raise ValueError(f"act_dtype must be one of {ACT_DTYPES}, got {cfg.act_dtype!r}")
        self.cfg = cfg
        c_in = cfg.input_shape[0]
        C = cfg.channels
        c_curr = cfg.stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(c_in, c_curr, 3, padding=1, bias=False), nn.BatchNorm2d(c_curr))
        C_pp, C_p, c_curr = c_curr, c_curr, C
        reductions = reduction_cells(cfg.layers)
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(cfg.layers):
            reduction = i in reductions
            if reduction:
                c_curr *= 2
            cell = SearchCell(C_pp, C_p, c_curr, reduction, reduction_prev, cfg)
            self.cells.append(cell)
            reduction_prev = reduction
            C_pp, C_p = C_p, cfg.steps * c_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_p, cfg.num_classes)

        n_edges = len(edge_nodes(cfg.steps))
        n_ops = len(PRIMITIVES)
        self.alphas_normal = nn.Parameter(1e-3 * torch.randn(n_edges, n_ops))
        self.alphas_reduce = nn.Parameter(1e-3 * torch.randn(n_edges, n_ops))
        self.betas_normal = nn.Parameter(1e-3 * torch.randn(n_edges))
        self.betas_reduce = nn.Parameter(1e-3 * torch.randn(n_edges))
        convs = [conv for _, conv, _ in self.quant_layers()]
        self.weight_quantizer = GroupedWeightQuantizer(convs) if cfg.grouped_weights and convs else None
        act_quants = [conv.act_quant for conv in convs if conv.act_quant is not None]
        self.act_probs = GroupedBitProbs(act_quants) if cfg.grouped_weights and act_quants else None
        self._paper_act_quants = [quant for quant in act_quants if quant.quantizer == "paper"]
        self._keep_no_running_ranges()
        set_layer_backend(self, cfg.backend)

    def _keep_no_running_ranges(self) -> None:
        """The supernet keeps no running activation ranges for evaluation (its accuracy is a search
        figure; the derived network keeps them): no launches for them in a search step."""
        for quant in self._paper_act_quants:
            quant.disable_observer()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._keep_no_running_ranges()  # a state saved before they were off (a search's checkpoint) has them on
        return result

    # ------------------------------------------------------------------ relaxation weights

    def edge_weights(self, betas: torch.Tensor) -> torch.Tensor:
        """softmax(beta) over the inputs of each node, concatenated in edge order."""
        parts, start = [], 0
        for n in range(2, self.cfg.steps + 2):
            parts.append(F.softmax(betas[start: start + n], dim=-1))
            start += n
        return torch.cat(parts)

    def op_probs(self, reduction: bool) -> torch.Tensor:
        return F.softmax(self.alphas_reduce if reduction else self.alphas_normal, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (fp32). With act_dtype "bf16" the cells run under autocast: convs, pools and the
        quantizers see bf16 activations (the parameters, mixed weights' scales and logits stay fp32)."""
        with contextlib.ExitStack() as grouped, torch.autocast(x.device.type, dtype=torch.bfloat16,
                                                               enabled=self.cfg.act_dtype == "bf16"):
            if not torch.compiler.is_compiling():  # one launch for every batch norm's batch count,
                grouped.enter_context(counted_together())  # one set of scales per quantized input
                grouped.enter_context(shared_activation_scales())
            if self.weight_quantizer is not None:
                grouped.enter_context(precomputed_weights(self.weight_quantizer.layers, self.weight_quantizer()))
            if self.act_probs is not None:
                grouped.enter_context(precomputed_probs(self.act_probs.quantizers, self.act_probs.probs()))
            logits = self._forward(x)
        return logits.float()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = {False: (self.op_probs(False), self.edge_weights(self.betas_normal)),
                   True: (self.op_probs(True), self.edge_weights(self.betas_reduce))}
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, *weights[cell.reduction])
        return self.classifier(self.global_pooling(s1).flatten(1))

    # ------------------------------------------------------------------ parameter groups

    def alpha_parameters(self) -> List[nn.Parameter]:
        return [self.alphas_normal, self.alphas_reduce]

    def beta_parameters(self) -> List[nn.Parameter]:
        return [self.betas_normal, self.betas_reduce]

    def gamma_parameters(self) -> List[nn.Parameter]:
        """Every distinct bit logits Parameter (shared ones once), in module order."""
        seen, out = set(), []
        for conv in quant_convs(self):
            for q in (conv.act_quant, conv.weight_quant):
                p = getattr(q, "logits", None) if q is not None else None
                if p is not None and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def param_groups(self) -> Dict[str, List[nn.Parameter]]:
        """{"weights", "gamma", "alpha", "beta"}: disjoint lists covering every parameter."""
        groups = {"alpha": self.alpha_parameters(), "beta": self.beta_parameters(), "gamma": self.gamma_parameters()}
        taken = {id(p) for ps in groups.values() for p in ps}
        groups["weights"] = [p for p in self.parameters() if id(p) not in taken]
        return groups

    # ------------------------------------------------------------------ introspection

    def quant_layers(self) -> List[Tuple[str, nn.Module, Optional[Tuple[bool, int, int]]]]:
        """(name, conv, where) for every quantized conv in module order.

        ``where`` = (reduction, edge, op index in PRIMITIVES) for convs inside a candidate op, None
        for the preprocessing convs (always present in the derived network).
        """
        out = []
        for ci, cell in enumerate(self.cells):
            for pname in ("preprocess0", "preprocess1"):
                for conv in quant_convs(getattr(cell, pname)):
                    out.append((f"cells.{ci}.{pname}", conv, None))
            for e, edge in enumerate(cell.edges):
                for oi, op in enumerate(edge.ops):
                    for conv in quant_convs(op):
                        out.append((f"cells.{ci}.edges.{e}.{PRIMITIVES[oi + 1]}", conv, (cell.reduction, e, oi + 1)))
        return out
