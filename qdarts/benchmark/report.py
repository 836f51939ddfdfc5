"""Writes the benchmark results: ``results.json``, a Markdown report and PNG plots."""

from __future__ import annotations

import json
import os
import statistics
from typing import Any, Dict, Iterable, List, Optional

from ..checkpoint import atomic_write_text
from .cases import AUTOGRAD, COMPILED, EAGER, MODES

MB = 2**20


def read_json(path: str) -> Dict[str, Any]:
    """A results.json written by write_json; a clear error if it is not one."""
    try:
        with open(path) as f:
            payload = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"cannot read benchmark results {path}: {e}") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("env"), dict):
        raise SystemExit(f"{path} is not a results.json of `qdarts bench`")
    return payload


def write_json(path: str, payload: Dict[str, Any]) -> None:
    """Atomic write (temporary file + rename), so a killed run never leaves half a file; the file gets
    the mode a plain open() would give it, as the search's outputs do."""
    atomic_write_text(path, json.dumps(payload, indent=1))


def _num(v: Optional[float], digits: int = 3) -> str:
    """A figure with ``digits`` significant digits ('-' when missing); a figure of ``digits`` or more
    integer digits, rounding included (99.6 with 2 digits), in full rather than as 1e+02."""
    if v is None:
        return "-"
    if v == 0:
        return "0"
    text = f"{v:.{digits}g}"
    return f"{v:.0f}" if "e+" in text else text


