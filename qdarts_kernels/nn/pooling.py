"""Pools that keep less for backward: a max pool without argmax indices, an average pool with nothing.

``nn.MaxPool2d`` keeps its input and an int64 index per output element for backward: twice the
bytes of an fp32 output on top of the input. :class:`InputKeepingMaxPool2d` keeps only the input and
recomputes the indices in the backward (one more pooling pass over the input), then calls PyTorch's
own ``max_pool2d_with_indices_backward``: the same gradient, bit for bit. Where the input is kept
anyway (in a DARTS edge: by the skip connection's output in the mixed sum), the indices were all
the pooling added. :class:`InputFreeAvgPool2d` keeps nothing on its CPU path (its backward needs
only the input's size). The price is the second
pooling pass: on a GPU a small kernel; on CPU (fp32, the cpu backend) the pool and its backward
run on C++ kernels that recompute the max in the backward anyway (no index tensor at all) and give
PyTorch's values and gradients bit for bit in a fraction of its CPU kernel's time (also without a
gradient to compute). It is plain ``nn.MaxPool2d`` with ``return_indices=True``, without a gradient
to compute off that CPU path, inside :func:`qdarts_kernels.eager_reference` (the plain-PyTorch
baseline) and under torch.func's transforms. Both take ``backend`` (an attribute too), the ops backend
whose kernels they take: the C++ ones with ``cpu`` or the automatic choice (None), PyTorch's else.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from .. import _backends
from .. import ops as _ops

__all__ = ["InputFreeAvgPool2d", "InputKeepingMaxPool2d"]


def _takes_cpu_kernels(x: Tensor, op: str, kernel_size, stride, padding, dilation, ceil_mode: bool,
                       backend: Optional[str]) -> bool:
    """Whether this pool runs on the C++ CPU kernels ``torch.ops.qdarts_C.<op>`` (csrc/cpu/pooling.cpp:
    PyTorch's values and gradients bit for bit, in a fraction of the time of its CPU kernels, which
    check bounds per output and, for the max pool, compute an int64 index per output): fp32 4-D CPU
    tensors, backend ``cpu`` (or None, the automatic choice: cpu on CPU), not traced by
    torch.compile, floor mode or a ceil mode that adds no window (the PC-DARTS bypass's 2x2
    stride-2 pool of an even plane), a
    contiguous x (the kernels compute in NCHW: a channels_last x takes PyTorch's, which keep its
    layout); ``QDARTS_FEW_CHANNEL_KERNELS=0`` keeps PyTorch's."""
    return (x.dtype == torch.float32 and x.dim() == 4 and x.is_contiguous() and not torch.compiler.is_compiling()
            and (not ceil_mode or _ceil_adds_no_window(x.shape[2:], kernel_size, stride, padding, dilation))
            and _backends.takes_cpu_only_kernels(backend, x.device, op))


def _ceil_adds_no_window(size, kernel_size, stride, padding, dilation) -> bool:
    """Whether ceil_mode=True gives the floor mode's output size (PyTorch's rule: a window the ceiling
    adds must start inside the input or its left padding), along every spatial dimension."""
    for n, k, s, p, d in zip(size, kernel_size, stride, padding, dilation):
        span = n + 2 * p - d * (k - 1) - 1
        ceil = -(-span // s) + 1
        if (ceil - 1) * s >= n + p:
            ceil -= 1
        if ceil != span // s + 1:
            return False
    return True


class _MaxPool2dKeepingInput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding, dilation, ceil_mode, backend):
        ctx.save_for_backward(x)
        ctx.args = (kernel_size, stride, padding, dilation, ceil_mode)
        ctx.backend = backend
        if _takes_cpu_kernels(x, "max_pool2d_forward", *ctx.args, backend):
            return torch.ops.qdarts_C.max_pool2d_forward(x, kernel_size, stride, padding, dilation)
        return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        kernel_size, stride, padding, dilation, ceil_mode = ctx.args
        # under create_graph=True PyTorch's backward, differentiable, gives the second derivative
        if (not torch.is_grad_enabled() and _takes_cpu_kernels(x, "max_pool2d_backward", *ctx.args, ctx.backend)
                and grad.dtype == torch.float32):
            return (torch.ops.qdarts_C.max_pool2d_backward(grad, x, kernel_size, stride, padding, dilation),
                    None, None, None, None, None, None)
        with torch.no_grad():
            _, indices = F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices=True)
        dx = torch.ops.aten.max_pool2d_with_indices_backward(grad, x, kernel_size, stride, padding, dilation,
                                                             ceil_mode, indices)
        return dx, None, None, None, None, None, None


class InputKeepingMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` that keeps its input and no argmax indices for backward (see the module
    docstring)."""

    backend: Optional[str] = None  # a module pickled whole before it had the attribute: the automatic choice

    def __init__(self, *args, backend: Optional[str] = None, **kwargs) -> None:
        _backends.check_name(backend)
        super().__init__(*args, **kwargs)
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        if self.return_indices or _ops.plain_pytorch_layers():
            return super().forward(x)
        stride = self.stride if self.stride is not None else self.kernel_size
        args = (list(_pair(self.kernel_size)), list(_pair(stride)), list(_pair(self.padding)),
                list(_pair(self.dilation)))
        if not (torch.is_grad_enabled() and x.requires_grad):
            # no gradient to compute (e.g. the arch step's frozen first cells): the C++ forward
            # still beats PyTorch's, which writes an index per output
            if _takes_cpu_kernels(x, "max_pool2d_forward", *args, self.ceil_mode, self.backend):
                return torch.ops.qdarts_C.max_pool2d_forward(x, *args)
            return super().forward(x)
        return _MaxPool2dKeepingInput.apply(x, *args, self.ceil_mode, self.backend)


class _AvgPool2dKeepingNothing(torch.autograd.Function):
    """Average pooling on the C++ CPU kernels; its backward needs only the input's size."""

    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding, count_include_pad):
        ctx.args = (list(x.shape), kernel_size, stride, padding, count_include_pad)
        return torch.ops.qdarts_C.avg_pool2d_forward(x, kernel_size, stride, padding, count_include_pad)

    @staticmethod
    def backward(ctx, grad):
        input_size, kernel_size, stride, padding, count_include_pad = ctx.args
        if torch.is_grad_enabled():  # create_graph=True: PyTorch's differentiable backward
            # reads only the size of its input argument: a zero expanded to it, nothing allocated
            shape_only = grad.new_zeros(()).expand(input_size)
            dx = torch.ops.aten.avg_pool2d_backward(grad, shape_only, kernel_size, stride, padding, False,
                                                    count_include_pad, None)
            return dx, None, None, None, None
        return torch.ops.qdarts_C.avg_pool2d_backward(grad.float(), *ctx.args), None, None, None, None


class InputFreeAvgPool2d(nn.AvgPool2d):
    """``nn.AvgPool2d`` that, on fp32 CPU tensors (the cpu backend, floor mode or a ceil mode that
    adds no window, no ``divisor_override``), runs on C++ kernels with PyTorch's values and gradients bit for bit and
    keeps no tensor for backward (PyTorch's keeps its input, for the size). Plain ``nn.AvgPool2d``
    otherwise, inside :func:`qdarts_kernels.eager_reference` (the plain-PyTorch baseline) and under torch.func."""

    backend: Optional[str] = None  # a module pickled whole before it had the attribute: the automatic choice

    def __init__(self, *args, backend: Optional[str] = None, **kwargs) -> None:
        _backends.check_name(backend)
        super().__init__(*args, **kwargs)
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        stride = self.stride if self.stride is not None else self.kernel_size
        args = (list(_pair(self.kernel_size)), list(_pair(stride)), list(_pair(self.padding)))
        if (self.divisor_override is not None or _ops.plain_pytorch_layers()
                or not _takes_cpu_kernels(x, "avg_pool2d_forward", *args, [1, 1], self.ceil_mode, self.backend)):
            return super().forward(x)
        return _AvgPool2dKeepingNothing.apply(x, *args, self.count_include_pad)
