"""Max pooling that keeps its input, not the argmax indices, for backward.

``nn.MaxPool2d`` keeps its input and an int64 index per output element for backward: twice the
bytes of an fp32 output on top of the input. :class:`InputKeepingMaxPool2d` keeps only the input and
recomputes the indices in the backward (one more pooling pass over the input), then calls PyTorch's
own ``max_pool2d_with_indices_backward``: the same gradient, bit for bit. Where the input is kept
anyway (in a DARTS edge: by the skip connection's output in the mixed sum, by the average pool,
which keeps its input too), the indices were all the pooling added. The price is the second
pooling pass: on a GPU a small kernel; on the 2-core CPU of bench/results, where PyTorch's max pool
takes ~0.8 ms per 64K-element 3x3 pool, about 5% of a CIFAR-size search step at batch 16 (measured
side by side), for 7% less memory kept. It is plain ``nn.MaxPool2d``
without a gradient to compute, with ``return_indices=True``, and inside
:func:`qdarts_kernels.eager_reference` (the plain-PyTorch baseline).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from .. import ops as _ops

__all__ = ["InputKeepingMaxPool2d"]


class _MaxPool2dKeepingInput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding, dilation, ceil_mode):
        ctx.save_for_backward(x)
        ctx.args = (kernel_size, stride, padding, dilation, ceil_mode)
        return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        kernel_size, stride, padding, dilation, ceil_mode = ctx.args
        with torch.no_grad():
            _, indices = F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices=True)
        dx = torch.ops.aten.max_pool2d_with_indices_backward(grad, x, kernel_size, stride, padding, dilation,
                                                             ceil_mode, indices)
        return dx, None, None, None, None, None


class InputKeepingMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` that keeps its input and no argmax indices for backward (see the module
    docstring)."""

    def forward(self, x: Tensor) -> Tensor:
        if self.return_indices or not (torch.is_grad_enabled() and x.requires_grad) or _ops.eager_reference_active():
            return super().forward(x)
        stride = self.stride if self.stride is not None else self.kernel_size
        return _MaxPool2dKeepingInput.apply(x, list(_pair(self.kernel_size)), list(_pair(stride)),
                                            list(_pair(self.padding)), list(_pair(self.dilation)), self.ceil_mode)
