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

from typing import Any, Dict, Optional

import torch

from . import _backends


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
