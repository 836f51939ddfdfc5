"""The cost model: expected BitOps of the supernet (differentiable), and BitOps and memory of a network.

Expected cost of the supernet, over its quantized convs m (stem and classifier are fp32 and out of
the cost, as in the paper), with ``E_a(m) = sum_i p^a_{m,i} b_i`` and ``E_w(m) = sum_j p^w_{m,j} b_j``::

    official:  C = sum_m F_m^dense  * E_a(m) * E_w(m) / F_m0
    improved:  C = sum_m pi_m * F_m * E_a(m) * E_w(m) / F_m0          (the default)

- ``F_m^dense`` is what the official code counts: C_out * C_in * k^2 * H_out * W_out, a depthwise conv
  counted as if it were dense, over the partial channels it sees;
- ``F_m`` counts the multiply-accumulates the conv has in the *derived* network: C_in / groups per
  output, and the full channel count (a candidate op sees C/K channels in the PC-DARTS supernet but
  C in the derived network: x K^2 for a dense conv, x K for a depthwise one);
- ``pi_m`` is the probability softmax(alpha)[edge, op] of the op the conv belongs to (1 for the
  preprocessing convs, which every derived network has);
- ``F_m0``: the multiply-accumulates of the first quantized conv, so that lambda means the same as in
  the official code (lambda = 1e-4 there).

Why improved is the default: the official sum pushes the bits of every candidate op down with the
same force, including ops the search is about to discard, and it over-weights depthwise convs by
their channel count (a 5x5 depthwise conv on 16 channels "costs" as much as a dense one), so the bit
budget is spent where the derived network spends nothing. Weighting by pi_m and counting groups
makes C the expected BitOps of the cells' ops and convs as the derived network counts them (up to the
F_m0 scale), but over every edge of the supernet: derivation keeps two inputs per node (8 of a
4-node cell's 14 edges), so C over-counts the derived network's BitOps until that selection is made,
and it does not weight an edge by its chance of being kept (beta, like alpha, is trained on the
validation loss alone, as in DESIGN section 2).

BitOps and memory of a concrete network (:func:`network_cost`): for every quantized conv,
``BitOps = MACs * b_a * b_w`` and ``memory = (weights * b_w + input activations * b_a) / 8`` bytes
(per sample); fp32 counts 32 bits for both; stem, classifier and auxiliary head are excluded.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn
from torch.ao.quantization import FakeQuantizeBase

from .supernet import SearchNetwork

__all__ = ["ExpectedCost", "COST_KINDS", "network_cost", "conv_macs"]

COST_KINDS = ("improved", "official")


def conv_macs(conv: nn.Conv2d, out_hw) -> int:
    """Multiply-accumulates per sample: C_out * (C_in / groups) * kh * kw * H_out * W_out."""
    kh, kw = conv.kernel_size
    return conv.out_channels * (conv.in_channels // conv.groups) * kh * kw * int(out_hw[0]) * int(out_hw[1])


class ExpectedCost:
    """Differentiable expected cost C of a :class:`SearchNetwork` (see the module docstring).

    Call after at least one forward pass (the convs record their MACs then). The constant parts
    (MACs, index maps) are built once; each call is a handful of tensor ops, no host sync.
    """

    def __init__(self, net: SearchNetwork, kind: str = "improved"):
        if kind not in COST_KINDS:
            raise ValueError(f"cost kind must be one of {COST_KINDS}, got {kind!r}")
        self.net = net
        self.kind = kind
        self._built = False

    def _build(self) -> None:
        net = self.net
        layers = net.quant_layers()
        if not layers:
            raise ValueError("the network has no quantized convs")
        k = net.cfg.partial_channels
        bits = net.cfg.bits
        n_alpha = net.alphas_normal.numel()  # entries of one alpha table
        macs_dense, macs_derived, prob_index = [], [], []
        self._act_params: List[nn.Parameter] = []
        self._weight_params: List[nn.Parameter] = []
        act_index, weight_index = [], []

        def index_of(params, p):
            for i, q in enumerate(params):
                if q is p:
                    return i
            params.append(p)
            return len(params) - 1

        for _, conv, where in layers:
            if not getattr(conv, "macs", 0):
                raise RuntimeError("ExpectedCost needs one forward pass of the network first (convs record MACs)")
            macs = int(conv.macs)
            macs_dense.append(macs * conv.groups)
            if where is None:
                macs_derived.append(macs)
                prob_index.append(2 * n_alpha)  # the constant 1 appended after both alpha tables
            else:
                reduction, edge, op = where
                macs_derived.append(macs * (k if conv.groups > 1 else k * k))
                prob_index.append((n_alpha if reduction else 0) + edge * net.alphas_normal.shape[1] + op)
            if len(bits) > 1:
                act_index.append(index_of(self._act_params, conv.act_quant.logits))
                weight_index.append(index_of(self._weight_params, conv.weight_quant.logits))
        dev = net.alphas_normal.device
        self._macs = torch.tensor(macs_dense if self.kind == "official" else macs_derived, dtype=torch.float64)
        self._norm = float(self._macs[0])
        self._macs = self._macs.to(device=dev, dtype=torch.float32)
        self._macs_derived = torch.tensor(macs_derived, dtype=torch.float32, device=dev)
        self._prob_index = torch.tensor(prob_index, device=dev)
        self._act_index = torch.tensor(act_index, dtype=torch.long, device=dev)
        self._weight_index = torch.tensor(weight_index, dtype=torch.long, device=dev)
        self._bits = torch.tensor(bits, dtype=torch.float32, device=dev)
        self._one = torch.ones(1, device=dev)
        self._built = True

    def _expected_bits(self, params: List[nn.Parameter], index: torch.Tensor) -> torch.Tensor:
        if not params:  # a single bit-width: nothing to search
            return self._bits[0].expand(self._macs.shape[0])
        probs = torch.softmax(torch.stack(params), dim=-1)
        return (probs @ self._bits)[index]

    def _op_probs(self) -> torch.Tensor:
        flat = torch.cat([self.net.op_probs(False).flatten(), self.net.op_probs(True).flatten(), self._one])
        return flat[self._prob_index]

    def _terms(self) -> torch.Tensor:
        if not self._built:
            self._build()
        return self._expected_bits(self._act_params, self._act_index) * \
            self._expected_bits(self._weight_params, self._weight_index)

    def __call__(self) -> torch.Tensor:
        """C, the normalised expected cost (0-d tensor, differentiable in gamma and, if improved, alpha)."""
        terms = self._terms() * self._macs
        if self.kind == "improved":
            terms = terms * self._op_probs()
        return terms.sum() / self._norm

    @torch.no_grad()
    def expected_bitops(self) -> torch.Tensor:
        """Expected BitOps per sample with the improved formula, in absolute units (for reporting): over
        every edge of the supernet, not only the two per node that derivation keeps."""
        return (self._terms() * self._macs_derived * self._op_probs()).sum()


class _ConvRecorder:
    """Forward hooks that record every counted conv's MACs, weights and input activations per sample."""

    def __init__(self, model: nn.Module, excluded: tuple):
        self.rows: List[Dict] = []
        self.handles = []
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv2d) and not name.startswith(excluded):
                self.handles.append(m.register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def hook(module, inputs, output):
            n = output.shape[0]
            self.rows.append({
                "name": name,
                "module": module,
                "macs": conv_macs(module, output.shape[-2:]),
                "weights": module.weight.numel(),
                "activations": inputs[0].numel() // n,
            })
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def _bits_of(conv: nn.Conv2d):
    chosen = getattr(conv, "chosen_bits", None)
    if chosen is None:
        return 32, 32
    act, weight = chosen()
    return (32 if act is None else act), weight


@torch.no_grad()
def network_cost(model: nn.Module, input_shape, *, excluded=("stem", "auxiliary_head"),
                 device: Optional[torch.device] = None) -> Dict[str, float]:
    """BitOps and memory footprint per sample of ``model``'s convs, against the same convs in fp32.

    Runs one forward pass on a zero input of ``input_shape`` (C, H, W) in eval mode. Convs whose
    module name starts with an entry of ``excluded`` are left out (stem and auxiliary head); the
    classifier is a Linear and not counted. A QuantConv2d counts its chosen bits, any other conv 32.
    Returns macs, bitops, bitops_fp32, memory_bytes, memory_bytes_fp32, and per-layer rows.
    """
    was_training = model.training
    model.eval()
    # the zero input must not initialise data-dependent quantizer state (LSQ scales): observers off
    observers = [(m, bool(m.observer_enabled[0])) for m in model.modules() if isinstance(m, FakeQuantizeBase)]
    for m, _ in observers:
        m.disable_observer()
    rec = _ConvRecorder(model, tuple(excluded))
    try:
        dev = device or next(model.parameters()).device
        model(torch.zeros((1,) + tuple(input_shape), device=dev))
    finally:
        rec.close()
        model.train(was_training)
        for m, enabled in observers:
            m.enable_observer(enabled)
    out = {"macs": 0, "bitops": 0, "bitops_fp32": 0, "memory_bits": 0, "memory_bits_fp32": 0}
    layers = []
    for r in rec.rows:
        a, w = _bits_of(r["module"])
        out["macs"] += r["macs"]
        out["bitops"] += r["macs"] * a * w
        out["bitops_fp32"] += r["macs"] * 32 * 32
        out["memory_bits"] += r["weights"] * w + r["activations"] * a
        out["memory_bits_fp32"] += (r["weights"] + r["activations"]) * 32
        layers.append({"name": r["name"], "act_bits": a, "weight_bits": w, "macs": r["macs"]})
    return {
        "macs": out["macs"],
        "bitops": out["bitops"],
        "bitops_fp32": out["bitops_fp32"],
        "memory_bytes": out["memory_bits"] / 8,
        "memory_bytes_fp32": out["memory_bits_fp32"] / 8,
        "layers": layers,
    }
