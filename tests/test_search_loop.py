"""The search loop: bit-for-bit reproducibility, resume, second order, atomic checkpoints; retraining."""

import json
import os
import sys
import warnings

import pytest
import torch

import qdarts
import qdarts_kernels.nn as qnn
from conftest import files_named_by_the_summary

from qdarts import evalnet, search
from qdarts.checkpoint import pack_tensors, unpack_tensors
from qdarts.derive import derive_genotype
from qdarts.evalnet import EvalNetwork
from qdarts.genotype import load_genotype
from qdarts.search import CHECKPOINT, SearchConfig, Searcher, cosine_lr, run_search
from qdarts.supernet import SearchNetwork, SupernetConfig
from qdarts.train import TrainConfig, run_train

TINY = dict(data="synthetic", epochs=2, warmup_epochs=1, batch_size=256, channels=4, layers=1, steps=2,
            partial_channels=2, bits=(2, 4))


def _search(out, resume=False, stop_after=None, **kw):
    cfg = SearchConfig(**{**TINY, **kw})
    return run_search(cfg, str(out), resume=resume, progress=False, stop_after=stop_after, plots=False)


def _without_time(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


@pytest.mark.slow
def test_two_runs_with_one_seed_are_identical_and_another_seed_differs(tmp_path):
    a = _search(tmp_path / "a")
    b = _search(tmp_path / "b")
    c = _search(tmp_path / "c", seed=1)
    assert a["genotype"].to_dict() == b["genotype"].to_dict()
    assert _without_time(a["history"]) == _without_time(b["history"])
    assert _without_time(a["history"]) != _without_time(c["history"])
    h = a["history"][-1]
    assert {"train_loss", "train_acc", "val_acc", "expected_bitops", "alpha", "beta", "gamma"} <= set(h)
    assert [x["arch_updates"] for x in a["history"]] == [False, True]
    files = set(os.listdir(tmp_path / "a"))
    assert {"genotype.json", "history.json", "summary.md", CHECKPOINT} <= files
    assert not [f for f in files if f.endswith(".tmp")]


def test_a_weight_lr_below_its_floor_is_held_not_raised_towards_it(tmp_path):
    """The cosine schedule anneals down to weight_lr_min (1e-3); a smaller weight_lr is kept as it is
    (it rose towards the floor before), and 0 freezes the weights."""
    assert [h["lr"] for h in _search(tmp_path / "a", epochs=3, weight_lr=5e-4)["history"]] == [5e-4] * 3
    frozen = _search(tmp_path / "b", epochs=2, warmup_epochs=2, weight_lr=0.0)
    assert [h["lr"] for h in frozen["history"]] == [0.0, 0.0]


@pytest.mark.slow
def test_resume_continues_to_the_uninterrupted_result(tmp_path):
    full = _search(tmp_path / "full")
    first = _search(tmp_path / "cut", stop_after=1)
    assert "genotype" not in first and not os.path.exists(tmp_path / "cut" / "genotype.json")
    with pytest.raises(FileExistsError, match="--resume"):
        _search(tmp_path / "cut")
    with pytest.raises(ValueError, match=r"epochs \(--epochs\) is 2 there, 3 here"):
        _search(tmp_path / "cut", resume=True, epochs=3)  # the Python API compares every setting
    resumed = _search(tmp_path / "cut", resume=True)
    assert resumed["genotype"].to_dict() == full["genotype"].to_dict()
    assert _without_time(resumed["history"]) == _without_time(full["history"])
    a = unpack_tensors(torch.load(tmp_path / "full" / CHECKPOINT, weights_only=False)["model"])
    b = unpack_tensors(torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=False)["model"])
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_packed_state_dicts_come_back_equal_tensor_by_tensor(tmp_path):
    """pack_tensors / unpack_tensors: mixed dtypes, 0-d, empty and non-contiguous tensors, a value that
    is not a tensor, the order of the keys; through torch.save and torch.load; a plain (unpacked) state
    dict, as checkpoints written before packing hold, is taken as it is."""
    state = {"w": torch.randn(3, 4).t(), "n": torch.tensor(7), "empty": torch.zeros(0, 2), "h": torch.randn(5).half(),
             "extra": {"a": 1}, "b": torch.arange(6, dtype=torch.float64).view(2, 3)}
    torch.save(pack_tensors(state), tmp_path / "s.pt")
    back = unpack_tensors(torch.load(tmp_path / "s.pt", weights_only=False))
    assert list(back) == list(state) and back["extra"] == {"a": 1}
    for k in ("w", "n", "empty", "h", "b"):
        assert back[k].dtype == state[k].dtype and back[k].shape == state[k].shape and torch.equal(back[k], state[k])
    plain = {"w": torch.randn(2)}
    assert unpack_tensors(plain).keys() == plain.keys() and unpack_tensors(plain)["w"] is plain["w"]
    net = SearchNetwork(SupernetConfig(input_shape=(1, 8, 8), num_classes=10, channels=4, layers=1, steps=2))
    copy = SearchNetwork(SupernetConfig(input_shape=(1, 8, 8), num_classes=10, channels=4, layers=1, steps=2))
    copy.load_state_dict(unpack_tensors(pack_tensors(net.state_dict())))
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), copy.state_dict().values()))


