"""Quantized convolution and linear layers: EdMIPS composite layers over fixed or mixed bit-widths.

Because convolution (and a linear map) is bilinear,

    sum_i sum_j p^a_i p^w_j conv(Q_i(x), Q_j(W)) = conv(sum_i p^a_i Q_i(x), sum_j p^w_j Q_j(W)),

so one convolution on the mixed activation and the mixed weight (each one fused
``mixed_fake_quant`` call) replaces the N_a * N_w convolutions of the naive mixed layer. With one
bit-width each, this is ordinary quantization-aware training at fixed bits.

Inside :func:`precomputed_weights`, a layer uses a mixed weight handed to it instead of quantizing
its own: :class:`qdarts_kernels.nn.GroupedWeightQuantizer` computes the mixed weights of many
layers in one grouped launch and hands them over this way.

The layers subclass ``nn.Conv2d`` / ``nn.Linear``, so their ``weight`` and ``bias`` keep their
names and a float layer can be swapped in place (:func:`qdarts_kernels.nn.quantize_`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import _backends
from .. import ops as _ops
from .quantizers import MixedPrecisionFakeQuantize, set_plain_attribute

__all__ = ["QuantConv2d", "QuantLinear", "precomputed_weights"]

#: bit-width reported for activations that are not quantized (fp32)
UNQUANTIZED_BITS = 32.0


class _QuantizedLayer:
    """Quantizers, bit-width queries and MAC bookkeeping shared by QuantConv2d and QuantLinear."""

    act_quant: Optional[MixedPrecisionFakeQuantize]
    weight_quant: MixedPrecisionFakeQuantize
    #: the mixed weight to use instead of ``weight_quant(weight)``; set only by precomputed_weights
    weight_override: Optional[Tensor] = None

    def _init_quantizers(self, out_channels: int, weight_bits, act_bits, quantizer: str, act_signed: bool,
                         fuse_relu: bool, act_logits, weight_logits, backend, device) -> None:
        if fuse_relu and act_signed:
            raise ValueError("fuse_relu quantizes relu(x) on the unsigned grid; it excludes act_signed=True")
        if fuse_relu and act_bits is None:
            raise ValueError("fuse_relu folds the ReLU into the activation quantizer; it needs act_bits")
        fk = {"device": device}
        lsq = quantizer == "lsq"
        # LSQ weights per output channel (what PyTorch's QAT does for weights); paper weights
        # decide per tensor / per channel themselves (per channel only with a bit-width >= 8)
        self.weight_quant = MixedPrecisionFakeQuantize(
            weight_bits, quantizer=quantizer, role="weight", per_channel_axis=0 if lsq else None,
            num_channels=out_channels if lsq else None, logits=weight_logits, backend=backend, factory_kwargs=fk)
        self.act_quant = None if act_bits is None else MixedPrecisionFakeQuantize(
            act_bits, quantizer=quantizer, role="act",
            grid="relu" if fuse_relu else ("signed" if act_signed else "unsigned"),
            logits=act_logits, backend=backend, factory_kwargs=fk)
        if act_bits is None and act_logits is not None:
            raise ValueError("act_logits were given but act_bits is None (activations not quantized)")
        if act_bits is None:
            # a buffer, so that expected_act_bits() makes no host-to-device copy per call
            self.register_buffer("_unquantized_bits", torch.tensor(UNQUANTIZED_BITS, device=device),
                                 persistent=False)
        self.quantizer = quantizer
        #: multiply-accumulates per sample of the last forward (0 before the first)
        self.macs = 0

    def expected_act_bits(self) -> Tensor:
        """Differentiable ``sum_i p^a_i b_i``; 32 (a constant) when activations are not quantized."""
        if self.act_quant is None:
            return self._unquantized_bits
        return self.act_quant.expected_bits()

    def expected_weight_bits(self) -> Tensor:
        """Differentiable ``sum_j p^w_j b_j``."""
        return self.weight_quant.expected_bits()

    def chosen_bits(self) -> Tuple[Optional[int], int]:
        """(activation bits or None when not quantized, weight bits): the argmax of each set's logits."""
        act = None if self.act_quant is None else self.act_quant.chosen_bits()
        return act, self.weight_quant.chosen_bits()

    def _quantized_input_and_weight(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        xq = x if self.act_quant is None else self.act_quant(x)
        wq = self.weight_override
        return xq, (self.weight_quant(self.weight) if wq is None else wq)

    @staticmethod
    def _check_quantizer(quantizer: str) -> None:
        if quantizer not in ("paper", "lsq"):
            raise ValueError(f"quantizer must be 'paper' or 'lsq', got {quantizer!r}")


def _depthwise_weight_grad(backend: str, x: Tensor, w: Tensor, groups: int, grad: Tensor):
    """The Triton depthwise-conv weight-gradient kernels if this conv's weight gradient takes them
    (a depthwise conv on the fused GPU backends, not traced by torch.compile), else None: PyTorch's
    CUDA kernel sums each (channel, tap) in one thread block, which leaves a GPU idle on few channels."""
    if (groups == 1 or torch.compiler.is_compiling()  # most convs are dense: decided without the backend
            or not _backends.takes_triton_only_kernels(backend, x.device)):
        return None
    from ..triton import depthwise_conv

    return depthwise_conv if depthwise_conv.supports(x, w.shape, groups, grad.shape[-1]) else None


class _QuantizedInputConv2d(torch.autograd.Function):
    """``conv2d(mixed_fake_quant(x), w, bias)`` that keeps x, not the mixed activation, for the
    backward: the backward recomputes the mixed activation (one more elementwise pass over x)
    instead of holding a second activation-sized tensor per conv from forward to backward.

    Under autocast the conv runs in the autocast dtype (as ``F.conv2d`` would); the backward casts
    its operands the same way and each gradient back to its input's dtype.
    """

    @staticmethod
    def forward(ctx, x, probs, scales, w, bias, quant_args, conv_args):
        xq = _ops._mfq_forward(x, probs, scales, *quant_args)
        y = nn.functional.conv2d(xq, w, bias, *conv_args)
        ctx.save_for_backward(x, probs, scales, w, bias)
        ctx.args = (quant_args, conv_args)
        ctx.conv_dtype = y.dtype
        return y

    @staticmethod
    def backward(ctx, grad):
        quant_args, conv_args = ctx.args
        _ops._refuse_second_order("QuantConv2d", quant_args[-1])
        x, probs, scales, w, bias = ctx.saved_tensors
        need_x, need_p, need_s, need_w, need_b = ctx.needs_input_grad[:5]
        need_xq = need_x or need_p or need_s
        dt = ctx.conv_dtype
        xq = _ops._mfq_forward(x, probs, scales, *quant_args) if need_xq or need_w else None
        stride, padding, dilation, groups = conv_args
        grad, conv_input = grad.to(dt), (xq if xq is not None else x).to(dt)
        depthwise = _depthwise_weight_grad(quant_args[-1], conv_input, w, groups, grad) if need_w else None
        dxq = dw = db = None
        if need_xq or need_b or (need_w and depthwise is None):
            dxq, dw, db = torch.ops.aten.convolution_backward(
                grad, conv_input, w.to(dt), None if bias is None else [bias.shape[0]],
                stride, padding, dilation, False, [0, 0], groups, [need_xq, need_w and depthwise is None, need_b])
        if depthwise is not None:
            dw = depthwise.depthwise_conv2d_weight_grad(grad.contiguous(), conv_input.contiguous(), w.shape[2:],
                                                        stride, padding, dilation)
        dx = dp = ds = None
        if need_xq:
            dx, dp, ds = _ops._mfq_backward(dxq.to(x.dtype), x, probs, scales, *quant_args, need_x, need_p, need_s)
        return (dx, dp, ds, dw.to(w.dtype) if need_w else None, db.to(bias.dtype) if need_b else None, None, None)


@contextmanager
def precomputed_weights(layers: Sequence[_QuantizedLayer], weights: Sequence[Tensor]) -> Iterator[None]:
    """Within the block, ``layers[i]`` uses ``weights[i]`` as its mixed weight (it must equal what
    ``layers[i].weight_quant(layers[i].weight)`` computes, gradients included)."""
    if len(layers) != len(weights):
        raise ValueError(f"precomputed_weights needs one weight per layer, got {len(weights)} for {len(layers)}")
    for layer, w in zip(layers, weights):
        set_plain_attribute(layer, "weight_override", w)  # never registered, even when w is a Parameter
    try:
        yield
    finally:
        for layer in layers:
            set_plain_attribute(layer, "weight_override", None)


def _share_parameters(q: nn.Module, source: nn.Module) -> nn.Module:
    """Make ``q`` use ``source``'s weight and bias Parameters (not copies) and its training mode."""
    q.weight = source.weight
    q.bias = source.bias
    q.train(source.training)
    return q


class QuantConv2d(_QuantizedLayer, nn.Conv2d):
    """``conv(act_quant(x), weight_quant(W))``: an ``nn.Conv2d`` with fake-quantized input and weight.

    Keyword arguments beyond ``nn.Conv2d``'s:
        weight_bits, act_bits: an int (fixed) or a tuple of 1..4 ints (mixed, searched); act_bits
            None leaves activations unquantized.
        quantizer: "paper" (HWGQ activations, Gaussian mid-rise weights, the official code) or
            "lsq" (learnable scales; weights per output channel); see ``quantizers``.
        act_signed: use the signed activation grid (for inputs that can be negative).
        fuse_relu: compute ``conv(act_quant(relu(x)), ...)``: a ReLU before the layer folded into
            the activation quantizer (grid "relu"): the values and gradients of ``nn.ReLU``
            followed by the layer, without the ReLU's output (the layer keeps x for backward,
            which the network usually holds anyway).
        act_logits, weight_logits: shared ``nn.Parameter`` logits (see MixedPrecisionFakeQuantize).
        backend: ops backend, None for the automatic choice.

    After a forward, ``macs`` holds the multiply-accumulates per sample
    (``C_out * C_in/groups * kh * kw * H_out * W_out``) and ``input_hw`` the input's (H, W); both
    are read from shapes, so recording them costs no sync.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 weight_bits=8, act_bits=8, quantizer: str = "paper", act_signed: bool = False, fuse_relu: bool = False,
                 act_logits: Optional[nn.Parameter] = None, weight_logits: Optional[nn.Parameter] = None,
                 backend: Optional[str] = None) -> None:
        self._check_quantizer(quantizer)
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                           padding_mode, device, dtype)
        self._init_quantizers(out_channels, weight_bits, act_bits, quantizer, act_signed, fuse_relu, act_logits,
                              weight_logits, backend, device)
        kh, kw = self.kernel_size
        self._macs_per_output_pixel = out_channels * (in_channels // groups) * kh * kw
        self.input_hw: Optional[Tuple[int, int]] = None

    def forward(self, x: Tensor) -> Tensor:
        aq = self.act_quant
        if (aq is not None and aq._fake_quant_on and self.padding_mode == "zeros" and x.dim() == 4
                and not isinstance(self.padding, str) and torch.is_grad_enabled()
                and not torch.compiler.is_compiling() and not _ops.eager_reference_active()):
            # eager training: keep only x for the backward (see _QuantizedInputConv2d); compiled
            # graphs leave what to keep to AOTAutograd's partitioner
            probs, scales, axis = aq._op_inputs(x)
            bits, code, ax, name = _ops._checked_mixed_fake_quant_args(x, probs, scales, aq.bits, aq.grid, axis,
                                                                       aq.backend)
            wq = self.weight_override
            wq = self.weight_quant(self.weight) if wq is None else wq
            y = _QuantizedInputConv2d.apply(x, probs, scales, wq, self.bias, (bits, code, ax, name),
                                            (self.stride, self.padding, self.dilation, self.groups))
        else:
            xq, wq = self._quantized_input_and_weight(x)
            y = self._conv_forward(xq, wq, self.bias)
        set_plain_attribute(self, "input_hw", (x.shape[-2], x.shape[-1]))
        set_plain_attribute(self, "macs", self._macs_per_output_pixel * y.shape[-2] * y.shape[-1])
        return y

    @classmethod
    def from_float(cls, conv: nn.Conv2d, **quant_kwargs) -> "QuantConv2d":
        """A QuantConv2d with ``conv``'s configuration that shares its weight and bias Parameters."""
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.groups, conv.bias is not None, conv.padding_mode, device=conv.weight.device,
                dtype=conv.weight.dtype, **quant_kwargs)
        return _share_parameters(q, conv)

    def extra_repr(self) -> str:
        return nn.Conv2d.extra_repr(self) + f", quantizer={self.quantizer!r}"


