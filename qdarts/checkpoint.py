"""Atomic file writes and the random-number state that a resumed run needs.

Every file is written to a temporary file in the same folder, flushed and fsynced, then moved over
the target with ``os.replace`` (atomic on POSIX and Windows): a kill at any moment leaves either
the previous complete file or the new complete one, never a torn one. A kill can leave the
temporary file itself (``.<name>.<random>.tmp``); :func:`remove_stale_temporaries` clears those
when a run starts or resumes.

Test hook: with ``QDARTS_TEST_PAUSE_BEFORE_REPLACE=N`` the N-th atomic write of the process stops
after its temporary file is complete and before ``os.replace``: it prints
``qdarts: paused before replacing <path>`` to stderr and sleeps, so that a test can kill it exactly
there.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import random
import re
import socket
import sys
import tempfile
import time
import warnings
from dataclasses import fields, replace
from typing import IO, Any, Callable, Collection, Dict, Iterator, List, Mapping, Optional, Tuple, TypeVar

import numpy as np
import torch

__all__ = ["atomic_write", "atomic_write_text", "atomic_torch_save", "rng_state", "set_rng_state", "seed_everything",
           "load_checkpoint", "resumed_config", "typed_over_saved", "prepare_output_folder", "release_output_folder",
           "writing_into", "refuse_outputs_without_checkpoint", "remove_stale_temporaries",
           "PAUSE_BEFORE_REPLACE_ENV", "pack_tensors", "unpack_tensors", "warn_if_world_size_changed"]

PAUSE_BEFORE_REPLACE_ENV = "QDARTS_TEST_PAUSE_BEFORE_REPLACE"
_TMP_SUFFIX = ".tmp"
#: the names mkstemp gives atomic_write's temporaries: "." + target name + "." + 8 random characters + ".tmp"
_TEMPORARY = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")
_writes_done = 0
Config = TypeVar("Config")


def _pause_if_asked(path: str) -> None:
    global _writes_done
    _writes_done += 1
    if os.environ.get(PAUSE_BEFORE_REPLACE_ENV) == str(_writes_done):
        print(f"qdarts: paused before replacing {path}", file=sys.stderr, flush=True)
        time.sleep(3600)


def _file_mode() -> int:
    """What ``open`` would give a new file (0o666 less the umask); mkstemp's 0o600 would hide outputs
    from the other users of a shared run folder."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then atomically move it to ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=_TMP_SUFFIX, dir=folder)
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        _pause_if_asked(path)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        # a Ctrl-C inside torch.save comes back as the RuntimeError its zip writer's clean-up raises
        # then ("unexpected pos ..."), the KeyboardInterrupt only its context: give it back as such
        interrupt = _interrupt_behind(e)
        if interrupt is e:
            raise
        if interrupt is not None:
            raise interrupt from None
        # a failed write (a full disk) comes back as such a RuntimeError too, or as the file's own error:
        # give back the write's error, naming the file (only these two: an OSError deeper in the chain
        # may be one that the code handling it then failed on, which would hide that failure)
        failed = e.__context__ if isinstance(e, RuntimeError) and isinstance(e.__context__, OSError) else e
        if isinstance(failed, OSError) and failed.filename is None and failed.errno is not None:
            raise type(failed)(failed.errno, failed.strerror, path) from None
        raise


def _interrupt_behind(error: BaseException) -> Optional[KeyboardInterrupt]:
    """The KeyboardInterrupt that ``error`` is, or that it was raised while handling, if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def remove_stale_temporaries(folder: str) -> None:
    """Delete the temporary files that a killed :func:`atomic_write` left in ``folder``."""
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        if _TEMPORARY.fullmatch(name):
            os.unlink(os.path.join(folder, name))


#: The file in an output folder that the run writing into it holds locked (POSIX advisory lock).
LOCK_FILE = ".qdarts.lock"


def prepare_output_folder(folder: str) -> Optional[IO[str]]:
    """Create ``folder`` if needed, prove it writable (before any work is spent) and lock it against a
    second run writing into it at the same time, then remove the temporaries of a killed earlier run
    (which a run in progress would still be writing). A ``ValueError`` names the folder otherwise.
    Returns the open lock file (None where the system has no ``fcntl``): the lock lasts until
    :func:`release_output_folder`, or until the process ends, however it ends."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ValueError(f"output folder {folder!r} cannot be written ({e.strerror or e})") from e
    lock = _lock_folder(folder)
    remove_stale_temporaries(folder)
    return lock


