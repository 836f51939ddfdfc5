"""Smoke tests of the benchmark suite (qdarts.benchmark): runner, figures, report, CLI; seconds on CPU."""

import argparse
import errno
import json
import os
import platform
import subprocess
import sys

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
    records = runner.run_kernels(TINY[:1], "cpu", quick=True, copy_bytes=2**20, impls=[EAGER, "reference"],
                                 log=lambda _: None)
    assert len(records) == 2 * len(cases.MODES)
    for r in records:
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["gbps"] == pytest.approx(r["min_traffic_bytes"] / r["median_ms"] / 1e6)
        assert r["pct_of_copy"] == pytest.approx(100 * r["gbps"] / r["copy_gbps"])
        assert r["speedup_vs_compiled"] is None
        if r["impl"] == EAGER:
            assert r["speedup_vs_eager"] == pytest.approx(1.0)
    for mode in cases.MODES:  # one copy timed beside the implementations of each mode
        assert len({r["copy_gbps"] for r in records if r["mode"] == mode}) == 1


def test_share_of_copy_is_against_the_copy_timed_in_the_same_rotation(monkeypatch):
    """A shared machine's bandwidth drifts: the copy is one more entry of each mode's round-robin,
    within the implementations' time budget, and each share is against the copy timed beside it."""
    seen = []

    def fake_measure(runs, device, *, budget_s, **sampling):
        seen.append((sorted(runs), budget_s))
        copy_s = 1e-3 * len(seen)  # another copy time in each mode: the machine drifting
        return {name: timing.Timing([copy_s if name == runner.COPY_RUN else 2e-3] * 5) for name in runs}

    monkeypatch.setattr(runner, "measure_interleaved", fake_measure)
    records = runner.run_kernels(TINY[:1], "cpu", quick=True, copy_bytes=2**20, impls=[EAGER, "reference"],
                                 log=lambda _: None)
    budget = runner.SAMPLING[True][3]
    assert seen == [(sorted([EAGER, "reference", runner.COPY_RUN]), budget * 2 / 3)] * len(cases.MODES)
    for r in records:
        copy_s = 1e-3 * (cases.MODES.index(r["mode"]) + 1)
        assert r["copy_gbps"] == pytest.approx(2 * 2**20 / copy_s / 1e9)
        assert r["pct_of_copy"] == pytest.approx(100 * (r["min_traffic_bytes"] / 2e-3) / (2 * 2**20 / copy_s))


def test_failing_implementation_is_recorded_not_raised():
    records = runner.run_kernels(TINY[3:], "cpu", quick=True, copy_bytes=2**20, impls=["no_such_backend"],
                                 log=lambda _: None)
    assert len(records) == 1 and "no_such_backend" in records[0]["error"]


def test_an_implementation_that_does_not_apply_to_a_case_is_skipped_not_failed():
    op_sum = [c for c in TINY if c.op == "mixed_op_sum"][:1]
    records = runner.run_kernels(op_sum, "cpu", quick=True, copy_bytes=2**20, impls=[EAGER, cases.AUTOGRAD],
                                 log=lambda _: None)
    assert {r["impl"] for r in records} == {EAGER} and not any("error" in r for r in records)


