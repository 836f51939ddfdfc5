"""Smoke tests of the benchmark suite (qdarts.benchmark): runner, figures, report, CLI; seconds on CPU."""

import argparse
import json
import os

import pytest
import torch

from qdarts.benchmark import cases, cli, endtoend, readme, report, runner, timing
from qdarts.benchmark.cases import EAGER, OpCase

import qdarts_kernels as qk

TINY = [
    OpCase("mixed_fake_quant", "per_tensor", (2, 4, 8, 8)),
    OpCase("mixed_fake_quant", "per_channel", (2, 4, 8, 8)),
    OpCase("fake_quant", "per_tensor", (2, 4, 8, 8)),
    OpCase("mixed_op_sum", "-", (2, 4, 8, 8)),
]


def test_min_traffic_follows_design_section_6():
    x = OpCase("mixed_fake_quant", "per_tensor", (64, 64, 32, 32))
    assert [x.min_traffic_bytes(m) for m in cases.MODES] == [8 * 2**22, 12 * 2**22, 20 * 2**22]
    s = OpCase("mixed_op_sum", "-", (64, 16, 32, 32))
    assert [s.min_traffic_bytes(m) for m in cases.MODES] == [36 * 2**20, 68 * 2**20, 104 * 2**20]
    half = OpCase("mixed_op_sum", "-", (64, 16, 32, 32), torch.bfloat16)
    assert half.min_traffic_bytes("forward") == 18 * 2**20


def test_sweeps_hold_the_issue_targets_and_the_design_anchors():
    cpu_ids = {(c.op, c.scaling, c.numel) for c in cases.sweep("cpu", quick=True)}
    for target in runner.CPU_TARGETS:
        assert (target["op"], target["scaling"], target["numel"]) in cpu_ids
    gpu = cases.sweep("cuda", quick=False)
    assert any(c.shape == (256, 128, 32, 32) and c.op == "mixed_fake_quant" for c in gpu)
    assert any(c.numel == 4 * 2**20 and c.op == "mixed_op_sum" for c in gpu)
    assert {c.dtype for c in gpu} == {torch.float32, torch.bfloat16}


@pytest.mark.parametrize("case", TINY, ids=lambda c: c.id)
def test_implementations_agree_with_the_reference(case):
    leaves = case.make_inputs("cpu")
    want = case.function(EAGER)(*leaves)
    impls = cases.backends_for("cpu") + ["reference"] + ([cases.AUTOGRAD] if case.op != "mixed_op_sum" else [])
    for impl in impls:
        torch.testing.assert_close(case.function(impl)(*leaves), want)


def test_measure_respects_sample_bounds():
    calls = []
    t = timing.measure(lambda s: calls.append(s), lambda: "state", "cpu", warmup=2, min_samples=3, max_samples=4,
                       budget_s=0.0)
    assert len(t.samples) == 3 and calls == ["state"] * 5
    assert t.p20 <= t.median <= t.p80


@pytest.mark.parametrize("case", TINY[:3], ids=lambda c: c.id)
def test_saved_bytes_counts_temporaries_not_inputs(case):
    leaves = case.make_inputs("cpu")
    x_bytes = leaves[0].numel() * 4
    # straightforward autograd keeps per-bit temporaries; the public op keeps its inputs (and at
    # most a few bytes, e.g. fake_quant's probs = [1.0])
    assert timing.saved_bytes(case.function(cases.AUTOGRAD), leaves) >= x_bytes * len(case.bits)
    assert timing.saved_bytes(case.function("reference"), leaves) < 64


def test_runner_records_and_speedups():
    records = runner.run_kernels(TINY[:1], "cpu", quick=True, copy_gbps=10.0, impls=[EAGER, "reference"],
                                 log=lambda _: None)
    assert len(records) == 2 * len(cases.MODES)
    for r in records:
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["gbps"] == pytest.approx(r["min_traffic_bytes"] / r["median_ms"] / 1e6)
        assert r["pct_of_copy"] == pytest.approx(10 * r["gbps"])
        assert r["speedup_vs_compiled"] is None
        if r["impl"] == EAGER:
            assert r["speedup_vs_eager"] == pytest.approx(1.0)


def test_failing_implementation_is_recorded_not_raised():
    records = runner.run_kernels(TINY[3:], "cpu", quick=True, copy_gbps=10.0, impls=["no_such_backend"],
                                 log=lambda _: None)
    assert len(records) == 1 and "no_such_backend" in records[0]["error"]


def test_cli_writes_results_report_plots_and_readme(tmp_path, monkeypatch, capsys):
    cli_cases = TINY[::3]
    monkeypatch.setattr(cases, "sweep", lambda device, quick: cli_cases)
    # few samples and a small copy: this checks the plumbing, not the figures
    monkeypatch.setattr(runner, "SAMPLING", {True: (1, 2, 2, 0.0)})
    monkeypatch.setattr(cli, "COPY_BYTES", {"cpu": 16 * 2**20})
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--quick", "--device", "cpu", "--out", str(tmp_path), "--impls", "eager,reference",
                              "--skip-end-to-end"])
    assert cli.run(args) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["kernels"]) == len(cli_cases) * 2 * len(cases.MODES)
    first = results["kernels"][0]
    for key in ("device", "torch", "triton", "python", "date", "shape", "dtype", "median_ms", "p20_ms", "p80_ms"):
        assert key in first
    text = (tmp_path / "report.md").read_text()
    for heading in ("## Summary", "## Latency", "## Memory kept for backward", "% of copy"):
        assert heading in text
    for png in ("speedup.png", "bandwidth.png"):
        assert os.path.getsize(tmp_path / png) > 1000
    capsys.readouterr()
    assert readme.main([str(tmp_path / "results.json")]) == 0
    section = capsys.readouterr().out
    assert section.startswith("## Performance") and "mixed_op_sum K=8" in section


def test_report_lists_failures():
    results = {"env": timing.environment("cpu"), "quick": True, "copy_bytes": 2**20, "copy_gbps": 1.0,
               "cache_bytes": 2**20, "kernels": [{"label": "x", "impl": "cpu", "shape": [1], "error": "boom"}],
               "targets": [], "end_to_end": []}
    assert "boom" in report.markdown_report(results)


TINY_SUPERNET = endtoend.E2EConfig("tiny", (1, 8, 8), 8, 4, 1, 2)


@pytest.mark.parametrize("ops", ["fused", "reference", "eager"])
def test_end_to_end_times_the_searchers_own_step(ops, monkeypatch):
    calls = []
    real_step = endtoend.Searcher.step
    monkeypatch.setattr(endtoend.Searcher, "step", lambda self, *a, **k: calls.append(k) or real_step(self, *a, **k))
    (r,) = endtoend._measure_config(TINY_SUPERNET, [ops], "cpu", quick=True, compiled=False, log=lambda _: None)
    assert r["samples"] >= 2 and r["median_ms"] > 0 and r["saved_mb"] > 0 and r["peak_mb"] is None
    assert len(calls) == 1 + r["samples"] and all(k == {"update_arch": True} for k in calls)
    # the arch half keeps the candidate outputs for the gradient of alpha; the weight half has no use for them
    assert r["saved_mb_arch"] > r["saved_mb_weight"] > 0
    assert r["saved_mb"] == max(r["saved_mb_arch"], r["saved_mb_weight"])


def test_end_to_end_variants_take_turns_each_with_its_own_ops(monkeypatch):
    steps = []
    real_step = endtoend.Searcher.step
    monkeypatch.setattr(endtoend.Searcher, "step", lambda self, *a, **k: steps.append(
        (id(self), qk.ops.eager_reference_active())) or real_step(self, *a, **k))
    fused, eager = endtoend._measure_config(TINY_SUPERNET, ["fused", "eager"], "cpu", quick=True, compiled=False,
                                            log=lambda _: None)
    n = fused["samples"]
    assert eager["samples"] == n >= 2
    first, timed = steps[:2], steps[2:]  # each variant's warm-up step, then one timed step of each in turn
    assert first[0][0] != first[1][0] and [active for _, active in first] == [False, True]
    assert timed == first * n


def test_measure_interleaved_takes_turns_and_isolates_failures():
    order = []

    def boom(_):
        order.append("boom")
        raise RuntimeError("kernel failed")

    runs = {"a": (lambda: None, lambda _: order.append("a")), "b": (lambda: None, lambda _: order.append("b")),
            "boom": (lambda: None, boom)}
    result = timing.measure_interleaved(runs, "cpu", warmup=1, min_samples=3, max_samples=3, budget_s=0.0)
    assert order == ["a", "b", "boom"] + ["a", "b"] * 3
    assert len(result["a"].samples) == 3 and len(result["b"].samples) == 3
    assert isinstance(result["boom"], RuntimeError)
    with pytest.raises(RuntimeError, match="kernel failed"):
        timing.measure(boom, lambda: None, "cpu", warmup=0, min_samples=1, max_samples=1)
