"""``qdarts bench``: run the kernel and end-to-end benchmarks and write results.json, report.md and
plots into ``--out``."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any, Callable, Dict

import torch

import qdarts_kernels as qk
from qdarts_kernels._backends import resolve as resolve_backend

from ..checkpoint import atomic_write_text
from ..signals import how_it_ended, sigterm_as_interrupt
from . import cases as case_defs
from . import endtoend, report
from .runner import check_gpu_targets, check_targets, run_kernels
from .timing import (copy_bandwidth_gbps, environment, flush_bytes, last_level_cache_bytes,
                     settle_host_allocator)


#: Size of the tensor copied to measure the device's copy bandwidth: far beyond any cache.
COPY_BYTES = {"cpu": 256 * 2**20, "cuda": 2**30}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="a short sweep (fewer sizes and samples; about 2-4 minutes on a 2-core CPU, depending "
                             "on how busy it is)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="device to benchmark (default: cuda when available, else cpu)")
    parser.add_argument("--out", default="bench-results",
                        help="output folder for results.json, report.md and the plots (default: %(default)s)")
    parser.add_argument("--only", default=None, metavar="TEXT",
                        help="run only the kernel cases whose id contains TEXT (e.g. mixed_op_sum, 1024x)")
    parser.add_argument("--impls", default=None, metavar="LIST",
                        help="comma-separated implementations to time: eager, compiled, autograd (quantizers only) "
                             "and backend names (default: all of them that run on the device)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's own choice, normally all cores)")
    parser.add_argument("--skip-kernels", action="store_true", help="do not run the kernel benchmarks")
    parser.add_argument("--skip-end-to-end", action="store_true", help="do not time the supernet search step")
    parser.add_argument("--append", action="store_true",
                        help="keep what OUT/results.json (from an earlier run on the same device, with the same "
                             "versions of torch, CUDA, triton, Python and qdarts_kernels; on a CPU, with the same "
                             "--threads) holds for the parts this run skips (--skip-kernels / "
                             "--skip-end-to-end), so that the two parts can run as separate steps, each with its own "
                             "time limit, into one report")
    parser.add_argument("--compile-end-to-end", action="store_true",
                        help="also time the search step compiled as `qdarts search --compile` runs it "
                             "(compiling takes minutes)")
    parser.add_argument("--cuda-graph-end-to-end", action="store_true",
                        help="also time the fused search step replayed from CUDA graphs, as `qdarts search "
                             "--cuda-graph` runs it (CUDA only; with --quick the rest of the batch x bits matrix "
                             "is timed graphed only)")


def _log(msg: str) -> None:
    print(msg, flush=True)


#: What each part of a run writes into results.json.
_KERNEL_KEYS = ("kernels", "targets", "gpu_targets", "copy_bytes", "copy_gbps", "cache_bytes",  # the kernels' % of copy
                "flush_bytes")
_END_TO_END_KEYS = ("end_to_end", "end_to_end_note", "end_to_end_target", "step_targets")


#: What an earlier results.json must share with this run for --append to keep its figures: the report
#: states one device and one set of versions for all of them.
_SAME_FOR_APPEND = ("device", "torch", "cuda", "triton", "python", "qdarts_kernels")


def _keep_skipped_parts(results: Dict[str, Any], json_path: str, args: argparse.Namespace) -> None:
    """--append: take from the earlier results.json the parts this run skips."""
    earlier = report.read_json(json_path)
    for key in _SAME_FOR_APPEND:
        theirs, ours = earlier["env"].get(key), results["env"][key]
        if theirs != ours:
            raise ValueError(f"--append: {json_path} was measured with {key} {theirs!r}, this run has {ours!r}; "
                             "use another --out")
    for skipped, keys in ((args.skip_kernels, _KERNEL_KEYS), (args.skip_end_to_end, _END_TO_END_KEYS)):
        if skipped and earlier.get(keys[0]):
            results.update({k: earlier[k] for k in keys if k in earlier})
            # the conditions of the run that measured the kept part (this run's describe the rest)
            env = earlier.get("env", {})
            # (and whether it finished: a kept part cut by its time limit must not read as complete)
            results.setdefault("kept_runs", {})[keys[0]] = earlier.get("kept_runs", {}).get(keys[0]) or {
                "date": env.get("date"), "quick": earlier.get("quick"),
                "loadavg_1m_start": env.get("loadavg_1m_start"), "loadavg_1m_end": earlier.get("loadavg_1m_end"),
                "status": earlier.get("status", "complete"), "error": earlier.get("error")}
    if args.skip_kernels:  # kept kernel figures: settled only if their own run said so
        results["host_allocator_settled"] = earlier.get("host_allocator_settled", False)


def _check_writable(out: str) -> None:
    """Refuse an --out that cannot be written before anything is measured (not minutes later)."""
    try:
        with tempfile.NamedTemporaryFile(dir=out, prefix=".qdarts-bench-"):
            pass
    except OSError as e:
        raise ValueError(f"--out {out!r} cannot be written ({e.strerror or e})") from e


def _measure(args: argparse.Namespace, device: str, cases, impls, copy_bytes: int, results: Dict[str, Any],
             save: Callable[[], None]) -> None:
    """The kernel sweep, then the end-to-end steps, saving results.json and report.md as they come."""
    if not args.skip_kernels:
        _log(f"kernels: {len(cases)} cases")

        def partial(records):
            # the targets with every save, as the end-to-end part does: a run stopped by a time limit keeps
            # the verdicts on what it measured
            results["kernels"] = records
            results["targets"] = check_targets(records, device)
            results["gpu_targets"] = check_gpu_targets(records, device)
            save()

        partial(run_kernels(cases, device, quick=args.quick, copy_bytes=copy_bytes, impls=impls,
                            on_case_done=partial, log=_log))
    if not args.skip_end_to_end:
        _log("end to end: supernet search step")

        def partial_end_to_end(records):
            # the targets with every save: a run stopped by a time limit keeps its verdicts too
            results["end_to_end"] = records
            results["end_to_end_target"] = endtoend.check_target(records, device)
            results["step_targets"] = endtoend.check_step_targets(records, device)
            save()

        results["end_to_end_note"] = endtoend.method_note(device, resolve_backend(None, torch.device(device)))
        records, results["end_to_end_note"] = endtoend.run(
            device, quick=args.quick, compiled=args.compile_end_to_end, graphed=args.cuda_graph_end_to_end, log=_log,
            on_config_done=partial_end_to_end)
        partial_end_to_end(records)


def run(args: argparse.Namespace) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")
    from ..search import check_device

    check_device(device, None)  # QDARTS_BACKEND and the CPU kernels' variables, before any figure and --out
    if args.skip_kernels and args.skip_end_to_end and not args.append:  # --append: the kept parts' new report
        raise ValueError("--skip-kernels with --skip-end-to-end leaves nothing to measure (with --append, the report "
                         "of the figures in --out is written again)")
    if args.cuda_graph_end_to_end and torch.device(device).type != "cuda":
        raise ValueError(f"--cuda-graph-end-to-end needs --device cuda, got {device!r}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    impls = args.impls.split(",") if args.impls else None
    known = {case_defs.EAGER, case_defs.COMPILED, case_defs.AUTOGRAD, *qk.available_backends()}
    if impls is not None and not set(impls) <= known:
        raise ValueError(f"--impls: {', '.join(sorted(set(impls) - known))} is not one of {', '.join(sorted(known))} "
                         f"(on {device})")
    cases = [] if args.skip_kernels else case_defs.sweep(device, args.quick)
    if args.only and not args.skip_kernels:
        cases = [c for c in cases if args.only in c.id]
        if not cases:
            raise ValueError(f"--only {args.only!r} matches no case of the {'quick ' if args.quick else ''}sweep")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out!r} is a file, not a folder")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {args.out!r} cannot be created ({e.strerror or e})") from e
    _check_writable(args.out)
    json_path = os.path.join(args.out, "results.json")
    started = time.perf_counter()

    settle_host_allocator()
    copy_bytes = COPY_BYTES[device]
    results: Dict[str, Any] = {
        "schema": 1,
        # "running" until the end: a file that still says so is from a run that was stopped (a time limit)
        "status": "running",
        "env": environment(device),
        "quick": bool(args.quick),
        "copy_bytes": copy_bytes,
        "cache_bytes": last_level_cache_bytes(device),
        "flush_bytes": flush_bytes(device),
        "host_allocator_settled": True,
        "kernels": [],
        "targets": [],
        "gpu_targets": [],
        "end_to_end": [],
    }
    if args.append and os.path.exists(json_path):  # refused or kept before anything is measured
        _keep_skipped_parts(results, json_path, args)
    if "copy_gbps" not in results:  # else kept with the kernel figures whose shares are against it
        results["copy_gbps"] = copy_bandwidth_gbps(device, copy_bytes)
    # the plots (of the kernel figures) are drawn at the end: an earlier run's must not stand beside this
    # run's results meanwhile, unless they are of the kernel figures kept by --append (an end-to-end part
    # stopped by its time limit then leaves the kernel part's plots)
    if "kernels" not in results.get("kept_runs", {}):
        for name in report.PLOT_FILES:
            if os.path.isfile(os.path.join(args.out, name)):
                os.remove(os.path.join(args.out, name))
    _log(f"qdarts bench on {results['env']['device']}: copy bandwidth {results['copy_gbps']:.1f} GB/s")

    def save() -> None:
        # every figure carries the conditions it was measured under (kept ones, those of their own run)
        for r in results["kernels"] + results["end_to_end"]:
            for k in ("device", "torch", "triton", "python", "date"):
                r.setdefault(k, results["env"][k])
        report.write_json(json_path, results)
        # the report too (cheap; the plots only at the end): a run stopped by a time limit leaves both in step
        atomic_write_text(os.path.join(args.out, "report.md"), report.markdown_report(results))

    try:
        save()  # "running" replaces an earlier run's "complete" before the first case ends (or is killed)
        _measure(args, device, cases, impls, copy_bytes, results, save)
        results["wall_s"] = time.perf_counter() - started
        results["loadavg_1m_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        plots = report.plot(results, args.out)  # before "complete": an interrupted drawing is no complete run
        results["status"] = "complete"
        save()
    except BaseException as e:  # Ctrl-C, or a failure outside the per-case records: say so in what is kept
        results["status"] = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        if not isinstance(e, KeyboardInterrupt):
            results["error"] = f"{type(e).__name__}: {e}"
        try:
            save()
        except OSError:  # the file system is what failed: the error to report is the one raised
            pass
        raise
    _log(f"wrote {json_path}, {os.path.join(args.out, 'report.md')}"
         + "".join(f", {p}" for p in plots) + f" in {results['wall_s']:.0f} s")
    failures = [r for r in results["kernels"] + results["end_to_end"] if "error" in r]
    for t in results["targets"]:
        if t["met"] is not None:
            _log(f"target {t['op']} {t['scaling']}: {t['measured']:.2f}x (>= {t['ratio']}x: "
                 f"{'met' if t['met'] else 'NOT met'})")
    for t in results.get("gpu_targets", []):
        _log("target " + report.gpu_target_text(t))
    for t in results.get("step_targets", []):
        _log(f"target search step: {t['config']}: {t['step_s']:.3f} s (<= {t['limit_s']} s)"
             + (f", peak {t['peak_mb']:.0f} MB (<= {t['peak_limit_mb']:.0f} MB)" if t["peak_limit_mb"] else "")
             + f": {'met' if t['met'] else 'NOT met'}")
    if failures:
        _log(f"{len(failures)} measurement(s) failed; see 'Failures' in the report")
        return 1
    return 0


def main(argv=None) -> int:
    """``python -m qdarts.benchmark``: a refused option is one line and exit status 2, as from ``qdarts bench``."""
    parser = argparse.ArgumentParser(prog="qdarts bench", description=__doc__)
    add_arguments(parser)
    try:
        with sigterm_as_interrupt():  # bench/gpu_check.sh's `timeout` ends a step with SIGTERM
            return run(parser.parse_args(argv))
    except ValueError as e:
        print(f"qdarts bench: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system failed mid-run (disk full, permissions changed): not a bug
        print(f"qdarts bench: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        how, status = how_it_ended(e)
        print(f"qdarts bench: {how} (results.json and report.md hold what was measured)", file=sys.stderr)
        return status