@pytest.mark.parametrize("argv, message", [
    (["--impls", "eager,foo"], "--impls: foo is not one of"),
    (["--only", "no-such-case"], "--only 'no-such-case' matches no case"),
    (["--out", "{file}"], "is a file, not a folder"),
])
def test_cli_refuses_bad_options_before_measuring(tmp_path, argv, message, monkeypatch, capsys):
    """One line, exit status 2 (as qdarts search and train), before any figure is measured or --out made."""
    (tmp_path / "file").write_text("")
    argv = [a.replace("{file}", str(tmp_path / "file")) for a in argv]
    out = [] if "--out" in argv else ["--out", str(tmp_path / "out")]
    monkeypatch.setattr(cli, "copy_bandwidth_gbps", lambda *a: pytest.fail("measured before refusing"))
    assert cli.main(["--device", "cpu", "--quick", "--skip-end-to-end", *out, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qdarts bench: error: ") and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_an_out_it_cannot_write_before_measuring(tmp_path, monkeypatch, capsys):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(cli.tempfile, "NamedTemporaryFile", read_only)
    monkeypatch.setattr(cli, "copy_bandwidth_gbps", lambda *a: pytest.fail("measured before refusing"))
    assert cli.main(["--device", "cpu", "--quick", "--skip-end-to-end", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"qdarts bench: error: --out {str(tmp_path)!r} cannot be written (Read-only file system)"


def _tiny_cli_run(monkeypatch):
    """A kernel sweep of two tiny cases, few samples, a small copy: the plumbing, not the figures."""
    monkeypatch.setattr(cases, "sweep", lambda device, quick: TINY[:2])
    monkeypatch.setattr(runner, "SAMPLING", {True: (1, 2, 2, 0.0)})
    monkeypatch.setattr(cli, "COPY_BYTES", {"cpu": 2**20})


def test_an_interrupted_run_says_so_and_keeps_no_earlier_plots(tmp_path, monkeypatch, capsys):
    """Ctrl-C in the second case: results.json and report.md keep the first case and say that the run did
    not finish (the README section too); the plots of an earlier run in --out are gone, not left beside."""
    _tiny_cli_run(monkeypatch)
    for png in report.PLOT_FILES:
        (tmp_path / png).write_bytes(b"an earlier run's plot")
    real_case = runner.benchmark_case
    done = []

    def interrupted_in_the_second(case, *args, **kwargs):
        if done:
            raise KeyboardInterrupt
        done.append(case)
        return real_case(case, *args, **kwargs)

    monkeypatch.setattr(runner, "benchmark_case", interrupted_in_the_second)
    assert cli.main(["--device", "cpu", "--quick", "--skip-end-to-end", "--impls", "eager", "--out",
                     str(tmp_path)]) == 130
    assert "qdarts bench: interrupted" in capsys.readouterr().err
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "interrupted" and {r["label"] for r in results["kernels"]} == {TINY[0].label}
    assert "This run did not finish (it was interrupted)" in (tmp_path / "report.md").read_text()
    assert not any((tmp_path / png).exists() for png in report.PLOT_FILES)
    assert readme.main([str(tmp_path / "results.json")]) == 0
    assert "This run did not finish" in capsys.readouterr().out
    # a run stopped without a word (a time limit's kill) leaves "running", which reads the same way
    results["status"] = "running"
    assert "did not finish (it was stopped" in report.markdown_report(results)
    # the end-to-end part appended to the interrupted kernel part (as gpu_check.sh runs them) finishes, but
    # the kept kernel figures still say that their run did not
    monkeypatch.setattr(runner, "benchmark_case", real_case)
    monkeypatch.setattr(endtoend, "plan", lambda device, quick: [(TINY_SUPERNET, ("fused",))])
    assert cli.main(["--device", "cpu", "--quick", "--skip-kernels", "--append", "--out", str(tmp_path)]) == 0
    appended = json.loads((tmp_path / "results.json").read_text())
    assert appended["status"] == "complete" and appended["kept_runs"]["kernels"]["status"] == "interrupted"
    text = (tmp_path / "report.md").read_text()
    assert "This run did not finish" not in text
    assert "The kernel figures, kept from an earlier run by --append, are from a run that did not finish (it was " \
           "interrupted)" in text


def test_a_run_killed_in_its_first_case_leaves_no_earlier_complete_status(tmp_path, monkeypatch):
    """Before the first case is measured, results.json already says "running" (an earlier run's "complete"
    must not stand beside the removal of its plots, should this run be killed in its first case)."""
    _tiny_cli_run(monkeypatch)
    (tmp_path / "results.json").write_text(json.dumps({"env": {}, "status": "complete", "kernels": []}))
    seen = []

    def killed(case, *args, **kwargs):
        seen.append(json.loads((tmp_path / "results.json").read_text())["status"])
        raise SystemExit(137)  # as a kill leaves it: nothing after this runs in a real kill

    monkeypatch.setattr(runner, "benchmark_case", killed)
    with pytest.raises(SystemExit):
        cli.main(["--device", "cpu", "--quick", "--skip-end-to-end", "--impls", "eager", "--out", str(tmp_path)])
    assert seen == ["running"]


def test_append_refuses_other_versions_before_measuring(tmp_path, monkeypatch, capsys):
    results = {"env": {**timing.environment("cpu"), "torch": "1.0.0+other"}, "kernels": [], "end_to_end": []}
    (tmp_path / "results.json").write_text(json.dumps(results))
    monkeypatch.setattr(cli, "copy_bandwidth_gbps", lambda *a: pytest.fail("measured before refusing"))
    assert cli.main(["--device", "cpu", "--quick", "--skip-kernels", "--append", "--out", str(tmp_path)]) == 2
    assert "measured with torch '1.0.0+other'" in capsys.readouterr().err


def test_a_file_system_error_mid_run_is_one_line(tmp_path, monkeypatch, capsys):
    _tiny_cli_run(monkeypatch)

    def disk_full(path, payload):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report, "write_json", disk_full)
    assert cli.main(["--device", "cpu", "--quick", "--skip-end-to-end", "--impls", "eager", "--out",
                     str(tmp_path)]) == 1
    assert capsys.readouterr().err == "qdarts bench: error: [Errno 28] No space left on device\n"


def test_cli_writes_results_report_plots_and_readme(tmp_path, monkeypatch, capsys):
    cli_cases = TINY[::3] + [OpCase("batch_norm", "-", (2, 4, 8, 8))]
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
    umask = os.umask(0)
    os.umask(umask)
    for name in ("results.json", "report.md"):  # written atomically, readable as open() would leave them
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    first = results["kernels"][0]
    for key in ("device", "torch", "triton", "python", "date", "shape", "dtype", "median_ms", "p20_ms", "p80_ms"):
        assert key in first
    text = (tmp_path / "report.md").read_text()
    for heading in ("## Summary", "## Latency", "## Memory kept for backward", "% of copy", "copy GB/s beside"):
        assert heading in text
    assert results["status"] == "complete" and "did not finish" not in text
    for png in ("speedup.png", "bandwidth.png"):
        assert os.path.getsize(tmp_path / png) > 1000
    capsys.readouterr()
    assert readme.main([str(tmp_path / "results.json")]) == 0
    section = capsys.readouterr().out
    assert section.startswith("## Performance") and "mixed_op_sum K=8" in section
    assert "batch_norm training" in text
    assert results["host_allocator_settled"] and "settle_host_allocator" in text


def test_readme_section_has_one_part_per_results_file_under_its_own_heading(capsys):
    """The section goes under the README's "## Performance": one "###" part per results file given (the CPU
    and the GPU figures side by side), and the report's own "##" headings (the end-to-end step) one level
    below their part, so that nothing of the section starts a new "##" chapter of the README."""
    results = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "results")
    files = [os.path.join(results, name) for name in ("cpu-2026-11-29.json", "h100-2026-11-27.json")]
    assert readme.main(files) == 0
    headings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("#")]
    assert [h for h in headings if h.startswith("### ")] == [
        f"### {report.read_json(f)['env']['device']} (`{f}`)" for f in files]
    assert [h for h in headings if not h.startswith("###")] == ["## Performance"], headings
    assert sum(h.startswith("#### End to end") for h in headings) == 2, headings


def test_batch_norm_case_implementations_agree_with_pytorchs():
    case = OpCase("batch_norm", "-", (3, 4, 5, 5))
    assert case.id == "batch_norm-3x4x5x5-fp32" and case.min_traffic_bytes("forward+backward") == 20 * case.numel
    gpu_impls = cases.implementations(case, "cuda")
    assert gpu_impls[:2] == [EAGER, cases.COMPILED] and set(gpu_impls[2:]) <= {"triton"}
    leaves = case.make_inputs("cpu")
    want = case.function(EAGER)(*leaves)
    for impl in ["reference"] + (["triton"] if "triton" in qk.available_backends() else []):
        torch.testing.assert_close(case.function(impl)(*leaves), want, rtol=1e-5, atol=1e-5)


def test_cli_append_runs_the_end_to_end_part_into_the_kernel_part_s_results(tmp_path, monkeypatch):
    monkeypatch.setattr(cases, "sweep", lambda device, quick: TINY[3:])
    monkeypatch.setattr(runner, "SAMPLING", {True: (1, 2, 2, 0.0)})
    monkeypatch.setattr(cli, "COPY_BYTES", {"cpu": 16 * 2**20})
    monkeypatch.setattr(endtoend, "plan", lambda device, quick: [(TINY_SUPERNET, ("fused",))])
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    base = ["--quick", "--device", "cpu", "--out", str(tmp_path), "--impls", "eager"]
    assert cli.run(parser.parse_args(base + ["--skip-end-to-end"])) == 0
    first = json.loads((tmp_path / "results.json").read_text())
    for r in first["kernels"]:  # as if measured earlier (one run's figures all carry its date), by a full sweep
        r["date"] = "2000-01-01T00:00:00Z"
    first["env"].update(date="2000-01-01T00:00:00Z", loadavg_1m_start=0.25)
    first.update(quick=False, loadavg_1m_end=0.5)
    (tmp_path / "results.json").write_text(json.dumps(first))
    kernels = first["kernels"]
    real_run, plots_meanwhile = endtoend.run, []

    def end_to_end(*args, **kwargs):  # the kernel part's plots stay while the end-to-end part runs
        plots_meanwhile.extend(png for png in report.PLOT_FILES if (tmp_path / png).exists())
        return real_run(*args, **kwargs)

    monkeypatch.setattr(endtoend, "run", end_to_end)
    assert cli.run(parser.parse_args(base + ["--skip-kernels", "--append"])) == 0
    assert plots_meanwhile == list(report.PLOT_FILES)
    text = (tmp_path / "report.md").read_text()
    # the kept part is described by its own run's conditions, the rest by this run's
    assert "kernel figures from 2000-01-01T00:00:00Z (full sweep, 1-minute load 0.25 to 0.5)" in text
    assert "sweep: quick" in text
    both = json.loads((tmp_path / "results.json").read_text())
    assert both["kernels"] == kernels and [e["config"] for e in both["end_to_end"]] == ["tiny"]
    assert both["copy_gbps"] == first["copy_gbps"]  # the kernels' shares of copy bandwidth stay consistent
    assert both["host_allocator_settled"]
    text = (tmp_path / "report.md").read_text()
    assert "## Latency" in text and "tiny" in text
    # without --append the skipped part is not carried over
    assert cli.run(parser.parse_args(base + ["--skip-kernels"])) == 0
    assert json.loads((tmp_path / "results.json").read_text())["kernels"] == []
    # results of another device are refused
    # kernel figures of a run that did not settle the allocator are not reported as settled
    del both["host_allocator_settled"]
    (tmp_path / "results.json").write_text(json.dumps(both))
    assert cli.run(parser.parse_args(base + ["--skip-kernels", "--append"])) == 0
    assert not json.loads((tmp_path / "results.json").read_text())["host_allocator_settled"]
    assert "settle_host_allocator" not in (tmp_path / "report.md").read_text()
    both["env"]["device"] = "some GPU"
    (tmp_path / "results.json").write_text(json.dumps(both))
    with pytest.raises(ValueError, match="some GPU"):
        cli.run(parser.parse_args(base + ["--skip-kernels", "--append"]))
    # and so are those of other versions: the report states one set of versions for all its figures
    both["env"].update(device=first["env"]["device"], torch="1.0.0+other")
    (tmp_path / "results.json").write_text(json.dumps(both))
    with pytest.raises(ValueError, match="measured with torch '1.0.0\\+other', this run has"):
        cli.run(parser.parse_args(base + ["--skip-kernels", "--append"]))


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
    (r,) = endtoend._measure_config(TINY_SUPERNET, [ops], "cpu", quick=True, mode="eager", log=lambda _: None)
    assert r["samples"] >= 5 and r["median_ms"] > 0 and r["saved_mb"] > 0  # a median of 5 steps at least on CPU
    # the CPU peak (profiler allocation events, the C++ kernels' output cache included) holds at least
    # what the larger half keeps for backward
    assert r["peak_mb"] >= r["saved_mb"] * 0.99
    assert r["ops_per_step"] > 0 and "launches_per_step" not in r and "counts_error" not in r
    # the warm-up step, the profiled step (peak), the step whose ops are counted, then the timed ones
    assert len(calls) == 3 + r["samples"] and all(k == {"update_arch": True} for k in calls)
    # each half keeps something for its backward (the arch half the candidate outputs for the gradient of
    # alpha, but nothing for weight gradients); the step's figure is the larger
    assert r["saved_mb_arch"] > 0 and r["saved_mb_weight"] > 0
    assert r["saved_mb"] == max(r["saved_mb_arch"], r["saved_mb_weight"])


def test_end_to_end_keeps_the_timing_when_the_cpu_peak_cannot_be_measured(monkeypatch):
    def refuse(step):
        raise RuntimeError("profiler already running")

    monkeypatch.setattr(endtoend, "step_allocation_peak_bytes", refuse)
    (r,) = endtoend._measure_config(TINY_SUPERNET, ["fused"], "cpu", quick=True, mode="eager", log=lambda _: None)
    assert r["median_ms"] > 0 and r["peak_mb"] is None and "profiler already running" in r["peak_error"]


def test_end_to_end_variants_take_turns_each_with_its_own_ops(monkeypatch):
    steps = []
    real_step = endtoend.Searcher.step
    monkeypatch.setattr(endtoend.Searcher, "step", lambda self, *a, **k: steps.append(
        (id(self), qk.ops.eager_reference_active())) or real_step(self, *a, **k))
    fused, eager = endtoend._measure_config(TINY_SUPERNET, ["fused", "eager"], "cpu", quick=True, mode="eager",
                                            log=lambda _: None)
    n = fused["samples"]
    assert eager["samples"] == n >= 5
    # each variant's warm-up, profiled (peak memory) and counted steps, then one timed step of each in turn
    prepared, timed = steps[:6], steps[6:]
    assert prepared[0] == prepared[1] == prepared[2] and prepared[3] == prepared[4] == prepared[5]
    first = [prepared[0], prepared[3]]
    assert first[0][0] != first[1][0] and [active for _, active in first] == [False, True]
    assert timed == first * n


def test_end_to_end_plan_covers_the_search_step_matrix():
    """CPU: fused against eager (digits only with --quick); CUDA: the fused and eager ops (all three
    kinds without --quick) on CIFAR, issue 9's CIFAR-size matrix (batch 64 and 256, bits 2,4,8 and
    2,4) with the fused ops, then digits."""
    assert [(c.name, k) for c, k in endtoend.plan("cpu", quick=True)] == [("digits", ("fused", "eager"))]
    assert [c.name for c, _ in endtoend.plan("cpu", quick=False)] == ["digits", "cifar"]
    full = endtoend.plan("cuda", quick=False)
    assert [(c.name, k) for c, k in full[:1] + full[-1:]] == [("cifar", endtoend.OPS_KINDS),
                                                              ("digits", endtoend.OPS_KINDS)]
    gpu = endtoend.plan("cuda", quick=True)
    assert [(c.name, k) for c, k in gpu[:1] + gpu[-1:]] == [("cifar", ("fused", "eager")),
                                                            ("digits", ("fused", "eager"))]
    cifar = [(c.batch, c.bits) for c, kinds in gpu if c.input_shape == (3, 32, 32) and "fused" in kinds]
    assert sorted(cifar) == sorted((b, bits) for b in (64, 256) for bits in ((2, 4, 8), (2, 4)))
    assert all(c.layers == 8 and c.channels == 16 and c.partial_channels == 4 for c, _ in gpu[:-1])
    assert endtoend.CIFAR.description.endswith("bits 2,4,8")


def test_graphed_steps_time_the_fused_ops_and_with_quick_replace_the_eager_matrix(capsys):
    modes = endtoend.step_modes
    assert modes(endtoend.CIFAR, ("fused", "eager"), "cuda", True, False, False) == [("eager", ("fused", "eager"))]
    assert modes(endtoend.CIFAR, ("fused", "eager"), "cuda", True, True, True) == [
        ("eager", ("fused", "eager")), ("compiled", ("fused", "eager")), ("graphed", ("fused",))]
    b256 = endtoend.SEARCH_STEP_MATRIX[1]
    assert modes(b256, ("fused",), "cuda", True, False, True) == [("graphed", ("fused",))]
    assert modes(b256, ("fused",), "cuda", False, False, True) == [("eager", ("fused",)), ("graphed", ("fused",))]
    assert modes(endtoend.digits_config(), ("fused", "eager"), "cuda", True, False, True)[0][0] == "eager"
    with pytest.raises(ValueError, match="CUDA"):
        modes(endtoend.CIFAR, ("fused",), "cpu", True, False, True)
    assert cli.main(["--device", "cpu", "--cuda-graph-end-to-end", "--out", "unused"]) == 2
    assert "qdarts bench: error: --cuda-graph-end-to-end needs --device cuda" in capsys.readouterr().err


def test_skipping_both_parts_without_append_is_refused(tmp_path, capsys):
    """Both parts skipped measure nothing: an empty report is refused before --out is made (with --append
    the run writes the report of the figures kept in --out again)."""
    out = tmp_path / "out"
    assert cli.main(["--device", "cpu", "--skip-kernels", "--skip-end-to-end", "--out", str(out)]) == 2
    assert "qdarts bench: error: --skip-kernels with --skip-end-to-end leaves nothing" in capsys.readouterr().err
    assert not out.exists()


def test_end_to_end_saves_after_each_configuration_and_reports_steps_per_second(monkeypatch):
    tiny_bits24 = endtoend.replace(TINY_SUPERNET, name="tiny-bits24", bits=(2, 4))
    monkeypatch.setattr(endtoend, "plan",
                        lambda device, quick: [(TINY_SUPERNET, ("fused",)), (tiny_bits24, ("fused",))])
    saved = []
    records, note = endtoend.run("cpu", quick=True, log=lambda _: None, on_config_done=lambda r: saved.append(list(r)))
    assert [len(r) for r in saved] == [1, 2] and saved[-1] == records
    assert [r["bits"] for r in records] == [[2, 4, 8], [2, 4]]
    for r in records:
        assert r["steps_per_s"] == pytest.approx(1e3 / r["median_ms"]) and r["compile_mode"] is None
    results = {"end_to_end": records, "end_to_end_note": note}
    text = "\n".join(report.end_to_end_lines(results))
    assert "steps/s" in text and "bits 2,4," in text and "tiny-bits24" in text


def test_compiled_end_to_end_falls_back_to_plain_inductor_when_graph_capture_fails(monkeypatch):
    tried = []

    def prepare(cfg, ops, device, compile_mode, backend=None, cuda_graph=False):
        tried.append(compile_mode)
        if compile_mode == "reduce-overhead":
            raise RuntimeError("capture failed")
        return {"config": cfg.name, "description": cfg.description, "ops": ops, "mode": "compiled",
                "compile_mode": compile_mode, "peak_mb": None, "saved_mb": 1.0}, lambda _: None

    monkeypatch.setattr(endtoend, "_prepare_variant", prepare)
    monkeypatch.setattr(endtoend, "compile_mode_for", lambda device: "reduce-overhead")
    (r,) = endtoend._measure_config(TINY_SUPERNET, ["fused"], "cpu", quick=True, mode="compiled", log=lambda _: None)
    assert tried == ["reduce-overhead", "default"]
    assert r["compile_mode"] == "default" and "capture failed" in r["fallback_from"] and r["median_ms"] > 0


def test_fused_end_to_end_on_a_gpu_falls_back_to_the_other_gpu_backend(monkeypatch):
    """A fused step whose automatic backend fails on the GPU is timed on the other GPU backend, and the
    failure is recorded with the figure; the eager reference is tried once."""
    tried = []

    def prepare(cfg, ops, device, compile_mode, backend=None, cuda_graph=False):
        tried.append((ops, backend))
        if ops == "fused" and backend in (None, "cuda"):
            raise RuntimeError("kernel failed")
        return {"config": cfg.name, "description": cfg.description, "ops": ops, "mode": "eager", "backend": backend,
                "compile_mode": None, "peak_mb": 1.0, "saved_mb": 1.0}, lambda _: None

    monkeypatch.setattr(endtoend, "_prepare_variant", prepare)
    monkeypatch.setattr(endtoend.qk, "available_backends", lambda: ["reference", "cuda", "triton"])
    monkeypatch.setattr(endtoend, "measure_interleaved",
                        lambda runs, device, **kw: {name: timing.Timing([0.1, 0.2, 0.3]) for name in runs})
    fused, eager = endtoend._measure_config(TINY_SUPERNET, ["fused", "eager"], "cuda", quick=True, mode="eager",
                                            log=lambda _: None)
    assert tried == [("fused", None), ("fused", "triton"), ("eager", None)]
    assert fused["backend"] == "triton" and "kernel failed" in fused["fallback_from"] and fused["median_ms"] == 200
    assert "fallback_from" not in eager


def test_search_step_targets_take_the_faster_mode_and_check_peak_memory_at_batch_256():
    def rec(batch, mode, ms, peak, bits=(2, 4, 8)):
        cfg = endtoend.replace(endtoend.CIFAR, batch=batch, bits=bits)
        return {"config": cfg.name, "description": cfg.description, "ops": "fused", "mode": mode, "batch": batch,
                "bits": list(bits), "input_shape": [3, 32, 32], "layers": 8, "median_ms": ms, "p20_ms": ms,
                "p80_ms": ms, "peak_mb": peak, "saved_mb": 1.0, "saved_mb_arch": 1.0, "saved_mb_weight": 0.5}

    records = [rec(64, "eager", 400.0, 900.0), rec(64, "compiled", 120.0, 800.0),
               rec(256, "eager", 900.0, 4000.0), rec(256, "compiled", 300.0, 12000.0),
               rec(256, "compiled", 10.0, 100.0, bits=(2, 4))]  # another bit set: not the target's
    assert endtoend.check_step_targets(records, "cpu") == []
    t64, t256 = endtoend.check_step_targets(records, "cuda")
    assert (t64["mode"], t64["step_s"], t64["met"]) == ("compiled", 0.12, True)
    assert (t256["mode"], t256["step_s"], t256["peak_mb"], t256["met"]) == ("compiled", 0.3, 12000.0, False)
    text = "\n".join(report.end_to_end_lines({"end_to_end": records, "step_targets": [t64, t256]}))
    assert "issue 9" in text and "NOT met" in text


def test_dispatched_ops_count_work_not_views_and_launch_counts_read_profiler_events():
    x = torch.randn(4, 4, requires_grad=True)

    def run():
        y = (x.t().reshape(16) * 2).sum()  # views (t, reshape of a copy...), one mul, one sum, then backward
        y.backward()

    n = timing.dispatched_ops(run)
    with torch.no_grad():
        assert timing.dispatched_ops(lambda: x.view(16).detach()) == 0
    assert 2 <= n <= 8  # forward mul and sum (plus the reshape's copy), their backward ops; no views

    class Event:
        def __init__(self, name, device_type=torch.autograd.DeviceType.CPU):
            self.name, self.device_type = name, device_type

    gpu = torch.autograd.DeviceType.CUDA
    events = [Event("cudaLaunchKernel"), Event("cuLaunchKernel"), Event("cudaGraphLaunch"), Event("aten::add"),
              Event("void kernel<float>", gpu), Event("triton_poi_fused", gpu), Event("memcpy", gpu)]
    assert timing.count_launches(events) == {"launches": 3, "kernels": 3}


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


def test_profile_reports_one_step_sorted_by_host_time(capsys):
    from qdarts.benchmark import profile

    tiny = endtoend.E2EConfig("tiny", (1, 8, 8), batch=8, channels=4, layers=1, partial_channels=2, bits=(2, 4))
    text = profile.profile_step(tiny, "cpu", rows=1000)  # every op: which ones lead depends on the machine
    assert "config: tiny" in text and "step wall time under the profiler" in text
    assert "## by self host time" in text and "## by self device time" not in text  # no device on CPU
    # a search step runs convolutions and the quantizers' op
    assert "convolution" in text and "mixed_fake_quant" in text
    # the command line knows the end-to-end benchmark's configurations
    assert set(profile.configs()) >= {"digits", "cifar", "cifar-b256"}
    with pytest.raises(SystemExit):
        profile.parser().parse_args(["--config", "no-such-config"])


def test_hidden_launches_time_the_device_not_the_host():
    """hide_launch: on a GPU the events time the kernels, and the host's time to issue them is
    recorded beside; a run that sleeps 1 ms on the host before one tiny kernel takes about 1 ms of
    host time and far less device time. On CPU there is nothing to hide: wall time, no host samples."""
    import time

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.zeros(1024, device=device)

    def run(_):
        time.sleep(1e-3)
        return x.add_(1.0)

    measured = timing.measure_interleaved({"run": (lambda: None, run)}, device, warmup=1, min_samples=5,
                                           max_samples=5, hide_launch=True)["run"]
    if device == "cpu":
        assert measured.host_samples == [] and measured.host_median is None and measured.median >= 1e-3
    else:
        assert len(measured.host_samples) == 5 and measured.host_median >= 1e-3
        assert measured.median < 0.5e-3, measured.samples
        assert timing.busy_wait_seconds() > 1e-3  # longer than the 1 ms sleep it hid
    # the report marks the runs whose host took longer than the wait hid
    assert report._host_cell({"host_ms": 5.0, "launch_wait_ms": 4.0}) == "5 *"
    assert report._host_cell({"host_ms": 0.4, "launch_wait_ms": 4.0}) == "0.4"
    assert report._host_cell({}) == "-"


def test_memory_at_peak_sums_what_is_alive_at_the_largest_total_by_site():
    from qdarts.benchmark import profile

    def frame(file, line):
        return [{"filename": "/x/torch/nn/functional.py", "line": 1, "name": "conv2d"},
                {"filename": f"/repo/qdarts/{file}", "line": line, "name": "forward"}]

    events = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": frame("ops.py", 10)},
        {"action": "alloc", "addr": 2, "size": 50, "frames": frame("supernet.py", 20)},
        {"action": "free_requested", "addr": 1, "size": 100},  # not yet free: the stream may still use it
        {"action": "alloc", "addr": 3, "size": 30, "frames": frame("ops.py", 10)},
        {"action": "free_completed", "addr": 1, "size": 100},
        {"action": "alloc", "addr": 4, "size": 60, "frames": []},
        {"action": "free_completed", "addr": 99, "size": 7},  # allocated before the trace began
    ]
    peak, by_site = profile.memory_at_peak(events)
    assert peak == 180  # 100 + 50 + 30, before addr 1 is freed
    assert by_site == {"qdarts/ops.py:10 forward": 130, "qdarts/supernet.py:20 forward": 50}


def test_cpu_memory_report_finds_what_a_step_keeps():
    """On CPU the peak comes from the profiler's allocation events, by autograd function: a search
    step's peak holds at least what the larger half of the step keeps for backward, its largest site
    under the batch norms (their outputs); no conv output is alive at the peak (each one is a batch norm's
    input, and a depthwise conv's is recomputed by the backward of its chained pointwise conv)."""
    from qdarts.benchmark import profile

    report = profile.memory_report(TINY_SUPERNET, "cpu")
    peak_mb = float(report.split("alive at its peak: ")[1].split(" MB")[0])
    kept = endtoend.SearchStep(TINY_SUPERNET, "cpu", None).saved_bytes()
    assert peak_mb >= max(kept.values()) / 2**20 * 0.95, report
    sites = report.split("by site:")[1]
    largest = sites.strip().splitlines()[0]
    assert "_BatchNormKeepingOutput > " in largest and "Conv2d > aten::empty" not in sites, report



_FAULTS_PER_ROUND = """
import resource, torch
from qdarts.benchmark.timing import settle_host_allocator

settle_host_allocator()
faults = []
for _ in range(12):  # as eager code does: six 4 MiB temporaries alive at once, every page touched, then freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    temporaries = [torch.ones(2**20) for _ in range(6)]
    del temporaries
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
"""


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc malloc only")
def test_settled_host_allocator_serves_eager_temporaries_without_page_faults():
    # A fresh process (this one's allocator has been settled by earlier tests). Unsettled, a fresh
    # process faults in all ~6100 pages every round (the heap trimmed after each), or in some runs in
    # the first three rounds only; settled, once (the heap growing), and now and then one tensor's
    # 1024 pages later on.
    out = subprocess.run([sys.executable, "-c", _FAULTS_PER_ROUND], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    faults = [int(f) for f in out.stdout.split()]
    assert faults[0] >= 6 * 2**20 // 4096 * 0.9, f"the first round grows the heap: {faults}"
    assert sum(faults[1:]) <= 2 * 1024, f"page faults per round after settle_host_allocator(): {faults}"


@pytest.mark.skipif("triton" not in qk.available_backends() or torch.cuda.is_available(),
                    reason="the Triton interpreter's smoke run (on a GPU, bench/gpu_check.sh runs the tuner)")
def test_tile_tuner_times_every_candidate_of_every_kernel(tmp_path, capsys):
    from qdarts.benchmark import tune
    from qdarts_kernels.triton._common import TUNABLE_KERNELS

    assert tune.main(["--device", "cpu", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "tune.json").read_text())
    records = results["records"]
    assert {r["kernel"] for r in records} == set(TUNABLE_KERNELS)
    assert all("median_ms" in r for r in records), [r for r in records if "error" in r]
    for kernel in TUNABLE_KERNELS:
        tiles = [(r["elements"], r["num_warps"]) for r in records if r["kernel"] == kernel]
        assert set(tiles) == {tuple(t) for t in tune.CANDIDATES}
    # one fastest and one current tile marked per kernel and case
    groups = {(r["kernel"], r["case"]) for r in records}
    rows = [line.rstrip() for line in (tmp_path / "tune.md").read_text().splitlines() if line.startswith("| mixed_")]
    assert len(rows) == len(records)
    assert sum(row.endswith(("| * |", "| * current |")) for row in rows) == len(groups)
    assert sum(row.endswith("current |") for row in rows) == len(groups)


@pytest.mark.parametrize("value, digits, text", [(99.6, 2, "100"), (99.4, 2, "99"), (100.4, 2, "100"),
                                                 (12345.0, 3, "12345"), (0.0123456, 3, "0.0123"),
                                                 (1.5e-5, 2, "1.5e-05"), (None, 3, "-"), (0.0, 3, "0")])
def test_report_figures_are_written_in_full_not_as_powers_of_ten(value, digits, text):
    assert report._num(value, digits) == text


@pytest.mark.parametrize("payload", ['{"env": [1]}', '[1, 2]', '{"kernels": []}', "{", ""])
def test_reading_a_file_that_is_not_a_results_json_fails_clearly(tmp_path, payload):
    """--append and the README generator read an earlier results.json: anything else is one clear line."""
    path = tmp_path / "results.json"
    path.write_text(payload)
    with pytest.raises(SystemExit, match="results.json|cannot read benchmark results"):
        report.read_json(str(path))


# --- figures and their labels, checked exactly (from a mutation run of qdarts.benchmark) ---------------


def test_timing_takes_the_median_and_percentiles_not_the_mean():
    t = timing.Timing([110.0, 0.0, 40.0, 10.0, 30.0, 20.0], host_samples=[4.0, 1.0, 3.0, 2.0])
    assert (t.p20, t.median, t.p80) == (10.0, 25.0, 40.0)  # the mean would be 35
    assert t.host_median == 2.5  # as the device's median, not Tensor.median's lower middle value (2)
    assert timing.Timing([1.0]).host_median is None


def test_each_sample_flushes_the_cache_after_its_setup_and_before_its_run():
    events = []
    timing.measure(lambda s: events.append("run"), lambda: events.append("setup"), "cpu",
                   flush=lambda: events.append("flush"), warmup=1, min_samples=2, max_samples=2, budget_s=0.0)
    assert events == ["setup", "flush", "run"] * 3


def test_copy_bandwidth_counts_the_read_and_the_write(monkeypatch):
    monkeypatch.setattr(timing, "measure", lambda run, setup, device, **kw: timing.Timing([0.5, 0.5, 0.5]))
    assert timing.copy_bandwidth_gbps("cpu", 2**20) == 2 * 2**20 / 0.5 / 1e9


def test_environment_records_the_versions():
    env = timing.environment("cpu")
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    assert (env["torch"], env["cuda"], env["triton"]) == (torch.__version__, torch.version.cuda, triton_version)
    assert env["python"] == platform.python_version() and env["device_type"] == "cpu"


def test_case_labels_ids_and_dtype_names():
    pc = OpCase("mixed_fake_quant", "per_channel", (2, 4, 8, 8), torch.bfloat16)
    assert pc.label == "mixed_fake_quant bits=(2,4,8) per channel" and pc.dtype_name == "bf16"
    assert pc.id == "mixed_fake_quant-per_channel-K3-2x4x8x8-bf16"
    assert OpCase("fake_quant", "per_tensor", (2, 4), torch.float16).label == "fake_quant bits=(4) per tensor"
    assert OpCase("fake_quant", "per_tensor", (2, 4), torch.float16).dtype_name == "fp16"


def test_implementations_include_the_devices_fused_backends():
    fused = cases.backends_for("cpu")
    assert fused == (["cpu"] if "cpu" in qk.available_backends() else [])
    assert cases.implementations(TINY[0], "cpu") == [EAGER, cases.COMPILED, *fused, cases.AUTOGRAD]
    assert cases.implementations(TINY[3], "cpu") == [EAGER, cases.COMPILED, *fused]


def test_a_backward_timing_runs_the_backward_alone():
    calls = []
    case = TINY[0]
    leaves, grad = case.make_inputs("cpu"), case.grad_output("cpu")
    fn = case.function(EAGER)
    modes = runner.mode_functions(lambda *a: calls.append(1) or fn(*a), leaves, grad)
    setup, run = modes["backward"]
    state = setup()
    assert len(calls) == 1
    assert [g.shape for g in run(state)] == [t.shape for t in leaves] and len(calls) == 1  # no forward timed
    setup, run = modes["forward+backward"]
    run(setup())
    assert len(calls) == 2


def test_speedups_are_the_baseline_time_over_this_one():
    records = [{"mode": "forward", "impl": EAGER, "median_ms": 4.0},
               {"mode": "forward", "impl": cases.COMPILED, "median_ms": 2.0},
               {"mode": "forward", "impl": "cpu", "median_ms": 0.5},
               {"mode": "backward", "impl": "cpu", "median_ms": 1.0}, {"impl": "cpu", "error": "boom"}]
    runner._add_speedups(records)
    assert [(r["speedup_vs_eager"], r["speedup_vs_compiled"]) for r in records[:4]] == [
        (1.0, 0.5), (2.0, 1.0), (8.0, 4.0), (None, None)]


def test_records_carry_the_cases_dtype(monkeypatch):
    monkeypatch.setattr(runner, "measure_interleaved",
                        lambda runs, device, **kw: {name: timing.Timing([1e-3] * 3) for name in runs})
    case = OpCase("mixed_op_sum", "-", (2, 4, 8, 8), torch.bfloat16)
    records = runner.run_kernels([case], "cpu", quick=True, copy_bytes=2**20, impls=[EAGER], log=lambda _: None)
    assert [(r["dtype"], r["mode"]) for r in records] == [("bf16", m) for m in cases.MODES]
    assert [r["min_traffic_bytes"] for r in records] == [case.min_traffic_bytes(m) for m in cases.MODES]


def test_cpu_targets_are_the_baselines_time_over_the_cpu_backends():
    def rec(impl, ms, numel=4 * 2**20):
        return {"op": "mixed_fake_quant", "scaling": "per_tensor", "numel": numel, "dtype": "fp32",
                "mode": "forward+backward", "impl": impl, "median_ms": ms, "shape": [64, 64, 32, 32]}

    records = [rec(cases.AUTOGRAD, 36.0), rec("cpu", 3.0), rec(cases.AUTOGRAD, 1.0, 2**20)] + [
        {**rec(impl, ms, 2**20), "op": "mixed_op_sum", "scaling": "-", "dtype": "bf16"}
        for impl, ms in ((EAGER, 9.0), ("cpu", 1.0))]  # bf16: not the fp32 target, stays unmeasured
    mfq, mos = runner.check_targets(records, "cpu")
    assert (mfq["measured"], mfq["met"], mfq["baseline_ms"], mfq["cpu_ms"]) == (12.0, True, 36.0, 3.0)
    assert (mos["measured"], mos["met"]) == (None, None)
    assert runner.check_targets(records, "cuda") == []


def test_summary_takes_the_fastest_fused_backend_and_labels_its_speedups():
    def rec(impl, ms, eager_x, compiled_x):
        return {"label": "mixed_op_sum K=8", "shape": [4, 16, 32, 32], "numel": 2**16, "dtype": "fp32",
                "mode": "forward+backward", "impl": impl, "median_ms": ms, "speedup_vs_eager": eager_x,
                "speedup_vs_compiled": compiled_x, "gbps": 1.0, "pct_of_copy": 10.0, "saved_bytes": 2**20}

    records = [rec(EAGER, 8.0, 1.0, 0.5), rec(cases.COMPILED, 4.0, 2.0, 1.0), rec("triton", 2.0, 4.0, 2.0),
               rec("cuda", 1.0, 8.0, 4.0)]
    (row,) = report.summary_rows(records)
    assert dict(zip(report.SUMMARY_HEADER, row)) == {
        "op": "mixed_op_sum K=8", "shape": "4x16x32x32 (64K)", "dtype": "fp32", "autograd ms": "-",
        "eager ms": "8", "compiled ms": "4", "best fused": "cuda", "fused ms": "1", "x eager": "8.00x",
        "x compiled": "4.00x", "GB/s": "1", "% of copy": "10%",
        "MB kept for backward (autograd / eager / compiled / fused)": "- / 1 / 1 / 1"}


def test_end_to_end_ratios_are_eagers_over_the_fused_steps():
    def rec(ops, ms, saved, peak):
        return {"config": "tiny", "description": "d", "ops": ops, "mode": "eager", "median_ms": ms, "p20_ms": ms,
                "p80_ms": ms, "saved_mb": saved, "saved_mb_arch": saved, "saved_mb_weight": saved, "peak_mb": peak}

    text = "\n".join(report.end_to_end_lines({"end_to_end": [rec("eager", 300.0, 40.0, 80.0),
                                                               rec("fused", 100.0, 10.0, 40.0)]}))
    fused = [line for line in text.splitlines() if line.startswith("| tiny | d | fused |")]
    cells = [c.strip() for c in fused[0].strip("|").split("|")]
    assert cells[5:11] == ["10", "3.00x", "10 (10 / 10)", "4.00x", "40", "2.00x"]


def test_cli_passes_its_options_on(tmp_path, monkeypatch, capsys):
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    assert cli.main(["--device", "cpu", "--threads", "3", "--impls", "nope", "--out", str(tmp_path)]) == 2
    assert threads == [3]
    seen = []

    def end_to_end(device, **kwargs):
        seen.append(kwargs)
        return [], None

    monkeypatch.setattr(endtoend, "run", end_to_end)
    monkeypatch.setattr(cli, "copy_bandwidth_gbps", lambda *a: 1.0)
    assert cli.main(["--device", "cpu", "--quick", "--skip-kernels", "--compile-end-to-end", "--out",
                     str(tmp_path)]) == 0
    assert [(k["quick"], k["compiled"], k["graphed"]) for k in seen] == [(True, True, False)]


def test_cli_exit_status_is_1_when_a_measurement_failed(tmp_path, monkeypatch, capsys):
    _tiny_cli_run(monkeypatch)
    monkeypatch.setattr(cli, "copy_bandwidth_gbps", lambda *a: 1.0)
    monkeypatch.setattr(runner, "benchmark_case", lambda case, device, impls, **kw: [
        {"label": case.label, "impl": "eager", "shape": list(case.shape), "error": "RuntimeError: boom"}])
    assert cli.main(["--device", "cpu", "--quick", "--skip-end-to-end", "--impls", "eager", "--out",
                     str(tmp_path)]) == 1
    assert "2 measurement(s) failed" in capsys.readouterr().out
