"""torch.func and forward-mode AD over the fused ops: what their autograd functions share.

torch.func's transforms run an ``autograd.Function`` only when it defines ``setup_context`` (the
ops' functions do), and ``vmap`` only with a rule of its own: the fused kernels read raw memory, so
they cannot take vmap's batched tensors. The ops' rules put the batch into the tensors' own
dimensions where that is exact (``mixed_fake_quant`` is elementwise in x for given probs and scales:
one call on the whole batch), and otherwise call the op once per sample (:func:`per_sample`).

torch.func's reverse-mode transforms record a graph through every backward (``create_graph=True``),
and ``jacrev`` vmaps the backward over its basis vectors. The fused backwards therefore run as an
autograd node of their own (:func:`first_order`) whenever a graph is being recorded: their results
can be used as any gradient, and only differentiating them again is refused, with a clear error,
at the moment it is asked for (the kernels compute first derivatives only); that node's vmap rule
is a loop over the samples.

Forward mode (``jvp``, ``jacfwd``, ``torch.autograd.forward_ad``): each function's ``jvp`` is the
reference's formula in torch ops, the transpose of its backward, so that ``jacfwd`` and ``jacrev`` give
one Jacobian; the inputs are saved for it only while forward mode records (:func:`forward_ad_active`).

Outside torch.func the ops call each function's eager form (:class:`AutogradForms`): the same code
without the per-call cost that ``setup_context`` brings to ``Function.apply``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, Tuple

import torch
from torch import Tensor

_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def active() -> bool:
    """Whether the caller runs under a torch.func transform (grad, vjp, jacrev, vmap, ...); False while
    torch.compile traces (which takes the custom ops; is_compiling() first, as Dynamo folds it to a
    constant and would not trace the query after it)."""
    return not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()


def forward_ad_active() -> bool:
    """Whether forward-mode AD records tangents now (torch.func's jvp and jacfwd, forward_ad.dual_level):
    only then do the functions save their inputs for ``jvp`` (saved for it, they would be kept with the
    graph as long as it lives)."""
    return torch.autograd.forward_ad._current_level >= 0


def transforming() -> bool:
    """Whether a torch.func transform runs or forward-mode AD records tangents: then the ops must go
    through their autograd functions (their vmap rules, their jvp), never straight to a kernel."""
    return active() or forward_ad_active()


class AutogradForms:
    """An autograd function written for torch.func (``forward`` without ctx, ``setup_context``, ``jvp``,
    a vmap rule; the class given, used as a decorator) in the three forms that :meth:`apply` picks from:

    - ``functorch``, the class itself, under torch.func;
    - ``traced`` while torch.compile traces: without ``jvp`` and the vmap rule, as Dynamo refuses to
      trace a function with a custom ``jvp`` (it reads the forms from this plain object, not from
      attributes of a Function class, which it does not follow);
    - ``eager`` elsewhere: the same function in the older style (ctx in ``forward``).
      ``Function.apply`` binds every call's arguments to ``forward``'s signature
      (``inspect.signature``) when ``setup_context`` is defined: a mixed_fake_quant of 64 elements on
      the cpu backend took 35 us through it and 12 us through this form (forward and backward: 131
      and 90 us; the 2-core VM of bench/results), and a search step makes hundreds of calls.

    The forms keep the class's name, which profiles show for their calls."""

    def __init__(self, cls):
        def forward(ctx, *args):
            output = cls.forward(*args)
            cls.setup_context(ctx, args, output)
            return output

        common = {"__doc__": cls.__doc__, "backward": staticmethod(cls.backward)}
        self.functorch = cls
        self.eager = type(cls.__name__, (torch.autograd.Function,),
                          {**common, "forward": staticmethod(forward), "jvp": staticmethod(cls.jvp)})
        self.traced = type(cls.__name__, (torch.autograd.Function,),
                           {**common, "forward": staticmethod(cls.forward),
                            "setup_context": staticmethod(cls.setup_context)})

    def apply(self, *args):
        """The function applied to ``args``, in the form the caller's context takes."""
        if torch.compiler.is_compiling():
            return self.traced.apply(*args)
        if torch._C._are_functorch_transforms_active():
            return self.functorch.apply(*args)
        return self.eager.apply(*args)


def unwrapped(t: Tensor) -> Tensor:
    """The plain tensor below torch.func's wrappers of ``t`` (under vmap: all the samples' values)."""
    while _is_wrapped(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def per_sample(apply: Callable, info: Any, in_dims: Sequence, args: Sequence) -> Tuple[Any, Any]:
    """vmap by a loop: ``apply`` on each sample (the batched ``args`` indexed along their ``in_dims``, the
    others as they are), the results stacked on a new dim 0; an output that is None stays None. Returns
    (outputs, out_dims) as a vmap rule does."""
    if info.batch_size == 0:
        # no sample: the outputs' shapes from one call on ones (valid values for every argument of the
        # ops: x, probs, scales, weights, gradients), an empty batch of them
        samples = [apply(*(a if d is None else a.new_ones(a.shape[:d] + a.shape[d + 1:])
                           for a, d in zip(args, in_dims)))]
        stack = lambda ts: ts[0].new_empty((0, *ts[0].shape))  # noqa: E731
    else:
        samples = [apply(*(a if d is None else a.select(d, i) for a, d in zip(args, in_dims)))
                   for i in range(info.batch_size)]
        stack = torch.stack
    first = samples[0]
    if not isinstance(first, tuple):
        return stack(samples), 0
    outputs = tuple(None if o is None else stack([s[j] for s in samples]) for j, o in enumerate(first))
    return outputs, tuple(None if o is None else 0 for o in first)


class _FirstOrderBackward(torch.autograd.Function):
    """``fn(*tensors)``, a fused backward, as a node whose own backward refuses (see the module docstring)."""

    @staticmethod
    def forward(fn, op, backend, *tensors):
        return tuple(fn(*tensors))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.op, ctx.backend = inputs[1], inputs[2]

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            f"{ctx.op}: backend {ctx.backend!r} has no second derivative (a gradient of its gradient); "
            "use backend='reference' for higher-order gradients"
        )

    @staticmethod
    def jvp(ctx, *tangents):
        # forward mode over a backward: a second derivative
        _FirstOrderBackward.backward(ctx)

    @staticmethod
    def vmap(info, in_dims, fn, op, backend, *tensors):
        return per_sample(lambda *t: _FirstOrderBackward.apply(fn, op, backend, *t), info, in_dims[3:], tensors)


def first_order(fn: Callable, op: str, backend: str, *tensors: Tensor) -> Tuple:
    """``fn(*tensors)``: the backward of the fused op ``op`` on ``backend`` (a tuple, None where a gradient
    is not asked for). Called as it is where no graph is recorded through the backward (the usual
    ``loss.backward()``) and on the reference backend, whose backward is made of differentiable torch
    ops; else as a node of its own that refuses a second derivative when, and only when, one is asked
    for."""
    if backend == "reference" or not torch.is_grad_enabled():
        return tuple(fn(*tensors))
    return _FirstOrderBackward.apply(fn, op, backend, *tensors)
