"""pytest-benchmark timings of the ops: the cases of ``qdarts bench`` through pytest-benchmark.

    pytest bench/ --benchmark-only                       # quick sweep on CUDA if present, else CPU
    QDARTS_BENCH_FULL=1 pytest bench/ --benchmark-only   # the full sweep
    pytest bench/ --benchmark-only -k "mixed_op_sum and cpu and forward+backward"

Each benchmark is one (case, implementation, mode) of ``qdarts.benchmark.cases``: ``eager`` (the
pure-PyTorch reference ``qdarts_kernels.reference``), ``compiled`` (torch.compile of it), every
fused backend available on the device, and for the quantizers ``autograd`` (the straightforward
PyTorch code with a straight-through round: issue 2's baseline). Tests of one case and mode share a
pytest-benchmark group, so the table compares the implementations side by side. The cache is
flushed and the device synchronised before every round (in pytest-benchmark's untimed setup), as
in ``qdarts bench``; the timed target ends with a device synchronisation.
"""

from __future__ import annotations

import os

import pytest
import torch

from qdarts.benchmark.cases import COMPILED, MODES, implementation, implementations, sweep
from qdarts.benchmark.runner import mode_functions
from qdarts.benchmark.timing import CacheFlusher, synchronize

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
QUICK = os.environ.get("QDARTS_BENCH_FULL", "0") != "1"
ROUNDS = 5 if QUICK else 20
PARAMS = [
    pytest.param(case, impl, mode, id=f"{case.id}-{impl}-{mode}")
    for case in sweep(DEVICE, QUICK)
    for impl in implementations(case, DEVICE)
    for mode in MODES
]


@pytest.fixture(scope="module")
def flush():
    return CacheFlusher(DEVICE)


class _CompiledCache:
    """One torch.compile per case, reused by its three modes. Dynamo's cache is reset when the case
    changes: every case compiles the same reference code, and past dynamo's recompile limit it would
    silently run eager."""

    def __init__(self):
        self.case = None
        self.fn = None

    def get(self, case):
        if case != self.case:
            torch._dynamo.reset()
            self.case, self.fn = case, implementation(case, COMPILED)
        return self.fn


_compiled = _CompiledCache()


@pytest.mark.parametrize("case,impl,mode", PARAMS)
def test_op(benchmark, flush, case, impl, mode):
    fn = _compiled.get(case) if impl == COMPILED else implementation(case, impl)
    leaves = case.make_inputs(DEVICE)
    grad = case.grad_output(DEVICE)
    setup, run = mode_functions(fn, leaves, grad)[mode]

    def setup_round():
        state = setup()
        flush()
        synchronize(DEVICE)
        return (state,), {}

    def timed(state):
        result = run(state)
        synchronize(DEVICE)
        return result

    benchmark.group = f"{case.id} {mode}"
    benchmark.extra_info.update(numel=case.numel, dtype=case.dtype_name, min_traffic_bytes=case.min_traffic_bytes(mode))
    # warm-up rounds include the compilation of the compiled implementation
    result = benchmark.pedantic(timed, setup=setup_round, rounds=ROUNDS, warmup_rounds=2)
    # what was timed is the whole op: the output, or one gradient per input
    if mode == "forward":
        assert result.shape == case.shape and result.dtype == case.dtype
    else:
        assert [g.shape for g in result] == [t.shape for t in leaves]
