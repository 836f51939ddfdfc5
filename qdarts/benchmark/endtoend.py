"""End to end: time per search step and memory of the supernet, fused ops against the reference.

One search step is ``qdarts.search.Searcher.step`` itself, after the warm-up (DESIGN section 2),
with the defaults of ``SearchConfig`` (first order) but the network's size, on a fixed train and
validation batch of random data of the right shape (values do not change the work): forward +
backward of CE on the validation batch for the gradients of alpha and beta only, and an Adam step
of them; then forward + backward of ``CE + lambda * C(gamma)`` on the train batch with alpha and
beta frozen, an SGD step of the weights (gradient clip 5) and of the bit logits. Compiled, it is
the step of ``qdarts search --compile``.

The same supernet is run with three kinds of ops:

- ``fused``: the public ops with the automatic backend (the C++ ``cpu`` kernels on CPU, the fastest
  GPU backend on CUDA);
- ``reference``: the ``reference`` backend of the public ops (``SupernetConfig(backend=
  "reference")``): the pure-PyTorch maths inside the ops' autograd functions;
- ``eager``: the supernet run inside ``qdarts_kernels.eager_reference()``: every public op, and
  every QAT module that calls one, computes with ``qdarts_kernels.reference`` under ordinary
  autograd, as plain PyTorch code would. The calls are counted, so a supernet that bypassed the
  switch would fail loudly.

Memory: on CUDA the peak allocated memory of one step (``torch.cuda.max_memory_allocated``), on
CPU the most bytes allocated during one step and alive at once (profiler allocation events:
:func:`step_allocation_peak_bytes`); on every device the bytes autograd keeps for backward in the
arch half and in the weight half of the step (saved-tensor hooks, distinct storages, parameters
and the input batches excluded), the part of the peak the ops control; ``saved_mb`` is the larger
of the two.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

import qdarts_kernels as qk
from qdarts_kernels._backends import resolve as resolve_backend

from qdarts.data import Dataset
from qdarts.search import SearchConfig, Searcher

from .timing import cuda_launches, dispatched_ops, kept_bytes, measure_interleaved, synchronize

OPS_KINDS = ("fused", "reference", "eager")


@dataclass(frozen=True)
class E2EConfig:
    name: str
    input_shape: Tuple[int, int, int]
    batch: int
    channels: int
    layers: int
    partial_channels: int
    bits: Tuple[int, ...] = SearchConfig.bits

    @property
    def description(self) -> str:
        c, h, w = self.input_shape
        return (f"{c}x{h}x{w}, batch {self.batch}, C={self.channels}, {self.layers} cells, "
                f"partial channels 1/{self.partial_channels}, bits {','.join(map(str, self.bits))}")


def digits_config() -> E2EConfig:
    """The supernet of ``qdarts search`` with its defaults (the embedded digits set, 1x8x8)."""
    d = SearchConfig()
    return E2EConfig("digits", (1, 8, 8), d.batch_size, d.channels, d.layers, d.partial_channels, d.bits)


#: CIFAR size as in the official search (C=16, 8 cells, partial channels 1/4) at batch 64, bits 2,4,8:
#: the configuration of issue 6's fused-against-eager target.
CIFAR = E2EConfig("cifar", (3, 32, 32), 64, 16, 8, 4)
#: The CIFAR-size search step at the batches and bit sets of issue 9 (measured on CUDA, fused ops only):
#: batch 64 and 256, bits (2,4,8) and (2,4); CIFAR itself is the first of them.
SEARCH_STEP_MATRIX = (CIFAR, replace(CIFAR, name="cifar-b256", batch=256),
                      replace(CIFAR, name="cifar-bits24", bits=(2, 4)),
                      replace(CIFAR, name="cifar-b256-bits24", batch=256, bits=(2, 4)))
#: issue 9's limits for the fused step, bits 2,4,8, on an H100: seconds per step by batch, and peak memory
STEP_LIMIT_S = {64: 0.15, 256: 0.35}
PEAK_LIMIT_MB = 10 * 1024


def plan(device: str, quick: bool) -> List[Tuple[E2EConfig, Tuple[str, ...]]]:
    """The configurations to time, each with the ops kinds to compare on it. On CPU, where a digits
    step takes seconds and a CIFAR-size step tens of seconds, only fused against eager, and
    ``--quick`` only digits. On CUDA the issue targets first (results are saved after each
    configuration, so a run cut short keeps them): CIFAR with the fused and the eager-reference ops
    (all three kinds without ``--quick``: an eager CIFAR-size step takes seconds there, being
    launch-bound), the rest of the search-step matrix with the fused ops, then digits."""
    if torch.device(device).type == "cpu":
        return [(cfg, ("fused", "eager")) for cfg in ([digits_config()] if quick else [digits_config(), CIFAR])]
    kinds = ("fused", "eager") if quick else OPS_KINDS
    return ([(CIFAR, kinds)] + [(cfg, ("fused",)) for cfg in SEARCH_STEP_MATRIX if cfg is not CIFAR]
            + [(digits_config(), kinds)])


class SearchStep:
    """A :class:`Searcher` with the defaults of ``SearchConfig`` for everything but the network's size,
    on one fixed train and one fixed val batch of random data; a call is one search step."""

    def __init__(self, cfg: E2EConfig, device: str, backend: Optional[str], *,
                 compile_mode: Optional[str] = None, cuda_graph: bool = False, seed: int = 0):
        config = SearchConfig(batch_size=cfg.batch, channels=cfg.channels, layers=cfg.layers,
                              partial_channels=cfg.partial_channels, bits=tuple(cfg.bits), train_portion=0.5, seed=seed,
                              device=device, backend=backend, compile=compile_mode, cuda_graph=cuda_graph)
        # train_portion 0.5 splits these two batches' worth of samples into one train and one val batch
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn((2 * cfg.batch, *cfg.input_shape), generator=gen)
        y = torch.randint(0, 10, (2 * cfg.batch,), generator=gen)
        data = Dataset("random", x, y, x[:0], y[:0], num_classes=10)  # no test split: the search never reads it
        # out_dir is never written: the benchmark takes no checkpoint
        self.searcher = Searcher(config, out_dir="", progress=False, dataset=data)
        s = self.searcher
        self.train_batch = (s.train_x.to(device), s.train_y.to(device))
        self.val_batch = (s.val_x.to(device), s.val_y.to(device))
        self.stats = torch.zeros(4, device=device)

    def __call__(self) -> None:
        # lr: the first epoch's learning rate (only the second-order arch step reads it)
        self.searcher.step(*self.train_batch, *self.val_batch, self.searcher.config.weight_lr, self.stats,
                           update_arch=True)

    def saved_bytes(self) -> Dict[str, int]:
        """Bytes autograd keeps for backward in each half of a step, ``{"arch": ..., "weight": ...}``
        (parameters and the input batches excluded; one count per distinct storage), counted over
        one arch step and one weight step of the search (which thus also update the parameters).
        The halves keep different tensors (the arch step keeps the candidate outputs for the
        gradient of alpha, the weight step does not), and the larger one bounds the peak."""
        s = self.searcher
        lr = s.config.weight_lr
        return {"arch": self._kept_bytes(lambda: s._arch_step(*self.train_batch, *self.val_batch, lr)),
                "weight": self._kept_bytes(lambda: s._weight_step(*self.train_batch, self.stats))}

    def _kept_bytes(self, run: Callable[[], None]) -> int:
        return kept_bytes(run, [*self.searcher.net.parameters(), *self.train_batch, *self.val_batch])


def _prepare_variant(cfg: E2EConfig, ops: str, device: str, compile_mode: Optional[str],
                     backend: Optional[str] = None, cuda_graph: bool = False) -> Tuple[Dict[str, Any], Callable]:
    """Build one variant (compiled in ``compile_mode`` unless None, replayed from CUDA graphs with
    ``cuda_graph``; ``backend`` of the fused ops, None for the automatic choice), take its first
    step (warm-up, and compilation; with ``cuda_graph`` the eager warm-up steps and the capture),
    count what it keeps for backward and (on CUDA) its peak memory; returns that record and
    ``run(_)``, one timed step."""
    compiled = compile_mode is not None
    mode = "compiled" if compiled else "graphed" if cuda_graph else "eager"
    backend = {"fused": backend, "reference": "reference", "eager": None}[ops]

    def swap():
        return qk.eager_reference() if ops == "eager" else contextlib.nullcontext(None)

    on_cuda = torch.device(device).type == "cuda"
    # what the variants prepared before this one hold (they stay alive to be timed in turn)
    held_by_others = torch.cuda.memory_allocated(device) if on_cuda else 0
    with swap() as calls:
        step = SearchStep(cfg, device, backend, compile_mode=compile_mode, cuda_graph=cuda_graph)
        synchronize(device)
        t0 = time.perf_counter()
        step()
        synchronize(device)
        first_s = time.perf_counter() - t0
        capture_s = None
        graphed = step.searcher._graphed
        if graphed is not None:  # the remaining eager warm-up steps, then the step that captures
            if on_cuda:  # a replay allocates nothing: the step's memory is the graphs' pools, taken while capturing
                torch.cuda.reset_peak_memory_stats(device)
            while graphed.captures == 0:
                t0 = time.perf_counter()
                step()
                synchronize(device)
                capture_s = time.perf_counter() - t0
        # compiled steps trace the reference without counting (qk.eager_reference)
        if calls is not None and not compiled and not (calls["mixed_fake_quant"] and calls["mixed_op_sum"]):
            raise RuntimeError(f"the eager-reference swap did not reach the supernet's ops (calls: {dict(calls)})")
        # saved_bytes: the arch half and the weight half of one eager step, each under the saved-tensor
        # hooks. On CUDA the peak of a step is read over them (a step of its own would cost an
        # eager-reference CIFAR-size variant 9 s on the H100); a graphed step's over its warm-up, its
        # capture and one replay (one replay alone allocated nothing: 206 MB at batch 256 on an H200,
        # which keeps 2820 MB for backward), before the eager halves allocate beside them.
        peak = None
        if on_cuda and graphed is not None:
            step()
            synchronize(device)
            peak = (torch.cuda.max_memory_allocated(device) - held_by_others) / 2**20
        if on_cuda:
            torch.cuda.reset_peak_memory_stats(device)
        saved = step.saved_bytes()
        if on_cuda and peak is None:
            synchronize(device)
            peak = (torch.cuda.max_memory_allocated(device) - held_by_others) / 2**20
        peak_error = None
        if not on_cuda:
            try:
                peak = step_allocation_peak_bytes(step) / 2**20
            except Exception as e:  # the profiler refusing (e.g. one already running): no peak, the rest stands
                peak_error = f"{type(e).__name__}: {e}"
        # on a GPU only the fused step's launches are profiled (the reference ones take many seconds
        # under the dispatch counter and the profiler; their op counts are the CPU run's)
        counts = _launch_counts(step, device, mode != "eager") if ops == "fused" or not on_cuda else {}

    def run(_):
        with swap():
            step()

    record = {
        "config": cfg.name, "description": cfg.description, "ops": ops, "mode": mode, "compile_mode": compile_mode,
        "backend": resolve_backend(backend, torch.device(device)) if ops == "fused" else backend,
        "batch": cfg.batch, "bits": list(cfg.bits), "input_shape": list(cfg.input_shape), "channels": cfg.channels,
        "layers": cfg.layers,
        "first_step_s": first_s, **({"capture_step_s": capture_s} if capture_s is not None else {}),
        "saved_mb": max(saved.values()) / 2**20,
        "saved_mb_arch": saved["arch"] / 2**20, "saved_mb_weight": saved["weight"] / 2**20, "peak_mb": peak,
        **({"peak_error": peak_error} if peak_error else {}),
        **counts,
    }
    return record, run


def step_allocation_peak_bytes(step: Callable[[], None]) -> int:
    """The most bytes allocated during one CPU step and alive at once: the profiler's allocation
    events (``profile_memory``; PyTorch's CPU allocator and the C++ kernels' output cache report to
    it), walked in time order. What the step starts with (parameters, gradients, optimiser state,
    batches) is not in it: CPU memory has no counter like CUDA's ``max_memory_allocated``."""
    from .profile import cpu_memory_at_peak  # profile builds on this module

    return cpu_memory_at_peak(step, sites=False)[0]


