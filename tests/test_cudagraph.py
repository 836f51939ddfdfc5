"""``--cuda-graph``: a search step replayed from CUDA graphs (qdarts.cudagraph).

On CPU the plumbing runs with a stand-in capture that behaves as a CUDA graph does: capturing
records the step without computing anything (the searcher's state is restored afterwards) and
fixes the learning rates, replaying re-runs what was recorded on the static inputs. The graphed
search must then take exactly the steps of the eager one, bit for bit. On a GPU the real capture
is checked against the eager step, with no host sync during replays.
"""

import copy
import json
import math
import os
import subprocess
import sys
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

import qdarts_kernels as qk

from conftest import require_backend
from qdarts.cudagraph import GraphedStep
from qdarts.search import SearchConfig, Searcher, set_capturable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(data="synthetic", epochs=1, warmup_epochs=0, batch_size=16, channels=4, layers=1, steps=2,
            partial_channels=2, bits=(2, 4))


def _batches(s, n, device="cpu"):
    """n (train, val) batch pairs of 16 samples, different ones each step."""
    return [tuple(t[16 * i:16 * (i + 1)].to(device) for t in (s.train_x, s.train_y, s.val_x, s.val_y))
            for i in range(n)]


class RecordingCapture:
    """``capture`` for GraphedStep on CPU, with a CUDA graph's semantics (module docstring)."""

    def __init__(self, searcher):
        self.searcher = searcher
        self.captured = 0

    def _state(self):
        s = self.searcher
        opts = [o for o in (s.opt_weights, s.opt_gamma, s.opt_arch) if o is not None]
        return copy.deepcopy(s.net.state_dict()), [copy.deepcopy(o.state_dict()) for o in opts], opts

    def __call__(self, fn):
        net_state, opt_states, opts = self._state()
        states_before = [len(o.state) for o in opts]
        fn()  # a capture records the kernels; here the step runs, then its effects are undone
        # an optimiser state made during a capture would be recorded, its zero-fill re-run by every replay
        assert [len(o.state) for o in opts] == states_before, "an optimiser state was made during a capture"
        self.searcher.net.load_state_dict(net_state)
        for o, st in zip(opts, opt_states):
            o.load_state_dict(st)
        self.captured += 1
        learning_rates = self.searcher.learning_rates()

        def replay():
            assert self.searcher.learning_rates() == learning_rates, "replayed after a learning-rate change"
            fn()

        return SimpleNamespace(replay=replay)


def _graphed(searcher, warmup=2):
    capture = RecordingCapture(searcher)
    return GraphedStep(searcher._graph_step, searcher.learning_rates, warmup=warmup, capture=capture,
                       warmup_context=nullcontext), capture


def test_graphed_steps_equal_eager_steps_and_recapture_when_a_learning_rate_changes(tmp_path):
    eager = Searcher(SearchConfig(**TINY), str(tmp_path / "e"), progress=False)
    graphed = Searcher(SearchConfig(**TINY), str(tmp_path / "g"), progress=False)
    step, capture = _graphed(graphed)
    plan = [(True, 0.1)] * 4 + [(True, 0.05)] * 2 + [(False, 0.05)] * 2
    for (xb, yb, xv, yv), (update_arch, lr) in zip(_batches(eager, len(plan)), plan):
        stats_e, stats_g = torch.zeros(4), torch.zeros(4)
        for s in (eager, graphed):
            for group in s.opt_weights.param_groups:
                group["lr"] = lr
        eager.step(xb, yb, xv, yv, lr, stats_e, update_arch=update_arch)
        step(xb, yb, xv, yv, stats_g, update_arch)
        assert torch.equal(stats_g, stats_e)
        for (name, a), b in zip(graphed.net.named_parameters(), eager.net.parameters()):
            assert torch.equal(a, b), name
    # arch+weights: 2 warm-up steps, then graphs at lr 0.1 and 0.05; weights only: 2 warm-up steps
    assert (capture.captured, step.captures, step.replays) == (2, 2, 4)


def test_the_first_arch_steps_after_the_warm_up_epochs_run_eagerly(tmp_path):
    """The warm-up epochs take weight steps only: the arch optimiser's state is made by the first
    arch step, which must not be captured (each key warms up on its own)."""
    eager = Searcher(SearchConfig(**TINY), str(tmp_path / "e"), progress=False)
    graphed = Searcher(SearchConfig(**TINY), str(tmp_path / "g"), progress=False)
    step, capture = _graphed(graphed)
    plan = [False] * 3 + [True] * 4
    for (xb, yb, xv, yv), update_arch in zip(_batches(eager, len(plan)), plan):
        stats_e, stats_g = torch.zeros(4), torch.zeros(4)
        eager.step(xb, yb, xv, yv, 0.1, stats_e, update_arch=update_arch)
        step(xb, yb, xv, yv, stats_g, update_arch)
        assert torch.equal(stats_g, stats_e)
    for (name, a), b in zip(graphed.net.named_parameters(), eager.net.parameters()):
        assert torch.equal(a, b), name
    assert (capture.captured, step.replays) == (2, 3)


def test_a_new_batch_shape_gets_its_own_graph(tmp_path):
    s = Searcher(SearchConfig(**TINY), str(tmp_path), progress=False)
    step, _ = _graphed(s, warmup=1)
    (xb, yb, xv, yv), = _batches(s, 1)
    for batch in (xb, xb, xb[:7], xb[:7]):  # each shape: a warm-up step, then its graph
        step(batch, yb[:batch.shape[0]], xv, yv, torch.zeros(4), True)
    assert (step.captures, step.replays) == (2, 2)
    with pytest.raises(ValueError, match="warmup"):
        GraphedStep(s._graph_step, s.learning_rates, warmup=0)


