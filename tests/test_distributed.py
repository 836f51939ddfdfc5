"""Data-parallel search and retraining under torchrun: two CPU processes with gloo.

Checks: both commands finish; rank 0 alone writes the outputs (one genotype.json, one report line);
every rank ends with bit-identical parameters (alpha, beta, gamma and the weights, compared through
the QDARTS_RANK_DUMP hook); a distributed search killed inside a checkpoint write resumes under
torchrun to exactly the uninterrupted distributed result. The sharding of the data is checked
directly: the ranks' batches together are the batches of one process with the global batch size.
"""

import json
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch

from qdarts.checkpoint import PAUSE_BEFORE_REPLACE_ENV
from qdarts.data import batches, num_batches
from qdarts.distributed import RANK_DUMP_ENV

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "qdarts"]
# lsq: its step sizes start from each rank's first batch, the hard case for keeping replicas equal
SEARCH = ["search", "--data", "synthetic", "--epochs", "2", "--warmup-epochs", "1", "--batch-size", "64",
          "--layers", "1", "--channels", "4", "--partial-channels", "2", "--bits", "2,4", "--quantizer", "lsq",
          "--no-progress", "--no-plots"]
TIMEOUT = 180


def _env(**extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return env


def _torchrun(args, **env):
    done = subprocess.run([*TORCHRUN, *args], env=_env(**env), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _same_on_every_rank(dump):
    ranks = [torch.load(dump / f"rank{r}.pt") for r in range(2)]
    assert set(ranks[0]) == set(ranks[1]) and ranks[0]
    different = [k for k in ranks[0] if not torch.equal(ranks[0][k], ranks[1][k])]
    assert different == []
    return ranks[0]


def _kill_tree(pid):
    """SIGKILL ``pid`` and every process below it (torchrun starts its workers in sessions of their own,
    so killing torchrun's process group would leave them running)."""
    def descendants(p):
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                children = [int(c) for c in f.read().split()]
        except OSError:
            return []
        return children + [d for c in children for d in descendants(c)]

    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _history(out):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in json.loads((out / "history.json").read_text())]


@pytest.fixture(scope="module")
def distributed_search(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    out, dump = base / "run", base / "dump"
    done = _torchrun([*SEARCH, "--out", str(out)], **{RANK_DUMP_ENV: str(dump)})
    return out, dump, done.stdout


@pytest.mark.slow
def test_two_process_search_writes_once_and_keeps_the_replicas_equal(distributed_search):
    out, dump, stdout = distributed_search
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "genotype.json", "history.json", "summary.md"]
    assert stdout.count("derived BitOps") == 1  # only rank 0 reports
    params = _same_on_every_rank(dump)
    assert {"alphas_normal", "alphas_reduce", "betas_normal", "betas_reduce"} <= set(params)
    assert any("gamma_a" in k for k in params) and any(k.endswith("scales") for k in params)
    history = _history(out)
    assert len(history) == 2 and history[1]["arch_updates"]


@pytest.mark.slow
def test_two_process_search_resumes_under_torchrun(distributed_search, tmp_path):
    """Rank 0 is stopped inside the epoch-2 checkpoint write (rank 1 waits at the barrier), the whole
    process group is killed, and a second torchrun with --resume finishes the run."""
    reference, _, _ = distributed_search
    out = tmp_path / "run"
    proc = subprocess.Popen([*TORCHRUN, *SEARCH, "--out", str(out)], env=_env(**{PAUSE_BEFORE_REPLACE_ENV: "3"}),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(TIMEOUT, _kill_tree, (proc.pid,))
    watchdog.start()
    try:
        paused = next((line for line in proc.stderr if "paused before replacing" in line), "")
    finally:
        _kill_tree(proc.pid)
        proc.wait()
        watchdog.cancel()
        proc.stderr.close()
    assert paused.strip().endswith("checkpoint.pt"), paused
    assert torch.load(out / "checkpoint.pt", weights_only=False)["epoch"] == 1
    _torchrun([*SEARCH, "--resume", "--out", str(out)])
    assert json.loads((out / "genotype.json").read_text()) == json.loads((reference / "genotype.json").read_text())
    assert _history(out) == _history(reference)
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


@pytest.mark.slow
def test_an_output_folder_error_of_the_writer_is_every_ranks(tmp_path):
    """Rank 0 alone prepares --out: where it cannot, every rank ends with its message (the others had
    waited at a barrier for it, then failed with a connection error and a traceback)."""
    (tmp_path / "file").write_text("")
    done = subprocess.run([*TORCHRUN, *SEARCH, "--out", str(tmp_path / "file" / "sub")], env=_env(),
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode != 0
    # no traceback through our code (torchrun prints its own, of the failed children)
    assert os.path.join(ROOT, "qdarts") not in done.stderr, done.stderr[-3000:]
    assert done.stderr.count("qdarts search: error: output folder") == 2, done.stderr[-3000:]


def test_two_process_retraining(distributed_search, tmp_path):
    reference, _, _ = distributed_search
    out, dump = tmp_path / "train", tmp_path / "dump"
    # with drop-path (each rank draws its own masks: train.rank_seed) the replicas stay equal all the same
    done = _torchrun(["train", "--genotype", str(reference / "genotype.json"), "--epochs", "2", "--batch-size", "64",
                      "--channels", "4", "--drop-path", "0.3", "--no-progress", "--out", str(out)],
                     **{RANK_DUMP_ENV: str(dump)})
    assert done.stdout.count("test accuracy") == 1
    assert sorted(os.listdir(out)) == ["summary.json", "train_checkpoint.pt"]
    _same_on_every_rank(dump)
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["test_accuracy"] <= 1.0


@pytest.mark.parametrize("n, batch_size, world_size", [(37, 4, 2), (64, 8, 2), (50, 3, 4)])
@pytest.mark.parametrize("augment", [False, True])
def test_rank_shards_add_up_to_the_global_batches(n, batch_size, world_size, augment):
    """Rank r's k-th batch is its share of the single-process k-th batch of size world_size * batch_size
    (the samples past a multiple of world_size are dropped, so every rank takes as many steps)."""
    x = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    y = torch.arange(n)

    def run(shard, bs):
        g = torch.Generator().manual_seed(5)
        return [yb for _, yb in batches(x, y, bs, shuffle=True, generator=g, augment=augment, shard=shard)]

    ranks = [run((r, world_size), batch_size) for r in range(world_size)]
    steps = num_batches(n, batch_size, world_size=world_size)
    assert all(len(r) == steps for r in ranks)
    single = run((0, 1), world_size * batch_size)
    order = torch.cat(single)[: n - n % world_size]
    for k in range(steps):
        together = torch.stack([r[k] for r in ranks], 1).flatten()  # sample j of every rank, then j + 1
        assert torch.equal(together, order[k * world_size * batch_size: (k + 1) * world_size * batch_size])


def test_each_rank_draws_its_own_drop_path_masks():
    """Every rank is seeded alike (the same initial weights); for each epoch of distributed training its
    global RNG is then seeded by (seed, epoch, rank), so that the ranks' drop-path masks differ (they
    were the same on every rank) and a resumed run draws what an uninterrupted one does."""
    from qdarts.evalnet import drop_path
    from qdarts.train import rank_seed

    masks = []
    for rank in (0, 1):
        torch.manual_seed(rank_seed(0, 3, rank))
        masks.append(drop_path(torch.ones(64, 1, 1, 1), 0.5).flatten())
    assert not torch.equal(masks[0], masks[1])
    assert rank_seed(0, 3, 1) == rank_seed(0, 3, 1) != rank_seed(0, 4, 1) != rank_seed(1, 3, 1)
