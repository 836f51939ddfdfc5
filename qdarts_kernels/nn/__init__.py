"""Drop-in quantization-aware-training modules built only on the public ops of qdarts_kernels.

- :class:`MixedPrecisionFakeQuantize`: softmax-weighted mixture of fake quantizers over 1..4
  bit-widths (LSQ learnable scales, or the paper's HWGQ / Gaussian quantizers); one fused op.
- :class:`FakeQuantize`: single bit-width LSQ quantizer for ``torch.ao.quantization`` QConfigs.
- :class:`QuantConv2d`, :class:`QuantLinear`: EdMIPS composite layers (fixed or mixed bits).
- :func:`chained_quant_convs`: two QuantConv2d in a row keeping only the first one's input for
  backward (the second's input recomputed there).
- :func:`quantize_`: swap a model's ``nn.Conv2d`` / ``nn.Linear`` layers in place.
- :class:`GroupedWeightQuantizer`, :func:`precomputed_weights`: the mixed weights of many layers
  from one grouped launch, handed to the layers for their next forwards.
- :class:`GroupedBitProbs`, :func:`precomputed_probs`: the bit probabilities of many quantizers
  from one softmax, handed to the quantizers likewise.
- :class:`OutputKeepingBatchNorm2d`: ``nn.BatchNorm2d`` that keeps its output, not its input, for
  backward (training, affine=False): one activation less where the output is kept anyway;
  :func:`counted_together`: their batch counts in one launch.
- :class:`InputKeepingMaxPool2d`: ``nn.MaxPool2d`` that keeps no argmax indices for backward;
  :class:`InputFreeAvgPool2d`: ``nn.AvgPool2d`` that keeps nothing (both on C++ kernels on CPU).
- :func:`shared_activation_scales`: paper activation quantizers of one configuration on the same
  input compute its scales once.
"""

from .batchnorm import OutputKeepingBatchNorm2d, counted_together
from .convert import quantize_
from .grouped import GroupedBitProbs, GroupedWeightQuantizer, precomputed_probs
from .pooling import InputFreeAvgPool2d, InputKeepingMaxPool2d
from .layers import QuantConv2d, QuantLinear, chained_quant_convs, precomputed_weights
from .quantizers import GAUSSIAN_STEPS, HWGQ_STEPS, FakeQuantize, MixedPrecisionFakeQuantize, shared_activation_scales

__all__ = [
    "MixedPrecisionFakeQuantize",
    "FakeQuantize",
    "QuantConv2d",
    "QuantLinear",
    "chained_quant_convs",
    "quantize_",
    "GroupedWeightQuantizer",
    "GroupedBitProbs",
    "precomputed_probs",
    "precomputed_weights",
    "OutputKeepingBatchNorm2d",
    "counted_together",
    "InputFreeAvgPool2d",
    "InputKeepingMaxPool2d",
    "shared_activation_scales",
    "HWGQ_STEPS",
    "GAUSSIAN_STEPS",
]