def _rehearsing():
    """Whether a qdarts_kernels.rehearse_graph_capture block is being run."""
    return qk.ops._capture_rehearsals > 0


def test_the_last_warm_up_step_of_each_key_rehearses_the_capture():
    """The capture's kernels (qdarts_kernels.rehearse_graph_capture) are launched, and so loaded, by
    the last warm-up step of each key: a Triton kernel launched for the first time inside a capture
    would be loaded there, which CUDA refuses. Neither the other warm-up steps nor the replays
    rehearse."""
    seen = []

    def step(xb, yb, xv, yv, stats, update_arch):
        seen.append(("step", update_arch, xb.shape[0], _rehearsing()))

    def capture(fn):
        seen.append(("capture", _rehearsing()))
        return SimpleNamespace(replay=lambda: seen.append(("replay", _rehearsing())))

    graphed = GraphedStep(step, lambda: 0.1, warmup=3, capture=capture, warmup_context=nullcontext)
    x = torch.zeros(4, 2)
    for update_arch, n in [(True, 4)] * 5 + [(False, 4)] * 4 + [(True, 3)] * 3:
        graphed(x[:n], x[:n], x, x, torch.zeros(4), update_arch)
    assert seen == [("step", True, 4, False), ("step", True, 4, False), ("step", True, 4, True),
                    ("capture", False), ("replay", False), ("replay", False),
                    ("step", False, 4, False), ("step", False, 4, False), ("step", False, 4, True),
                    ("capture", False), ("replay", False),
                    ("step", True, 3, False), ("step", True, 3, False), ("step", True, 3, True)]
    assert not _rehearsing()


@pytest.mark.parametrize("mode", [None, "default", "reduce-overhead", "max-autotune"])
def test_steps_compiled_with_cuda_graphs_rehearse_the_capture(mode, tmp_path, monkeypatch):
    """torch.compile's modes reduce-overhead and max-autotune capture CUDA graphs of the compiled
    functions after warm-up calls (a first call, and again after any recompile): every search step
    then runs under rehearse_graph_capture; uncompiled and default-compiled steps never do. (The
    compiled functions are not called here: on CPU inductor takes minutes.)"""
    s = Searcher(SearchConfig(**TINY, compile=mode), str(tmp_path), progress=False)
    seen = []
    monkeypatch.setattr(s, "_eager_step", lambda *args: seen.append(_rehearsing()))
    x = torch.zeros(4, 2)
    for update_arch, n in [(False, 4)] * 3 + [(True, 4)] * 3 + [(False, 3)] * 3:
        s.step(x[:n], x[:n], x, x, 0.1, torch.zeros(4), update_arch=update_arch)
    assert seen == [mode in ("reduce-overhead", "max-autotune")] * 9
    assert not _rehearsing()


def test_cuda_graph_setting_is_checked():
    with pytest.raises(ValueError, match="cuda_graph needs a CUDA device"):
        SearchConfig(**TINY, cuda_graph=True).validate()
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="exclude each other"):
            SearchConfig(**TINY, cuda_graph=True, device="cuda", compile="default").validate()
        with pytest.raises(ValueError, match="order 'first'"):
            SearchConfig(**TINY, cuda_graph=True, device="cuda", order="second").validate()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replays_the_eager_step_without_host_syncs(tmp_path):
    eager = Searcher(SearchConfig(**TINY, device="cuda"), str(tmp_path / "e"), progress=False)
    graphed = Searcher(SearchConfig(**TINY, device="cuda", cuda_graph=True), str(tmp_path / "g"), progress=False)
    batches = _batches(eager, 6, "cuda")
    stats_e, stats_g = torch.zeros(4, device="cuda"), torch.zeros(4, device="cuda")
    for i, (xb, yb, xv, yv) in enumerate(batches):
        eager.step(xb, yb, xv, yv, 0.1, stats_e, update_arch=True)
        if i >= 4:  # warm-up (3) and capture (1) done: replays must not wait for the device
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            graphed.step(xb, yb, xv, yv, 0.1, stats_g, update_arch=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert graphed._graphed.captures == 1 and graphed._graphed.replays == 3
    torch.testing.assert_close(stats_g, stats_e, rtol=1e-4, atol=1e-4)
    for (name, a), b in zip(graphed.net.named_parameters(), eager.net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_a_new_process_captures_the_search_step_on_each_gpu_backend(backend, tmp_path):
    """``qdarts search --cuda-graph`` in a process where no kernel has run yet: no kernel is launched,
    and so loaded, for the first time inside a capture (which CUDA refuses; Triton loads a kernel at
    its first launch in a process). 8 steps of one batch shape: 3 warm-up steps, a capture, 4 replays."""
    require_backend(backend, "cuda")
    command = [sys.executable, "-m", "qdarts", "search", "--data", "synthetic", "--device", "cuda", "--backend",
               backend, "--cuda-graph", "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "32", "--layers",
               "1", "--channels", "4", "--bits", "2,4", "--no-progress", "--no-plots", "--out", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    history = json.loads((tmp_path / "history.json").read_text())
    assert len(history) == 1 and math.isfinite(history[0]["train_loss"]), history


def test_the_arch_optimiser_follows_the_cuda_graph_setting_of_a_resumed_run():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    state = copy.deepcopy(opt.state_dict())
    set_capturable(opt, True)
    assert opt.param_groups[0]["capturable"] and opt.state[p]["step"].device == p.device
    opt.load_state_dict(state)  # a checkpoint of a run without graphs: capturable False again
    assert not opt.param_groups[0]["capturable"]
    set_capturable(opt, False)
    assert opt.state[p]["step"].device.type == "cpu" and float(opt.state[p]["step"]) == 1.0
    opt.step()  # still a working Adam
    assert float(opt.state[p]["step"]) == 2.0
