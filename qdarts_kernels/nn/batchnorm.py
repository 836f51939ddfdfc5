"""Batch normalisation that keeps its output, not its input, for backward.

In training, a batch norm without affine parameters computes ``o = (x - mean) * invstd`` per
channel over (N, H, W), and its input gradient needs only ``o`` and ``invstd``::

    dx = invstd * (g - mean(g) - o * mean(g * o))        (means per channel over N, H, W)

which is PyTorch's own batch-norm backward evaluated at ``o`` instead of ``(x - mean) * invstd``:
``native_batch_norm_backward`` with input ``o``, mean 0, inverse std 1 and ``invstd`` in the place of
the affine weight. Keeping ``o`` instead of ``x`` changes nothing where ``x`` is used by nothing
else, and saves a whole activation where ``o`` is kept anyway: in a DARTS supernet each candidate
op ends with such a batch norm (affine=False in the search), and ``mixed_op_sum`` keeps the
candidates' outputs for the gradient of alpha. Plain ``nn.BatchNorm2d`` keeps both the convolution
output it normalises and, through the mixed sum, its output.

:class:`OutputKeepingBatchNorm2d` is an ``nn.BatchNorm2d`` (same parameters, buffers and state
dict) that takes this path in training with batch statistics and affine=False, and is plain
``nn.BatchNorm2d`` otherwise, inside :func:`qdarts_kernels.eager_reference` (the plain-PyTorch
baseline) and under torch.func's transforms. Running statistics are updated as by ``nn.BatchNorm2d``.

On that path the statistics and the normalisation come from one of three sets of kernels, all
with the maths of :mod:`qdarts_kernels.triton.batch_norm`:

- the Triton kernels of :mod:`qdarts_kernels.triton.batch_norm`, which split each channel over many
  programs: on CUDA tensors with backend ``triton``, ``cuda`` or the automatic choice (the fused GPU
  backends; there is no CUDA C++ batch norm), and on CPU tensors with backend ``triton`` under
  ``TRITON_INTERPRET=1`` (the tests). PyTorch's CUDA kernels reduce a channel in one thread block,
  which leaves most of a GPU idle on tensors with few channels;
- the C++ CPU kernels ``torch.ops.qdarts_C.batch_norm_train_forward/backward``
  (``csrc/cpu/batch_norm.cpp``): fp32 CPU tensors with backend ``cpu`` or the automatic choice
  there. PyTorch's CPU forward took 4-5x its backward's time on the supernet's few-channel planes
  (a [64, 4, 32, 32] batch: about 250 us against 50 us; these kernels take about 41 and 38 us);
- PyTorch's ``native_batch_norm`` and its backward otherwise: backend ``reference``, fp64 (and
  fp16/bf16 on CPU), under ``torch.compile`` (which generates its own), for a second derivative
  (create_graph=True), and with ``QDARTS_FEW_CHANNEL_KERNELS=0``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Dict, Iterator, Optional

import torch
from torch import Tensor, nn

from .. import _backends
from .. import ops as _ops

__all__ = ["OutputKeepingBatchNorm2d", "counted_together"]

#: Within :func:`counted_together`: the batches each OutputKeepingBatchNorm2d has seen so far.
_deferred_counts: Optional[Dict["OutputKeepingBatchNorm2d", int]] = None


@contextmanager
def counted_together() -> Iterator[None]:
    """Within the block, the :class:`OutputKeepingBatchNorm2d` modules that normalise a training
    batch count it in ``num_batches_tracked`` when the block ends, all with one multi-tensor add
    per count (``torch._foreach_add_``), instead of one ``add_`` launch each: a CIFAR-size supernet
    has some 1900 batch norms. The counts are those of the modules' own forwards. Nested blocks
    count in the outermost; a block left by an exception counts what ran."""
    global _deferred_counts
    if _deferred_counts is not None:
        yield
        return
    _deferred_counts = counts = {}
    try:
        yield
    finally:
        _deferred_counts = None
        by_count: Dict[int, list] = {}
        for module, n in counts.items():
            by_count.setdefault(n, []).append(module.num_batches_tracked)
        for n, tensors in by_count.items():
            torch._foreach_add_(tensors, n)


_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _fused_kernels(backend: Optional[str], x: Tensor, running_mean: Tensor):
    """The kernels this call takes (see the module docstring): the Triton module, the C++ CPU ops
    (``torch.ops.qdarts_C``, same functions), or None for PyTorch's."""
    # a channels_last x takes PyTorch's kernels, which keep its layout (ours compute in NCHW)
    if running_mean.dtype != torch.float32 or not x.is_contiguous() or torch.compiler.is_compiling():
        return None
    if x.dtype in _TRITON_DTYPES and _backends.takes_triton_only_kernels(backend, x.device):
        from ..triton import batch_norm

        return batch_norm
    if x.dtype == torch.float32 and _backends.takes_cpu_only_kernels(backend, x.device, "batch_norm_train_forward"):
        return torch.ops.qdarts_C
    return None


