"""Atomic file writes and the random-number state that a resumed run needs.

Every file is written to a temporary file in the same folder, flushed and fsynced, then moved over
the target with ``os.replace`` (atomic on POSIX and Windows): a kill at any moment leaves either
the previous complete file or the new complete one, never a torn one.
"""

from __future__ import annotations

import os
import random
import tempfile
from typing import Any, Callable, Dict

import numpy as np
import torch

__all__ = ["atomic_write", "atomic_write_text", "atomic_torch_save", "rng_state", "set_rng_state", "seed_everything"]


def atomic_write(path: str, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then atomically move it to ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_torch_save(path: str, obj: Any) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> Dict[str, Any]:
    """The global RNG states (Python, NumPy, torch CPU and every CUDA device) for a checkpoint."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
