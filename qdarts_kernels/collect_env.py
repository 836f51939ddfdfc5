"""What qdarts_kernels runs on here: for a bug report, and for a first look at an installation.

    python -m qdarts_kernels [--json] [--check-gpu-build]      (the same as: qdarts env ...)

The versions (Python, torch and its CUDA, Triton, this package); the compiled extension: where it
is, what it was built from and whether that matches this installation (``build_info()``); what the
C++ CPU kernels run on; each backend, and why one cannot run here; the automatic choice for CPU and
CUDA tensors; the GPUs, and whether the extension holds machine code for each; and the environment
variables that change the package's behaviour, where set. Like ``python -m torch.utils.collect_env``
for PyTorch, whose report it complements. ``--check-gpu-build`` also tells, by its exit status,
whether the extension is ready for every GPU here (bench/gpu_check.sh asks it of a ready-built one).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
from typing import Any, Dict, List, Optional

import torch

from . import _backends, _build_record, cpu_kernels

DESCRIPTION = "What qdarts_kernels runs on here: versions, the extension, the backends, the GPUs."

#: Variables read by the package or by what it runs on, reported where set (besides every QDARTS_*).
OTHER_VARIABLES = ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")


def _triton_version() -> Optional[str]:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _backend_reason(name: str, cpu_kernels_info: Optional[Dict[str, Any]]) -> Optional[str]:
    """None where backend ``name`` can run here, else why not."""
    if name == "cpu" and cpu_kernels_info and "error" in cpu_kernels_info:  # loaded, but cannot start
        return f"its kernels cannot start: {cpu_kernels_info['error']}"
    if _backends.runnable(name):
        return None
    if name == "triton" and _backends._load("triton") is not None:
        return "Triton compiles for GPUs only: on a CPU it runs in its interpreter, under TRITON_INTERPRET=1"
    return _backends._failed.get(name, "not available")


def _automatic_choice(device: str, backends: Dict[str, Optional[str]]) -> str:
    """The backend an op on ``device`` takes (``backends``: each one's reason not to run, None if it runs),
    with the reason where it cannot run after all (the cpu backend's kernels refusing the environment)."""
    try:
        name = _backends.resolve(None, torch.device(device))
    except (ValueError, RuntimeError) as e:  # QDARTS_BACKEND names a backend that cannot run here
        return f"error: {e}"
    reason = backends.get(name)
    return name if reason is None else f"{name}, which cannot run here: {reason}"


def _cpu_kernels() -> Optional[Dict[str, Any]]:
    """cpu_kernels.info(), or {"error": why the kernels cannot start} (an invalid QDARTS_CPU_ISA, say)."""
    try:
        return cpu_kernels.info()
    except RuntimeError as e:
        return {"error": str(e)}


def collect() -> Dict[str, Any]:
    """The report as a dict of plain values (what ``--json`` prints)."""
    from . import __version__

    build = _backends.build_info()
    library = importlib.util.find_spec("qdarts_kernels._C")
    kernels = _cpu_kernels()
    gpus: List[Dict[str, Any]] = []
    for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        props = torch.cuda.get_device_properties(index)
        capability = (props.major, props.minor)
        gpus.append({
            "index": index, "name": props.name, "compute_capability": "%d.%d" % capability,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "extension_machine_code": bool(build and build["cuda"]
                                           and _build_record.has_machine_code_for(build["cuda_archs"], capability)),
        })
    backends = {name: _backend_reason(name, kernels) for name in _backends.BACKEND_NAMES}
    return {
        "qdarts_kernels": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": str(torch.__version__),
        "torch_cuda": torch.version.cuda,
        "triton": _triton_version(),
        "extension": {
            "path": library.origin if library is not None else None,
            "load_error": None if _backends._load("cpu") is not None else _backends._failed.get("cpu"),
            "build": build,
            "stale": _backends.compiled_stale_reason(),
        },
        "cpu_kernels": kernels,
        "backends": backends,
        "automatic_choice": {"cpu": _automatic_choice("cpu", backends),
                             "cuda": _automatic_choice("cuda", backends) if gpus else None},
        "gpus": gpus,
        "environment": {name: value for name, value in sorted(os.environ.items())
                        if name.startswith("QDARTS_") or name in OTHER_VARIABLES},
    }


def render(report: Dict[str, Any]) -> str:
    """The report as text, one fact a line."""
    extension, build = report["extension"], report["extension"]["build"]
    lines = [
        f"qdarts_kernels {report['qdarts_kernels']}",
        f"Python {report['python']} on {report['platform']}",
        f"torch {report['torch']} (CUDA {report['torch_cuda'] or 'none'}); "
        f"triton {report['triton'] or 'not installed'}",
    ]
    if extension["path"] is None:
        lines.append(f"extension qdarts_kernels._C: not built ({extension['load_error']})")
    elif extension["load_error"] is not None:
        lines.append(f"extension qdarts_kernels._C: {extension['path']}")
        lines.append(f"  could not be loaded: {extension['load_error']}")
    else:
        lines.append(f"extension qdarts_kernels._C: {extension['path']}")
        if build is not None:
            cuda = (f"CUDA {build['cuda']}, machine code for {', '.join(build['cuda_archs']) or 'no GPU'}"
                    if build["cuda"] else "no CUDA kernels")
            lines.append(f"  built against torch {build['torch']}, {cuda}, {'debug' if build['debug'] else 'release'}"
                         f" build, sources {build['csrc_digest'][:12]}")
        lines.append("  matches this installation: " + ("yes" if extension["stale"] is None
                                                         else f"NO: {extension['stale']}"))
    kernels = report["cpu_kernels"]
    if kernels is not None and "error" in kernels:
        lines.append(f"C++ CPU kernels: cannot start: {kernels['error']}")
    elif kernels is not None:
        cache = kernels["cache"]
        lines.append(f"C++ CPU kernels: {kernels['isa']} instructions, {kernels['threads']} threads, output cache "
                     f"{cache['cached_bytes'] / 2**20:.0f} of {cache['limit_bytes'] / 2**20:.0f} MiB held")
    lines.append("backends:")
    for name, reason in report["backends"].items():
        lines.append(f"  {name:<10} " + ("available" if reason is None else f"not available: {reason}"))
    choice = report["automatic_choice"]
    lines.append(f"automatic choice: CPU tensors -> {choice['cpu']}; CUDA tensors -> "
                 f"{choice['cuda'] if choice['cuda'] is not None else '(no CUDA device)'}")
    if not report["gpus"]:
        lines.append("GPUs: none")
    for gpu in report["gpus"]:
        lines.append(f"GPU {gpu['index']}: {gpu['name']}, compute capability {gpu['compute_capability']}, "
                     f"{gpu['memory_gib']} GiB; machine code in the extension: "
                     + ("yes" if gpu["extension_machine_code"] else "no"))
    variables = report["environment"]
    lines.append("environment: " + (", ".join(f"{k}={v}" for k, v in variables.items())
                                    or f"none of QDARTS_*, {', '.join(OTHER_VARIABLES)} set"))
    return "\n".join(lines)


def gpu_build_refusal(report: Dict[str, Any]) -> Optional[str]:
    """Why the extension of ``report`` is not ready to run on every GPU here (loaded, current, with CUDA
    kernels that hold machine code for each GPU); None where it is."""
    extension, build = report["extension"], report["extension"]["build"]
    if extension["path"] is None:
        return "the extension is not built"
    if extension["load_error"] is not None:
        return f"the extension could not be loaded: {extension['load_error']}"
    if build is None:
        return "the extension has no build record (built by an older version of this package)"
    if extension["stale"] is not None:
        return f"the extension may not match this installation: {extension['stale']}"
    if not build["cuda"]:
        return "the extension was built without CUDA kernels"
    if not report["gpus"]:
        return "there is no CUDA device"
    for gpu in report["gpus"]:
        if not gpu["extension_machine_code"]:
            return (f"the extension holds no machine code for GPU {gpu['index']} (compute capability "
                    f"{gpu['compute_capability']}; it has {', '.join(build['cuda_archs']) or 'none'})")
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--check-gpu-build", action="store_true",
                        help="exit status 1 unless the extension is loaded, matches this installation and holds "
                             "machine code for every GPU here (the reason is printed last)")


def run(args: argparse.Namespace) -> int:
    report = collect()
    print(json.dumps(report, indent=2) if args.json else render(report))
    if not args.check_gpu_build:
        return 0
    refusal = gpu_build_refusal(report)
    print("GPU build: " + ("ready" if refusal is None else f"not ready: {refusal}"))
    return 0 if refusal is None else 1


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qdarts_kernels", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))
