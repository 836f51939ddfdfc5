"""Where a search step's time goes: the profiler's view of one step of the fused supernet.

    python -m qdarts.benchmark.profile --device cuda --config cifar-b256 [--rows 25] [--memory]

Two warm-up steps, then one profiled step (``torch.profiler``, host and, on CUDA, device activity).
Prints the step's wall time, the GPU's busy time (the kernels' summed durations: one stream, so
they do not overlap), the host-side launch calls and the kernels run, then the ops sorted by self
device time and by self host time. A step whose GPU busy time is a small part of its wall time is
bound by the host (Python, dispatch and launches), not by arithmetic or memory traffic: the
question issue 9 asks of the remaining time.

``--memory``: what is allocated at the peak of a step. On CUDA by the line of qdarts code that
asked for it, from the CUDA allocator's trace (``torch.cuda.memory._record_memory_history``); on
CPU by the autograd function or op that asked for it, from the profiler's allocation events. The
part of the peak beyond what autograd keeps for backward is issue 6's peak-memory question (on
this CPU the fused CIFAR-size step's peak is what it keeps, 771 against 754 MB at batch 64).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .endtoend import CIFAR, SEARCH_STEP_MATRIX, E2EConfig, SearchStep, digits_config
from .timing import count_launches, synchronize


def configs() -> Dict[str, E2EConfig]:
    """The end-to-end benchmark's configurations by name."""
    return {cfg.name: cfg for cfg in (digits_config(), CIFAR, *SEARCH_STEP_MATRIX)}


def profile_step(cfg: E2EConfig, device: str, backend: Optional[str] = None, rows: int = 25) -> str:
    """The report described in the module docstring, for one step of ``cfg`` on ``device``."""
    from torch.profiler import ProfilerActivity, profile

    step = SearchStep(cfg, device, backend)
    for _ in range(2):  # the first step allocates and (Triton) compiles; the second runs as later ones do
        step()
    synchronize(device)
    on_cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        step()
        synchronize(device)
        wall_s = time.perf_counter() - t0
    events = prof.events()
    kernel_us = sum(e.time_range.elapsed_us() for e in events
                    if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA)
    counts = count_launches(events)
    lines: List[str] = [
        f"config: {cfg.name} ({cfg.description}), device {device}, backend {backend or 'automatic'}",
        f"step wall time under the profiler: {wall_s * 1e3:.1f} ms",
    ]
    if on_cuda:
        lines.append(f"GPU busy (kernels' summed durations): {kernel_us / 1e3:.1f} ms "
                     f"({100 * kernel_us / 1e3 / (wall_s * 1e3):.0f}% of the wall time)")
        lines.append(f"host launch calls: {counts['launches']}, kernels run: {counts['kernels']}")
    averages = prof.key_averages()
    if on_cuda:
        lines += ["", "## by self device time", averages.table(sort_by="self_device_time_total", row_limit=rows)]
    lines += ["", "## by self host time", averages.table(sort_by="self_cpu_time_total", row_limit=rows)]
    return "\n".join(lines)


def _allocation_site(frames: List[Dict[str, Any]]) -> str:
    """The innermost frame of qdarts code that asked for an allocation (else the innermost frame)."""
    if not frames:
        return "(no stack)"
    f = next((f for f in frames if "qdarts" in f.get("filename", "")), None)
    where = "/".join(f["filename"].rsplit("/", 2)[-2:]) if f else frames[0].get("filename", "?").rsplit("/", 1)[-1]
    f = f or frames[0]
    return f"{where}:{f.get('line')} {f.get('name')}"


def _op_site(stack: List[str]) -> str:
    """The autograd function or qdarts op (the innermost) and the op that allocated, of a profiler
    op stack (outermost first)."""
    caller = next((name for name in reversed(stack[:-1]) if name.startswith(("qdarts", "_")) or "Backward" in name),
                  "-")
    return f"{caller} > {stack[-1] if stack else '-'}"