def _launch_counts(step: "SearchStep", device: str, recorded: bool) -> Dict[str, Any]:
    """What one step launches: ``ops_per_step`` (ops dispatched that do work, eager steps only: not
    ``recorded`` by compilation or capture), and on CUDA ``launches_per_step`` /
    ``gpu_kernels_per_step`` from the profiler. A count that fails is recorded as such; the step's
    other figures stand."""
    counts: Dict[str, Any] = {}
    try:
        if not recorded:
            counts["ops_per_step"] = dispatched_ops(step)
        if torch.device(device).type == "cuda":
            launched = cuda_launches(step)
            counts.update(launches_per_step=launched["launches"], gpu_kernels_per_step=launched["kernels"])
    except Exception as e:  # the profiler or a dispatch mode refusing this step: say so, keep the timing
        counts["counts_error"] = f"{type(e).__name__}: {e}"
    return counts


def _measure_config(cfg: E2EConfig, kinds: Sequence[str], device: str, quick: bool, mode: str,
                    log: Callable[[str], None]) -> List[Dict[str, Any]]:
    """The records of one configuration's variants in ``mode`` (one of STEP_MODES), timed one step
    of each in turn (as the kernel benchmarks are), so that on a machine whose speed drifts their
    ratio compares steps taken side by side. A variant that fails is reported, and the others
    still run."""
    compiled = mode == "compiled"
    records: Dict[str, Dict[str, Any]] = {}
    runs = {}
    # compiled: the benchmark's mode, and should it fail (CUDA-graph capture), plain inductor; the fused
    # ops on a GPU: the automatic backend, and should it fail, each other GPU backend (a figure for the
    # step rather than none; the failure is recorded with it)
    compile_modes = [None] if not compiled else list(dict.fromkeys([compile_mode_for(device), "default"]))
    on_gpu = torch.device(device).type == "cuda"
    for ops in kinds:
        failures = []
        backends = [None] + [b for b in ("triton", "cuda") if b in qk.available_backends()] if (
            ops == "fused" and on_gpu) else [None]
        for compile_mode, backend in ((m, b) for b in backends for m in compile_modes):
            try:
                records[ops], run = _prepare_variant(cfg, ops, device, compile_mode, backend,
                                                     cuda_graph=mode == "graphed")
                runs[ops] = (lambda: None, run)
                break
            except Exception as e:
                failures.append(f"{compile_mode or 'eager'}{'' if backend is None else ' on ' + backend}: "
                                f"{type(e).__name__}: {e}")
        if ops not in runs:
            records[ops] = {"config": cfg.name, "description": cfg.description, "ops": ops, "mode": mode,
                            "error": "; ".join(failures)}
        elif failures:
            records[ops]["fallback_from"] = "; ".join(failures)
    # the first step was the warm-up; 5 rounds at least where it can be afforded (a CPU's step now and then
    # takes several times its median on a shared machine: 2 rounds made a mean of one such step the
    # median); on a GPU --quick takes 3 (an eager-reference CIFAR-size step is seconds of launches there)
    cpu = torch.device(device).type == "cpu"
    rounds = 3 if quick and not cpu else 5
    # the steps taken while preparing (warm-up, counted, memory) warmed every variant up already, but for a
    # compiled step on a GPU: CUDA-graph trees run a step eagerly, then record one, and replay only the third
    warmup = 1 if not cpu and (not quick or mode == "compiled") else 0
    timings = measure_interleaved(runs, device, warmup=warmup, min_samples=rounds,
                                  max_samples=20, budget_s=1.0 if cpu or quick else 10.0) if runs else {}
    for ops in kinds:
        r = records[ops]
        timing = timings.get(ops)
        if isinstance(timing, Exception):
            r = records[ops] = {"config": cfg.name, "description": cfg.description, "ops": ops, "mode": mode,
                                "error": f"{type(timing).__name__}: {timing}"}
        elif timing is not None:
            r.update(median_ms=timing.median * 1e3, p20_ms=timing.p20 * 1e3, p80_ms=timing.p80 * 1e3,
                     steps_per_s=1.0 / timing.median, samples=len(timing.samples))
        if "error" in r:
            log(f"  {cfg.name:<7} {ops:<9} FAILED: {r['error']}")
        else:
            log(f"  {cfg.name:<7} {ops:<9} {mode:<8} {r['median_ms']:9.1f} ms/step  saved {r['saved_mb']:.0f} MB"
                + (f"  peak {r['peak_mb']:.0f} MB" if r["peak_mb"] else ""))
    return [records[ops] for ops in kinds]


