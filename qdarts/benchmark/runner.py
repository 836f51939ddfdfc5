"""The kernel benchmark sweep: every case x implementation x mode, with derived figures.

Implementations compared on each case: ``eager`` (``qdarts_kernels.reference``), ``compiled``
(``torch.compile`` of that same reference, compiled once per shape and dtype; the compile time is
recorded), each fused backend of ``qk.available_backends()`` that runs natively on the device
(``cpu`` on CPU; ``cuda`` and ``triton`` on a GPU), and for the quantizers ``autograd``, the
straightforward PyTorch code (``cases.straightforward_quant``).

Derived figures per (case, implementation, mode): achieved bandwidth = minimum traffic (see
``cases``) / median time, its share of the device's copy bandwidth (a copy far larger than the cache,
timed as one more entry of the case's rotation, so that the share compares samples taken side by side:
a shared machine's bandwidth drifts by half within seconds), the speed-up over
eager and over compiled (ratio of medians), and, per (case, implementation), the bytes autograd
keeps for backward beyond the inputs (and on CUDA the peak memory of forward+backward above what
was allocated before it).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

from .cases import AUTOGRAD, COMPILED, EAGER, MODES, OpCase, backends_for, implementation, implementations
from .timing import CacheFlusher, Timing, busy_wait_seconds, copy_run, measure_interleaved, saved_bytes, synchronize

#: Sampling per measurement: (warm-up runs, min samples, max samples, seconds budget per implementation).
SAMPLING = {True: (2, 5, 30, 0.4), False: (3, 10, 200, 1.5)}

#: The rotation's entry for the copy timed beside a case's implementations (no implementation's name).
COPY_RUN = "(copy)"


def mode_functions(fn: Callable[..., torch.Tensor], leaves: List[torch.Tensor], grad: torch.Tensor):
    """(setup, run) per mode; only ``run`` is timed (the forward of a backward timing is setup)."""

    def backward(y):
        return torch.autograd.grad(y, leaves, grad)

    return {
        "forward": (lambda: None, lambda _: fn(*leaves)),
        "backward": (lambda: fn(*leaves), backward),
        "forward+backward": (lambda: None, lambda _: backward(fn(*leaves))),
    }


def _peak_extra_bytes(fn, leaves, grad, device) -> Optional[int]:
    """CUDA only: peak allocated memory during one forward+backward above the memory before it."""
    if torch.device(device).type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = torch.autograd.grad(fn(*leaves), leaves, grad)
    synchronize(device)
    del result
    return torch.cuda.max_memory_allocated(device) - before


def _ms(seconds: float) -> float:
    return seconds * 1e3


def benchmark_case(
    case: OpCase,
    device: str,
    impls: Iterable[str],
    *,
    quick: bool,
    flush: Optional[Callable[[], None]],
    copy: Tuple[Callable[[], None], Callable[[Any], torch.Tensor]],
    copy_bytes: int,
    log: Callable[[str], None] = print,
) -> List[Dict[str, Any]]:
    """Records for one case: one per (implementation, mode), or one with ``error`` when an
    implementation fails (it is reported, and the sweep goes on). ``copy`` (:func:`.timing.copy_run`
    over ``copy_bytes``) is timed in each mode's rotation beside the implementations."""
    warmup, min_samples, max_samples, budget_s = SAMPLING[quick]
    leaves = case.make_inputs(device)
    grad = case.grad_output(device)
    base = {
        "op": case.op, "scaling": case.scaling, "label": case.label, "bits": list(case.bits), "k": case.k,
        "shape": list(case.shape), "numel": case.numel, "dtype": case.dtype_name,
    }
    records: List[Dict[str, Any]] = []

    def failed(impl: str, e: Exception) -> None:  # one failing implementation must not stop the sweep
        records.append({**base, "impl": impl, "error": f"{type(e).__name__}: {e}"})
        log(f"  {case.id:<52} {impl:<9} FAILED: {type(e).__name__}: {e}")

    ready: Dict[str, Tuple[Callable[..., torch.Tensor], Dict[str, Any]]] = {}
    for impl in impls:
        try:
            fn = implementation(case, impl)
            extra: Dict[str, Any] = {}
            if impl == COMPILED:
                synchronize(device)
                t0 = time.perf_counter()
                torch.autograd.grad(fn(*leaves), leaves, grad)  # compiles forward and backward
                synchronize(device)
                extra["compile_s"] = time.perf_counter() - t0
            extra["saved_bytes"] = saved_bytes(fn, leaves)
            extra["peak_extra_bytes"] = _peak_extra_bytes(fn, leaves, grad, device)
            ready[impl] = (fn, extra)
        except Exception as e:
            failed(impl, e)
    try:
        for mode in MODES:
            runs = {impl: mode_functions(fn, leaves, grad)[mode] for impl, (fn, _) in ready.items()}
            if not runs:
                continue
            # on a GPU the device's time (launches issued ahead), the host's time to issue beside it. The
            # copy shares the implementations' time budget: a case that the budget ends takes no longer for
            # it; one that the sample cap ends takes a copy per round more (on a GPU, without the busy-wait
            # that hides launches: the copy is one kernel, about 0.5 ms for 1 GiB on an H100)
            timings = measure_interleaved({**runs, COPY_RUN: copy}, device, flush=flush, warmup=warmup,
                                          min_samples=min_samples, max_samples=max_samples,
                                          budget_s=budget_s * len(runs) / (len(runs) + 1), hide_launch=set(runs))
            copy_timing = timings.pop(COPY_RUN)
            if not isinstance(copy_timing, Timing):  # a device that cannot copy: no share can be right
                raise copy_timing
            copy_gbps = 2 * copy_bytes / copy_timing.median / 1e9
            for impl, timing in timings.items():
                if isinstance(timing, Exception):
                    failed(impl, timing)
                    del ready[impl]
                    continue
                traffic = case.min_traffic_bytes(mode)
                gbps = traffic / timing.median / 1e9
                records.append({
                    **base, "impl": impl, "mode": mode, **ready[impl][1],
                    "median_ms": _ms(timing.median), "p20_ms": _ms(timing.p20), "p80_ms": _ms(timing.p80),
                    "samples": len(timing.samples), "min_traffic_bytes": traffic, "gbps": gbps,
                    "copy_gbps": copy_gbps, "pct_of_copy": 100.0 * gbps / copy_gbps,
                    **({"host_ms": _ms(timing.host_median), "launch_wait_ms": _ms(busy_wait_seconds())}
                       if timing.host_samples else {}),
                })
                log(f"  {case.id:<52} {impl:<9} {mode:<17} {records[-1]['median_ms']:10.3f} ms"
                    f"  {gbps:7.1f} GB/s")
    finally:
        if COMPILED in impls:
            # every case compiles the same reference code: start each from a clean dynamo cache so
            # that no recompile limit is hit (which would fall back to eager silently)
            ready.clear()
            torch._dynamo.reset()
    _add_speedups(records)
    return records


