"""Where a search step's time goes: the profiler's view of one step of the fused supernet.

    python -m qdarts.benchmark.profile --device cuda --config cifar-b256 [--rows 25]

Two warm-up steps, then one profiled step (``torch.profiler``, host and, on CUDA, device activity).
Prints the step's wall time, the GPU's busy time (the kernels' summed durations: one stream, so
they do not overlap), the host-side launch calls and the kernels run, then the ops sorted by self
device time and by self host time. A step whose GPU busy time is a small part of its wall time is
bound by the host (Python, dispatch and launches), not by arithmetic or memory traffic: the
question issue 9 asks of the remaining time.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Dict, List, Optional

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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m qdarts.benchmark.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", default="cifar", choices=sorted(configs()))
    p.add_argument("--backend", default=None, help="backend of the public ops (default: the automatic choice)")
    p.add_argument("--rows", type=int, default=25, help="rows of each table")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    print(profile_step(configs()[args.config], args.device, args.backend, args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