#: How a step runs: eagerly, compiled (``qdarts search --compile``), replayed from CUDA graphs
#: (``qdarts search --cuda-graph``).
STEP_MODES = ("eager", "compiled", "graphed")


def step_modes(cfg: E2EConfig, kinds: Sequence[str], device: str, quick: bool, compiled: bool,
               graphed: bool) -> List[Tuple[str, Tuple[str, ...]]]:
    """The (mode, ops kinds) of ``cfg`` to time: eager always, compiled when asked, graphed when asked
    (CUDA only; the fused ops only: the eager-reference baseline is the plain eager step). With
    ``--quick`` and graphed steps, the rest of issue 9's matrix is timed graphed only."""
    if graphed and torch.device(device).type != "cuda":
        raise ValueError(f"graphed steps (CUDA graphs) need a CUDA device, got {device!r}")
    matrix_only = cfg in SEARCH_STEP_MATRIX and cfg is not CIFAR
    modes = [] if (quick and graphed and matrix_only) else [("eager", tuple(kinds))]
    if compiled:
        modes.append(("compiled", tuple(kinds)))
    if graphed and "fused" in kinds:
        modes.append(("graphed", ("fused",)))
    return modes


def run(device: str, *, quick: bool, compiled: bool = False, graphed: bool = False,
        log: Callable[[str], None] = print,
        on_config_done: Optional[Callable[[List[Dict[str, Any]]], None]] = None
        ) -> Tuple[List[Dict[str, Any]], Optional[str]]:
    """Records for each config x mode x ops kind (:func:`step_modes`), and a note for the report.
    ``on_config_done(records so far)`` after each configuration, so that a caller can save partial
    results (a run cut short by a time limit keeps what it measured)."""
    try:
        import qdarts.cost  # noqa: F401
        import qdarts.search  # noqa: F401
        import qdarts.supernet  # noqa: F401
    except ImportError as e:
        note = f"Not measured: the search layer could not be imported ({type(e).__name__}: {e})."
        log("  " + note)
        return [], note
    on_cuda = torch.device(device).type == "cuda"
    note = method_note(device, resolve_backend(None, torch.device(device)))
    records: List[Dict[str, Any]] = []
    for cfg, kinds in plan(device, quick):
        for mode, mode_kinds in step_modes(cfg, kinds, device, quick, compiled, graphed):
            records += _measure_config(cfg, mode_kinds, device, quick, mode, log)
            if on_cuda:
                torch.cuda.empty_cache()
            if on_config_done is not None:
                on_config_done(records)
    return records, note


