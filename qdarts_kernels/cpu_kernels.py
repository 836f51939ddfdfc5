"""What the C++ CPU kernels run on, and their cache of output buffers.

``info()`` tells which instruction set the kernels dispatch to (``"avx512"``, ``"avx2"`` or
``"baseline"``; the environment variable ``QDARTS_CPU_ISA`` caps it), how many threads they get
(``torch.get_num_threads()``, as long as the extension was built with OpenMP) and the state of the
output cache. Large outputs of the CPU kernels (at least 1 MiB) come from a cache of freed buffers,
so that a training step does not pay a page fault per 4 KiB of every new output
(``csrc/cpu/output_cache.h``); it keeps at most ``QDARTS_CPU_CACHE_MB`` MiB (default 1024, 0 turns
it off) of freed buffers, and ``empty_cache()`` returns them to the system, like
``torch.cuda.empty_cache()``.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch

from . import _backends


#: Values of QDARTS_CPU_ISA (csrc/cpu/simd.h reads it at the first kernel call).
ISA_NAMES = ("avx512", "avx2", "baseline")
#: The most QDARTS_CPU_CACHE_MB takes: output_cache.cpp keeps the limit in bytes, an int64.
MAX_CACHE_MB = (2**63 - 1) >> 20


def check_environment() -> None:
    """A ValueError naming the variable if QDARTS_CPU_ISA or QDARTS_CPU_CACHE_MB holds a value the
    kernels would refuse at their first call (set but empty is unset): for a program to check before
    it starts work, as the CLI does, where the kernels' own refusal would come mid-run."""
    isa = os.environ.get("QDARTS_CPU_ISA") or None
    if isa is not None and isa not in ISA_NAMES:
        raise ValueError(f"QDARTS_CPU_ISA must be {', '.join(ISA_NAMES[:-1])} or {ISA_NAMES[-1]}, got {isa!r}")
    cache_mb = os.environ.get("QDARTS_CPU_CACHE_MB") or None
    # (the length first: int() refuses a string of more than 4300 digits with an error of its own)
    if cache_mb is not None and not (cache_mb.isascii() and cache_mb.isdigit() and len(cache_mb) <= 20
                                     and int(cache_mb) <= MAX_CACHE_MB):
        raise ValueError(f"QDARTS_CPU_CACHE_MB must be a whole number of MiB in [0, {MAX_CACHE_MB}], got {cache_mb!r}")


def _ops():
    return torch.ops.qdarts_C if _backends._load("cpu") is not None else None


def info() -> Optional[Dict[str, Any]]:
    """``{"isa", "threads", "cache": {"cached_bytes", "limit_bytes", "hits", "misses",
    "in_use_bytes"}}``, or None when the compiled extension is not available. ``in_use_bytes``: the
    outputs now alive that came from the cache (the profiler's memory view counts them too)."""
    ops = _ops()
    if ops is None:
        return None
    cached, limit, hits, misses, in_use = ops.cpu_output_cache_stats()
    return {
        "isa": ops.cpu_simd_level(),
        "threads": int(ops.cpu_parallel_threads()),
        "cache": {"cached_bytes": cached, "limit_bytes": limit, "hits": hits, "misses": misses,
                  "in_use_bytes": in_use},
    }


def empty_cache() -> None:
    """Return every cached free output buffer of the CPU kernels to the system (no-op without
    the extension)."""
    ops = _ops()
    if ops is not None:
        ops.empty_cpu_output_cache()
