"""Time candidate tiles of the Triton kernels, to set their launch table from measurements.

    python -m qdarts.benchmark.tune [--device cuda] [--quick] --out DIR

The Triton kernels take their tile (elements per program, warps) from ``tile_size`` in
``qdarts_kernels/triton/_common.py``: first choices from reasoning. This times each tunable kernel
(``TUNABLE_KERNELS``: the forward and backward of ``mixed_fake_quant``, its persistent backward for
per-tensor scales, and those of ``mixed_op_sum``) at the sizes the issue targets name, with every
candidate tile, through the public op on the ``triton`` backend (the tile applied by
``tile_override``), the candidates sampled in turn and timed as the kernel benchmark times them
(device time, launches issued ahead, cache flushed). It writes ``tune.json`` (every figure, with
the conditions) and ``tune.md`` (per kernel and size: each candidate's median, GB/s and share of
copy bandwidth; the fastest and the current choice marked). The table in ``tile_size`` is then set
from these figures.

On a CPU (the Triton interpreter) the figures mean nothing; the run checks the plumbing only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from qdarts_kernels.triton._common import TileSize, tile_override, tile_size

from ..checkpoint import atomic_write_text
from .cases import OpCase, implementation
from .runner import mode_functions
from .timing import CacheFlusher, copy_bandwidth_gbps, environment, measure_interleaved

#: Candidate tiles: 4 to 32 fp32 elements per thread (one to eight 16-byte loads per input).
CANDIDATES: Tuple[TileSize, ...] = (
    TileSize(1024, 4), TileSize(1024, 8), TileSize(2048, 4), TileSize(2048, 8), TileSize(4096, 4),
    TileSize(4096, 8), TileSize(8192, 8),
)


def _kernel(op: str, scaling: str, mode: str) -> str:
    """The TUNABLE_KERNELS name that times ``op`` in ``mode``: per-tensor scales take the
    persistent backward of mixed_fake_quant, per-channel ones the tiled one."""
    persistent = op == "mixed_fake_quant" and mode == "backward" and scaling == "per_tensor"
    return f"{op}_{mode}" + ("_per_tensor" if persistent else "")



#: (kernel, case, mode): the sizes of the issue-3 targets (fp32, K=3 bits (2,4,8) per tensor at 4M
#: and 32M elements; mixed_op_sum K=8 at 4M per input) and a per-channel activation.
TARGETS: Tuple[Tuple[str, OpCase, str], ...] = tuple(
    (_kernel(op, scaling, mode), OpCase(op, scaling, shape), mode)
    for op, scaling, shape in (
        ("mixed_fake_quant", "per_tensor", (64, 64, 32, 32)),
        ("mixed_fake_quant", "per_tensor", (256, 128, 32, 32)),
        ("mixed_fake_quant", "per_channel", (256, 16, 32, 32)),
        ("mixed_op_sum", "-", (64, 64, 32, 32)),
    )
    for mode in ("forward", "backward")
)

#: Sizes for --quick and for a CPU (interpreter) run: the plumbing, not the figures.
SMALL_SHAPE = (2, 4, 8, 8)


def _name(tile: TileSize) -> str:
    return f"{tile.elements}x{tile.num_warps}w"


def _with_tile(kernel: str, tile: TileSize, run):
    def timed(state):
        with tile_override(kernel, tile):
            return run(state)

    return timed


def tune_case(kernel: str, case: OpCase, mode: str, device: str, candidates: Sequence[TileSize], *,
              flush, copy_gbps: float, samples: Tuple[int, int, int, float]) -> List[Dict[str, Any]]:
    """One record per candidate tile (or with ``error``) for ``kernel`` on ``case`` in ``mode``."""
    leaves = case.make_inputs(device)
    grad = case.grad_output(device)
    setup, run = mode_functions(implementation(case, "triton"), leaves, grad)[mode]
    runs = {_name(t): (setup, _with_tile(kernel, t, run)) for t in candidates}
    warmup, min_samples, max_samples, budget_s = samples
    timings = measure_interleaved(runs, device, flush=flush, warmup=warmup, min_samples=min_samples,
                                  max_samples=max_samples, budget_s=budget_s, hide_launch=True)
    default = tile_size(case.numel, kernel)
    traffic = case.min_traffic_bytes(mode)
    records = []
    for tile in candidates:
        timing = timings[_name(tile)]
        base = {"kernel": kernel, "case": case.id, "numel": case.numel, "mode": mode,
                "elements": tile.elements, "num_warps": tile.num_warps, "current": tile == default}
        if isinstance(timing, Exception):
            records.append({**base, "error": f"{type(timing).__name__}: {timing}"})
            continue
        gbps = traffic / timing.median / 1e9
        records.append({**base, "median_ms": timing.median * 1e3, "p20_ms": timing.p20 * 1e3,
                        "p80_ms": timing.p80 * 1e3, "gbps": gbps, "pct_of_copy": 100.0 * gbps / copy_gbps})
    return records


def report(results: Dict[str, Any]) -> str:
    env = results["env"]
    lines = [
        "# Triton tile candidates",
        "",
        f"- Device: {env['device']}; torch {env['torch']}, triton {env['triton']}; {env['date']}",
        f"- Copy bandwidth (measured): {results['copy_gbps']:.1f} GB/s; device time per run, median (20th-80th "
        "percentile), launches issued ahead, cache flushed; the candidates sampled in turn",
        "- `*` the fastest candidate, `current` the tile `tile_size` chooses today",
        "",
        "| kernel | case | tile (elements x warps) | ms | GB/s | % of copy | |",
        "|---|---|---|---|---|---|---|",
    ]
    by_target: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for r in results["records"]:
        by_target.setdefault((r["kernel"], r["case"]), []).append(r)
    for (kernel, case), rows in by_target.items():
        ok = [r for r in rows if "median_ms" in r]
        best = min(ok, key=lambda r: r["median_ms"]) if ok else None
        for r in rows:
            tile = f"{r['elements']} x {r['num_warps']}"
            if "median_ms" not in r:
                lines.append(f"| {kernel} | {case} | {tile} | failed: {r['error']} | | | |")
                continue
            marks = " ".join(m for m, on in (("*", r is best), ("current", r["current"])) if on)
            lines.append(f"| {kernel} | {case} | {tile} | {r['median_ms']:.4g} ({r['p20_ms']:.4g}-{r['p80_ms']:.4g}) "
                         f"| {r['gbps']:.0f} | {r['pct_of_copy']:.0f}% | {marks} |")
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m qdarts.benchmark.tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu (interpreter: plumbing only)")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few samples (a smoke run)")
    p.add_argument("--out", required=True, help="folder for tune.json and tune.md")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here")
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--device cpu runs the Triton kernels under the interpreter: set TRITON_INTERPRET=1")
    small = args.quick or device == "cpu"
    os.makedirs(args.out, exist_ok=True)
    copy_bytes = 16 * 2**20 if small else 2**30
    results: Dict[str, Any] = {"env": environment(device), "copy_gbps": copy_bandwidth_gbps(device, copy_bytes),
                               "records": []}
    flush = CacheFlusher(device)
    samples = (1, 2, 3, 0.0) if small else (3, 10, 30, 0.2)
    done = set()
    for kernel, case, mode in TARGETS:
        if small:
            case = OpCase(case.op, case.scaling, SMALL_SHAPE)
        if (kernel, case.id) in done:  # small: the two per-tensor sizes are one
            continue
        done.add((kernel, case.id))
        records = tune_case(kernel, case, mode, device, CANDIDATES, flush=flush, copy_gbps=results["copy_gbps"],
                            samples=samples)
        results["records"] += records
        best = min((r for r in records if "median_ms" in r), key=lambda r: r["median_ms"], default=None)
        print(f"{kernel:<28} {case.id:<44} best "
              + (f"{best['elements']} x {best['num_warps']}: {best['median_ms']:.4g} ms" if best else "none"),
              flush=True)
        # saved after every target, each file whole (atomically): a run cut short keeps what it measured
        atomic_write_text(os.path.join(args.out, "tune.json"), json.dumps(results, indent=1))
        atomic_write_text(os.path.join(args.out, "tune.md"), report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