def method_note(device: str, fused_backend: str) -> str:
    """How the end-to-end figures on ``device`` were taken, for the report (``fused_backend``: the
    backend the automatic choice gave the fused ops there)."""
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda:
        fused_backend += ", the faster GPU backend"
    elif fused_backend != "cpu":
        fused_backend += ": the C++ extension is not built"
    return (f"Random data of the configuration's shape; one step of `qdarts search` itself (`Searcher.step`, "
            f"first order: alpha and beta on the val batch, then weights and bit logits on the train batch), its "
            f"defaults otherwise. `fused` = automatic backend ({fused_backend} here); `reference` = backend "
            f"'reference' of the public ops; `eager` = the same step inside `qdarts_kernels.eager_reference()` "
            f"(every op and QAT module on the reference under plain autograd). The variants of a configuration "
            f"are timed one step of each in turn, after a warm-up step and a counted step (ops) each. "
            f"torch.compile: the step of `qdarts search --compile {compile_mode_for(device)}`; graphed: the step of "
            "`qdarts search --cuda-graph` (replayed from CUDA graphs, after 3 eager steps and a capture). "
            "'saved MB': kept for backward by the larger half of the step (arch half / weight half in brackets). "
            "'ops': ATen and custom ops that do work dispatched in one eager step (views and allocations not "
            "counted; on a GPU each launches at least one kernel); on CUDA, the launches the profiler saw (and, in "
            "brackets, the kernels run). "
            + ("Peak MB: CUDA peak allocated memory of one step (for graphed steps, over the capture, where "
               "the graphs' memory pools are allocated, and one replay)." if on_cuda
               else "Peak MB: the most bytes allocated during one step and alive at once (the profiler's "
                    "allocation events), on top of what the step starts with (parameters, gradients, optimiser "
                    "state, batches; CPU memory has no peak counter like CUDA's)."))


