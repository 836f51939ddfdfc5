"""Compiling the search and training steps: ``--compile [MODE]``.

``compiled(fn, mode)`` wraps a step's forward-and-loss function in ``torch.compile`` with
``fullgraph=True``: the supernet (the quantized convs with their grouped weight launch, the mixed-op
sums, the cost) traces as one graph with no break, since every qdarts op is a ``torch.library``
custom op with a fake kernel. AOTAutograd compiles the backward with it. Modes:

- ``default``: inductor;
- ``reduce-overhead``: inductor and CUDA-graph capture of the forward and the backward (CUDA only):
  a step replays two graphs instead of launching thousands of kernels;
- ``max-autotune``: inductor with autotuning (slow to compile), and CUDA graphs as reduce-overhead.

Where the mode captures CUDA graphs (:func:`captures_cuda_graphs`) the steps run under
:func:`qdarts_kernels.rehearse_graph_capture`: the compiled functions' warm-up calls, which
torch.compile makes before each capture of a function (a first call, a recompile), then launch the
kernels that the capture takes, so that none is first launched, and so loaded, inside a capture.

Nothing in the compiled function may read a tensor back to the host (a graph break at best, a
failed capture under CUDA graphs); :func:`record_shapes` therefore runs the one forward whose
Python side effects the cost model needs (each conv records its MACs) before the first compiled
call, so that the cost's constant tables exist before tracing.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import nn
from torch.ao.quantization import FakeQuantizeBase

__all__ = ["COMPILE_MODES", "captures_cuda_graphs", "compiled", "record_shapes"]

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


def captures_cuda_graphs(mode: Optional[str]) -> bool:
    """Whether torch.compile's ``mode`` captures CUDA graphs of the compiled functions (on CUDA)."""
    from torch._inductor import list_mode_options

    return mode is not None and bool(list_mode_options(mode).get("triton.cudagraphs"))


def compiled(fn: Callable, mode: Optional[str], *, backend: str = "inductor") -> Callable:
    """``fn`` compiled whole (``fullgraph=True``) in ``mode``; ``fn`` itself when ``mode`` is None.

    ``backend`` is torch.compile's ("aot_eager" compiles forward and backward graphs without
    generating code: what the CPU tests use, inductor being slow to compile on two cores).
    """
    if mode is None:
        return fn
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    if backend != "inductor":
        return torch.compile(fn, fullgraph=True, backend=backend)
    return torch.compile(fn, fullgraph=True, mode=mode)


@torch.no_grad()
def record_shapes(model: nn.Module, input_shape: Tuple[int, ...], device: torch.device) -> None:
    """One forward of a single zero sample in eval mode with the quantizers' observers off, so the
    layers record their shapes (MACs) and nothing else changes: no BatchNorm statistics, no LSQ
    scale initialisation, no random numbers drawn."""
    was_training = model.training
    observers = [(m, bool(m.observer_enabled[0])) for m in model.modules() if isinstance(m, FakeQuantizeBase)]
    model.eval()
    for m, _ in observers:
        m.disable_observer()
    try:
        model(torch.zeros((1,) + tuple(input_shape), device=device))
    finally:
        model.train(was_training)
        for m, enabled in observers:
            m.enable_observer(enabled)