def _ratio(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _size(numel: int) -> str:
    for unit, div in (("M", 2**20), ("K", 2**10)):
        if numel >= div:
            return f"{numel / div:g}{unit}"
    return str(numel)


def _shape(r: Dict[str, Any]) -> str:
    return "x".join(map(str, r["shape"])) + f" ({_size(r['numel'])})"


_METRIC_TEXT = {"pct_of_copy": ("% of copy bandwidth", "{:.0f}%"),
                "speedup_vs_compiled": ("x torch.compile", "{:.1f}x")}


def _host_cell(r: Dict[str, Any]) -> str:
    """'host ms' of a record, marked * where the host took longer than the busy-wait hid."""
    host, wait = r.get("host_ms"), r.get("launch_wait_ms")
    return _num(host) + (" *" if host is not None and wait is not None and host > wait else "")


def gpu_target_text(t: Dict[str, Any]) -> str:
    """One issue-3/4 target row (``runner.check_gpu_targets``) in words."""
    name, fmt = _METRIC_TEXT[t["metric"]]
    measured = "not measured" if t["measured"] is None else fmt.format(t["measured"])
    verdict = {True: "met", False: "NOT met", None: "-"}[t["met"]]
    return (f"{t['op']}{'' if t['scaling'] == '-' else ' ' + t['scaling']} {_size(t['numel'])} fp32 forward+backward, "
            f"{t['backend']}: {measured} (target >= {fmt.format(t['min'])} {name.lstrip('%x ')}): {verdict}")


def _gpu_target_table(targets: List[Dict[str, Any]]) -> List[str]:
    rows = []
    for t in targets:
        name, fmt = _METRIC_TEXT[t["metric"]]
        rows.append([t["op"] + ("" if t["scaling"] == "-" else f" {t['scaling']}"),
                     "x".join(map(str, t["shape"])) if t.get("shape") else _size(t["numel"]), t["backend"],
                     _num(t.get("ms")), _num(t.get("host_ms")), f">= {fmt.format(t['min'])} {name.lstrip('%x ')}",
                     "-" if t["measured"] is None else fmt.format(t["measured"]),
                     {True: "yes", False: "NO", None: "-"}[t["met"]]])
    return _table(["op", "shape", "backend", "device ms", "host ms", "target", "measured", "met"], rows)


def _table(header: List[str], rows: Iterable[List[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _ok(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return [r for r in records if "median_ms" in r]


def _labels(records: List[Dict[str, Any]]) -> List[str]:
    seen: List[str] = []
    for r in records:
        if r["label"] not in seen:
            seen.append(r["label"])
    return seen


def _case_key(r: Dict[str, Any]):
    return (r["label"], r["numel"], r["dtype"])


def _earlier_parts(results: Dict[str, Any]) -> str:
    """Where ``--append`` kept a part measured by an earlier run: when, and under which sweep and load
    (the date, sweep and load that follow are this run's)."""
    notes = []
    this_run = results["env"]["date"]
    for part, key in (("kernel figures", "kernels"), ("end-to-end figures", "end_to_end")):
        kept = results.get("kept_runs", {}).get(key)
        if kept:
            notes.append(f"{part} from {kept['date']} ({'quick' if kept['quick'] else 'full'} sweep, 1-minute load "
                         f"{_num(kept.get('loadavg_1m_start'), 2)} to {_num(kept.get('loadavg_1m_end'), 2)})")
            continue
        dates = sorted({r["date"] for r in results.get(key, []) if r.get("date") and r["date"] != this_run})
        if dates:  # a results.json from before kept_runs: the figures' own dates
            notes.append(f"{part} from {' and '.join(dates)}")
    return f" (this run; {', '.join(notes)}, an earlier run's, kept by --append)" if notes else ""


def beside_copy_gbps(records: List[Dict[str, Any]]) -> List[float]:
    """The copy bandwidths timed beside the cases of ``records``, one per case and mode (none in results
    of before they were: their shares are against the copy timed once at the start)."""
    beside = {(r["label"], r["numel"], r["dtype"], r["mode"]): r["copy_gbps"]
              for r in _ok(records) if "copy_gbps" in r}
    return list(beside.values())


def copy_bandwidth_line(results: Dict[str, Any]) -> str:
    line = (f"- Copy bandwidth (measured, `dst.copy_(src)` of {results['copy_bytes'] // MB} MiB, read + write): "
            f"{results['copy_gbps']:.1f} GB/s at the start")
    beside = beside_copy_gbps(results["kernels"])
    if not beside:
        return line
    return (line + f"; the same copy is timed in every case's rotation, beside its implementations, and each "
            f"'% of copy' is against the copy timed beside it (a machine's bandwidth drifts): median over the "
            f"cases and modes {statistics.median(beside):.1f} GB/s, from {min(beside):.1f} to {max(beside):.1f}")


def conditions_lines(results: Dict[str, Any]) -> List[str]:
    env = results["env"]
    versions = f"torch {env['torch']}" + (f" (CUDA {env['cuda']})" if env.get("cuda") else "")
    versions += f", triton {env['triton'] or 'not installed'}, Python {env['python']}"
    cpu_kernels = ""
    if env.get("cpu_kernels_isa"):
        cpu_kernels = (f"; C++ CPU kernels: {env['cpu_kernels_isa']} instruction set, {env['cpu_kernels_threads']} "
                       f"threads, large outputs from their buffer cache (`qdarts_kernels.cpu_kernels`)")
    return [
        f"- Device: {env['device']}{cpu_kernels}",
        f"- Versions: {versions}; qdarts_kernels {env['qdarts_kernels']}; {env['platform']}",
        f"- Date: {env['date']}{_earlier_parts(results)}; sweep: {'quick' if results['quick'] else 'full'}; "
        f"1-minute load average "
        f"{_num(env.get('loadavg_1m_start'), 2)} at the start, {_num(results.get('loadavg_1m_end'), 2)} at the end "
        f"(other work on the machine slows CPU figures)",
        copy_bandwidth_line(results),
        f"- Method: median and 20th/80th percentiles of per-run times, the implementations of a case sampled "
        f"in turn (round-robin, so that drift of the machine's speed cancels out of the ratios); warm-up runs "
        f"discarded; the "
        f"{results['cache_bytes'] // MB} MiB last-level cache is flushed before every run (a buffer of "
        f"{results.get('flush_bytes', 2 * results['cache_bytes']) // MB} MiB is rewritten) and the device "
        f"synchronised"
        + ("; on the GPU each run's launches are issued behind a busy-wait kernel, so that the figures are the "
           "device's time (the host's time to issue the run is the 'host ms' column)"
           if any("host_ms" in r for r in results["kernels"]) else "")
        + ("; before the first case one ~30 MiB block is allocated and freed, so that glibc's malloc serves the "
           "multi-megabyte temporaries of eager code from its heap, not from fresh page-faulting mappings, "
           "whatever ran before (`qdarts.benchmark.timing.settle_host_allocator`)"
           if results.get("host_allocator_settled") else "")
        + "; forward runs with inputs that require grad "
        "(as in training); backward is timed alone after an untimed forward; GB/s counts the minimum "
        "traffic (the table in `qdarts.benchmark.cases`). `eager` = `qdarts_kernels.reference`, "
        "`compiled` = `torch.compile` of "
        "it (one compilation per shape and dtype), `autograd` = the straightforward PyTorch quantizer "
        "(autograd through every step, straight-through round; `qdarts.benchmark.cases.straightforward_quant`).",
    ]


def summary_rows(records: List[Dict[str, Any]]) -> List[List[str]]:
    """Forward+backward per case: eager, compiled, and the fastest fused backend."""
    rows = []
    by_case: Dict[Any, Dict[str, Dict[str, Any]]] = {}
    for r in _ok(records):
        if r["mode"] == "forward+backward":
            by_case.setdefault(_case_key(r), {})[r["impl"]] = r
    for key, impls in by_case.items():
        fused = [r for name, r in impls.items() if name not in (EAGER, COMPILED, AUTOGRAD)]
        best = min(fused, key=lambda r: r["median_ms"]) if fused else None
        eager, compiled = impls.get(EAGER), impls.get(COMPILED)
        any_r = next(iter(impls.values()))
        autograd = impls.get(AUTOGRAD)
        rows.append([
            any_r["label"], _shape(any_r), any_r["dtype"], _num(autograd and autograd["median_ms"]),
            _num(eager and eager["median_ms"]), _num(compiled and compiled["median_ms"]),
            best["impl"] if best else "-", _num(best and best["median_ms"]),
            _ratio(best and best["speedup_vs_eager"]), _ratio(best and best["speedup_vs_compiled"]),
            _num(best and best["gbps"]), _num(best and best["pct_of_copy"], 2) + ("%" if best else ""),
            " / ".join(_num(impls[n]["saved_bytes"] / MB) if n in impls else "-"
                       for n in [AUTOGRAD, EAGER, COMPILED] + ([best["impl"]] if best else [])),
        ])
    return rows


SUMMARY_HEADER = [
    "op", "shape", "dtype", "autograd ms", "eager ms", "compiled ms", "best fused", "fused ms", "x eager", "x compiled",
    "GB/s", "% of copy", "MB kept for backward (autograd / eager / compiled / fused)",
]


def _unfinished_why(status: str, error: Optional[str]) -> Optional[str]:
    """Why a run with ``status`` did not finish (None where it did)."""
    if status == "complete":
        return None
    return {"running": "it was stopped (a time limit, a kill) or is still running", "interrupted": "it was interrupted",
            "failed": f"it failed: {error}"}.get(status, status)


def status_line(results: Dict[str, Any]) -> Optional[str]:
    """A warning where the run that wrote ``results``, or one whose part it kept by --append, did not finish
    (none for results of before the status was recorded, which were written complete)."""
    notes = []
    why = _unfinished_why(results.get("status", "complete"), results.get("error"))
    if why:
        notes.append(f"This run did not finish ({why}): the figures below are those measured until then; cases "
                     "and configurations after them, and the targets they decide, were not measured.")
    for key, kept in (results.get("kept_runs") or {}).items():
        why = _unfinished_why(kept.get("status", "complete"), kept.get("error"))
        if why:
            part = "kernel" if key == "kernels" else "end-to-end"
            notes.append(f"The {part} figures, kept from an earlier run by --append, are from a run that did not "
                         f"finish ({why}): those after them were not measured.")
    return "**" + " ".join(notes) + "**" if notes else None


def markdown_report(results: Dict[str, Any]) -> str:
    records = results["kernels"]
    unfinished = status_line(results)
    lines = ["# qdarts benchmark report", "", *([unfinished, ""] if unfinished else []), *conditions_lines(results), ""]
    if results.get("targets"):
        lines += ["## Issue-2 targets (cpu backend against straightforward eager PyTorch, forward+backward, fp32)", ""]
        lines += _table(
            ["op", "shape", "baseline", "baseline ms", "cpu ms", "target", "measured", "met"],
            ([t["op"] + ("" if t["scaling"] == "-" else f" {t['scaling']}"),
              "x".join(map(str, t["shape"])) if t.get("shape") else _size(t["numel"]), t["baseline"],
              _num(t.get("baseline_ms")), _num(t.get("cpu_ms")), f">= {t['ratio']}x",
              _ratio(t["measured"]), {True: "yes", False: "NO", None: t.get("note", "-")}[t["met"]]]
             for t in results["targets"]),
        )
        lines.append("")
    if results.get("gpu_targets"):
        lines += ["## Issue-3/4 targets (each GPU backend, forward+backward, fp32)", ""]
        lines += _gpu_target_table(results["gpu_targets"]) + [""]
    lines += ["## Summary: forward+backward", ""]
    lines += _table(SUMMARY_HEADER, summary_rows(records))
    host_column = any("host_ms" in r for r in records)
    copy_column = all("copy_gbps" in r for r in _ok(records))  # results of before the copy was timed beside
    lines += ["", "## Latency, speed-up and bandwidth", ""]
    if host_column:
        lines += ["Device time: each run's launches are issued while the GPU is still busy (a busy-wait queued "
                  "before the start event), so the events time the kernels back to back, as in a network whose "
                  "host runs ahead; 'host ms' is the host's time to issue the run. Where host ms exceeds the "
                  "device time, the op run alone is bound by the host; a * marks a run whose host took longer "
                  "than the busy-wait hid, so that its device time includes waiting for the host.", ""]
    for label in _labels(_ok(records)):
        lines += [f"### {label}", ""]
        rows = []
        for r in _ok(records):
            if r["label"] == label:
                rows.append([
                    _shape(r), r["dtype"], r["mode"], r["impl"],
                    f"{_num(r['median_ms'])} ({_num(r['p20_ms'])}-{_num(r['p80_ms'])})",
                    _ratio(r["speedup_vs_eager"]), _ratio(r["speedup_vs_compiled"]),
                    _num(r["gbps"]), _num(r["pct_of_copy"], 2) + "%",
                ] + ([_num(r["copy_gbps"])] if copy_column else []) + ([_host_cell(r)] if host_column else []))
        lines += _table(["shape", "dtype", "mode", "impl", "median ms (p20-p80)", "x eager", "x compiled", "GB/s",
                         "% of copy"] + (["copy GB/s beside"] if copy_column else [])
                        + (["host ms"] if host_column else []), rows)
        lines.append("")
    lines += ["## Memory kept for backward", "",
              "Bytes of the tensors autograd saves beyond the inputs (saved-tensor hooks)"
              + ("; on CUDA also the peak memory of one forward+backward above the memory before it." if
                 results["env"]["device_type"] == "cuda" else "."), ""]
    mem_rows, seen = [], set()
    for r in _ok(records):
        key = _case_key(r) + (r["impl"],)
        if key in seen:
            continue
        seen.add(key)
        row = [r["label"], _shape(r), r["dtype"], r["impl"], _num(r["saved_bytes"] / MB),
               _num(r["saved_bytes"] / (r["numel"] * (4 if r["dtype"] == "fp32" else 2)), 2)]
        if results["env"]["device_type"] == "cuda":
            row.append(_num(r["peak_extra_bytes"] / MB) if r.get("peak_extra_bytes") is not None else "-")
        mem_rows.append(row)
    header = ["op", "shape", "dtype", "impl", "saved MB", "saved / size of x (one input)"]
    if results["env"]["device_type"] == "cuda":
        header.append("fwd+bwd peak extra MB")
    lines += _table(header, mem_rows)
    compile_rows = [[r["label"], _shape(r), r["dtype"], f"{r['compile_s']:.1f}"]
                    for r in _ok(records) if r["impl"] == COMPILED and r["mode"] == MODES[0]]
    if compile_rows:
        lines += ["", "## torch.compile time (first forward+backward, per shape and dtype)", ""]
        lines += _table(["op", "shape", "dtype", "compile s"], compile_rows)
    lines += ["", *end_to_end_lines(results)]
    errors = [r for r in records if "error" in r] + [e for e in results.get("end_to_end", []) if "error" in e]
    if errors:
        lines += ["", "## Failures", ""]
        lines += [f"- {e.get('label', e.get('config'))} {e.get('impl', e.get('ops', ''))}"
                  f" {'x'.join(map(str, e.get('shape', [])))}: {e['error']}" for e in errors]
    return "\n".join(lines) + "\n"


def _saved_cell(e: Dict[str, Any]) -> str:
    # the larger half of the step, then both halves: (arch / weight)
    return f"{_num(e['saved_mb'])} ({_num(e['saved_mb_arch'])} / {_num(e['saved_mb_weight'])})"


def _launch_cell(e: Dict[str, Any]) -> str:
    """Ops dispatched per step (eager steps), and on CUDA the launches and kernels the profiler saw."""
    parts = [str(e["ops_per_step"])] if e.get("ops_per_step") is not None else ["-"]
    if e.get("launches_per_step") is not None:
        parts.append(f"{e['launches_per_step']} ({e['gpu_kernels_per_step']})")
    return " / ".join(parts)


def end_to_end_lines(results: Dict[str, Any]) -> List[str]:
    lines = ["## End to end: one search step of the supernet", ""]
    note = results.get("end_to_end_note")
    if note:
        lines += [note, ""]
    ok = [e for e in results.get("end_to_end") or [] if "median_ms" in e]
    if not ok:
        return lines + ["Not measured in this run."]
    baseline = {(e["config"], e["mode"]): e for e in ok if e["ops"] == "eager"}

    def times(base: Optional[Dict[str, Any]], e: Dict[str, Any], key: str) -> str:
        return _ratio(base[key] / e[key]) if base and base.get(key) and e.get(key) else "-"

    rows = []
    for e in ok:
        # compiled and graphed steps against their own eager-reference variant if timed, else the plain one
        base = baseline.get((e["config"], e["mode"])) or baseline.get((e["config"], "eager"))
        rows.append([
            e["config"], e["description"], e["ops"],
            f"compiled ({e.get('compile_mode') or 'default'})" if e["mode"] == "compiled" else e["mode"],
            f"{_num(e['median_ms'])} ({_num(e['p20_ms'])}-{_num(e['p80_ms'])}, {e.get('samples', '-')})",
            _num(1e3 / e["median_ms"]),
            times(base, e, "median_ms"),
            _saved_cell(e), times(base, e, "saved_mb"),
            _num(e["peak_mb"]) if e.get("peak_mb") is not None else "-", times(base, e, "peak_mb"),
            _launch_cell(e),
        ])
    lines += _table(["config", "setting", "ops", "step", "ms per step (p20-p80, steps timed)", "steps/s",
                     "x faster than eager", "saved MB", "x less saved", "peak MB", "x less peak",
                     "ops / launches (kernels) per step"], rows)
    target = results.get("end_to_end_target")
    if target:
        lines += ["", f"Target (issue 6, set for an H100): {target['config']}, fused ops >= {target['target']:g}x faster "
                  f"and >= {target['target']:g}x less memory than eager reference ops: {_ratio(target['speedup'])} "
                  f"faster, {_ratio(target['memory_ratio'])} less {target['memory'].replace('_mb', '')} memory: "
                  f"{'met' if target['met'] else 'NOT met'}."]
    for t in results.get("step_targets") or []:
        peak = (f" and <= {_num(t['peak_limit_mb'])} MB peak: {_num(t['peak_mb'])} MB" if t["peak_limit_mb"] else "")
        lines += ["", f"Target (issue 9, set for an H100): {t['config']}, fused, <= {t['limit_s']:g} s per step{peak}; "
                  f"measured {t['step_s']:.3f} s ({t['mode']}): {'met' if t['met'] else 'NOT met'}."]
    return lines


#: The plots :func:`plot` draws.
PLOT_FILES = ("speedup.png", "bandwidth.png")


def plot(results: Dict[str, Any], out_dir: str) -> List[str]:
    """speedup.png (over eager, against size) and bandwidth.png (GB/s against size, with the copy
    bandwidth as a line), one panel per op variant and mode; fp32 solid, bf16 dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = _ok(results["kernels"])
    labels = _labels(records)
    if not labels:
        return []
    # one colour per implementation in every panel (the dtype is the line style)
    colours = {impl: f"C{i}" for i, impl in enumerate(sorted({r["impl"] for r in records}))}
    paths = []
    for name, key, ylabel in zip(PLOT_FILES, ("speedup_vs_eager", "gbps"),
                                 ("speed-up over eager (x)", "achieved GB/s (minimum traffic)")):
        fig, axes = plt.subplots(len(labels), len(MODES), figsize=(4.2 * len(MODES), 3.2 * len(labels)),
                                 squeeze=False)
        for row, label in enumerate(labels):
            for col, mode in enumerate(MODES):
                ax = axes[row][col]
                series: Dict[Any, List[Any]] = {}
                for r in records:
                    if r["label"] == label and r["mode"] == mode and r.get(key) is not None:
                        if key == "speedup_vs_eager" and r["impl"] == EAGER:
                            continue
                        series.setdefault((r["impl"], r["dtype"]), []).append((r["numel"], r[key]))
                for (impl, dtype), pts in sorted(series.items()):
                    pts.sort()
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colours[impl],
                            linestyle="-" if dtype == "fp32" else "--", label=f"{impl} {dtype}")
                if key == "gbps":  # the copy timed beside this panel's cases where it was
                    beside = beside_copy_gbps([r for r in records if r["label"] == label and r["mode"] == mode])
                    ax.axhline(statistics.median(beside) if beside else results["copy_gbps"], color="grey",
                               linestyle=":", label="copy" + (" (median beside the cases)" if beside else ""))
                else:
                    ax.axhline(1.0, color="grey", linestyle=":")
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_title(f"{label}\n{mode}", fontsize=9)
                ax.set_xlabel("elements")
                ax.set_ylabel(ylabel, fontsize=8)
                ax.grid(True, which="both", alpha=0.3)
                if series or key == "gbps":  # a speed-up panel with eager alone has no series
                    ax.legend(fontsize=7)
        fig.suptitle(f"{results['env']['device']} - torch {results['env']['torch']}", fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths
