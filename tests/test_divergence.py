"""A diverged search or training stops with qdarts.divergence.Diverged: what became non-finite, in which
epoch, which options to lower; the last finished epoch's checkpoint stays as it was."""

import json
import math

import pytest
import torch

from qdarts import cli
from qdarts.divergence import Diverged, check_figures, diagnosed, non_finite
from qdarts.search import SearchConfig, Searcher

TINY = dict(data="synthetic", epochs=2, warmup_epochs=0, batch_size=256, channels=4, layers=1, steps=2,
            partial_channels=2, bits=(2, 4))
TINY_ARGS = ["--data", "synthetic", "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "256", "--layers", "1",
             "--channels", "4", "--partial-channels", "2", "--bits", "2,4", "--no-progress", "--no-plots"]


def test_non_finite_names_the_tensors_with_a_nan_or_an_infinity():
    finite = torch.ones(3)
    assert non_finite([("a", finite), ("i", torch.arange(3))]) == []
    assert non_finite([("a", finite), ("b", torch.tensor([1.0, -math.inf])), ("c", torch.tensor([math.nan])),
                       ("h", torch.tensor([math.nan], dtype=torch.bfloat16))]) == ["b", "c", "h"]


def test_check_figures_names_every_non_finite_figure():
    check_figures("the run", {"loss": 1.5, "acc": 0.0}, "do this")
    with pytest.raises(Diverged, match=r"^the run diverged: loss nan, bitops inf; do this$"):
        check_figures("the run", {"loss": math.nan, "acc": 0.5, "bitops": math.inf}, "do this")


def test_diagnosed_turns_an_error_into_divergence_only_while_a_parameter_is_not_finite():
    good, bad = [("w", torch.ones(2))], [("w", torch.ones(2)), ("v", torch.tensor([math.nan]))]
    error = ValueError("scales must be finite, got [nan]\nsecond line")
    other = ValueError("x must be a float tensor")
    with pytest.raises(ValueError) as caught, diagnosed("the run", lambda: good, "lower it"):
        raise other
    assert caught.value is other  # parameters finite: not a divergence, the error as it was
    with pytest.raises(KeyError), diagnosed("the run", lambda: bad, "lower it"):
        raise KeyError("x")  # not what a non-finite number makes the ops raise
    with pytest.raises(Diverged) as caught, diagnosed("the run", lambda: bad, "lower it"):
        raise error
    assert str(caught.value) == ("the run diverged: parameter v is no longer finite (which then stopped the step: "
                                 "scales must be finite, got [nan]); lower it")
    assert caught.value.__cause__ is error
    many = [(f"p{i}", torch.tensor([math.inf])) for i in range(5)]
    with pytest.raises(Diverged, match=r"^the run diverged: parameters p0, p1, p2 and 2 more are no longer"), \
            diagnosed("the run", lambda: many, "lower it"):
        raise error
    with pytest.raises(Diverged, match=r"^the run diverged: parameters p0 and p1 are no longer"), \
            diagnosed("the run", lambda: many[:2], "lower it"):
        raise error
    with diagnosed("the run", lambda: bad, "lower it"):
        pass  # no error: nothing is looked at


@pytest.mark.parametrize("message", ["scales must be finite, got [inf, 0.5]",  # the Python check
                                     "scales must be finite and >= 2**-126, got scales[0] = inf"])  # the C++ kernels'
def test_diagnosed_takes_non_finite_scales_with_finite_parameters_for_overflowed_activations(message):
    error = RuntimeError(message)
    with pytest.raises(Diverged) as caught, diagnosed("the run", lambda: [("w", torch.tensor([-3e7, 2.0]))], "lower"):
        raise error
    assert str(caught.value) == ("the run diverged: the activations overflowed while every parameter is still finite "
                                 f"(the largest has magnitude 3e+07; which then stopped the step: {message}); lower")
    assert caught.value.__cause__ is error


def _files(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_a_search_whose_weights_become_nan_stops_naming_them_and_keeps_the_last_checkpoint(tmp_path):
    s = Searcher(SearchConfig(**TINY), str(tmp_path), progress=False)
    s.run(stop_after=1)
    saved = _files(tmp_path)
    conv = s.net.quant_layers()[0][1]
    name, weight = next((n, p) for n, p in s.net.named_parameters() if p is conv.weight)
    with torch.no_grad():
        weight.view(-1)[0] = math.nan  # what an overflowing SGD step leaves; its quantizer's scale is then NaN
    with pytest.raises(Diverged) as caught:
        s.run()
    text = str(caught.value)
    assert text.startswith(f"the search (epoch 2) diverged: parameter {name} is no longer finite (which then "
                           "stopped the step: scales")
    assert "--weight-lr" in text and "--arch-lr" in text and "keeps epoch 1, the last finished one" in text
    assert _files(tmp_path) == saved and s.epoch == 1 and len(s.history) == 1


def test_a_search_with_a_nan_loss_stops_at_the_end_of_the_epoch(tmp_path, monkeypatch):
    # how divergence shows on a GPU, whose kernels cannot refuse non-finite scales without a host sync:
    # nothing raises during the steps; the epoch's figures, read back at its end, are NaN
    step = Searcher.step

    def nan_loss_step(self, xb, yb, xv, yv, lr, stats, **kwargs):
        step(self, xb, yb, xv, yv, lr, stats, **kwargs)
        stats[1] = math.nan

    s = Searcher(SearchConfig(**TINY), str(tmp_path), progress=False)
    s.run(stop_after=1)
    saved = _files(tmp_path)
    monkeypatch.setattr(Searcher, "step", nan_loss_step)
    with pytest.raises(Diverged, match=r"^the search \(epoch 2\) diverged: train_loss nan; start again"):
        s.run()
    assert _files(tmp_path) == saved and json.loads((tmp_path / "history.json").read_text())[0]["epoch"] == 1


def _diverged_cli(argv, capsys):
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and " diverged: " in lines[0], err
    return lines[0]


def test_cli_search_and_training_with_a_far_too_large_learning_rate_say_so(tmp_path, capsys):
    line = _diverged_cli(["search", *TINY_ARGS, "--weight-lr", "1e30", "--out", str(tmp_path / "s")], capsys)
    assert line.startswith("qdarts search: error: the search (epoch 1) diverged: ")
    assert "weight_lr (--weight-lr) is 1e+30" in line and "no epoch had finished" in line
    assert "cost_weight (--lambda) is 0.001" in line  # the bit logits' gradient grows with it
    assert not (tmp_path / "s" / "checkpoint.pt").exists()
    # a rate whose weights stay finite under the gradient clipping, but not the activations they make,
    # whose largest magnitude the 8-bit activation scales are taken from
    line = _diverged_cli(["search", *TINY_ARGS, "--bits", "2,8", "--weight-lr", "1e9", "--out", str(tmp_path / "a")],
                         capsys)
    assert "the activations overflowed while every parameter is still finite" in line, line
    assert "weight_lr (--weight-lr) is 1e+09" in line
    assert cli.main(["search", *TINY_ARGS, "--out", str(tmp_path / "g")]) == 0
    capsys.readouterr()
    line = _diverged_cli(["train", "--genotype", str(tmp_path / "g" / "genotype.json"), "--epochs", "1",
                          "--batch-size", "256", "--channels", "4", "--no-progress", "--lr", "1e30",
                          "--out", str(tmp_path / "t")], capsys)
    assert line.startswith("qdarts train: error: the training (epoch 1) diverged: train_loss nan; ")
    assert "lr (--lr) is 1e+30" in line and not (tmp_path / "t" / "checkpoint.pt").exists()
