"""What qdarts_kernels runs on here: for a bug report, and for a first look at an installation.

    python -m qdarts_kernels [--json]          (the same as: qdarts env [--json])

The versions (Python, torch and its CUDA, Triton, this package); the compiled extension: where it
is, what it was built from and whether that matches this installation (``build_info()``); what the
C++ CPU kernels run on; each backend, and why one cannot run here; the automatic choice for CPU and
CUDA tensors; the GPUs, and whether the extension holds machine code for each; and the environment
variables that change the package's behaviour, where set. Like ``python -m torch.utils.collect_env``
for PyTorch, whose report it complements.
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

#: Variables read by the package or by what it runs on, reported where set (besides every QDARTS_*).
OTHER_VARIABLES = ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")


def _triton_version() -> Optional[str]:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _backend_reason(name: str) -> Optional[str]:
    """None where backend ``name`` can run here, else why not."""
    if _backends.runnable(name):
        return None
    if name == "triton" and _backends._load("triton") is not None:
        return "Triton compiles for GPUs only: on a CPU it runs in its interpreter, under TRITON_INTERPRET=1"
    return _backends._failed.get(name, "not available")


def _automatic_choice(device: str) -> str:
    try:
        return _backends.resolve(None, torch.device(device))
    except (ValueError, RuntimeError) as e:  # QDARTS_BACKEND names a backend that cannot run here
        return f"error: {e}"


def _cpu_kernels() -> Any:
    """cpu_kernels.info(), or why the kernels refuse to start (an invalid QDARTS_CPU_ISA, say)."""
    try:
        return cpu_kernels.info()
    except RuntimeError as e:
        return f"error: {e}"


def collect() -> Dict[str, Any]:
    """The report as a dict of plain values (what ``--json`` prints)."""
    from . import __version__

    build = _backends.build_info()
    library = importlib.util.find_spec("qdarts_kernels._C")
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
    return {
        "qdarts_kernels": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": str(torch.__version__),
        "torch_cuda": torch.version.cuda,
        "triton": _triton_version(),
        "extension": {
            "path": library.origin if library is not None else None,
            "build": build,
            "stale": _backends.compiled_stale_reason(),
        },
        "cpu_kernels": _cpu_kernels(),
        "backends": {name: _backend_reason(name) for name in _backends.BACKEND_NAMES},
        "automatic_choice": {"cpu": _automatic_choice("cpu"),
                             "cuda": _automatic_choice("cuda") if gpus else None},
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
        lines.append("extension qdarts_kernels._C: not built")
    else:
        lines.append(f"extension qdarts_kernels._C: {extension['path']}")
        if build is not None:
            cuda = f"CUDA {build['cuda']} for {build['cuda_archs']}" if build["cuda"] else "no CUDA kernels"
            lines.append(f"  built against torch {build['torch']}, {cuda}, {'debug' if build['debug'] else 'release'}"
                         f" build, sources {build['csrc_digest'][:12]}")
        lines.append("  matches this installation: " + ("yes" if extension["stale"] is None
                                                         else f"NO: {extension['stale']}"))
    kernels = report["cpu_kernels"]
    if isinstance(kernels, str):
        lines.append(f"C++ CPU kernels: {kernels}")
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    report = collect()
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qdarts_kernels", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