def _add_speedups(records: List[Dict[str, Any]]) -> None:
    """speedup_vs_eager / speedup_vs_compiled = baseline median / this median, per mode."""
    by_mode: Dict[str, Dict[str, float]] = {}
    for r in records:
        if "median_ms" in r:
            by_mode.setdefault(r["mode"], {})[r["impl"]] = r["median_ms"]
    for r in records:
        if "median_ms" not in r:
            continue
        baselines = by_mode[r["mode"]]
        for name, key in ((EAGER, "speedup_vs_eager"), (COMPILED, "speedup_vs_compiled")):
            r[key] = baselines[name] / r["median_ms"] if name in baselines else None


def run_kernels(
    cases: List[OpCase],
    device: str,
    *,
    quick: bool,
    copy_bytes: int,
    impls: Optional[List[str]] = None,
    on_case_done: Optional[Callable[[List[Dict[str, Any]]], None]] = None,
    log: Callable[[str], None] = print,
) -> List[Dict[str, Any]]:
    """Run every case with ``impls`` (default: ``cases.implementations``), less those that do not apply
    to it (autograd to mixed_op_sum, a backend without a kernel for its op; an unknown name is timed,
    and fails as a record), with a copy of ``copy_bytes`` timed beside them; ``on_case_done(records so
    far)`` lets the caller save partial results."""
    flusher = CacheFlusher(device)
    copy = copy_run(device, copy_bytes)
    records: List[Dict[str, Any]] = []
    for case in cases:
        applicable = implementations(case, device)
        not_applicable = ({AUTOGRAD} | set(backends_for(device))) - set(applicable)
        chosen = applicable if impls is None else [i for i in impls if i not in not_applicable]
        records += benchmark_case(case, device, chosen, quick=quick, flush=flusher, copy=copy, copy_bytes=copy_bytes,
                                  log=log)
        if on_case_done is not None:
            on_case_done(records)
    return records


