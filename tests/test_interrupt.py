"""A search killed (SIGKILL) at any moment, then resumed with --resume, ends with exactly the genotype and
history of an uninterrupted run; the kill inside an atomic write is made deterministic with the
QDARTS_TEST_PAUSE_BEFORE_REPLACE hook of qdarts.checkpoint."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from qdarts.checkpoint import LOCK_FILE, PAUSE_BEFORE_REPLACE_ENV
from qdarts.search import CHECKPOINT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 3
SEARCH = [sys.executable, "-m", "qdarts", "search", "--data", "synthetic", "--epochs", str(EPOCHS),
          "--warmup-epochs", "1", "--batch-size", "128", "--layers", "1", "--channels", "4",
          "--partial-channels", "2", "--bits", "2,4", "--quantizer", "lsq", "--no-progress", "--no-plots"]
TIMEOUT = 120

pytestmark = pytest.mark.slow


def _env(**extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return env


def _start(out, *, resume=False, pause_at_write=None):
    extra = {PAUSE_BEFORE_REPLACE_ENV: str(pause_at_write)} if pause_at_write else {}
    return subprocess.Popen([*SEARCH, *(["--resume"] if resume else []), "--out", str(out)], env=_env(**extra),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _finish(out):
    done = subprocess.run([*SEARCH, "--resume", "--out", str(out)], env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr


def _temporaries(out):
    return [n for n in os.listdir(out) if n.endswith(".tmp")]


def _result(out):
    """(genotype, history without timings) of a finished run folder, which holds no temporary file."""
    assert _temporaries(out) == []
    genotype = json.loads((out / "genotype.json").read_text())
    history = [{k: v for k, v in h.items() if k != "seconds"} for h in json.loads((out / "history.json").read_text())]
    return genotype, history


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The result of an uninterrupted run, and how long it took (the scale of the random kill times)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    start = time.perf_counter()
    done = subprocess.run([*SEARCH, "--out", str(out)], env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    return _result(out), time.perf_counter() - start


# With --no-plots a fresh run makes its atomic writes in this order: epoch e writes checkpoint.pt
# (write 2e-1) then history.json (2e); after the last epoch genotype.json, history.json, summary.md.
@pytest.mark.parametrize("write, target", [
    (3, CHECKPOINT),  # the epoch-2 checkpoint is complete in its temporary file, not yet in place
    (2 * EPOCHS, "history.json"),  # the final checkpoint is in place, history.json and the outputs are not
], ids=["checkpoint_mid_run", "history_after_last_checkpoint"])
def test_kill_inside_an_atomic_write_then_resume(write, target, uninterrupted, tmp_path):
    out = tmp_path / "run"
    proc = _start(out, pause_at_write=write)
    watchdog = threading.Timer(TIMEOUT, proc.kill)
    watchdog.start()
    try:
        paused = next((line for line in proc.stderr if "paused before replacing" in line), "")
    finally:
        proc.kill()
        proc.wait()
        watchdog.cancel()
        proc.stderr.close()
    assert paused.strip().endswith(os.path.join(str(out), target)), paused
    assert len(_temporaries(out)) == 1  # the kill left the complete temporary behind
    assert not (out / "genotype.json").exists()
    epoch = torch.load(out / CHECKPOINT, weights_only=False)["epoch"]  # the previous checkpoint is whole
    assert epoch == write // 2  # the checkpoint of the last epoch whose checkpoint write completed
    _finish(out)
    assert _result(out) == uninterrupted[0]


def test_kills_at_random_moments_then_resume(uninterrupted, tmp_path):
    """Kill after a random share of an uninterrupted run's time (while importing, searching, writing:
    wherever it falls), resume, kill again, and finally let it finish. ``--resume`` on a folder without
    a checkpoint starts afresh, so every attempt is the same command. Should a fresh attempt finish
    before its kill (the machine got faster than during the uninterrupted run), it starts over with
    shorter times, so that at least one kill happens."""
    result, seconds = uninterrupted
    rng = random.Random(0)
    out = tmp_path / "run"
    kills = 0
    for _ in range(6):
        proc = _start(out, resume=True)
        try:
            proc.communicate(timeout=rng.uniform(0.2, 0.7) * seconds)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            kills += 1
            if kills == 2:
                break
        else:
            assert proc.returncode == 0
            if kills:
                break
            shutil.rmtree(out)
            seconds /= 2
    assert kills >= 1
    _finish(out)
    assert _result(out) == result


def test_sigterm_ends_a_run_as_ctrl_c_does_then_resume(uninterrupted, tmp_path):
    """SIGTERM (a scheduler's time limit, torchrun stopping its workers) once the first checkpoint is in
    place: one line with the resume hint, exit status 143 (128 + SIGTERM, as the shell reports a process
    the signal ended), the folder's lock file removed; --resume then finishes with the uninterrupted
    run's result."""
    out = tmp_path / "run"
    proc = _start(out)
    deadline = time.monotonic() + TIMEOUT
    while not (out / CHECKPOINT).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "qdarts search: terminated (SIGTERM)" in err and "--resume" in err and "Traceback" not in err, err
    assert LOCK_FILE not in os.listdir(out) and _temporaries(out) == []
    _finish(out)
    assert _result(out) == uninterrupted[0]