class _BatchNormKeepingOutput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, running_mean, running_var, momentum: float, eps: float, unit_stats, kernels):
        if kernels is not None:
            out, invstd = kernels.batch_norm_train_forward(x.contiguous(), running_mean, running_var, momentum, eps)
        else:
            out, _, invstd = torch.native_batch_norm(x, None, None, running_mean, running_var, True, momentum, eps)
        ctx.save_for_backward(out, invstd, unit_stats)
        ctx.eps = eps
        ctx.kernels = kernels
        return out

    @staticmethod
    def backward(ctx, grad):
        out, invstd, unit_stats = ctx.saved_tensors
        # under create_graph=True PyTorch's backward, made of differentiable ops, gives the second
        # derivative; the fused kernels give first derivatives only
        if ctx.kernels is not None and not torch.is_grad_enabled():
            dx = ctx.kernels.batch_norm_train_backward(grad.contiguous(), out, invstd)
            return dx, None, None, None, None, None, None
        if unit_stats.dtype == invstd.dtype and unit_stats.device == invstd.device:
            mean, inv = unit_stats[0], unit_stats[1]
        else:  # a module cast to another dtype than its statistics' (fp64 input, or .half() on the module)
            mean, inv = torch.zeros_like(invstd), torch.ones_like(invstd)
        dx, _, _ = torch.ops.aten.native_batch_norm_backward(
            grad, out, invstd, None, None, mean, inv, True, ctx.eps, [True, False, False])
        return dx, None, None, None, None, None, None


class OutputKeepingBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training forward without affine parameters keeps its output, not
    its input, for backward (see the module docstring): an in-place op on that output, such as a
    following ``nn.ReLU(inplace=True)``, then fails the backward (autograd's "modified by an inplace
    operation"). ``backend`` (an attribute too): the ops backend whose kernels it takes on that path,
    None for the automatic choice."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, backend: Optional[str] = None) -> None:
        _backends.check_name(backend)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.backend = backend
        # mean 0 and inverse std 1 of the normalised output, made once rather than in every backward
        # (two launches per batch norm per step, over a thousand in a CIFAR-size supernet step)
        unit = torch.stack([torch.zeros(num_features, device=device), torch.ones(num_features, device=device)])
        self.register_buffer("_unit_stats", unit, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        # with batch statistics, the same kernels (the same bits) whether or not x needs a gradient:
        # the preprocessing of a supernet's first cell has none in an arch step, where the weights
        # are out of autograd (and without one the autograd function keeps nothing)
        # (an empty batch, which torch.native_batch_norm refuses, to nn.BatchNorm2d's own case for it)
        if (not self.training or self.affine or not self.track_running_stats or self.momentum is None
                or x.numel() == 0 or _ops.plain_pytorch_layers()):
            return super().forward(x)
        self._check_input_dim(x)
        # F.batch_norm's checks in training, which this path does not go through
        if x.shape[0] * math.prod(x.shape[2:]) == 1:  # one value per channel has no variance
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(x.shape)}")
        if not self.eps > 0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {self.eps}")
        if _deferred_counts is None or torch.compiler.is_compiling():
            self.num_batches_tracked.add_(1)
        else:
            _deferred_counts[self] = _deferred_counts.get(self, 0) + 1
        kernels = _fused_kernels(self.backend, x, self.running_mean)
        return _BatchNormKeepingOutput.apply(x, self.running_mean, self.running_var, self.momentum, self.eps,
                                             self._unit_stats, kernels)
