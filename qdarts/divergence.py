"""A run that diverged, told apart from a bug: its loss or its parameters became NaN or infinite.

A learning rate too large for the data makes the weights overflow within a few steps. The fused ops
then get non-finite scales: the C++ CPU kernels refuse them (a ValueError from deep inside a
quantizer, ``scales must be finite``), while the GPU kernels, which cannot read their scales without
a host sync, compute NaN and the run goes on. Either way the user learns nothing about the cause. The
search and training loops therefore stop such a run with :class:`Diverged`, which says what became
non-finite, in which epoch, which options to lower, and that the last finished epoch's checkpoint is
kept (a diverged epoch is never saved).

The parameters need not overflow first: with gradient clipping (the search's) the weights grow only
linearly, yet a few layers of them can make the activations overflow. The scales of the paper's
activation quantizers, taken from the activations' largest magnitude, are then infinite, and the
kernels refuse them while every parameter is still finite. Inside a step every scale comes from the
run's own parameters and activations, so such an error is a divergence too.

Nothing here is on the hot path: :func:`diagnosed` looks at the parameters only once a step has
raised, and :func:`check_figures` at the figures the end of an epoch reads back anyway.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, List, Mapping, Tuple

import torch
from torch import Tensor

__all__ = ["Diverged", "check_figures", "diagnosed", "kept_checkpoint", "non_finite"]


class Diverged(FloatingPointError):
    """A search or training run whose loss or parameters became NaN or infinite."""


def non_finite(named_tensors: Iterable[Tuple[str, Tensor]]) -> List[str]:
    """The names of the floating tensors that hold a NaN or an infinity (reads each back)."""
    with torch.no_grad():
        return [name for name, t in named_tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def _listed(names: List[str], shown: int = 3) -> str:
    """``a``, ``a and b``, ``a, b, c and 4 more``."""
    head, rest = names[:shown], len(names) - shown
    if rest > 0:
        return f"{', '.join(head)} and {rest} more"
    return head[0] if len(head) == 1 else f"{', '.join(head[:-1])} and {head[-1]}"


#: How the kernels refuse a scale that is not finite (qdarts_kernels/_validation.py, csrc/cpu/mixed_fake_quant.cpp).
NON_FINITE_SCALES = "scales must be finite"


def _largest_magnitude(named_tensors: Iterable[Tuple[str, Tensor]]) -> float:
    with torch.no_grad():
        return max((float(t.detach().abs().max()) for _, t in named_tensors if t.is_floating_point() and t.numel()),
                   default=0.0)


@contextmanager
def diagnosed(what: str, named_parameters: Callable[[], Iterable[Tuple[str, Tensor]]],
              advice: str) -> Iterator[None]:
    """Run the block. Should it raise a ValueError or RuntimeError while one of ``named_parameters()``
    is not finite, or one that refuses non-finite scales (the activations overflowed; see the module's
    docstring), raise :class:`Diverged` from it instead (``"{what} diverged: ...; {advice}"``); any
    other error, or another one with every parameter finite, propagates as it is."""
    try:
        yield
    except (ValueError, RuntimeError) as e:
        cause = (str(e).strip().splitlines() or [type(e).__name__])[0]
        names = non_finite(named_parameters())
        if names:
            subject = f"parameter {names[0]} is" if len(names) == 1 else f"parameters {_listed(names)} are"
            raise Diverged(f"{what} diverged: {subject} no longer finite (which then stopped the step: {cause}); "
                           f"{advice}") from e
        if NON_FINITE_SCALES not in cause:
            raise
        raise Diverged(f"{what} diverged: the activations overflowed while every parameter is still finite "
                       f"(the largest has magnitude {_largest_magnitude(named_parameters()):.3g}; which then stopped "
                       f"the step: {cause}); {advice}") from e


def check_figures(what: str, figures: Mapping[str, float], advice: str) -> None:
    """Raise :class:`Diverged` if any of an epoch's ``figures`` (name: value) is NaN or infinite."""
    bad = [f"{name} {value}" for name, value in figures.items() if not math.isfinite(value)]
    if bad:
        raise Diverged(f"{what} diverged: {', '.join(bad)}; {advice}")


def kept_checkpoint(path: str, epochs_done: int) -> str:
    """What a diverged run leaves behind: the checkpoint ``path`` of its last finished epoch, if any."""
    if epochs_done:
        return f"{path} keeps epoch {epochs_done}, the last finished one"
    return "no epoch had finished, so no checkpoint was written"
