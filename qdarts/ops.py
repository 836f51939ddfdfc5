"""The DARTS candidate operations, with every convolution a quantized composite convolution.

Each conv of an op is a :class:`qdarts_kernels.nn.QuantConv2d`: one ``mixed_fake_quant`` of its
input, one of its weight, one conv (EdMIPS composite convolution, DESIGN section 2). A
:class:`ConvMaker` builds the convs of one op in one of three modes:

- search: mixed precision over ``bits``; by default the convs of one op share a single pair of
  logits (gamma_a, gamma_w), as the official code does; ``share_gamma=False`` gives each conv its own;
- fixed: the bit pairs of a derived genotype, one (act_bits, weight_bits) pair per conv, in order;
- fp32: plain ``nn.Conv2d`` (the full-precision baseline of the same architecture).

Activation grid. A conv that reads a ReLU output takes the ReLU into its activation quantizer
(``fuse_relu``: grid "relu", the unsigned grid applied to relu(x); the same values and gradients as
the ReLU followed by the conv, without the ReLU's output kept for backward); the pointwise conv after
a depthwise conv reads a signed tensor and quantizes on a two-sided grid: the signed one, or the
mid-rise one where the searched bit set holds 1 (``quantizers.symmetric_grid``; the derived network
keeps the search's grid, as do LSQ weights). ``act_grid="official"``
reproduces the official code instead, which uses the unsigned (clamp-at-zero) grid everywhere and so
zeroes the negative half of every depthwise output.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from qdarts_kernels.nn import InputFreeAvgPool2d, InputKeepingMaxPool2d, OutputKeepingBatchNorm2d, chained_quant_convs
from qdarts_kernels.nn.quantizers import symmetric_grid

from .genotype import PRIMITIVES

__all__ = ["BitPairsError", "ConvMaker", "OPS", "build_op", "quant_convs", "set_layer_backend", "ACT_GRIDS",
           "QUANTIZERS", "FactorizedReduce", "ReLUConvBN", "ReLUConv2d"]

ACT_GRIDS = ("follow", "official")
QUANTIZERS = ("paper", "lsq")


class ReLUConv2d(nn.Conv2d):
    """``conv2d(relu(x))``: the full-precision counterpart of a QuantConv2d with ``fuse_relu``
    (the same parameter names as ``nn.Conv2d``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.relu(x))


def _quant_conv_class():
    from qdarts_kernels.nn import QuantConv2d

    return QuantConv2d


class BitPairsError(ValueError):
    """A genotype's bit pairs that do not fit an op: as many pairs as the op has convs, one per conv."""


