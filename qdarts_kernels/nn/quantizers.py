"""Fake-quantizer modules built on the public ops (one ``mixed_fake_quant`` call per forward).

:class:`MixedPrecisionFakeQuantize` is the one quantizer of the family: a softmax over a set of
1..4 bit-widths, ``y = sum_k softmax(logits)_k * Q(x; s_k, b_k)`` (DESIGN section 2), with either

* ``quantizer="lsq"``: learnable scales (LSQ, Esser et al. 2020), initialised on the first batch
  by ``s_k = 2 * mean|x| / sqrt(Qp_k)`` and trained with the gradient scaled by
  ``1 / sqrt(n * Qp_k)`` (n = elements per scale, Qp_k = the largest positive level of bit-width
  b_k in units of the step: 2^(b-1)-1 signed, 2^b-1 unsigned, 2^(b-1)-1/2 mid-rise; 1 for the
  signed 1-bit grid, whose largest level is 0), and kept >= float32 eps (clamped in place before
  each use, as PyTorch's learnable fake quantizer does, so an optimizer step cannot make it <= 0);
  or
* ``quantizer="paper"``: the fixed quantizers of the official gradient-QDARTS / EdMIPS code, with
  every scale computed on the device (the official code calls ``.item()`` here; we never do):

  - activations, b < 8: HWGQ step per bit ``{1: 0.799, 2: 0.538, 3: 0.3217, 4: 0.185}`` on the
    unsigned grid, ``y = D * round(clip(x, 0, (2^b - 1) D) / D)``, with the op contract's gradient
    (1 where the *rounded* level is on the grid, as PyTorch's fake quantizers; so also for x up to
    half a step above the clip, where EdMIPS's clamp-then-round gives 0); on the signed and mid-rise
    grids (inputs that can be negative) the step of the full-Gaussian table below. Bit-widths
    5..7, absent from the paper, continue each table geometrically with the ratio of its last two
    entries (``D_b = D_4 * (D_4 / D_3)^(b-4)``): the Gaussian-optimal step shrinks by a factor a little
    above 1/2 per bit (slowly tending to 1/2), so this stays closer to the optimum at 5..7 bits
    than halving the step per bit, which makes it too small.
  - weights, b < 8: mid-rise grid, ``D_b = g_b * std(W)`` with ``g = {1: 1.596, 2: 0.996,
    3: 0.586, 4: 0.336}`` (std unbiased, as ``Tensor.std``), and the identity (straight-through)
    gradient to W, as in the official code. Where std(W) is 0 or undefined (a constant weight, a
    single one), ``max|W| / (2^(b-1) - 1/2)``, as for 8 bits: the std would give a step of 0 or NaN.
  - b >= 8: the scale that maps the largest magnitude to the top level, ``max|x| / Qp`` per tensor
    for activations and ``max|W_c| / (2^(b-1) - 1/2)`` per output channel c for weights (weights
    then use per-channel scales ``[K, C_out]``, the b < 8 rows broadcast over channels). For
    activations that is the batch's largest magnitude in training (as the official code takes it);
    in evaluation, its moving average over the training batches (buffer ``running_largest``, kept
    while the observer is on, as batch norm keeps its running statistics), so that a sample's output
    does not depend on the other samples of its batch.

  These scales take no gradient (they are functions of the data, not parameters).

:class:`FakeQuantize` is the single-bit LSQ quantizer dressed for ``torch.ao.quantization``:
``QConfig(activation=FakeQuantize.with_args(...), weight=FakeQuantize.with_args(...))`` works with
``prepare_qat`` and ``convert``.

Switches. Both classes subclass :class:`torch.ao.quantization.FakeQuantizeBase`, so
``torch.ao.quantization.enable_observer / disable_observer / enable_fake_quant /
disable_fake_quant`` apply to them. The ``uint8`` buffers of FakeQuantizeBase hold the switches in
the ``state_dict``; the forward reads Python mirrors of them (set by the ``enable_*`` methods and
on ``load_state_dict``), so no switch ever costs a host-device sync. Set the switches through the
methods, not by writing the buffers. For the LSQ quantizer "observer enabled" means: the next
forward initialises the scales from its batch if they have not been initialised yet
(``reset_scales()`` re-arms it); for the paper activation quantizer with a bit-width scaled by the
max: the training forwards keep the running range of the largest magnitude that evaluation takes.
"""

from __future__ import annotations

import math
import weakref
from contextlib import contextmanager
from typing import Dict, Iterator, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.ao.quantization import FakeQuantizeBase
from torch.nn.parameter import UninitializedParameter

from .. import _backends, _functorch, ops, reference
from .._validation import distinct_bits, grid_code, grid_params

__all__ = ["MixedPrecisionFakeQuantize", "FakeQuantize", "HWGQ_STEPS", "GAUSSIAN_STEPS", "shared_activation_scales"]