def cpu_allocations(event_tree, sites: bool = True) -> List[Dict[str, Any]]:
    """The CPU allocations and frees of a profiled run (``profile(profile_memory=True)``:
    ``prof.profiler.kineto_results.experimental_event_tree()``) in time order, as the events of
    :func:`memory_at_peak`, each allocation with the ``site`` of :func:`_op_site` (with ``sites``;
    else "-": the op stacks are most of the walk's time)."""
    from torch._C._profiler import _EventType

    found: List[Tuple[int, Dict[str, Any]]] = []
    pending = [(root, [] if sites else None) for root in event_tree]
    while pending:
        event, stack = pending.pop()
        if event.tag == _EventType.Allocation:
            f = event.extra_fields
            if f.device.type == "cpu":
                action = "alloc" if f.alloc_size > 0 else "free_completed"
                found.append((event.start_time_ns, {"action": action, "addr": f.ptr, "size": abs(f.alloc_size),
                                                    "site": _op_site(stack) if sites else "-"}))
            continue
        pending.extend((child, stack + [event.name] if sites else None) for child in event.children)
    found.sort(key=lambda te: te[0])
    return [e for _, e in found]


def cpu_memory_at_peak(run: Callable[[], Any], sites: bool = True) -> Tuple[int, Dict[str, int]]:
    """:func:`memory_at_peak` of the CPU allocations ``run()`` makes, from the profiler's allocation
    events (PyTorch's CPU allocator and the C++ kernels' output cache report to it)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    return memory_at_peak(cpu_allocations(prof.profiler.kineto_results.experimental_event_tree(), sites))


def memory_at_peak(events: List[Dict[str, Any]]) -> Tuple[int, Dict[str, int]]:
    """From an allocator trace (``torch.cuda.memory._snapshot()``'s ``device_traces[i]``, or
    :func:`cpu_allocations`: events with ``action`` alloc / free_completed, ``addr``, ``size`` and
    either ``frames`` or a ``site``): the largest number of bytes allocated at once during the
    trace, and what was alive then, summed by allocation site."""
    live: Dict[int, Tuple[int, str]] = {}
    total = peak = 0
    at_peak: Dict[int, Tuple[int, str]] = {}
    for e in events:
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], e.get("site") or _allocation_site(e.get("frames") or []))
            total += e["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif e["action"] == "free_completed" and e["addr"] in live:
            total -= live.pop(e["addr"])[0]
    by_site: Dict[str, int] = {}
    for size, site in at_peak.values():
        by_site[site] = by_site.get(site, 0) + size
    return peak, dict(sorted(by_site.items(), key=lambda kv: -kv[1]))


def memory_report(cfg: E2EConfig, device: str, backend: Optional[str] = None, rows: int = 25) -> str:
    """What is allocated at the peak of one step of ``cfg``: allocations made during the step, by
    the site that asked for them (see the module docstring), on top of what the step starts with
    (parameters, optimiser states, the batches)."""
    step = SearchStep(cfg, device, backend)
    for _ in range(2):
        step()
    lines = [f"config: {cfg.name} ({cfg.description}), device {device}"]
    if torch.device(device).type == "cpu":
        peak, by_site = cpu_memory_at_peak(step)
    else:
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
        try:
            torch.cuda.reset_peak_memory_stats(device)
            step()
            torch.cuda.synchronize(device)
            snapshot = torch.cuda.memory._snapshot()
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)
        peak, by_site = memory_at_peak(snapshot["device_traces"][torch.device(device).index or 0])
        lines.append(f"allocated when the step starts: {start / 2**20:.1f} MB; the step's peak "
                     f"(max_memory_allocated): {torch.cuda.max_memory_allocated(device) / 2**20:.1f} MB")
    lines.append(f"allocated by the step and alive at its peak: {peak / 2**20:.1f} MB, by site:")
    lines += [f"  {size / 2**20:9.1f} MB  {site}" for site, size in list(by_site.items())[:rows]]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m qdarts.benchmark.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", default="cifar", choices=sorted(configs()))
    p.add_argument("--backend", default=None, help="backend of the public ops (default: the automatic choice)")
    p.add_argument("--rows", type=int, default=25, help="rows of each table")
    p.add_argument("--memory", action="store_true",
                   help="also list what is allocated at the step's peak, by allocation site")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    print(profile_step(configs()[args.config], args.device, args.backend, args.rows), flush=True)
    if args.memory:
        print("\n## memory at the peak of a step\n" + memory_report(configs()[args.config], args.device, args.backend,
                                                                  args.rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