def compile_mode_for(device: str) -> str:
    """The ``--compile`` mode the benchmark times: with CUDA-graph capture on a GPU (a step replays
    its graphs instead of launching thousands of kernels), inductor alone on a CPU."""
    return "reduce-overhead" if torch.device(device).type == "cuda" else "default"


def check_target(records: List[Dict[str, Any]], device: str) -> Optional[Dict[str, Any]]:
    """Issue 6's end-to-end target (set for an H100): the CIFAR-size step with the fused ops at least
    2x faster and with at least 2x less peak memory than on the eager reference ops. Off CUDA the
    memory compared is the memory kept for backward (the CPU peak leaves out what the step starts
    with, so it is not the process's peak)."""
    by_ops = {r["ops"]: r for r in records if r.get("config") == CIFAR.name and r.get("mode") == "eager"
              and "median_ms" in r}
    if "fused" not in by_ops or "eager" not in by_ops:
        return None
    fused, eager = by_ops["fused"], by_ops["eager"]
    memory_key = "peak_mb" if torch.device(device).type == "cuda" else "saved_mb"
    speedup = eager["median_ms"] / fused["median_ms"]
    memory_ratio = eager[memory_key] / fused[memory_key] if fused[memory_key] else None
    met = speedup >= 2.0 and memory_ratio is not None and memory_ratio >= 2.0
    return {"config": f"CIFAR size ({CIFAR.description})", "speedup": speedup, "memory": memory_key,
            "memory_ratio": memory_ratio, "target": 2.0, "met": met}


