"""The ``cpu`` and ``cuda`` backends: adapters over the compiled extension ``qdarts_kernels._C``.

The extension registers its ops once (``csrc/ops.cpp``, namespace ``qdarts_C``) with one
implementation per device; the two backends therefore share these adapters and differ only in the
device they accept. A gradient that was not requested comes back from C++ as a 0-element tensor.
"""

from __future__ import annotations

import functools
import importlib
from types import SimpleNamespace

import torch

from ._backends import loop_grouped_backward, loop_grouped_forward

# Loading the library runs its static registrations: torch.ops.qdarts_C.* exist afterwards.
importlib.import_module("qdarts_kernels._C")

_ops = torch.ops.qdarts_C


def _none_if_empty(t, needed: bool):
    return t if needed else None


def mixed_fake_quant_forward(x, probs, scales, bits, grid, axis):
    return _ops.mixed_fake_quant_forward(x, probs, scales, list(bits), grid, axis)


def mixed_fake_quant_backward(grad, x, probs, scales, bits, grid, axis, need_dx, need_dprobs, need_dscales):
    dx, dp, ds = _ops.mixed_fake_quant_backward(
        grad, x, probs, scales, list(bits), grid, axis, need_dx, need_dprobs, need_dscales
    )
    return _none_if_empty(dx, need_dx), _none_if_empty(dp, need_dprobs), _none_if_empty(ds, need_dscales)


def mixed_op_sum_forward(outputs, weights):
    return _ops.mixed_op_sum_forward(outputs, weights)


def mixed_op_sum_backward(grad, outputs, weights, need_doutputs, need_dweights):
    douts, dw = _ops.mixed_op_sum_backward(grad, outputs, weights, need_doutputs, need_dweights)
    return (list(douts) if need_doutputs else None), _none_if_empty(dw, need_dweights)


def mixed_fake_quant_grouped_backward_cuda(grads, xs, probs, scales, bits, grid, axes, need_dx, need_dprobs,
                                           need_dscales):
    dxs, dp, ds = _ops.mixed_fake_quant_grouped_backward(
        grads, xs, probs, scales, list(bits), grid, list(axes), need_dx, need_dprobs, need_dscales
    )
    return (list(dxs) if need_dx else None), _none_if_empty(dp, need_dprobs), _none_if_empty(ds, need_dscales)


def mixed_fake_quant_grouped_forward_cuda(xs, probs, scales, bits, grid, axes):
    return list(_ops.mixed_fake_quant_grouped_forward(xs, probs, scales, list(bits), grid, list(axes)))


def _has_cuda_kernels() -> bool:
    return bool(_ops.has_cuda_kernels())


def backend(name: str) -> SimpleNamespace:
    """The backend object for ``name`` ("cpu" or "cuda"); raises if that part was not built."""
    if name == "cuda":
        if not _has_cuda_kernels():
            raise ImportError("qdarts_kernels._C was built without its CUDA kernels")
        if not torch.cuda.is_available():
            raise ImportError("no CUDA device is available")
    if name == "cuda":
        grouped_forward = mixed_fake_quant_grouped_forward_cuda
        grouped_backward = mixed_fake_quant_grouped_backward_cuda
    else:
        # the CPU kernels have no grouped op: one call per tensor costs no launch on a CPU
        grouped_forward = functools.partial(loop_grouped_forward, mixed_fake_quant_forward)
        grouped_backward = functools.partial(loop_grouped_backward, mixed_fake_quant_backward)
    return SimpleNamespace(
        # The C++ autograd of csrc/autograd.cpp, for the CPU only so far: it calls the same raw ops
        # as the Python autograd, but no GPU has run it yet (the cuda backend keeps the Python one).
        mixed_op_sum_with_autograd=_ops.mixed_op_sum if name == "cpu" else None,
        mixed_fake_quant_forward=mixed_fake_quant_forward,
        mixed_fake_quant_backward=mixed_fake_quant_backward,
        mixed_op_sum_forward=mixed_op_sum_forward,
        mixed_op_sum_backward=mixed_op_sum_backward,
        mixed_fake_quant_grouped_forward=grouped_forward,
        mixed_fake_quant_grouped_backward=grouped_backward,
    )
