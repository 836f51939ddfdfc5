"""Replaying a whole search step from a CUDA graph: ``qdarts search --cuda-graph``.

An eager search step on a GPU is bound by its host: some 50 k kernel launches, each issued through
Python and the dispatcher (on the H100, 2.1 s of host time against 0.56 s of GPU time at batch 256:
``bench/results/h100-2026-11-27-profile-cifar-b256.txt``). Captured once into a CUDA graph, the
step is replayed by one launch, and its time becomes the GPU's. Unlike ``--compile
reduce-overhead`` nothing is traced or compiled: the eager step itself is recorded, in the time
of one step.

:class:`GraphedStep` runs a step function ``step(xb, yb, xv, yv, stats, update_arch)``:

- one graph per key (``update_arch``, the batches' shapes and dtypes). The first ``warmup`` calls
  with a key run eagerly on a side stream, as ``torch.cuda.graphs`` asks: lazy initialisations
  (cuDNN and cuBLAS handles, the quantizers' first-batch scales, the cached index tensors of a batch
  shape, and the optimisers' states: the arch optimiser's is made by the first step with
  ``update_arch``, which the warm-up epochs leave for later) happen there, never during a capture,
  where they would be recorded (a zero-filled Adam state, re-zeroed by every replay) rather than
  done. The last of them runs under :func:`qdarts_kernels.rehearse_graph_capture`, on the kernels
  that the capture takes (the grouped weight quantizer's single-tensor calls): a Triton kernel
  launched for the first time in a capture would be loaded there, which CUDA refuses. The next
  call captures the step on static copies of its inputs (a capture records, it computes nothing)
  and replays it; later calls copy their batches into the static inputs and replay. ``stats`` is
  accumulated through a static buffer that the graph zeroes first;
- ``key_extra()`` (the optimisers' learning rates: Python floats that their kernels take as
  arguments) is read at every call; when it changes (every epoch under the cosine schedule) the
  graphs are dropped and captured anew.

What a step may not do under capture, and the search step does not: read a tensor back to the
host (``.item()``, printing, Python control flow on tensor values), copy host data to the device,
allocate outside PyTorch's allocator. The arch optimiser (Adam) must be ``capturable`` (its step
count on the device). One process only: collective calls are not captured here.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Callable, ContextManager, Dict, Hashable, Iterator, Optional, Tuple

import torch
from torch import Tensor

from qdarts_kernels import rehearse_graph_capture

__all__ = ["GraphedStep", "capture_cuda_graph", "side_stream"]

StepFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, bool], None]


def capture_cuda_graph(fn: Callable[[], None]) -> Any:
    """``fn``'s kernels recorded into a ``torch.cuda.CUDAGraph`` (nothing runs until ``replay()``)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


@contextmanager
def side_stream() -> Iterator[None]:
    """Run the block on a fresh stream that waits for the current one, and make the current one
    wait for it: where ``torch.cuda.graphs`` asks the warm-up before a capture to run."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        yield
    torch.cuda.current_stream().wait_stream(side)


class GraphedStep:
    """A search step replayed from CUDA graphs (module docstring). ``captures`` counts the graphs
    captured so far, ``replays`` the steps replayed.

    ``capture(fn)`` records ``fn`` and returns an object whose ``replay()`` runs what was recorded;
    ``warmup_context()`` is where the warm-up steps run. The defaults are the CUDA ones
    (:func:`capture_cuda_graph`, :func:`side_stream`); tests without a GPU pass stand-ins."""

    def __init__(self, step: StepFn, key_extra: Callable[[], Hashable], *, warmup: int = 3,
                 capture: Callable[[Callable[[], None]], Any] = capture_cuda_graph,
                 warmup_context: Callable[[], ContextManager[None]] = side_stream):
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (eager steps before the first capture of each key), got {warmup}")
        self._step = step
        self._key_extra = key_extra
        self._warmup = warmup
        self._warmed: Dict[Hashable, int] = {}  # eager calls so far, per key
        self._capture_fn = capture
        self._warmup_context = warmup_context
        self._graphs: Dict[Hashable, Tuple[Any, Tuple[Tensor, ...], Tensor]] = {}
        self._extra: Optional[Hashable] = None
        self.captures = 0
        self.replays = 0

    def __call__(self, xb: Tensor, yb: Tensor, xv: Tensor, yv: Tensor, stats: Tensor, update_arch: bool) -> None:
        inputs = (xb, yb, xv, yv)
        key = (bool(update_arch),) + tuple((tuple(t.shape), t.dtype) for t in inputs)
        warmed = self._warmed.get(key, 0)
        if warmed < self._warmup:
            self._warmed[key] = warmed + 1
            last = warmed + 1 == self._warmup
            with self._warmup_context(), (rehearse_graph_capture() if last else nullcontext()):
                self._step(xb, yb, xv, yv, stats, update_arch)
            return
        extra = self._key_extra()
        if extra != self._extra:
            self._graphs.clear()  # frees their memory pools before the new captures take theirs
            self._extra = extra
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(inputs, stats, bool(update_arch))
        graph, static_inputs, static_stats = entry
        for static, t in zip(static_inputs, inputs):
            static.copy_(t)
        graph.replay()
        self.replays += 1
        stats.add_(static_stats)

    def _capture(self, inputs: Tuple[Tensor, ...], stats: Tensor, update_arch: bool):
        static_inputs = tuple(t.clone() for t in inputs)
        static_stats = torch.zeros_like(stats)

        def recorded() -> None:
            static_stats.zero_()
            self._step(*static_inputs, static_stats, update_arch)

        graph = self._capture_fn(recorded)
        self.captures += 1
        return graph, static_inputs, static_stats