class ConvMaker:
    """Builds the convolutions of one op (or one preprocessing layer); see the module docstring.

    Args:
        bits: search mode: the bit-width choices (tuple of 1..4 ints).
        pairs: fixed mode: one (act_bits, weight_bits) per conv, consumed in construction order.
        searched_bits: fixed mode: the search's bit set, whose two-sided grid the convs keep
            (None: the grid their own bits choose).
        fp32: fp32 mode.
        quantizer: "paper" | "lsq".  act_grid: "follow" | "official".
        share_gamma: search mode: one (gamma_a, gamma_w) pair for all convs of the op.
    """

    def __init__(self, *, bits: Optional[Sequence[int]] = None, pairs: Optional[Sequence[Tuple[int, int]]] = None,
                 fp32: bool = False, quantizer: str = "paper", act_grid: str = "follow", share_gamma: bool = True,
                 backend: Optional[str] = None, searched_bits: Optional[Sequence[int]] = None):
        if (bits is not None) + (pairs is not None) + bool(fp32) != 1:
            raise ValueError("ConvMaker needs exactly one of bits (search), pairs (fixed bits) or fp32=True")
        if quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {quantizer!r}")
        if act_grid not in ACT_GRIDS:
            raise ValueError(f"act_grid must be one of {ACT_GRIDS}, got {act_grid!r}")
        self.bits = tuple(bits) if bits is not None else None
        self.pairs = list(pairs) if pairs is not None else None
        self.fp32 = fp32
        self.quantizer = quantizer
        self.act_grid = act_grid
        self.backend = backend
        # fixed mode: the search's grid for two-sided inputs, which its bit set chose for every conv
        self.two_sided_grid = None if searched_bits is None else symmetric_grid(tuple(searched_bits))
        self.made = 0
        self.act_logits: Optional[nn.Parameter] = None
        self.weight_logits: Optional[nn.Parameter] = None
        if self.bits is not None and share_gamma and len(self.bits) > 1:
            self.act_logits = nn.Parameter(torch.zeros(len(self.bits)))
            self.weight_logits = nn.Parameter(torch.zeros(len(self.bits)))

    def __call__(self, cin: int, cout: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1, groups: int = 1, *, signed_input: bool = False,
                 relu_input: bool = False) -> nn.Conv2d:
        """One conv; ``signed_input``: its input can be negative (signed grid); ``relu_input``: it
        applies a ReLU to its input first (folded into the activation quantizer)."""
        index, self.made = self.made, self.made + 1
        if self.fp32:
            return (ReLUConv2d if relu_input else nn.Conv2d)(cin, cout, kernel_size, stride, padding, dilation, groups,
                                                             bias=False)
        if self.pairs is not None:
            if index >= len(self.pairs):
                raise BitPairsError(f"the genotype gives {len(self.pairs)} bit pairs for an op with more convs")
            act_bits, weight_bits = self.pairs[index]
            extra = {"two_sided_grid": self.two_sided_grid}
        else:
            act_bits = weight_bits = self.bits
            extra = {"act_logits": self.act_logits, "weight_logits": self.weight_logits}
        return _quant_conv_class()(
            cin, cout, kernel_size, stride, padding, dilation, groups, bias=False,
            weight_bits=weight_bits, act_bits=act_bits, quantizer=self.quantizer,
            act_signed=signed_input and self.act_grid == "follow", fuse_relu=relu_input, backend=self.backend,
            **extra,
        )

    def finish(self, module: nn.Module) -> nn.Module:
        """Register the shared logits on ``module`` (names gamma_a, gamma_w) and check the bit pairs were used up."""
        if self.pairs is not None and self.made != len(self.pairs):
            raise BitPairsError(f"the genotype gives {len(self.pairs)} bit pairs for an op with {self.made} convs")
        if self.act_logits is not None and self.made:  # ops without convs (pooling, identity) have no bits
            module.gamma_a = self.act_logits
            module.gamma_w = self.weight_logits
        return module


# The ReLUs of the DARTS ops below are folded into the conv after them (relu_input=True).


class ReLUConvBN(nn.Sequential):
    """ReLU, conv, batch norm."""

    def __init__(self, cin, cout, kernel_size, stride, padding, conv: ConvMaker, affine=True):
        super().__init__(conv(cin, cout, kernel_size, stride, padding, relu_input=True),
                         OutputKeepingBatchNorm2d(cout, affine=affine))


class _DepthwisePointwiseBN(nn.Sequential):
    """(depthwise conv, pointwise conv, batch norm) one or more times; each conv pair runs as
    :func:`qdarts_kernels.nn.chained_quant_convs` (the depthwise output is recomputed in the
    backward, not kept from forward to backward)."""

    def forward(self, x):
        for i in range(0, len(self), 3):
            x = self[i + 2](chained_quant_convs(self[i], self[i + 1], x))
        return x


class DilConv(_DepthwisePointwiseBN):
    """ReLU, dilated depthwise conv, pointwise conv, batch norm."""

    def __init__(self, cin, cout, kernel_size, stride, padding, dilation, conv: ConvMaker, affine=True):
        super().__init__(
            conv(cin, cin, kernel_size, stride, padding, dilation, groups=cin, relu_input=True),
            conv(cin, cout, 1, signed_input=True),
            OutputKeepingBatchNorm2d(cout, affine=affine),
        )


