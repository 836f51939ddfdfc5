"""How things are timed: cache flush, device synchronisation, warm-up, percentiles, copy bandwidth,
memory kept for backward, and the conditions recorded with every figure."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

#: Used when the last-level cache size cannot be read (larger than any current CPU LLC or GPU L2).
_FALLBACK_CACHE_BYTES = 128 * 2**20


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def last_level_cache_bytes(device: str) -> int:
    """Size of the cache a benchmark input could stay in between runs: the GPU's L2, or the CPU's
    last-level cache as Linux reports it."""
    if torch.device(device).type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)) or _FALLBACK_CACHE_BYTES
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    for index in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        try:
            with open(os.path.join(base, index, "size")) as f:
                text = f.read().strip()
            best = max(best, int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
        except (OSError, ValueError, IndexError):  # entries such as "uevent" have no size
            continue
    return best or _FALLBACK_CACHE_BYTES


#: Just under glibc's DEFAULT_MMAP_THRESHOLD_MAX (32 MiB on 64-bit), the largest block whose free
#: still raises the dynamic mmap threshold.
_ALLOCATOR_SETTLING_BYTES = 30 * 2**20


def settle_host_allocator() -> None:
    """Put the host allocator into the state of a long-running training process before timing.

    glibc's malloc serves a block above its mmap threshold (128 KiB at start) with a fresh mmap, whose
    pages fault (and are zeroed) on first touch, and it raises the threshold (and the heap trim
    threshold, to twice that) to the size of each larger mmapped block freed, up to 32 MiB. So
    eager PyTorch code that allocates multi-megabyte temporaries pays thousands of page faults per
    run (measured: mixed_op_sum K=8 1M fp32 eager forward+backward 9.7-11.9 ms with 2-3.7 k faults
    per run, 8.0 ms with none) until some earlier code has freed a block as large, and its timings
    would depend on which cases ran before. Freeing one ~30 MiB block settles that once, for every
    case, in the eager code's favour (the fused CPU kernels keep their outputs in a cache and fault
    in neither state). A no-op under other allocators."""
    block = torch.empty(_ALLOCATOR_SETTLING_BYTES, dtype=torch.uint8)
    block[:: 4096].zero_()  # touch it, so that it is really mapped
    del block


def flush_bytes(device: str) -> int:
    """Bytes the cache flush rewrites: twice the GPU's L2, four times the CPU's last-level cache as
    Linux reports it. Four on a CPU because the few vCPUs of a VM may sit on two core complexes with
    a last-level cache each while Linux reports one: on the 2-core VM of bench/results (32 MiB
    reported), the fused mixed_op_sum K=8 over 1M fp32 elements, forward+backward, run back to back,
    took 2.7 ms after a 64 MiB flush and 3.1-3.4 ms after one of 96, 128 or 256 MiB (part of its
    36 MiB of inputs had stayed cached)."""
    return (2 if torch.device(device).type == "cuda" else 4) * last_level_cache_bytes(device)


class CacheFlusher:
    """Writes a buffer of :func:`flush_bytes`, so that the next timed run reads its inputs from
    memory, as it would inside a network, and not from a cache warmed by the previous run. ``add_``
    (a read-modify-write) rather than ``zero_``: large memsets may use streaming stores that bypass
    the cache."""

    def __init__(self, device: str):
        self.buffer = torch.zeros(flush_bytes(device) // 4, dtype=torch.float32, device=device)

    def __call__(self) -> None:
        self.buffer.add_(1.0)


@dataclass
class Timing:
    """Seconds per run: the median and the 20th/80th percentiles of ``samples``; ``host_samples``
    (when the launches were hidden, see :func:`measure_interleaved`) the host's seconds to issue
    each run."""

    samples: List[float]
    host_samples: List[float] = field(default_factory=list)

    def quantile(self, q: float) -> float:
        return float(torch.tensor(self.samples, dtype=torch.float64).quantile(q))

    @property
    def median(self) -> float:
        return self.quantile(0.5)

    @property
    def p20(self) -> float:
        return self.quantile(0.2)

    @property
    def p80(self) -> float:
        return self.quantile(0.8)

    @property
    def host_median(self) -> Optional[float]:
        # quantile, not Tensor.median (the lower of the two middle values): the same median as the device's
        return float(torch.tensor(self.host_samples, dtype=torch.float64).quantile(0.5)) if self.host_samples else None


#: GPU clock cycles of the busy-wait queued before a run whose launches are hidden: about 4 ms at
#: the H100's 1.98 GHz, longer than the host took to issue a forward+backward of any op benchmarked
#: there (at most 2.1 ms, the eager reference's). The runs record the host's time, and the report
#: marks those whose host time exceeded the wait (:func:`busy_wait_seconds`).
HIDE_LAUNCH_CYCLES = 8_000_000

_busy_wait_s: Dict[int, float] = {}


def _busy_wait() -> None:
    """Keep the GPU busy for HIDE_LAUNCH_CYCLES (``torch.cuda._sleep``, which PyTorch's own tests use)."""
    torch.cuda._sleep(HIDE_LAUNCH_CYCLES)


def busy_wait_seconds() -> float:
    """How long the busy-wait keeps the current GPU busy (measured once per device, with events)."""
    index = torch.cuda.current_device()
    if index not in _busy_wait_s:
        _busy_wait()  # the first launch of the kernel pays for loading it
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        _busy_wait()
        end.record()
        end.synchronize()
        _busy_wait_s[index] = begin.elapsed_time(end) / 1e3
    return _busy_wait_s[index]


def measure_interleaved(
    runs: Dict[str, Tuple[Callable[[], Any], Callable[[Any], Any]]],
    device: str,
    *,
    flush: Optional[Callable[[], None]] = None,
    warmup: int = 2,
    min_samples: int = 5,
    max_samples: int = 50,
    budget_s: float = 2.0,
    hide_launch: Union[bool, Collection[str]] = False,
) -> Dict[str, Union[Timing, Exception]]:
    """Time several implementations of one piece of work, one sample of each in turn.

    ``runs`` maps a name to ``(setup, run)``; only ``run(setup())`` is inside the timed region.
    Each sample: ``state = setup()`` (untimed: e.g. the forward pass before a backward-only
    timing), flush the cache, synchronise, then time ``run(state)`` up to the device finishing it
    (CUDA events on a GPU, ``perf_counter`` after a synchronise elsewhere). Round-robin rather than
    one implementation after the other: on a machine whose speed drifts (a shared VM, a GPU
    warming up), the ratios of the medians then compare samples taken side by side. ``warmup``
    rounds come first and are discarded; sampling stops after ``max_samples`` rounds or once
    ``budget_s`` seconds per implementation have been spent and ``min_samples`` rounds were taken.
    An implementation that raises leaves the rotation; its entry is the exception.

    ``hide_launch`` (CUDA): the time the device spends on the run, not the host's time to issue it.
    A busy-wait kernel is queued before the start event, so the host issues the whole run while the
    GPU still waits and the events then time the kernels back to back, as in a network whose host
    runs ahead of its GPU (what ``triton.testing.do_bench`` measures, with the cache flushed). The
    host's time to issue each run is recorded beside it (``Timing.host_samples``): a run whose host
    time exceeds its device time is bound by the host when it runs alone. ``True`` hides the launches
    of every run; a collection of names, those of the runs so named (a one-kernel run such as a copy
    has no launches worth the wait).
    """
    on_cuda = torch.device(device).type == "cuda"
    hidden = frozenset(() if not on_cuda else runs if hide_launch is True else hide_launch or ())
    host: Dict[str, List[float]] = {name: [] for name in runs}
    samples: Dict[str, List[float]] = {name: [] for name in runs}
    failed: Dict[str, Exception] = {}
    started = time.perf_counter()
    for i in range(warmup + max_samples):
        for name, (setup, run) in runs.items():
            if name in failed:
                continue
            try:
                state = setup()
                if flush is not None:
                    flush()
                synchronize(device)
                if on_cuda:
                    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    if name in hidden:
                        _busy_wait()
                    begin.record()
                    t0 = time.perf_counter()
                    result = run(state)
                    issued_s = time.perf_counter() - t0
                    end.record()
                    end.synchronize()
                    seconds = begin.elapsed_time(end) / 1e3
                else:
                    t0 = time.perf_counter()
                    result = run(state)
                    seconds = time.perf_counter() - t0
                del result, state
            except Exception as e:  # reported per implementation; the others go on
                failed[name] = e
                continue
            if i >= warmup:
                samples[name].append(seconds)
                if name in hidden:
                    host[name].append(issued_s)
        rounds = i + 1 - warmup
        if rounds >= min_samples and time.perf_counter() - started > budget_s * max(1, len(runs) - len(failed)):
            break
    return {name: failed.get(name) or Timing(samples[name], host[name]) for name in runs}


def measure(
    run: Callable[[Any], Any],
    setup: Callable[[], Any],
    device: str,
    **sampling: Any,
) -> Timing:
    """Time ``run(setup())`` alone: :func:`measure_interleaved` with one implementation (same
    keyword arguments); raises what ``run`` raises."""
    result = measure_interleaved({"run": (setup, run)}, device, **sampling)["run"]
    if isinstance(result, Exception):
        raise result
    return result


def copy_run(device: str, nbytes: int) -> Tuple[Callable[[], None], Callable[[Any], torch.Tensor]]:
    """(setup, run) of ``dst.copy_(src)`` over ``nbytes`` (a tensor far larger than the cache): the
    copy whose bandwidth, counting the read and the write (2 x nbytes per copy), is the practical
    ceiling a memory-bound kernel can reach."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return (lambda: None), (lambda _: dst.copy_(src))


def copy_bandwidth_gbps(device: str, nbytes: int, budget_s: float = 2.0) -> float:
    """Achieved bandwidth of :func:`copy_run` over ``nbytes``, timed alone."""
    setup, run = copy_run(device, nbytes)
    timing = measure(run, setup, device, warmup=3, min_samples=10, budget_s=budget_s, hide_launch=True)
    return 2 * nbytes / timing.median / 1e9


def kept_bytes(run: Callable[[], Any], exclude: Iterable[torch.Tensor]) -> int:
    """Bytes of the tensors autograd keeps for backward while ``run()`` runs, one count per distinct
    storage, not counting the storages of ``exclude`` (what the caller holds anyway).

    Counted with ``torch.autograd.graph.saved_tensors_hooks``, which also sees the tensors saved by
    compiled graphs and custom ops.
    """
    held = {t.untyped_storage().data_ptr() for t in exclude}
    kept: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in held:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(kept.values())


#: Ops that launch no kernel: they only make a tensor (views are recognised by their schema).
_NO_WORK_OPS = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_unsafe_view",
                          "is_same_size", "_reshape_alias", "lift_fresh"})


def dispatched_ops(run: Callable[[], Any]) -> int:
    """How many ATen and custom ops that do work ``run()`` dispatches (views and bare allocations
    not counted), through autograd's backward too. On a GPU each such op launches at least one
    kernel from the host, so this is an eager step's launch count, counted the same way on any
    device; compiled code should not be run under it (it would see the graph's ops re-dispatched)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    count = 0

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            nonlocal count
            if not func.is_view and func.overloadpacket.__name__ not in _NO_WORK_OPS:
                count += 1
            return func(*args, **(kwargs or {}))

    with Count():
        run()
    return count


#: Host-side calls that launch GPU work, as the profiler names them (runtime and driver API; Triton
#: launches through the driver; a CUDA-graph replay is one launch).
CUDA_LAUNCH_CALLS = frozenset({"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                               "cudaGraphLaunch", "cudaLaunchCooperativeKernel"})


def cuda_launches(run: Callable[[], Any]) -> Dict[str, int]:
    """``{"launches": host-side launch calls, "kernels": kernels run on the GPU}`` of one ``run()``,
    from the profiler (a step replayed from CUDA graphs makes few launches for many kernels)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    return count_launches(prof.events())


def count_launches(events: Iterable[Any]) -> Dict[str, int]:
    """The counts of :func:`cuda_launches` from profiler events (``name``, ``device_type``)."""
    launches = kernels = 0
    for e in events:
        if e.name in CUDA_LAUNCH_CALLS:
            launches += 1
        elif getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA:
            kernels += 1
    return {"launches": launches, "kernels": kernels}


def saved_bytes(fn: Callable[..., torch.Tensor], leaves: Sequence[torch.Tensor]) -> int:
    """Bytes of the tensors autograd keeps for the backward of ``fn(*leaves)`` beyond the inputs
    themselves (see :func:`kept_bytes`)."""
    return kept_bytes(lambda: fn(*leaves), leaves)


def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads)"


def environment(device: str) -> Dict[str, Any]:
    """The conditions recorded with every figure."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import qdarts_kernels

    cpu_kernels = qdarts_kernels.cpu_kernels.info()
    return {
        "device": device_name(device),
        "device_type": torch.device(device).type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": sys.version.split()[0],
        "qdarts_kernels": getattr(qdarts_kernels, "__version__", None),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        # the instruction set the C++ CPU kernels dispatched to, and the threads they really got
        "cpu_kernels_isa": cpu_kernels["isa"] if cpu_kernels else None,
        "cpu_kernels_threads": cpu_kernels["threads"] if cpu_kernels else None,
        # other work on the machine skews CPU timings: say how busy it was
        "loadavg_1m_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