def check_step_targets(records: List[Dict[str, Any]], device: str) -> List[Dict[str, Any]]:
    """Issue 9's targets (set for an H100): the CIFAR-size fused step with bits 2,4,8 within
    STEP_LIMIT_S at batch 64 and 256, and within PEAK_LIMIT_MB of peak memory at batch 256; the
    fastest of the eager, compiled and graphed steps counts. CUDA only (empty elsewhere)."""
    if torch.device(device).type != "cuda":
        return []
    targets = []
    for batch, limit_s in STEP_LIMIT_S.items():
        runs = [r for r in records if r.get("ops") == "fused" and "median_ms" in r and r.get("batch") == batch
                and tuple(r.get("bits", ())) == CIFAR.bits and r.get("input_shape") == list(CIFAR.input_shape)
                and r.get("layers") == CIFAR.layers]
        if not runs:
            continue
        best = min(runs, key=lambda r: r["median_ms"])
        peak_limit = PEAK_LIMIT_MB if batch == 256 else None
        met = best["median_ms"] / 1e3 <= limit_s and (
            peak_limit is None or (best["peak_mb"] is not None and best["peak_mb"] <= peak_limit))
        targets.append({"config": best["description"], "mode": best["mode"], "step_s": best["median_ms"] / 1e3,
                        "limit_s": limit_s, "peak_mb": best["peak_mb"], "peak_limit_mb": peak_limit, "met": met})
    return targets