def test_first_order_arch_step_computes_no_weight_gradient_and_the_same_arch_gradients(tmp_path, monkeypatch):
    """The arch step takes the weights and gamma out of autograd: no conv computes a weight gradient,
    no backward of the grouped weight quantizer runs, and alpha and beta get the gradients they get
    with everything in autograd, bit for bit; the weights need gradients again afterwards."""
    s = Searcher(SearchConfig(**TINY), str(tmp_path), progress=False)
    xv, yv = s.val_x[:32], s.val_y[:32]
    want = torch.autograd.grad(s._val_loss_fn(xv, yv), s.arch_params, allow_unused=True)
    weight_grads = []
    depthwise_backward = torch.ops.qdarts_C.depthwise_conv2d_backward
    monkeypatch.setattr(torch.ops.qdarts_C, "depthwise_conv2d_backward",
                        lambda *a: weight_grads.append(a[-1]) or depthwise_backward(*a))
    monkeypatch.setattr(s.opt_arch, "step", lambda: None)  # the gradients stay to be read
    s._arch_step(s.train_x[:32], s.train_y[:32], xv, yv, lr=0.1)
    assert weight_grads and not any(weight_grads)  # depthwise backward calls, none with the weight gradient
    for p, g in zip(s.arch_params, want):
        assert torch.equal(p.grad, torch.zeros_like(p) if g is None else g)
    assert all(p.requires_grad for p in s.groups["weights"] + s.groups["gamma"])


def test_second_order_moves_alpha_and_keeps_weights_where_the_optimiser_left_them(tmp_path):
    s = Searcher(SearchConfig(**TINY, order="second"), str(tmp_path), progress=False)
    x, y = s.train_x[:16], s.train_y[:16]
    s.net(x)  # convs record their MACs
    before_w = [p.detach().clone() for p in s.groups["weights"]]
    before_a = s.net.alphas_normal.detach().clone()
    # the forwards at the virtual weights (w', w+-) leave the batch norms' running statistics as they were
    running = {name: b.clone() for name, b in s.net.named_buffers() if "running" in name or "batches" in name}
    assert running
    s._arch_step(x, y, s.val_x[:16], s.val_y[:16], lr=0.1)
    assert not torch.equal(before_a, s.net.alphas_normal)
    assert all(torch.equal(a, b) for a, b in zip(before_w, s.groups["weights"]))
    buffers = dict(s.net.named_buffers())
    assert all(torch.equal(b, buffers[name]) for name, b in running.items())


def test_lsq_search_runs_and_gamma_lowers_bits_under_a_strong_cost(tmp_path):
    r = _search(tmp_path, quantizer="lsq", epochs=1, warmup_epochs=1, cost_weight=1.0, gamma_lr=1.0)
    first_pair = next(iter(r["history"][-1]["gamma"].values()))
    assert first_pair["weight"][0] > 0.5  # probability of 2 bits


@pytest.mark.slow
def test_retraining_writes_the_summary_and_resumes(tmp_path):
    r = _search(tmp_path / "s", epochs=1, warmup_epochs=0)
    genotype = str(tmp_path / "s" / "genotype.json")
    cfg = dict(genotype=genotype, epochs=2, batch_size=256, channels=4)
    full = run_train(TrainConfig(**cfg), str(tmp_path / "t"), progress=False)
    run_train(TrainConfig(**cfg), str(tmp_path / "u"), progress=False, stop_after=1)
    resumed = run_train(TrainConfig(**cfg), str(tmp_path / "u"), progress=False, resume=True)
    keys = {"test_accuracy", "bitops", "bitops_fp32", "memory_bytes", "memory_bytes_fp32"}
    assert keys <= set(json.loads((tmp_path / "t" / "summary.json").read_text()))
    assert resumed["test_accuracy"] == full["test_accuracy"]
    assert _without_time(resumed["history"]) == _without_time(full["history"])
    assert full["bitops"] < full["bitops_fp32"] and r["genotype"].bit_choices == [2, 4]
    fp32 = run_train(TrainConfig(**cfg, fp32=True), str(tmp_path / "f"), progress=False)
    assert fp32["bitops"] == fp32["bitops_fp32"] == full["bitops_fp32"]