#: Issue-2 acceptance targets on CPU, fp32, forward+backward: the fused ``cpu`` backend against the
#: straightforward eager PyTorch code (``autograd`` for the quantizer; for mixed_op_sum the reference
#: is that code).
CPU_TARGETS = (
    {"op": "mixed_fake_quant", "scaling": "per_tensor", "numel": 4 * 2**20, "baseline": AUTOGRAD, "ratio": 10.0},
    {"op": "mixed_op_sum", "scaling": "-", "numel": 2**20, "baseline": EAGER, "ratio": 2.5},
)


def check_targets(records: List[Dict[str, Any]], device: str) -> List[Dict[str, Any]]:
    """The issue-2 targets (CPU only); ``measured`` = baseline median / cpu median."""
    if torch.device(device).type != "cpu":
        return []
    out = []
    for target in CPU_TARGETS:
        found = {
            r["impl"]: r for r in records
            if r.get("op") == target["op"] and r.get("scaling") == target["scaling"] and r.get("numel") == target["numel"]
            and r.get("dtype") == "fp32" and r.get("mode") == "forward+backward" and "median_ms" in r
        }
        row = {**target, "backend": "cpu", "mode": "forward+backward", "dtype": "fp32"}
        if "cpu" in found and target["baseline"] in found:
            fused, base = found["cpu"], found[target["baseline"]]
            measured = base["median_ms"] / fused["median_ms"]
            row.update(shape=fused["shape"], baseline_ms=base["median_ms"], cpu_ms=fused["median_ms"],
                       measured=measured, met=measured >= target["ratio"])
        else:
            row.update(measured=None, met=None, note="not measured (cpu backend missing or case not in the sweep)")
        out.append(row)
    return out


#: Issue-3/4 acceptance targets on a GPU (set for an H100), fp32, forward+backward, for each fused GPU
#: backend: ``pct_of_copy`` = share of the measured copy bandwidth at the minimum traffic,
#: ``speedup_vs_compiled`` = torch.compile of the reference's time / the backend's.
GPU_TARGETS = (
    {"op": "mixed_fake_quant", "scaling": "per_tensor", "numel": 32 * 2**20, "metric": "pct_of_copy", "min": 80.0},
    {"op": "mixed_fake_quant", "scaling": "per_tensor", "numel": 4 * 2**20, "metric": "speedup_vs_compiled",
     "min": 10.0},
    {"op": "mixed_op_sum", "scaling": "-", "numel": 4 * 2**20, "metric": "pct_of_copy", "min": 80.0},
)
GPU_BACKENDS = ("triton", "cuda")


def check_gpu_targets(records: List[Dict[str, Any]], device: str) -> List[Dict[str, Any]]:
    """The issue-3/4 targets (CUDA only), one row per target and GPU backend."""
    if torch.device(device).type != "cuda":
        return []
    out = []
    for target in GPU_TARGETS:
        for backend in GPU_BACKENDS:
            row = {**target, "backend": backend, "mode": "forward+backward", "dtype": "fp32", "measured": None,
                   "met": None}
            for r in records:
                if (r.get("op"), r.get("scaling"), r.get("numel"), r.get("dtype"), r.get("mode"), r.get("impl")) == (
                        target["op"], target["scaling"], target["numel"], "fp32", "forward+backward", backend):
                    measured = r.get(target["metric"])
                    row.update(shape=r["shape"], ms=r.get("median_ms"), host_ms=r.get("host_ms"), measured=measured,
                               met=None if measured is None else measured >= target["min"])
            out.append(row)
    return out