class QuantLinear(_QuantizedLayer, nn.Linear):
    """``linear(act_quant(x), weight_quant(W))``: an ``nn.Linear`` with fake-quantized input and weight.

    Same keyword arguments as :class:`QuantConv2d`. ``macs`` = out_features * in_features times the
    number of rows per sample (the product of x's middle dimensions; 1 for an [N, in] input).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 weight_bits=8, act_bits=8, quantizer: str = "paper", act_signed: bool = False, fuse_relu: bool = False,
                 act_logits: Optional[nn.Parameter] = None, weight_logits: Optional[nn.Parameter] = None,
                 backend: Optional[str] = None) -> None:
        self._check_quantizer(quantizer)
        nn.Linear.__init__(self, in_features, out_features, bias, device, dtype)
        self._init_quantizers(out_features, weight_bits, act_bits, quantizer, act_signed, fuse_relu, act_logits,
                              weight_logits, backend, device)

    def forward(self, x: Tensor) -> Tensor:
        xq, wq = self._quantized_input_and_weight(x)
        y = nn.functional.linear(xq, wq, self.bias)
        rows = 1
        for d in x.shape[1:-1]:
            rows = rows * d
        self.macs = self.in_features * self.out_features * rows
        return y

    @classmethod
    def from_float(cls, linear: nn.Linear, **quant_kwargs) -> "QuantLinear":
        """A QuantLinear with ``linear``'s configuration that shares its weight and bias Parameters."""
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, device=linear.weight.device,
                dtype=linear.weight.dtype, **quant_kwargs)
        return _share_parameters(q, linear)

    def extra_repr(self) -> str:
        return nn.Linear.extra_repr(self) + f", quantizer={self.quantizer!r}"