def test_bad_config_is_rejected_naming_the_setting(tmp_path):
    with pytest.raises(ValueError, match="bits must be distinct"):
        _search(tmp_path, bits=(2, 2))
    with pytest.raises(ValueError, match="partial_channels"):
        _search(tmp_path, channels=6, partial_channels=4)
    with pytest.raises(ValueError, match="order must be"):
        _search(tmp_path, order="third")
    with pytest.raises(ValueError, match=r"seed \(--seed\) must be an integer in \[0, 2\*\*32\)"):
        _search(tmp_path, seed=2**32)
    SearchConfig(**TINY, seed=2**32 - 1).validate()  # its per-epoch seeds fit torch.Generator's 64 bits
    with pytest.raises(ValueError, match=r"cost_weight \(--lambda\) must be a finite number >= 0, got nan"):
        _search(tmp_path, cost_weight=float("nan"))
    with pytest.raises(ValueError, match=r"layers \(--layers\) must be >= 1"):
        TrainConfig(genotype="g.json", layers=0).validate()
    # the Python API's settings without an option: a negative clip norm flips the gradients' sign, a NaN
    # momentum ends in a divergence blamed on the learning rates, 1.5 epochs ran 2
    for setting, value in (("grad_clip", -1.0), ("weight_momentum", float("nan")), ("gamma_decay", -1e-3),
                           ("arch_decay", float("inf"))):
        with pytest.raises(ValueError, match=f"{setting} must be a finite number >= 0, got {value}"):
            _search(tmp_path, **{setting: value})
    for setting in ("epochs", "batch_size", "steps"):
        with pytest.raises(ValueError, match=f"{setting}.* must be an integer, got 2.0"):
            _search(tmp_path, **{setting: 2.0})
    for setting, value in (("grad_clip", -1.0), ("momentum", float("nan")), ("weight_decay", -1.0)):
        with pytest.raises(ValueError, match=f"{setting} must be a finite number >= 0, got {value}"):
            TrainConfig(genotype="g.json", **{setting: value}).validate()
    with pytest.raises(ValueError, match=r"epochs \(--epochs\) must be an integer, got 1.5"):
        TrainConfig(genotype="g.json", epochs=1.5).validate()
    assert not os.listdir(tmp_path)


def test_a_list_of_bits_is_the_tuple_a_checkpoint_gives_back(tmp_path):
    """bits (and arch_betas) given as lists to the Python API: the run resumes, its checkpoint's tuples
    are the same settings."""
    config = SearchConfig(**{**TINY, "bits": list(TINY["bits"])})
    assert config.bits == tuple(TINY["bits"]) and SearchConfig(arch_betas=[0.5, 0.9]).arch_betas == (0.5, 0.9)
    run_search(config, str(tmp_path / "s"), progress=False, plots=False, stop_after=1)
    run_search(config, str(tmp_path / "s"), progress=False, plots=False, resume=True)


def test_auxiliary_retraining_drops_a_trailing_batch_of_one_sample(tmp_path):
    """The synthetic pool of 512 in batches of 511 ends in a batch of one sample, for which the
    auxiliary head's BatchNorm (on a 1x1 map) has one value per channel: that batch is left out."""
    net = SearchNetwork(SupernetConfig(input_shape=(3, 8, 8), num_classes=10, channels=4, layers=1, steps=2,
                                       partial_channels=2, bits=(2, 4)))
    derive_genotype(net, {"data": "synthetic", "layers": 1}).save(str(tmp_path / "genotype.json"))
    s = run_train(TrainConfig(genotype=str(tmp_path / "genotype.json"), epochs=1, batch_size=511, channels=4,
                              auxiliary=True), str(tmp_path / "t"), progress=False)
    assert 0 <= s["test_accuracy"] <= 1
    # the parameters are counted as DARTS counts them: without the auxiliary head (DARTS's: 768 channels)
    plain = EvalNetwork(load_genotype(str(tmp_path / "genotype.json")), (3, 8, 8), 10, 4, 1)
    assert s["parameters"] == sum(p.numel() for p in plain.parameters())
    aux = EvalNetwork(load_genotype(str(tmp_path / "genotype.json")), (3, 8, 8), 10, 4, 1, auxiliary=True)
    assert aux.auxiliary_head.classifier.in_features == 768