#: HWGQ activation step per bit-width for a unit-variance (half-wave Gaussian) input.
HWGQ_STEPS = {1: 0.799, 2: 0.538, 3: 0.3217, 4: 0.185}
#: Mid-rise weight step per bit-width in units of std(W) (uniform quantizer of a unit Gaussian).
GAUSSIAN_STEPS = {1: 1.596, 2: 0.996, 3: 0.586, 4: 0.336}
#: From this bit-width on, the paper quantizers take their scale from the largest magnitude.
PAPER_MAX_BITS = 8
#: Weight of a training batch's largest magnitude in the running range that paper activation
#: quantizers scaled by the max use in evaluation (as batch norm's running statistics).
RUNNING_RANGE_MOMENTUM = 0.1
#: Smallest scale any data-derived initialisation produces (that of PyTorch's observers), so an
#: all-zero batch cannot give a zero scale.
MIN_SCALE = torch.finfo(torch.float32).eps

_ROLES = ("act", "weight")
_QUANTIZERS = ("lsq", "paper")


#: Within shared_activation_scales(): the paper activation scales computed in the block, by (id of
#: the input, bits, grid): a weak reference to the input, its version then, the scales (None in
#: evaluation, where each quantizer's come from its own running range), the batch's largest magnitude.
_shared_scales: Optional[Dict[tuple, Tuple[weakref.ref, int, Optional[Tensor], Tensor]]] = None


@contextmanager
def shared_activation_scales() -> Iterator[None]:
    """Within the block, paper activation quantizers of one configuration (bits, grid) that
    quantize the same input compute its scales once (the scales depend on the input and the
    configuration only). In a DARTS supernet the first conv of every candidate op of every edge
    reading a node state quantizes the same partial-channel copy of it: some 50 quantizers per cell
    on 5 inputs, each otherwise spending 3 launches on the same scales. An input is the same while
    it is the same tensor object at the same version. The block refers to the inputs it saw weakly:
    holding them would keep every quantized activation of a forward alive to its end, which a forward
    without a graph does not otherwise do (the 8-cell CIFAR-size supernet's at batch 256 on CPU: 2563
    instead of 369 MB at its peak; a training step's, 747 instead of 723). Nested blocks share the
    outermost one's scales; torch.compile traces every quantizer's own."""
    global _shared_scales
    if _shared_scales is not None:
        yield
        return
    _shared_scales = {}
    try:
        yield
    finally:
        _shared_scales = None


def set_plain_attribute(module: torch.nn.Module, name: str, value) -> None:
    """``module.name = value`` for an attribute that is no parameter, buffer or submodule (where
    ``nn.Module.__setattr__`` would store it too), without that method's checks: a search step sets
    four such attributes per conv, and the checks cost it ~0.1 s on a CPU."""
    object.__setattr__(module, name, value)


def _table_step(table: dict, bits: int) -> float:
    """Step for ``bits`` < 8 from a per-bit table, continued geometrically past its last entry."""
    last = max(table)
    if bits in table:
        return table[bits]
    return table[last] * (table[last] / table[last - 1]) ** (bits - last)


def symmetric_grid(bits: Tuple[int, ...]) -> str:
    """The default grid for values of either sign: "signed", or "midrise" where ``bits`` holds 1.

    The signed 1-bit levels are {-s, 0} (PyTorch's quant_min -1, quant_max 0): every positive value
    becomes 0, which nobody asking for 1-bit weights or signed activations means; the mid-rise
    levels are +-s/2 (a binary network's sign). A grid is per quantizer, so a bit set with 1 in it
    takes the mid-rise grid for all its bit-widths; ``grid="signed"`` given explicitly stays signed."""
    return "midrise" if 1 in bits else "signed"


def _top_level(grid: int, bits: int) -> float:
    """Qp: the largest positive level in units of the step (the LSQ normaliser)."""
    qmin, qmax, z = grid_params(grid, bits)
    top = qmax - z
    return top if top > 0 else z - qmin


def gaussian_weight_scales(steps: Tensor, top: Tensor, w: Tensor, channel_maxima: Optional[Tensor] = None) -> Tensor:
    """The paper's weight scales below 8 bits, ``steps_k * std(w_g)`` for each row w_g of w [G, n]:
    [G, K] (std unbiased, as the official code takes it). Where the std is 0 (a constant row, a
    zero-initialised head) or undefined (a single weight), ``max|w_g| / top_k`` instead, which
    represents a constant exactly; at least MIN_SCALE (an all-zero row), never 0 or NaN.
    ``channel_maxima`` [G, C]: the rows' per-channel max|w| where the caller has them (8-bit scales),
    whose maxima are max|w_g| without another pass over w."""
    if w.shape[1] == 0:  # no weight to quantize: any valid scale
        return steps.expand(w.shape[0], -1)
    std = w.std(dim=1, correction=1 if w.shape[1] > 1 else 0)[:, None]
    largest = (w.abs() if channel_maxima is None else channel_maxima).amax(dim=1)[:, None]
    return torch.where(std > 0, steps[None, :] * std, largest / top[None, :]).clamp_min(MIN_SCALE)


