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
from typing import Dict, Iterator, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import _backends, _functorch
from .. import ops as _ops
from .._validation import distinct_bits
from .quantizers import MixedPrecisionFakeQuantize, set_plain_attribute, symmetric_grid

__all__ = ["QuantConv2d", "QuantLinear", "chained_quant_convs", "precomputed_weights"]

#: bit-width reported for activations that are not quantized (fp32)
UNQUANTIZED_BITS = 32.0


class _QuantizedLayer:
    """Quantizers, bit-width queries and MAC bookkeeping shared by QuantConv2d and QuantLinear."""

    act_quant: Optional[MixedPrecisionFakeQuantize]
    weight_quant: MixedPrecisionFakeQuantize
    #: the mixed weight to use instead of ``weight_quant(weight)``; set only by precomputed_weights
    weight_override: Optional[Tensor] = None

    def _init_quantizers(self, out_channels: int, weight_bits, act_bits, quantizer: str, act_signed: bool,
                         fuse_relu: bool, act_logits, weight_logits, backend, device,
                         two_sided_grid: Optional[str]) -> None:
        if fuse_relu and act_signed:
            raise ValueError("fuse_relu quantizes relu(x) on the unsigned grid; it excludes act_signed=True")
        if fuse_relu and act_bits is None:
            raise ValueError("fuse_relu folds the ReLU into the activation quantizer; it needs act_bits")
        # checked here to name the argument (the quantizers check them again as their "bits")
        weight_bits = distinct_bits(weight_bits, "weight_bits")
        act_bits = None if act_bits is None else distinct_bits(act_bits, "act_bits")
        if two_sided_grid not in (None, "signed", "midrise"):
            raise ValueError(f"two_sided_grid must be 'signed', 'midrise' or None, got {two_sided_grid!r}")
        fk = {"device": device}
        lsq = quantizer == "lsq"

        def two_sided(bits) -> str:  # the grid of a quantizer whose input has either sign
            return two_sided_grid or symmetric_grid(bits)

        # LSQ weights per output channel (what PyTorch's QAT does for weights); paper weights
        # decide per tensor / per channel themselves (per channel only with a bit-width >= 8)
        self.weight_quant = MixedPrecisionFakeQuantize(
            weight_bits, grid=two_sided(weight_bits) if lsq else None, quantizer=quantizer, role="weight",
            per_channel_axis=0 if lsq else None,
            num_channels=out_channels if lsq else None, logits=weight_logits, backend=backend, factory_kwargs=fk)
        self.act_quant = None if act_bits is None else MixedPrecisionFakeQuantize(
            act_bits, quantizer=quantizer, role="act",
            grid="relu" if fuse_relu else (two_sided(act_bits) if act_signed else "unsigned"),
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

    def _mixed_weight(self) -> Tensor:
        """The mixed weight: the one precomputed_weights handed over, else this layer's own."""
        wq = self.weight_override
        return self.weight_quant(self.weight) if wq is None else wq

    def _quantized_input_and_weight(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        return (x if self.act_quant is None else self.act_quant(x)), self._mixed_weight()

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


def _cpu_conv_path(backend: Optional[str], x: Tensor, w: Tensor, bias: Optional[Tensor], conv_args) -> Optional[str]:
    """How a quantized conv on CPU tensors runs where PyTorch's CPU convolution (oneDNN) is slow on
    the few channels of a supernet (its set-up and layout reorders take milliseconds where the
    arithmetic takes a fraction of one): "depthwise" (one filter per channel) on the C++ kernels
    ``torch.ops.qdarts_C.depthwise_conv2d_*`` (csrc/cpu/depthwise_conv.cpp), "pointwise" (1x1, no
    padding, groups 1, any stride: the strided one on the input's pixel grid ``x[:, :, ::sh, ::sw]``)
    as batched matrix products ([Co, Ci] @ [N, Ci, Ho Wo]), else None (PyTorch's convolution). Only
    without bias, in fp32 and not under autocast, with the cpu backend, not traced by torch.compile,
    on a contiguous x (both compute in NCHW: a channels_last x would be copied and give an NCHW
    output, where PyTorch's convolution keeps the model's layout); ``QDARTS_FEW_CHANNEL_KERNELS=0``
    turns both off. Measured on the 2-core VM of bench/results
    (torch 2.13), forward and backward: [64, 4, 32, 32] -> 4 channels, 3.8 and 5.1 ms as a conv,
    0.07 and 0.15 ms as matrix products; stride 2 (a FactorizedReduce's), [128, 8, 8, 8] -> 4
    channels 0.08 and 0.37 ms against 0.03 and 0.08, [128, 32, 8, 8] -> 16 0.17 and 2.1 ms against
    0.09 and 0.21."""
    stride, padding, dilation, groups = conv_args
    # CPU kernels only: another device (meta included, which has no autocast state to ask) takes F.conv2d
    if (bias is not None or x.device.type != "cpu" or x.dim() != 4 or x.dtype != torch.float32
            or w.dtype != torch.float32 or not x.is_contiguous() or isinstance(padding, str)
            or torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu")):
        return None  # (x.dim() 3: an unbatched [C, H, W] input, which F.conv2d takes and these kernels do not)
    if groups > 1 and groups == x.shape[1] == w.shape[0] and w.shape[1] == 1:
        return "depthwise" if _backends.takes_cpu_only_kernels(backend, x.device, "depthwise_conv2d_forward") else None
    if groups == 1 and tuple(w.shape[2:]) == (1, 1) and tuple(padding) == (0, 0):
        return "pointwise" if _backends.takes_cpu_only_kernels(backend, x.device, None) else None
    return None


def _conv2d(x: Tensor, w: Tensor, bias: Optional[Tensor], conv_args, path: Optional[str]) -> Tensor:
    """``F.conv2d(x, w, bias, *conv_args)``, on the ``path`` :func:`_cpu_conv_path` chose (the autograd
    functions choose once in the forward and keep it for the backward's convs)."""
    if path == "depthwise":
        stride, padding, dilation, _ = conv_args
        return torch.ops.qdarts_C.depthwise_conv2d_forward(x, w, list(stride), list(padding), list(dilation))
    if path == "pointwise":
        x = _pointwise_grid(x, conv_args[0])
        n, _, h, width = x.shape  # bmm with the weight expanded (a view): matmul would fold the batch by copying
        # written into the output's storage rather than viewed: an autograd function's output that is a view
        # refuses in-place changes (a ReLU(inplace=True) after the conv, a residual y += x)
        y = x.new_empty((n, w.shape[0], h, width))
        torch.bmm(w.flatten(1).expand(n, -1, -1), x.reshape(n, x.shape[1], h * width),
                  out=y.view(n, w.shape[0], h * width))
        return y
    return nn.functional.conv2d(x, w, bias, *conv_args)


def _pointwise_grid(x: Tensor, stride) -> Tensor:
    """The pixels a 1x1 conv without padding reads at ``stride`` (a view): all of x at stride 1."""
    sh, sw = stride
    return x if sh == sw == 1 else x[:, :, ::sh, ::sw]


def _conv2d_backward(grad: Tensor, x: Tensor, w: Tensor, bias: Optional[Tensor], conv_args, path: Optional[str],
                     need_x: bool, need_w: bool, need_b: bool):
    """(dx, dw, dbias) of ``F.conv2d(x, w, bias, *conv_args)`` for ``grad``, None where not needed,
    on the forward's ``path`` (see :func:`_conv2d`)."""
    stride, padding, dilation, groups = conv_args
    if path == "depthwise":
        dx, dw = torch.ops.qdarts_C.depthwise_conv2d_backward(grad.contiguous(), x, w, list(stride), list(padding),
                                                              list(dilation), need_x, need_w)
        return (dx if need_x else None), (dw if need_w else None), None
    if path == "pointwise":
        xs = _pointwise_grid(x, stride)
        n, h, width = xs.shape[0], xs.shape[2], xs.shape[3]
        g = grad.reshape(n, w.shape[0], h * width)
        dx = None
        if need_x:
            dxs = torch.bmm(w.flatten(1).t().expand(n, -1, -1), g).view(xs.shape)
            if xs is x:
                dx = dxs
            else:  # the pixels the strided conv skips get no gradient
                dx = x.new_zeros(x.shape)
                _pointwise_grid(dx, stride).copy_(dxs)
        dw = None
        if need_w:
            dw = torch.bmm(g, xs.reshape(n, xs.shape[1], h * width).transpose(1, 2)).sum(0).view(w.shape)
        return dx, dw, None
    return torch.ops.aten.convolution_backward(grad, x, w, None if bias is None else [bias.shape[0]], stride, padding,
                                               dilation, False, [0, 0], groups, [need_x, need_w, need_b])


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)``; the dtype compared first, as a no-op ``to`` still costs a dispatched call (a few of
    them per conv and step add up in a host-bound step)."""
    return t if t.dtype == dtype else t.to(dtype)


def _quantized_conv_backward(grad, x, probs, scales, w, bias, quant_args, conv_args, conv_path, conv_dtype, needs,
                             xq=None):
    """(dx, dprobs, dscales, dw, dbias) of ``conv2d(mixed_fake_quant(x), w, bias)`` for ``grad``,
    None where ``needs`` (five flags, in that order) says not needed. The conv runs in
    ``conv_dtype`` (autocast's, as in the forward) on the forward's ``conv_path``; each gradient comes
    back in its input's dtype. ``xq``: the mixed activation where the caller has it, else recomputed
    from x."""
    need_x, need_p, need_s, need_w, need_b = needs
    need_xq = need_x or need_p or need_s
    if xq is None and (need_xq or need_w):
        xq = _ops._mfq_forward(x, probs, scales, *quant_args)
    stride, padding, dilation, groups = conv_args
    grad, conv_input = _cast(grad, conv_dtype), _cast(xq if xq is not None else x, conv_dtype)
    depthwise = _depthwise_weight_grad(quant_args[-1], conv_input, w, groups, grad) if need_w else None
    dxq = dw = db = None
    if need_xq or need_b or (need_w and depthwise is None):
        dxq, dw, db = _conv2d_backward(grad, conv_input, _cast(w, conv_dtype), bias, conv_args, conv_path, need_xq,
                                       need_w and depthwise is None, need_b)
    if depthwise is not None:
        dw = depthwise.depthwise_conv2d_weight_grad(grad.contiguous(), conv_input.contiguous(), w.shape[2:],
                                                    stride, padding, dilation)
    dx = dp = ds = None
    if need_xq:
        dx, dp, ds = _ops._mfq_backward(_cast(dxq, x.dtype), x, probs, scales, *quant_args, need_x, need_p, need_s)
    return dx, dp, ds, (_cast(dw, w.dtype) if need_w else None), (_cast(db, bias.dtype) if need_b else None)


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
        path = _cpu_conv_path(quant_args[-1], xq, w, bias, conv_args)
        y = _conv2d(xq, w, bias, conv_args, path)
        ctx.save_for_backward(x, probs, scales, w, bias)
        ctx.args = (quant_args, conv_args, path)
        ctx.conv_dtype = y.dtype
        return y

    @staticmethod
    def backward(ctx, grad):
        quant_args, conv_args, path = ctx.args
        needs, dt = ctx.needs_input_grad[:5], ctx.conv_dtype
        grads = _functorch.first_order(
            lambda g, *saved: _quantized_conv_backward(g, *saved, quant_args, conv_args, path, dt, needs),
            "QuantConv2d", quant_args[-1], grad, *ctx.saved_tensors)
        return (*grads, None, None)


class _ChainedQuantizedConv2d(torch.autograd.Function):
    """``conv2(mq2(conv1(mq1(x))))``, two quantized convs in a row (mq: mixed_fake_quant), keeping
    only x (and the parameters) for the backward: the backward recomputes the first conv's output
    h (one conv more: mq1(x) is recomputed for the first conv's backward anyway) instead of
    holding h from forward to backward, as the second conv alone would. In a DARTS separable or
    dilated conv (depthwise then pointwise) h is the depthwise output, 6 of the 14 activations an
    edge's candidates would otherwise keep: the CIFAR-size search step (batch 64) keeps 754 instead
    of 1111 MB (2^20 bytes) for its arch half, 697 instead of 1054 for its weight half.

    ``second_quant_args(h, s2)`` gives mq2's (scales, bits/grid/axis/backend) on h: s2 itself, or
    when s2 is None the paper activation scales scaled by h's max (they carry no gradient),
    computed once h exists."""

    @staticmethod
    def forward(ctx, x, p1, s1, w1, b1, p2, s2, w2, b2, quant1, conv1, conv2, second_quant_args):
        x1q = _ops._mfq_forward(x, p1, s1, *quant1)
        path1 = _cpu_conv_path(quant1[-1], x1q, w1, b1, conv1)
        h = _conv2d(x1q, w1, b1, conv1, path1)
        del x1q  # freed before the second conv, as the peak of a step holds it otherwise
        s2, quant2 = second_quant_args(h, s2)
        hq = _ops._mfq_forward(h, p2, s2, *quant2)
        path2 = _cpu_conv_path(quant2[-1], hq, w2, b2, conv2)
        y = _conv2d(hq, w2, b2, conv2, path2)
        ctx.save_for_backward(x, p1, s1, w1, b1, p2, s2, w2, b2)
        ctx.args = (quant1, conv1, path1, quant2, conv2, path2)
        ctx.conv_dtype = y.dtype
        return y

    @staticmethod
    def backward(ctx, grad):
        quant1, conv1, path1, quant2, conv2, path2 = ctx.args
        needs1, needs2 = ctx.needs_input_grad[:5], ctx.needs_input_grad[5:9]
        dt = ctx.conv_dtype

        def backward(grad, x, p1, s1, w1, b1, p2, s2, w2, b2):
            x1q = _ops._mfq_forward(x, p1, s1, *quant1)
            h = _conv2d(_cast(x1q, dt), _cast(w1, dt), None if b1 is None else _cast(b1, dt), conv1, path1)
            dh, dp2, ds2, dw2, db2 = _quantized_conv_backward(grad, h, p2, s2, w2, b2, quant2, conv2, path2, dt,
                                                              (any(needs1), *needs2))
            grads1 = _quantized_conv_backward(dh, x, p1, s1, w1, b1, quant1, conv1, path1, dt, needs1, xq=x1q) \
                if dh is not None else (None,) * 5
            return (*grads1, dp2, ds2, dw2, db2)

        grads = _functorch.first_order(backward, "QuantConv2d", quant1[-1], grad, *ctx.saved_tensors)
        return (*grads, None, None, None, None)


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


def chained_quant_convs(first: nn.Module, second: nn.Module, x: Tensor) -> Tensor:
    """``second(first(x))`` for two convs in a row; when both are :class:`QuantConv2d` on their
    eager training path, computed by one autograd function that keeps only x for the backward and
    recomputes first's output there (one conv more per backward, one activation less kept from
    forward to backward: see ``_ChainedQuantizedConv2d``). Otherwise, and where second's activation
    scales would need its input before it exists (LSQ scales still to be initialised, per-channel
    activation scales), the two calls in turn. Values and gradients are those of the two calls."""
    if not (isinstance(first, QuantConv2d) and isinstance(second, QuantConv2d)
            and first._keeps_only_its_input(x.dim()) and second._keeps_only_its_input(x.dim())
            and second.act_quant._scales_known_before_input()):
        return second(first(x))
    aq2 = second.act_quant
    h_hw = first._output_hw(x.shape[-2:])
    s2 = aq2._scales_before_input(torch.Size((x.shape[0], first.out_channels, *h_hw)))
    p1, s1, axis1 = first.act_quant._op_inputs(x)
    p2 = aq2.probs()

    def second_quant_args(h: Tensor, scales: Optional[Tensor]) -> Tuple[Tensor, tuple]:
        """(scales, quant args) of second's activation quantizer on h (see _ChainedQuantizedConv2d)."""
        scales = aq2._act_scales_of(h) if scales is None else scales
        return scales, second._quant_args(h, p2, scales, None)

    y = _ChainedQuantizedConv2d.apply(x, p1, s1, first._mixed_weight(), first.bias,
                                      p2, s2, second._mixed_weight(), second.bias,
                                      first._quant_args(x, p1, s1, axis1), first._conv_args(), second._conv_args(),
                                      second_quant_args)
    first._record_shapes(x.shape[-2:], h_hw)
    second._record_shapes(h_hw, y.shape[-2:])
    return y


#: The hooks of a module that its quantized layer takes over (torch.ao.quantization's swap_module takes the
#: forward ones): the dicts by which nn.Module calls them, with their flags.
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks")


def _share_parameters(q: nn.Module, source: nn.Module) -> nn.Module:
    """Make ``q`` use ``source``'s weight and bias Parameters (not copies), its other parameters and buffers,
    its hooks and its training mode. A weight that is not a Parameter is made by a hook from others
    (``torch.nn.utils.weight_norm``, ``spectral_norm``, ``prune``), which the quantized layer cannot compute
    as the original did: a ValueError."""
    if not isinstance(source.weight, nn.Parameter):
        raise ValueError("its weight is computed by a hook (torch.nn.utils.weight_norm, spectral_norm or prune): "
                         "take it out first, or use torch.nn.utils.parametrize, whose layers are left as they are")
    q.weight = source.weight
    q.bias = source.bias
    for name, p in source._parameters.items():
        if name not in ("weight", "bias"):
            q.register_parameter(name, p)
    for name, b in source._buffers.items():
        q.register_buffer(name, b, persistent=name not in source._non_persistent_buffers_set)
    for name in _HOOK_DICTS:
        if hasattr(source, name):  # the newer ones exist from some torch version on
            getattr(q, name).update(getattr(source, name))
    q._is_full_backward_hook = source._is_full_backward_hook
    q.train(source.training)
    return q


class QuantConv2d(_QuantizedLayer, nn.Conv2d):
    """``conv(act_quant(x), weight_quant(W))``: an ``nn.Conv2d`` with fake-quantized input and weight.

    Keyword arguments beyond ``nn.Conv2d``'s:
        weight_bits, act_bits: an int (fixed) or a tuple of 1..4 ints (mixed, searched); act_bits
            None leaves activations unquantized.
        quantizer: "paper" (HWGQ activations, Gaussian mid-rise weights, the official code) or
            "lsq" (learnable scales; weights per output channel); see ``quantizers``.
        act_signed: use a grid for inputs that can be negative: the signed one, or the mid-rise one
            where act_bits holds 1 (``quantizers.symmetric_grid``).
        two_sided_grid: "signed" or "midrise": the grid of the quantizers whose input has either
            sign (LSQ weights; activations with act_signed) instead of the one their bits choose;
            e.g. a layer retrained at 4 bits from a search over (1, 2, 4, 8), which quantized on
            the mid-rise grid.
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
                 backend: Optional[str] = None, two_sided_grid: Optional[str] = None) -> None:
        self._check_quantizer(quantizer)
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                           padding_mode, device, dtype)
        self._init_quantizers(out_channels, weight_bits, act_bits, quantizer, act_signed, fuse_relu, act_logits,
                              weight_logits, backend, device, two_sided_grid)
        kh, kw = self.kernel_size
        self._macs_per_output_pixel = out_channels * (in_channels // groups) * kh * kw
        self.input_hw: Optional[Tuple[int, int]] = None
        #: (bits, grid code, axis, backend) of the activation quantizer's op by kind of call (_quant_args)
        self._checked_quant_args: Dict[tuple, tuple] = {}

    def forward(self, x: Tensor) -> Tensor:
        if self._keeps_only_its_input(x.dim()):
            # eager training: keep only x for the backward (see _QuantizedInputConv2d); compiled
            # graphs leave what to keep to AOTAutograd's partitioner
            aq = self.act_quant
            probs, scales, axis = aq._op_inputs(x)
            y = _QuantizedInputConv2d.apply(x, probs, scales, self._mixed_weight(), self.bias,
                                            self._quant_args(x, probs, scales, axis), self._conv_args())
        else:
            xq, wq = self._quantized_input_and_weight(x)
            y = self._conv_off_training_path(xq, wq)
        self._record_shapes(x.shape[-2:], y.shape[-2:])
        return y

    def _conv_off_training_path(self, xq: Tensor, wq: Tensor) -> Tensor:
        """The conv of the quantized input and weight. Without a graph (evaluation, inference), with
        plain zero padding, outside eager_reference() and torch.func: the few-channel CPU kernels of the training
        path where they apply (_conv2d; they have no autograd of their own, hence only without a
        graph: PyTorch's convolution had taken 0.36 s of the 5 s of a digits search epoch on the
        2-core VM of bench/results, all in evaluation); else nn.Conv2d's."""
        if (torch.is_grad_enabled() or self.padding_mode != "zeros" or isinstance(self.padding, str)
                or _ops.plain_pytorch_layers()):
            return self._conv_forward(xq, wq, self.bias)
        conv_args = self._conv_args()
        return _conv2d(xq, wq, self.bias, conv_args,
                       _cpu_conv_path(self.weight_quant.backend, xq, wq, self.bias, conv_args))

    def _keeps_only_its_input(self, input_dim: int) -> bool:
        """Whether a forward on an input with ``input_dim`` dimensions takes the eager training path
        that keeps only the input for the backward (fake quantization on, plain zero padding)."""
        aq = self.act_quant
        return (aq is not None and aq._fake_quant_on and self.padding_mode == "zeros" and input_dim == 4
                and not isinstance(self.padding, str) and torch.is_grad_enabled()
                and not torch.compiler.is_compiling() and not _ops.plain_pytorch_layers())

    def _quant_args(self, x, probs: Tensor, scales: Tensor, axis: Optional[int]) -> tuple:
        """(bits, grid code, axis, backend) of the activation quantizer's op on x, validated in full once
        per kind of call (``ops._checked_mixed_fake_quant_args_of_a_kind``)."""
        aq = self.act_quant
        return _ops._checked_mixed_fake_quant_args_of_a_kind(self._checked_quant_args, x, probs, scales, aq.bits,
                                                             aq.grid, axis, aq.backend)

    def _conv_args(self) -> tuple:
        return self.stride, self.padding, self.dilation, self.groups

    def _output_hw(self, hw) -> Tuple[int, int]:
        """The output's (H, W) for an input of (H, W) ``hw`` (numeric padding)."""
        return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1
                     for n, p, d, k, s in zip(hw, self.padding, self.dilation, self.kernel_size, self.stride))

    def _record_shapes(self, input_hw, output_hw) -> None:
        set_plain_attribute(self, "input_hw", (input_hw[0], input_hw[1]))
        set_plain_attribute(self, "macs", self._macs_per_output_pixel * output_hw[0] * output_hw[1])

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
                 backend: Optional[str] = None, two_sided_grid: Optional[str] = None) -> None:
        self._check_quantizer(quantizer)
        nn.Linear.__init__(self, in_features, out_features, bias, device, dtype)
        self._init_quantizers(out_features, weight_bits, act_bits, quantizer, act_signed, fuse_relu, act_logits,
                              weight_logits, backend, device, two_sided_grid)

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