@pytest.mark.parametrize("setting", [{}, {"grouped_weights": False}, {"act_dtype": "bf16"}, {"quantizer": "lsq"}],
                         ids=["grouped", "per_conv", "bf16", "lsq"])
def test_no_host_sync_inside_a_search_step(tmp_path, monkeypatch, setting):
    """The search layer and the quantized layers never read a tensor value back to the host within a
    step (losses are accumulated as tensors). Reads inside the ops of qdarts_kernels are that
    library's business: it checks the scale values of CPU tensors, which costs no device sync
    (test_search_speed runs steps on a GPU under torch.cuda.set_sync_debug_mode("error"))."""
    s = Searcher(SearchConfig(**TINY, **setting), str(tmp_path), progress=False)
    x, y, xv, yv = s.train_x[:16], s.train_y[:16], s.val_x[:16], s.val_y[:16]
    stats = torch.zeros(4)
    s._weight_step(x, y, stats)  # first step: convs record MACs, the cost builds its constant tables
    packages = {os.path.dirname(os.path.abspath(m.__file__)) for m in (qdarts, qnn)}
    reads = []

    def guarded(original):
        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if os.path.dirname(os.path.abspath(caller)) in packages:
                reads.append(caller)
            return original(self, *args, **kwargs)
        return read

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, guarded(getattr(torch.Tensor, name)))
    for order in ("first", "second"):
        s.config.order = order
        s._arch_step(x, y, xv, yv, lr=0.1)
    s._weight_step(x, y, stats)
    assert reads == []
    s._record(0, 0.1, stats, 0.0)  # once per epoch the values are read: the guard sees it
    assert reads