def _other_dims(x: Tensor, axis: int) -> Tuple[int, ...]:
    return tuple(d for d in range(x.dim()) if d != axis)


@_functorch.AutogradForms
class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``factor`` (a float, or a tensor that
    broadcasts): the LSQ gradient scaling, at no cost in the forward pass."""

    generate_vmap_rule = True  # torch.func: the rule follows from the torch ops below

    @staticmethod
    def forward(s: Tensor, factor) -> Tensor:
        return s.view_as(s)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.factor = inputs[1]

    @staticmethod
    def jvp(ctx, ds, _):  # the transpose of backward's: jacfwd and jacrev give one Jacobian
        return ds * ctx.factor

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.factor, None


class MixedPrecisionFakeQuantize(FakeQuantizeBase):
    """``y = sum_k p_k * Q(x; s_k, b_k)`` with ``p = softmax(logits)``: one fused op per forward.

    Args:
        bits: one int or a tuple of 1..4 distinct bit-widths in [1, 16].
        grid: "signed" | "unsigned" | "midrise" | "relu"; None picks the role's grid: activations
            "unsigned"; weights :func:`symmetric_grid` (lsq: "signed", or "midrise" where bits
            holds 1) or "midrise" (paper, which requires it). "relu"
            (activations only) quantizes relu(x) on the unsigned grid: a ReLU before the
            quantizer folded into it (the same values and gradients, without the ReLU's output
            tensor); the scales are observed on relu(x), and with fake quantization disabled the
            forward is relu(x).
        quantizer: "lsq" (learnable scales) or "paper" (fixed HWGQ / Gaussian steps), see the
            module docstring.
        role: "act" or "weight"; chooses the paper quantizer and the default grid.
        per_channel_axis: channel dimension of x for per-channel scales (lsq), None for per
            tensor. Paper weights with a bit-width >= 8 are always per channel along axis 0 (the
            output channels) unless another axis is given.
        num_channels: C for per-channel lsq scales; None creates them on the first batch (build
            the optimizer after one forward then, or pass ``num_channels``).
        logits: an ``nn.Parameter`` of shape [K] to share among several quantizers (e.g. the
            convs of one DARTS op); None creates one (zeros) when K > 1. With K = 1 there are
            no logits and probs() is [1].
        backend: the ops backend, None for the automatic choice.
        factory_kwargs: ``{"device": ..., "dtype": ...}`` for the parameters (what
            ``torch.ao`` passes to weight fake-quant constructors); scales and logits are fp32
            unless a dtype is given.
    """

    #: softmax(logits) to use instead of computing it; set only by grouped.precomputed_probs
    probs_override: Optional[Tensor] = None

    def __init__(
        self,
        bits=8,
        *,
        grid: Optional[str] = None,
        quantizer: str = "lsq",
        role: str = "act",
        per_channel_axis: Optional[int] = None,
        num_channels: Optional[int] = None,
        logits: Optional[nn.Parameter] = None,
        backend: Optional[str] = None,
        factory_kwargs: Optional[dict] = None,
    ) -> None:
        super().__init__()
        if quantizer not in _QUANTIZERS:
            raise ValueError(f"quantizer must be one of {list(_QUANTIZERS)}, got {quantizer!r}")
        if role not in _ROLES:
            raise ValueError(f"role must be one of {list(_ROLES)}, got {role!r}")
        _backends.check_name(backend)
        self.bits = distinct_bits(bits)
        k = len(self.bits)
        if grid is None:
            grid = "unsigned" if role == "act" else (symmetric_grid(self.bits) if quantizer == "lsq" else "midrise")
        code = grid_code(grid)
        if quantizer == "paper" and role == "weight" and grid != "midrise":
            raise ValueError(f"the paper weight quantizer uses the midrise grid, got grid={grid!r}")
        if role == "weight" and grid == "relu":
            raise ValueError("grid='relu' folds a ReLU of the input into an activation quantizer; "
                             "it is not a weight grid")
        if per_channel_axis is not None and (isinstance(per_channel_axis, bool)
                                             or not isinstance(per_channel_axis, int)):
            raise ValueError(f"per_channel_axis must be an int or None, got {per_channel_axis!r}")
        if num_channels is not None and (not isinstance(num_channels, int) or num_channels < 1):
            raise ValueError(f"num_channels must be a positive int or None, got {num_channels!r}")
        if num_channels is not None and per_channel_axis is None:
            raise ValueError("num_channels is given but per_channel_axis is None (per-tensor scales)")
        if quantizer == "paper" and role == "act" and per_channel_axis is not None:
            raise ValueError("the paper activation quantizer is per tensor; per_channel_axis must be None")
        if quantizer == "paper" and role == "weight" and per_channel_axis is None and max(self.bits) >= PAPER_MAX_BITS:
            per_channel_axis = 0
        self.grid, self.grid_code, self.quantizer, self.role = grid, code, quantizer, role
        self.per_channel_axis = per_channel_axis
        self.backend = backend
        fk = dict(factory_kwargs or {})
        device = fk.get("device")
        pdtype = fk.get("dtype") or torch.float32

        if logits is not None:
            if k == 1:
                raise ValueError("logits were given but there is only one bit-width")
            if not isinstance(logits, nn.Parameter) or logits.shape != (k,):
                raise ValueError(f"logits must be an nn.Parameter of shape [{k}], got {type(logits).__name__} "
                                 f"of shape {list(getattr(logits, 'shape', []))}")
            self.logits = logits
        elif k > 1:
            self.logits = nn.Parameter(torch.zeros(k, device=device, dtype=pdtype))
        else:
            self.logits = None
        self.register_buffer("_unit_probs", torch.ones(1, device=device, dtype=pdtype), persistent=False)
        self.register_buffer("_bits_f", torch.tensor(self.bits, device=device, dtype=torch.float32), persistent=False)

        top = [_top_level(code, b) for b in self.bits]
        self._tops = tuple(top)
        if quantizer == "lsq":
            # LSQ gradient scale 1/sqrt(n * Qp_k): 1/sqrt(Qp_k) here, 1/sqrt(n) per call
            self.register_buffer("_grad_scale", torch.tensor([t**-0.5 for t in top], device=device,
                                                             dtype=pdtype), persistent=False)
            self.register_buffer("_init_factor", torch.tensor([2.0 / math.sqrt(t) for t in top],
                                                              device=device, dtype=pdtype), persistent=False)
            if per_channel_axis is None:
                self.scales = nn.Parameter(torch.ones(k, device=device, dtype=pdtype))
            elif num_channels is None:
                self.scales = UninitializedParameter(device=device, dtype=pdtype)
            else:
                self.scales = nn.Parameter(torch.ones(k, num_channels, device=device, dtype=pdtype))
            self.register_buffer("initialized", torch.zeros(1, dtype=torch.uint8, device=device))
        else:
            table = HWGQ_STEPS if (role == "act" and grid in ("unsigned", "relu")) else GAUSSIAN_STEPS
            steps = [_table_step(table, b) if b < PAPER_MAX_BITS else 1.0 for b in self.bits]
            self.register_buffer("_steps", torch.tensor(steps, device=device, dtype=torch.float32), persistent=False)
            self.register_buffer("_by_max", torch.tensor([b >= PAPER_MAX_BITS for b in self.bits], device=device),
                                 persistent=False)
            self.register_buffer("_top", torch.tensor(top, device=device), persistent=False)
            # the activation scales in two launches after the max (see _paper_scales)
            by_max = [b >= PAPER_MAX_BITS for b in self.bits]
            self.register_buffer("_top_or_inf", torch.tensor([t if m else math.inf for t, m in zip(top, by_max)],
                                                             device=device, dtype=torch.float32), persistent=False)
            self.register_buffer("_floor_or_step", torch.tensor([MIN_SCALE if m else v for v, m in zip(steps, by_max)],
                                                                device=device, dtype=torch.float32), persistent=False)
            self._any_by_max = max(self.bits) >= PAPER_MAX_BITS
            if role == "act" and self._any_by_max:
                self._register_running_range(device)
        self._fake_quant_on = True
        self._observer_on = True
        self._needs_init = quantizer == "lsq"

    def _register_running_range(self, device) -> None:
        """The buffers of the running range of the largest magnitude, for evaluation (see
        _max_scaled_act_scales): none observed yet."""
        self.register_buffer("running_largest", torch.zeros((), device=device))
        self.register_buffer("largest_observed", torch.zeros((), dtype=torch.bool, device=device))

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        # a module pickled whole before the running range was kept: none observed yet
        missing = "running_largest" not in self._buffers
        if self.quantizer == "paper" and self.role == "act" and self._any_by_max and missing:
            self._register_running_range(self._steps.device)

    # -- switches (python mirrors of the FakeQuantizeBase buffers: no host sync in forward) -------

    def enable_fake_quant(self, enabled: bool = True) -> None:
        super().enable_fake_quant(enabled)
        self._fake_quant_on = bool(enabled)

    def enable_observer(self, enabled: bool = True) -> None:
        super().enable_observer(enabled)
        self._observer_on = bool(enabled)

    def reset_scales(self) -> None:
        """Re-arm the LSQ initialisation: the next forward with the observer on sets the scales."""
        if self.quantizer != "lsq":
            raise RuntimeError("reset_scales applies to the lsq quantizer only")
        self.initialized.zero_()
        self._needs_init = True

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # per-channel scales that have not seen a batch yet have no shape: left out (nn.Module would
        # detach them, which an uninitialised parameter refuses, and torch.load's weights_only refuses
        # one in a file), and taken as absent again on loading
        scales = self._parameters.get("scales")
        if not isinstance(scales, UninitializedParameter):
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        self._parameters["scales"] = None
        try:
            super()._save_to_state_dict(destination, prefix, keep_vars)
        finally:
            self._parameters["scales"] = scales

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "scales"
        uninitialized = isinstance(getattr(self, "scales", None), UninitializedParameter)
        if uninitialized and key in state_dict:
            self.scales.materialize(state_dict[key].shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if uninitialized and key not in state_dict and key in missing_keys:
            missing_keys.remove(key)  # saved before its first batch (see _save_to_state_dict): it stays so
        for name in ("running_largest", "largest_observed"):
            if prefix + name in missing_keys:  # saved before the running range was kept: none observed yet
                missing_keys.remove(prefix + name)
        # loading is not on the hot path: reading the switches back to the host here is fine
        self._fake_quant_on = bool(self.fake_quant_enabled[0])
        self._observer_on = bool(self.observer_enabled[0])
        if self.quantizer == "lsq":
            self._needs_init = not bool(self.initialized[0])

    # -- the quantizer --------------------------------------------------------------------------

    @property
    def num_bits(self) -> int:
        """K, the number of bit-widths."""
        return len(self.bits)

    def probs(self) -> Tensor:
        """softmax(logits), or [1] for a single bit-width (or what precomputed_probs handed over)."""
        if self.probs_override is not None:
            return self.probs_override
        return self._unit_probs if self.logits is None else torch.softmax(self.logits, 0)

    def expected_bits(self) -> Tensor:
        """Differentiable expected bit-width ``sum_k p_k b_k`` (a 0-d tensor)."""
        if self.logits is None:
            return self._bits_f[0]
        return (torch.softmax(self.logits.float(), 0) * self._bits_f).sum()

    def chosen_bits(self) -> int:
        """The bit-width of the largest logit (reads the logits back to the host)."""
        if self.logits is None:
            return self.bits[0]
        return self.bits[int(torch.argmax(self.logits.detach()))]

    def _axis(self, x: Tensor) -> Optional[int]:
        ax = self.per_channel_axis
        if ax is not None and not -x.dim() <= ax < x.dim():
            raise ValueError(f"per_channel_axis {ax} is out of range for an input with {x.dim()} dimensions")
        return None if ax is None else ax % x.dim()

    @torch.no_grad()
    def _init_lsq_scales(self, x: Tensor, axis: Optional[int]) -> None:
        """LSQ rule ``s_k = 2 mean|x| / sqrt(Qp_k)``, per tensor or per channel; on the device. An
        empty batch observes nothing: the first non-empty one initialises the scales. Zeros say
        nothing about a scale either: a channel all zeros in that batch (dead after a ReLU) takes the
        whole batch's mean, and where everything was zero the scales keep their value (1 before any
        batch) rather than take the floor MIN_SCALE, which would clip every later input to ~1e-5.
        The means are over the finite elements: one overflowed value (inf, NaN; an fp16 batch that
        a loss scaler is about to skip) would otherwise make the scales inf, or NaN read as "all
        zero", for good. A batch with no finite element counts as observed, and keeps the scales:
        telling it apart on the host would cost a sync."""
        if axis is not None:
            if isinstance(self.scales, UninitializedParameter):
                self.scales.materialize((self.num_bits, x.shape[axis]))
                self.scales.fill_(1.0)  # a valid placeholder until a batch is observed
            elif self.scales.dim() != 2:  # PyTorch's .to("meta") makes an UninitializedParameter an empty Parameter
                raise ValueError(f"the per-channel scales have shape {list(self.scales.shape)}: the quantizer was "
                                 "moved with .to('meta') before a first batch sized them; move it after its first "
                                 "forward, or build it there (factory_kwargs={'device': 'meta'}), or give num_channels")
            elif self.scales.shape[1] != x.shape[axis]:
                raise ValueError(f"x has {x.shape[axis]} channels along axis {axis} but the quantizer has "
                                 f"{self.scales.shape[1]} per-channel scales")
        if x.numel() == 0:
            return
        xa = self._magnitudes(x.detach()).float()
        xa.masked_fill_(~xa.isfinite(), math.nan)  # what nanmean leaves out; xa is a fresh tensor
        if axis is None:
            mean_abs = xa.nanmean().reshape(1)
            init = self._init_factor * mean_abs
        else:
            per_channel = xa.nanmean(dim=_other_dims(x, axis))
            mean_abs = torch.where(per_channel > 0, per_channel, xa.nanmean())[None, :]
            init = self._init_factor[:, None] * mean_abs
        # a where on the device, not a test on the host: no sync
        self.scales.copy_(torch.where(mean_abs > 0, init, self.scales).clamp_min(MIN_SCALE))
        self.initialized.fill_(1)
        self._needs_init = False

    def _magnitudes(self, x: Tensor) -> Tensor:
        """What the scales are observed on: |x|, or relu(x) on the relu grid (the quantizer's input)."""
        return torch.relu(x) if self.grid == "relu" else x.abs()

    def _lsq_scales(self, x: Tensor, axis: Optional[int]) -> Tensor:
        if self._needs_init and self._observer_on:
            if _functorch.active():  # else PyTorch's own refusal of the in-place write, naming neither
                raise RuntimeError("the LSQ scales of this quantizer are set from its first input, in place, which "
                                   "cannot happen under a torch.func transform: run the model once on a batch "
                                   "before the transform (or load a state_dict that holds the scales)")
            self._init_lsq_scales(x, axis)
        # an optimizer step may push a scale to <= 0; keep it positive as PyTorch's learnable fake
        # quantizer does: in place on the device (no sync), through .data so that the version
        # counter stays, and a graph of an earlier forward (gradient accumulation) stays valid.
        # torch.export traces no update of a parameter through .data: its graph clamps a copy.
        if torch.compiler.is_exporting():
            scales = self.scales.clamp(min=MIN_SCALE)
        else:
            self.scales.data.clamp_(min=MIN_SCALE)
            scales = self.scales
        # elements per scale (at least 1: an empty batch gets no gradient, and 0 ** -0.5 raises)
        per_scale = max(1, x.numel() if axis is None else x.numel() // max(1, x.shape[axis]))
        if self.num_bits == 1:  # a python float: exactly PyTorch's grad_factor 1/sqrt(n * Qp)
            return _ScaleGrad.apply(scales, (per_scale * self._tops[0]) ** -0.5)
        factor = self._grad_scale * per_scale**-0.5
        return _ScaleGrad.apply(scales, factor if axis is None else factor[:, None])

    def _paper_scales(self, x: Tensor, axis: Optional[int]) -> Tensor:
        xd = x.detach()
        if self.role == "act":
            return self._max_scaled_act_scales(xd, x) if self._any_by_max else self._steps
        if axis is None:
            return gaussian_weight_scales(self._steps, self._top, xd.float().reshape(1, -1))[0]
        if xd.numel() == 0:  # a layer without inputs (Linear(0, n)): amax refuses it; the scales' floor
            max_c = xd.new_zeros(xd.shape[axis], dtype=torch.float32)
        else:
            max_c = xd.abs().amax(dim=_other_dims(xd, axis)).float()
        scaled = gaussian_weight_scales(self._steps, self._top, xd.float().reshape(1, -1), max_c[None])[0]
        by_max = (max_c[None, :] / self._top[:, None]).clamp_min(MIN_SCALE)
        return torch.where(self._by_max[:, None], by_max, scaled[:, None])

    def _observes_range(self, xd: Tensor) -> bool:
        """Whether this forward updates the running range: training with the observer on, outside
        torch.func's transforms (a statistic kept in place, which a transformed function cannot do; as
        BatchNorm's there, it is not kept); an empty batch observes nothing."""
        return self.training and self._observer_on and xd.numel() > 0 and not _functorch.active()

    @torch.no_grad()
    def _observe_largest(self, largest: Tensor) -> None:
        """Fold a training batch's largest magnitude into the running range, on the device (no host
        sync): the first one as it is, then an exponential moving average (RUNNING_RANGE_MOMENTUM); a
        non-finite one (an overflowed batch that a loss scaler will skip) leaves it as it was."""
        largest = largest.to(self.running_largest.dtype)  # fp32, unless the module was made fp64 (.double())
        finite = largest.isfinite()
        moved = torch.where(self.largest_observed, torch.lerp(self.running_largest, largest, RUNNING_RANGE_MOMENTUM),
                            largest)
        self.running_largest.copy_(torch.where(finite, moved, self.running_largest))
        self.largest_observed.logical_or_(finite)

    @staticmethod
    def _batch_largest(xd: Tensor, grid: str) -> Tensor:
        """The largest magnitude of xd (of relu(xd) on the relu grid), 0 for an empty batch."""
        # relu grid: max relu(x) = relu(max x), and relu(m) / top clamped at MIN_SCALE > 0 is m / top
        # so clamped (NaN stays NaN): no activation-sized temporary, and no separate relu launch;
        # otherwise max |x| as one reduction (the inf-norm), not abs then amax -- except on CPU, where
        # PyTorch's inf-norm is some 30x slower than its min/max pass (0.35 against 0.02 ms over
        # [64, 4, 32, 32] on the 2-core VM of bench/results): max(max x, -min x), the same value
        if xd.numel() == 0:  # an empty batch (the reductions refuse it): the scales' floor
            return xd.new_zeros((), dtype=torch.float32)
        if grid == "relu":
            return xd.amax()
        if xd.device.type == "cpu":
            lowest, highest = torch.aminmax(xd)
            return torch.maximum(highest, -lowest)
        return torch.linalg.vector_norm(xd, ord=math.inf)

    def _scales_of_largest(self, largest: Tensor) -> Tensor:
        # max(largest / top_k, MIN_SCALE) for the bit-widths scaled by the max, step_k for the others
        # (largest / inf = 0 < step_k): two launches instead of three. A non-finite largest makes the
        # others' scales NaN too, where the output is NaN anyway through the max-scaled bit-widths.
        return torch.maximum(largest.float() / self._top_or_inf, self._floor_or_step)

    def _max_scaled_act_scales(self, xd: Tensor, x: Optional[Tensor] = None) -> Tensor:
        """The paper activation scales of a configuration with a bit-width scaled by the max.

        In training, from the largest magnitude of the batch, as the official code takes it; with the
        observer on, that also updates the running range. In evaluation, from the running range (the
        largest magnitude's moving average over the training batches, as batch norm's running
        statistics), so that a sample's output does not depend on the other samples of its batch; a
        quantizer that observed no training batch (or whose state was saved before the running range
        was kept) takes the batch's, as in training: a where() on the device, on the buffers the
        module holds now (those torch.func's functional_call hands it, too).

        ``x`` (xd's source), within :func:`shared_activation_scales`: quantizers of one configuration
        on the same input share the batch's largest magnitude and, in training, the scales."""
        shared = _shared_scales if x is not None and not torch.compiler.is_compiling() else None
        seen = None
        if shared is not None:
            key = (id(x), self.bits, self.grid)
            seen = shared.get(key)
            # a dead input's id may be taken by a new tensor: the weak reference then is not to x
            if seen is not None and not (seen[0]() is x and seen[1] == x._version):
                seen = None
        largest = seen[3] if seen is not None else self._batch_largest(xd, self.grid)
        if not self.training:
            scales = self._scales_of_largest(torch.where(self.largest_observed, self.running_largest,
                                                         largest.to(self.running_largest.dtype)))
            if shared is not None and seen is None:
                shared[key] = (weakref.ref(x), x._version, None, largest)  # the scales are each one's own
            return scales
        if self._observes_range(xd):
            self._observe_largest(largest)
        if seen is not None and seen[2] is not None:
            return seen[2]
        scales = self._scales_of_largest(largest)
        if shared is not None:
            shared[key] = (weakref.ref(x), x._version, scales, largest)
        return scales

    def _op_inputs(self, x: Tensor) -> Tuple[Tensor, Tensor, Optional[int]]:
        """(probs, scales, axis) of this forward's mixed_fake_quant call on x."""
        axis = self._axis(x)
        scales = self._lsq_scales(x, axis) if self.quantizer == "lsq" else self._paper_scales(x, axis)
        return self.probs(), scales, axis

    def _scales_known_before_input(self) -> bool:
        """Whether :meth:`_scales_before_input` applies: activations with per-tensor scales, not
        LSQ scales still to be initialised from the input."""
        return (self.role == "act" and self.per_channel_axis is None
                and not (self.quantizer == "lsq" and self._needs_init and self._observer_on))

    def _scales_before_input(self, shape: torch.Size) -> Optional[Tensor]:
        """The scales for an input of ``shape`` that is not computed yet, where they do not depend on
        its values (LSQ scales, paper scales without a bit-width scaled by the max); None for paper
        scales scaled by its max, which carry no gradient (:meth:`_act_scales_of` computes them
        once the input exists). Only where :meth:`_scales_known_before_input`."""
        if self.quantizer == "lsq":
            return self._lsq_scales(torch.empty(shape, device="meta"), None)  # reads only the shape
        return None if self._any_by_max else self._steps

    def _act_scales_of(self, x: Tensor) -> Tensor:
        """The paper activation scales of x, scaled by its max (no gradient). Not through
        :func:`shared_activation_scales`, whose cache would hold x until the forward ends: x here is
        an intermediate that :func:`~qdarts_kernels.nn.chained_quant_convs` frees at once."""
        return self._max_scaled_act_scales(x.detach())

    def forward(self, x: Tensor) -> Tensor:
        if not self._fake_quant_on:
            return torch.relu(x) if self.grid == "relu" else x  # the folded ReLU stays
        probs, scales, axis = self._op_inputs(x)
        if self.quantizer == "lsq" or self.role == "act":
            return ops.mixed_fake_quant(x, probs, scales, self.bits, grid=self.grid, axis=axis, backend=self.backend)
        y = ops.mixed_fake_quant(x.detach(), probs, scales, self.bits, grid=self.grid, axis=axis,
                                 backend=self.backend)
        # identity gradient to the weights (official code)
        return reference.with_identity_gradient(y, x) if x.requires_grad else y

    @torch.jit.unused
    def calculate_qparams(self) -> Tuple[Tensor, Tensor]:
        """(scale, zero_point) of the chosen bit-width, for ``torch.ao.quantization.convert``.

        Defined for lsq scales on the signed and unsigned grids (zero point 0); the midrise grid
        has no integer zero point and the paper scales are functions of the data (the weights', the
        batch's or its running range), not quantization parameters.
        """
        if self.quantizer != "lsq":
            raise RuntimeError("calculate_qparams: the paper quantizer's scales are functions of the data; "
                               "use quantizer='lsq' for a convertible model")
        if self.grid == "midrise":
            raise RuntimeError("calculate_qparams: the midrise grid (zero point 1/2) has no integer qparams"
                               + (" (the default two-sided grid of a bit set with 1 bit; see symmetric_grid)"
                                  if 1 in self.bits else ""))
        k = self.bits.index(self.chosen_bits())
        scale = self.scales.detach()[k].reshape(-1).float()
        return scale, torch.zeros(scale.shape, dtype=torch.int32, device=scale.device)

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, grid={self.grid!r}, quantizer={self.quantizer!r}, role={self.role!r}, "
                f"per_channel_axis={self.per_channel_axis}, backend={self.backend!r}")


class FakeQuantize(MixedPrecisionFakeQuantize):
    """Learnable (LSQ) single bit-width fake quantizer for ``torch.ao.quantization`` QAT.

    ``y = Q(x; s, bits)`` on the signed or the unsigned grid (zero point 0 in the kernel), per
    tensor or per channel (``ch_axis``), scale initialised from the first batch and learned with
    LSQ gradient scaling. With a fixed scale this is bit for bit
    ``torch.fake_quantize_per_tensor_affine`` / ``_per_channel_affine`` with zero point 0, and its
    gradients are those of ``torch._fake_quantize_learnable_per_tensor_affine`` with
    ``grad_factor = 1/sqrt(n * Qp)``.

    ``dtype`` is the integer type ``convert`` stores: the signed grid as ``torch.qint8`` (zero point
    0) or as ``torch.quint8`` with zero point 2^(b-1) (the same levels, shifted: what PyTorch's int8
    kernels need for activations that can be negative, ``per_tensor_symmetric``); the unsigned
    grid as ``torch.quint8`` (zero point 0); ``torch.qint32`` for more than 8 bits. Defaults:
    qint8 for signed, quint8 for unsigned (qint32 above 8 bits).

    Use as ``QConfig(activation=FakeQuantize.with_args(bits=8, grid="signed", dtype=torch.quint8),
    weight=FakeQuantize.with_args(bits=8, ch_axis=0))`` with ``prepare_qat``; per-channel scales
    are created on the first batch (build the optimizer after one forward, or pass
    ``num_channels``). ``convert`` takes ``calculate_qparams``, ``dtype``, ``qscheme``,
    ``ch_axis``, ``quant_min`` and ``quant_max`` from it.
    """

    def __init__(
        self,
        bits: int = 8,
        *,
        grid: str = "signed",
        dtype: Optional[torch.dtype] = None,
        ch_axis: Optional[int] = None,
        num_channels: Optional[int] = None,
        backend: Optional[str] = None,
        factory_kwargs: Optional[dict] = None,
    ) -> None:
        if isinstance(bits, bool) or not isinstance(bits, int):
            raise ValueError(f"bits must be one int for FakeQuantize, got {bits!r}")
        if grid not in ("signed", "unsigned"):
            raise ValueError(f"grid must be 'signed' or 'unsigned' for FakeQuantize, got {grid!r}")
        super().__init__(bits, grid=grid, quantizer="lsq", role="act", per_channel_axis=ch_axis,
                         num_channels=num_channels, backend=backend, factory_kwargs=factory_kwargs)
        signed = grid == "signed"
        if dtype is None:
            dtype = (torch.qint8 if signed else torch.quint8) if bits <= 8 else torch.qint32
        allowed = ((torch.qint8, torch.quint8) if signed else (torch.quint8,)) if bits <= 8 else (torch.qint32,)
        if dtype not in allowed:
            raise ValueError(f"dtype must be one of {list(allowed)} for the {grid} grid at {bits} bits, got {dtype}")
        qmin, qmax, _ = grid_params(self.grid_code, bits)
        # the signed levels stored as quint8: shift the integer range, zero point 2^(b-1)
        self._zero_point = 2 ** (bits - 1) if (signed and dtype == torch.quint8) else 0
        self.quant_min, self.quant_max = int(qmin) + self._zero_point, int(qmax) + self._zero_point
        self.dtype = dtype
        per_channel = ch_axis is not None
        self.qscheme = ((torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric) if signed
                        else (torch.per_channel_affine if per_channel else torch.per_tensor_affine))
        self.ch_axis = -1 if ch_axis is None else ch_axis
        self.is_dynamic = False

    @property
    def scale(self) -> Tensor:
        """The scale: 0-d (per tensor) or shape [C] (per channel)."""
        return self.scales[0]

    @torch.jit.unused
    def calculate_qparams(self) -> Tuple[Tensor, Tensor]:
        scale, zero_point = super().calculate_qparams()
        return scale, zero_point + self._zero_point

    def extra_repr(self) -> str:
        return (f"bits={self.bits[0]}, grid={self.grid!r}, dtype={self.dtype}, quant_min={self.quant_min}, "
                f"quant_max={self.quant_max}, qscheme={self.qscheme}, ch_axis={self.ch_axis}, backend={self.backend!r}")