class SepConv(_DepthwisePointwiseBN):
    """Twice: ReLU, depthwise conv, pointwise conv, batch norm (the first depthwise conv strided)."""

    def __init__(self, cin, cout, kernel_size, stride, padding, conv: ConvMaker, affine=True):
        super().__init__(
            conv(cin, cin, kernel_size, stride, padding, groups=cin, relu_input=True),
            conv(cin, cin, 1, signed_input=True),
            OutputKeepingBatchNorm2d(cin, affine=affine),
            conv(cin, cin, kernel_size, 1, padding, groups=cin, relu_input=True),
            conv(cin, cout, 1, signed_input=True),
            OutputKeepingBatchNorm2d(cout, affine=affine),
        )


class FactorizedReduce(nn.Module):
    """Halve the resolution with two 1x1 stride-2 convs on pixel grids offset by one, concatenated
    (after a ReLU, folded into both convs)."""

    def __init__(self, cin, cout, conv: ConvMaker, affine=True):
        super().__init__()
        self.conv_1 = conv(cin, cout // 2, 1, 2, relu_input=True)
        self.conv_2 = conv(cin, cout - cout // 2, 1, 2, relu_input=True)
        self.bn = OutputKeepingBatchNorm2d(cout, affine=affine)

    def forward(self, x):
        # pad the shifted grid by one so both halves have ceil(H/2) x ceil(W/2) for odd sizes too
        # (padding with zeros commutes with the ReLU that conv_2 applies)
        shifted = F.pad(x[:, :, 1:, 1:], (0, 1, 0, 1))
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(shifted)], dim=1))


class Zero(nn.Module):
    def __init__(self, stride):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


OPS: Dict[str, Callable[..., nn.Module]] = {
    "none": lambda C, stride, conv, affine: Zero(stride),
    "avg_pool_3x3": lambda C, stride, conv, affine: InputFreeAvgPool2d(3, stride=stride, padding=1,
                                                                       count_include_pad=False),
    "max_pool_3x3": lambda C, stride, conv, affine: InputKeepingMaxPool2d(3, stride=stride, padding=1),
    "skip_connect": lambda C, stride, conv, affine: (
        nn.Identity() if stride == 1 else FactorizedReduce(C, C, conv, affine=affine)),
    "sep_conv_3x3": lambda C, stride, conv, affine: SepConv(C, C, 3, stride, 1, conv, affine=affine),
    "sep_conv_5x5": lambda C, stride, conv, affine: SepConv(C, C, 5, stride, 2, conv, affine=affine),
    "dil_conv_3x3": lambda C, stride, conv, affine: DilConv(C, C, 3, stride, 2, 2, conv, affine=affine),
    "dil_conv_5x5": lambda C, stride, conv, affine: DilConv(C, C, 5, stride, 4, 2, conv, affine=affine),
}


def build_op(name: str, C: int, stride: int, conv: ConvMaker, affine: bool = True) -> nn.Module:
    """Op ``name`` on C channels; its convs come from ``conv``, whose shared logits it then owns."""
    if name not in OPS:
        raise ValueError(f"unknown op {name!r}; the candidates are {', '.join(PRIMITIVES)}")
    return conv.finish(OPS[name](C, stride, conv, affine))


def set_layer_backend(module: nn.Module, backend: Optional[str]) -> None:
    """The batch norms and pools inside ``module`` take the ops backend ``backend`` (the quantized convs
    get theirs from their ConvMaker): ``--backend reference`` then runs none of the C++ CPU kernels."""
    for m in module.modules():
        if isinstance(m, (OutputKeepingBatchNorm2d, InputKeepingMaxPool2d, InputFreeAvgPool2d)):
            m.backend = backend


def quant_convs(module: nn.Module) -> List[nn.Module]:
    """The QuantConv2d modules inside ``module``, in module order."""
    from qdarts_kernels.nn import QuantConv2d

    return [m for m in module.modules() if isinstance(m, QuantConv2d)]