def _lock_folder(folder: str) -> Optional[IO[str]]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return None
    path = os.path.join(folder, LOCK_FILE)
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                # a file system that takes no locks (some network and FUSE ones): go on without
                f.close()
                with contextlib.suppress(OSError):
                    os.unlink(path)
                return None
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise ValueError(f"another run ({holder}) is writing into {folder!r}; wait for it to end, or choose "
                             "another --out") from None
        # the run that held it deletes the file as it ends: the lock counts where it is still the folder's file
        if os.path.exists(path) and os.path.samestat(os.fstat(f.fileno()), os.stat(path)):
            break
        f.close()
    f.seek(0)
    f.truncate()
    f.write(f"qdarts, process {os.getpid()} on {socket.gethostname()}")
    f.flush()
    return f


@contextlib.contextmanager
def writing_into(folder: str, dist: Any) -> Iterator[None]:
    """The block in which a run writes into ``folder``: its writer (``dist.is_writer``, a
    :class:`qdarts.distributed.Dist`) prepares the folder (:func:`prepare_output_folder`) and holds its lock
    until the block ends; every rank raises the writer's error, if it met one."""
    lock, error = None, None
    if dist.is_writer:
        try:
            lock = prepare_output_folder(folder)
        except ValueError as e:
            error = e
    dist.raise_writer_error(error)
    try:
        yield
    finally:
        if lock is not None:
            release_output_folder(lock)


def release_output_folder(lock: IO[str]) -> None:
    """End the lock that :func:`prepare_output_folder` took: its file is deleted (while still locked, so
    that no other run takes a lock on a file about to go), then closed."""
    os.unlink(lock.name)
    lock.close()


def refuse_outputs_without_checkpoint(folder: str, outputs: Collection[str], checkpoint: str) -> None:
    """A ``FileExistsError`` where ``folder`` holds a finished run's ``outputs`` but no checkpoint to continue
    (deleted): a new run there would replace them, and leave its other files (plots) beside the new ones."""
    found = [name for name in outputs if os.path.isfile(os.path.join(folder, name))]
    if found:
        raise FileExistsError(f"{folder!r} holds a run's outputs ({', '.join(found)}) but no {checkpoint} to "
                              "continue; choose another --out, or delete them to start there afresh")


def load_checkpoint(path: str, fmt: str) -> Optional[Dict[str, Any]]:
    """The checkpoint at ``path`` (None if there is none); a ``ValueError`` naming the file if it is
    unreadable (truncated, not a torch file) or not a ``fmt`` checkpoint."""
    if not os.path.isfile(path):
        return None
    hint = "delete it to start afresh, or choose another --out"
    try:
        # weights_only=False: the RNG states are NumPy objects; load checkpoints you wrote yourself only
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch.load raises whatever the unpickler meets in a torn or foreign file
        raise ValueError(f"checkpoint {path!r} cannot be read ({error_reason(e)}); {hint}") from e

    if not isinstance(state, dict) or state.get("format") != fmt:
        raise ValueError(f"{path!r} is not a {fmt} file; {hint}")
    return state


def warn_if_world_size_changed(state: Mapping[str, Any], world_size: int, is_writer: bool) -> None:
    """A run resumed on another number of processes than its checkpoint's continues, with a warning (from the
    writer only): each process takes batch_size samples a step, so the global batch, hence the result, differ
    from the uninterrupted run's. A checkpoint that does not say (written before this was kept) is not checked."""
    saved = state.get("world_size")
    if is_writer and saved is not None and saved != world_size:
        warnings.warn(f"the checkpoint was written by a run of {saved} process(es), this one has {world_size}: the "
                      "global batch (batch size per process x processes) changes, so the result will differ from "
                      "an uninterrupted run's", UserWarning, stacklevel=3)