def test_a_resume_on_another_number_of_processes_warns(tmp_path):
    """The checkpoint keeps its run's number of processes: the global batch is theirs times batch_size, so a
    resume on another number continues with a warning that its result differs from an uninterrupted run's."""
    _search(tmp_path / "same", stop_after=1)
    assert torch.load(tmp_path / "same" / "checkpoint.pt", weights_only=False)["world_size"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same number: no warning
        _search(tmp_path / "same", resume=True)
    _search(tmp_path / "other", stop_after=1)
    state = torch.load(tmp_path / "other" / "checkpoint.pt", weights_only=False)
    torch.save({**state, "world_size": 2}, tmp_path / "other" / "checkpoint.pt")
    with pytest.warns(UserWarning, match=r"a run of 2 process\(es\), this one has 1: the global batch"):
        _search(tmp_path / "other", resume=True)


def test_alpha_and_beta_move_from_the_first_epoch_after_the_warm_up_on(tmp_path):
    """warmup_epochs=1: the first epoch leaves alpha and beta at their initial values, the second updates them."""
    initial = Searcher(SearchConfig(**TINY), str(tmp_path / "init"), progress=False).net
    history = _search(tmp_path / "s")["history"]
    assert history[0]["alpha"]["normal"] == search._rounded(initial.op_probs(False))
    assert history[0]["beta"]["reduce"] == search._rounded(initial.edge_weights(initial.betas_reduce))
    assert history[1]["alpha"]["normal"] != history[0]["alpha"]["normal"]
    assert history[1]["beta"]["reduce"] != history[0]["beta"]["reduce"]


def test_the_cosine_schedule_starts_at_weight_lr_and_anneals_towards_its_floor(tmp_path):
    assert cosine_lr(0, 4, 0.1, 0.0) == 0.1
    assert cosine_lr(2, 4, 0.1, 0.02) == pytest.approx(0.06)
    assert cosine_lr(4, 4, 0.1, 0.02) == pytest.approx(0.02)
    lrs = [h["lr"] for h in _search(tmp_path, epochs=2, weight_lr=0.1, weight_lr_min=0.0)["history"]]
    assert lrs == [0.1, cosine_lr(1, 2, 0.1, 0.0)] and lrs[1] == pytest.approx(0.05)


def test_each_epoch_draws_new_train_and_val_orders(tmp_path, monkeypatch):
    """The data order of epoch e comes from a generator seeded by (seed, e): every epoch and each split reshuffles,
    and a second run draws the same orders."""
    orders = []

    def recording(x, y, batch_size, *, shuffle, generator=None, **kw):
        if shuffle:  # the epoch's splits (the evaluation reads the val split in order)
            orders.append(torch.randperm(x.shape[0], generator=torch.Generator().set_state(generator.get_state())))
        return batches(x, y, batch_size, shuffle=shuffle, generator=generator, **kw)

    batches = search.batches
    monkeypatch.setattr(search, "batches", recording)
    _search(tmp_path / "a", epochs=2)
    _search(tmp_path / "b", epochs=2)
    assert len(orders) == 8  # per run and epoch: train, val
    first, second = orders[:4], orders[4:]
    assert all(not torch.equal(a, b) for i, a in enumerate(first) for b in first[i + 1:])
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_the_train_loss_adds_the_weighted_cost_to_the_cross_entropy(tmp_path):
    s = Searcher(SearchConfig(**TINY, cost_weight=0.1), str(tmp_path / "unit"), progress=False)
    _, ce, loss = s._train_loss(s.train_x[:32], s.train_y[:32])
    assert torch.equal(loss, ce + 0.1 * s.cost())
    h = _search(tmp_path / "run", epochs=1, cost_weight=0.1)["history"][0]
    assert h["train_loss"] > h["train_ce"] + 0.05  # C > 1: the first conv alone counts E_a E_w >= 4


def test_second_order_arch_gradient_on_a_smooth_loss(tmp_path, monkeypatch):
    """DARTS eq. 7-8 on losses with a known unrolled gradient, with u a weight and a = alpha[0, 0]:
    L_train = u^2 / 2 + a u, L_val = u^2 / 2 + 0.3 a. The virtual step (lr 0.1, with weight decay and the
    momentum buffer) gives u' = u - lr (u + a + wd u + m buf), and dL_val(u'(a)) / da = 0.3 - lr u'; the
    finite difference is exact here, as d L_train / da = u is linear in the weights."""
    s = Searcher(SearchConfig(**TINY, order="second", weight_decay=0.5, weight_momentum=0.9), str(tmp_path),
                 progress=False)
    w = s.groups["weights"][0]
    a = s.net.alphas_normal
    with torch.no_grad():
        w.view(-1)[0] = 1.0
        a.view(-1)[0] = 0.5
    s.opt_weights.state[w]["momentum_buffer"] = torch.full_like(w, 0.2)
    u = lambda: w.view(-1)[0]  # noqa: E731
    monkeypatch.setattr(s, "_train_loss", lambda x, y: (None, None, u() ** 2 / 2 + a.view(-1)[0] * u()))
    monkeypatch.setattr(s, "_val_loss_fn", lambda x, y: u() ** 2 / 2 + 0.3 * a.view(-1)[0])
    grads = s._second_order_grads(None, None, None, None, lr=0.1)
    virtual = 1.0 - 0.1 * (1.0 + 0.5 + 0.5 * 1.0 + 0.9 * 0.2)
    assert grads[0].view(-1)[0].item() == pytest.approx(0.3 - 0.1 * virtual, rel=1e-4)
    assert not grads[0].view(-1)[1:].any() and not any(g.any() for g in grads[1:])
    assert u().item() == 1.0  # the weights are back where they were


def test_gradient_clipping_applies_to_the_weights_alone(tmp_path):
    """grad_clip 0 scales every weight gradient to zero; gamma's gradient (its own SGD) is not clipped."""
    s = Searcher(SearchConfig(**TINY, grad_clip=0.0), str(tmp_path), progress=False)
    s._weight_step(s.train_x[:32], s.train_y[:32], torch.zeros(4))
    assert all(not p.grad.any() for p in s.groups["weights"] if p.grad is not None)
    assert all(p.grad.any() for p in s.groups["gamma"])


def test_resume_after_an_arch_epoch_restores_the_arch_optimiser(tmp_path):
    """Stopped after an epoch that updated alpha and beta, a run resumes with Adam's moments and step count."""
    full = _search(tmp_path / "full", epochs=3)
    _search(tmp_path / "cut", epochs=3, stop_after=2)
    resumed = _search(tmp_path / "cut", epochs=3, resume=True)
    assert _without_time(resumed["history"]) == _without_time(full["history"])


def test_a_resumed_search_runs_on_the_backend_given_for_the_resume(tmp_path):
    _search(tmp_path, stop_after=1)
    resumed = _search(tmp_path, resume=True, backend="reference")
    assert resumed["config"].backend == "reference" and resumed["searcher"].net.cells[0].edges[0].backend == "reference"


def _genotype_file(tmp_path):
    net = SearchNetwork(SupernetConfig(input_shape=(3, 8, 8), num_classes=10, channels=4, layers=1, steps=2,
                                       partial_channels=2, bits=(2, 4)))
    derive_genotype(net, {"data": "synthetic", "layers": 1}).save(str(tmp_path / "genotype.json"))
    return str(tmp_path / "genotype.json")


def test_the_auxiliary_loss_is_weighted_by_aux_weight(tmp_path):
    """lr 0 keeps the weights: every run sees the same main and auxiliary cross-entropies, so the train loss
    CE + aux_weight * CE_aux is linear in aux_weight."""
    genotype = _genotype_file(tmp_path)
    loss = {w: run_train(TrainConfig(genotype=genotype, epochs=1, batch_size=256, channels=4, auxiliary=True,
                                     aux_weight=w, lr=0.0), str(tmp_path / str(w)), progress=False)["history"][0]
            ["train_loss"] for w in (0.0, 0.5, 1.0)}
    assert loss[1.0] > loss[0.0]
    assert loss[1.0] - loss[0.0] == pytest.approx(2 * (loss[0.5] - loss[0.0]), rel=1e-4)


def test_drop_path_probability_rises_linearly_over_the_epochs(tmp_path, monkeypatch):
    """DARTS: epoch e drops paths with probability drop_path * e / epochs (none in the first epoch)."""
    used = []
    drop_path = evalnet.drop_path
    monkeypatch.setattr(evalnet, "drop_path", lambda h, p: used.append(p) or drop_path(h, p))
    run_train(TrainConfig(genotype=_genotype_file(tmp_path), epochs=2, batch_size=256, channels=4, drop_path=0.3),
              str(tmp_path / "t"), progress=False)
    assert used and set(used) == {0.15}


def test_a_resumed_retraining_draws_the_drop_path_masks_of_an_uninterrupted_one(tmp_path):
    """The masks come from the global RNG, whose state the checkpoint keeps."""
    cfg = dict(genotype=_genotype_file(tmp_path), epochs=3, batch_size=256, channels=4, drop_path=0.3)
    full = run_train(TrainConfig(**cfg), str(tmp_path / "full"), progress=False)
    run_train(TrainConfig(**cfg), str(tmp_path / "cut"), progress=False, stop_after=2)
    resumed = run_train(TrainConfig(**cfg), str(tmp_path / "cut"), progress=False, resume=True)
    assert _without_time(resumed["history"]) == _without_time(full["history"])


def test_summary_states_how_many_times_more_bitops_and_bytes_fp32_takes(tmp_path):
    from qdarts.report import write_search_report

    class Genotype:
        def describe(self):
            return "the genotype"

    history = [{"epoch": 1, "train_acc": 0.5, "val_acc": 0.25, "expected_bitops": 3e6}]
    cost = {"bitops": 1000.0, "bitops_fp32": 16000.0, "memory_bytes": 300.0, "memory_bytes_fp32": 1200.0,
            "layers": []}
    write_search_report(str(tmp_path), SearchConfig(), history, Genotype(), cost, 1.25, plots=False)
    lines = (tmp_path / "summary.md").read_text().splitlines()
    assert "| derived network BitOps / sample | 1000 |" in lines
    assert "| same network in fp32 | 1.6e+04 (16.0x more) |" in lines
    assert "| same network in fp32 | 1200 B (4.0x more) |" in lines


def test_summary_without_plots_names_the_files_there_are(tmp_path):
    """--no-plots: no plot named, and no empty entry in their place (it read "history.json, , checkpoint.pt")."""
    from qdarts.report import write_search_report

    class Genotype:
        def describe(self):
            return "the genotype"

    cost = {"bitops": 1.0, "bitops_fp32": 2.0, "memory_bytes": 3.0, "memory_bytes_fp32": 4.0, "layers": []}
    write_search_report(str(tmp_path), SearchConfig(), [{"epoch": 1, "train_acc": 0.5, "val_acc": 0.25,
                                                         "expected_bitops": 3e6}], Genotype(), cost, 1.0, plots=False)
    assert files_named_by_the_summary(tmp_path) == ["genotype.json", "history.json", "checkpoint.pt"]
