"""The qdarts command line: help everywhere, search -> train end to end, bench delegation, errors."""

import json
import subprocess
import sys

import pytest
from conftest import files_named_by_the_summary

from qdarts import cli

TINY = ["--data", "synthetic", "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "256", "--layers", "1",
        "--channels", "4", "--partial-channels", "2", "--bits", "2,4", "--no-progress"]


@pytest.mark.parametrize("argv", [[], ["search"], ["train"], ["bench"]])
def test_help_everywhere(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv + ["--help"])
    assert e.value.code == 0
    assert "usage: qdarts" in capsys.readouterr().out


@pytest.mark.parametrize("module", ["qdarts", "qdarts.cli"])
def test_python_dash_m_runs_the_cli(module):
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, check=True)
    assert "search" in out.stdout and "train" in out.stdout and "bench" in out.stdout


@pytest.mark.slow
def test_search_then_train_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["search", *TINY, "--out", str(run)]) == 0
    for name in ("genotype.json", "history.json", "summary.md", "bits_per_layer.png", "op_weights.png",
                 "accuracy_bitops.png"):
        assert (run / name).stat().st_size > 0, name
    assert set(files_named_by_the_summary(run)) == {p.name for p in run.iterdir()} - {"summary.md", ".qdarts.lock"}
    assert "derived BitOps" in capsys.readouterr().out
    out = tmp_path / "t"
    assert cli.main(["train", "--genotype", str(run / "genotype.json"), "--epochs", "1", "--channels", "4",
                     "--no-progress", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bitops"] < summary["bitops_fp32"] and 0 <= summary["test_accuracy"] <= 1
    # the search folder itself stands for its genotype.json
    assert cli.main(["train", "--genotype", str(run), "--epochs", "1", "--channels", "4", "--no-progress",
                     "--out", str(tmp_path / "t2")]) == 0
    assert json.loads((tmp_path / "t2" / "summary.json").read_text())["bitops"] == summary["bitops"]
    # a second search into the same folder without --resume is refused with a clear message
    assert cli.main(["search", *TINY, "--out", str(run)]) == 2
    assert "--resume" in capsys.readouterr().err


def test_a_warmup_as_long_as_the_run_is_noted(tmp_path, capsys):
    """Allowed (the bit-widths are still searched) but noted: alpha and beta never learn."""
    assert cli.main(["search", *TINY, "--warmup-epochs", "1", "--out", str(tmp_path / "w")]) == 0
    err = capsys.readouterr().err
    assert "note: --warmup-epochs (1) is not below --epochs (1): alpha and beta are never updated" in err
    history = json.loads((tmp_path / "w" / "history.json").read_text())
    assert not any(h["arch_updates"] for h in history)


def test_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["search", "--bits", "2,x", "--out", str(tmp_path)])
    assert "--bits must be comma-separated ints" in capsys.readouterr().err
    assert cli.main(["train", "--genotype", str(tmp_path / "none.json"), "--out", str(tmp_path / "t")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["train", "--genotype", str(tmp_path), "--out", str(tmp_path / "t")]) == 2
    assert "is a folder without a genotype.json" in capsys.readouterr().err
    assert cli.main(["search", "--data", "cifar10", "--data-dir", str(tmp_path / "nope"), "--out",
                     str(tmp_path / "s")]) == 2
    assert "CIFAR-10 folder" in capsys.readouterr().err


def test_bench_without_the_benchmark_module_fails_clearly(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "qdarts.benchmark.cli", None)  # makes the import raise ImportError
    assert cli.main(["bench"]) == 2
    assert "qdarts.benchmark.cli is not available" in capsys.readouterr().err


def test_every_option_reaches_the_run_s_config(tmp_path, monkeypatch):
    """No option parsed and then dropped: each lands in SearchConfig / TrainConfig (the runs are stubbed)."""
    from qdarts import search, train

    seen = []

    def capture(config, out, **kwargs):
        seen.append((config, kwargs))
        raise ValueError("captured")

    monkeypatch.setattr(search, "run_search", capture)
    monkeypatch.setattr(train, "run_train", capture)
    assert cli.main(["search", "--data", "synthetic", "--data-dir", str(tmp_path), "--bits", "2,4", "--epochs", "3",
                     "--warmup-epochs", "1", "--batch-size", "32", "--layers", "2", "--channels", "6",
                     "--partial-channels", "4", "--quantizer", "lsq", "--act-grid", "official", "--gamma-per-conv",
                     "--cost", "official", "--lambda", "0.5", "--order", "second", "--weight-lr", "0.01",
                     "--gamma-lr", "0.02", "--arch-lr", "0.03", "--seed", "7", "--no-grouped-weights", "--cuda-graph",
                     "--compile", "--act-dtype", "bf16", "--backend", "reference", "--no-progress", "--no-plots",
                     "--device", "cuda:1", "--resume", "--out", str(tmp_path / "s")]) == 2
    assert cli.main(["train", "--genotype", "g.json", "--fp32", "--epochs", "2", "--batch-size", "16", "--layers", "2",
                     "--channels", "6", "--lr", "0.2", "--auxiliary", "--aux-weight", "0.3", "--drop-path", "0.1",
                     "--data", "synthetic", "--data-dir", str(tmp_path), "--seed", "5", "--backend", "reference",
                     "--act-dtype", "bf16", "--compile", "max-autotune", "--no-progress", "--resume",
                     "--device", "cuda:1", "--out", str(tmp_path / "t")]) == 2
    (s, s_kwargs), (t, t_kwargs) = seen
    assert s == search.SearchConfig(
        data="synthetic", data_dir=str(tmp_path), bits=(2, 4), epochs=3, warmup_epochs=1, batch_size=32, layers=2,
        channels=6, partial_channels=4, quantizer="lsq", act_grid="official", share_gamma=False, cost="official",
        cost_weight=0.5, order="second", weight_lr=0.01, gamma_lr=0.02, arch_lr=0.03, seed=7, device="cuda:1",
        backend="reference", grouped_weights=False, act_dtype="bf16", compile="default", cuda_graph=True)
    assert (s_kwargs["resume"], s_kwargs["progress"], s_kwargs["plots"]) == (True, False, False)
    assert t == train.TrainConfig(
        genotype="g.json", fp32=True, epochs=2, batch_size=16, layers=2, channels=6, lr=0.2, auxiliary=True,
        aux_weight=0.3, drop_path=0.1, data="synthetic", data_dir=str(tmp_path), seed=5, device="cuda:1",
        backend="reference", act_dtype="bf16", compile="max-autotune")
    assert (t_kwargs["resume"], t_kwargs["progress"]) == (True, False)