def resumed_config(saved: Config, given: Config, *, may_change: Collection[str],
                   explicit: Optional[Collection[str]] = None, name: Callable[[str], str] = str) -> Config:
    """The settings a resumed run continues with: the checkpoint's (``saved``), except those in
    ``may_change`` (where and how a step runs, not what it computes), which come from ``given``.

    A setting of ``given`` that differs from the checkpoint's is refused with a ``ValueError`` that names
    it, rather than silently ignored (``--resume --epochs 20`` on a 10-epoch run would otherwise stop at
    10): every setting when ``explicit`` is None (the Python API passes a whole config), else only the
    settings named in ``explicit`` (the command line: the options typed, not those left at their defaults).
    ``name`` spells a setting for the message (the CLI option beside the field name). Two spellings of
    one existing file or folder (``--data-dir data`` and ``--data-dir ./data/``) are the same setting.
    """
    checked = [f.name for f in fields(saved) if f.name not in may_change and (explicit is None or f.name in explicit)]
    changed = [n for n in checked if not _same_setting(getattr(given, n), getattr(saved, n))]
    if changed:
        diff = "; ".join(f"{name(n)} is {getattr(saved, n)!r} there, {getattr(given, n)!r} here" for n in changed)
        free = ", ".join(name(n) for n in may_change)
        raise ValueError(f"a resumed run continues with its checkpoint's settings, and these differ: {diff}. "
                         f"Leave them out or give the checkpoint's values (only {free} may change), or start "
                         "a new run in another --out")
    return replace(saved, **{n: getattr(given, n) for n in may_change})


def typed_over_saved(saved: Config, given: Config, explicit: Optional[Collection[str]]) -> Config:
    """The checkpoint's settings with those typed for this run (``explicit``; every one of ``given`` where
    it is None) over them: what validates this run's own settings on a resume, whose options left out take
    the checkpoint's values, not their defaults (``--resume --partial-channels 3`` on a run of 6 channels)."""
    return replace(saved, **{f.name: getattr(given, f.name) for f in fields(given)
                             if explicit is None or f.name in explicit})


def _same_setting(a: Any, b: Any) -> bool:
    """Equal, or two strings naming the same existing file or folder."""
    if a == b:
        return True
    if not (isinstance(a, str) and isinstance(b, str) and os.path.exists(a) and os.path.exists(b)):
        return False
    return os.path.samefile(a, b)


def pack_tensors(state: Mapping[str, Any]) -> Dict[str, Any]:
    """A state dict as one flat buffer per dtype and device, and each tensor's place in it (other values
    as they are); :func:`unpack_tensors` gives the state dict back, equal tensor by tensor. Why:
    ``torch.save`` writes one record per tensor, some 30-40 us each, and a supernet's state dict holds
    thousands of tiny tensors (its batch norms' statistics): the digits default's 5267 took 0.15-0.23 s
    of every epoch's checkpoint on the 2-core VM of bench/results (the whole checkpoint 165-240 ms before,
    105-113 ms packed)."""
    chunks: Dict[Tuple[torch.dtype, torch.device], List[torch.Tensor]] = {}
    sizes: Dict[Tuple[torch.dtype, torch.device], int] = {}
    index, other = [], {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor) or isinstance(value, torch.nn.parameter.UninitializedTensorMixin):
            other[name] = value
            continue
        key = (value.dtype, value.device)
        offset = sizes.get(key, 0)
        chunks.setdefault(key, []).append(value.detach().reshape(-1))
        sizes[key] = offset + value.numel()
        index.append((name, key, offset, tuple(value.shape)))
    buffers = {key: torch.cat(parts) for key, parts in chunks.items()}
    return {"packed_tensors": 1, "buffers": buffers, "index": index, "other": other, "order": list(state)}


def unpack_tensors(packed: Mapping[str, Any]) -> Dict[str, Any]:
    """The state dict that :func:`pack_tensors` packed (in its order); a plain state dict as it is (the
    checkpoints written before packing)."""
    if packed.get("packed_tensors") != 1:
        return dict(packed)
    buffers = packed["buffers"]
    values = dict(packed["other"])
    for name, key, offset, shape in packed["index"]:
        values[name] = buffers[key][offset:offset + math.prod(shape)].view(shape)
    return {name: values[name] for name in packed["order"]}


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_torch_save(path: str, obj: Any) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def error_reason(e: BaseException) -> str:
    """One line saying why ``e`` was raised: its message's first line, with the next where the first only
    announces what follows (load_state_dict's "Error(s) in loading state_dict for X:"); its type when
    it has no message."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


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
