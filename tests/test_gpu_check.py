"""bench/gpu_check.sh, the one script a lent GPU machine runs, checked on CPU with a stand-in Python; and
the parts of the Python tools it runs (bench/cpp_error_probe.py, bench/cuda_memcheck_run.py) and of
bench/test_bench_ops.py that need no GPU.

Device time is scarce (one run per session, and a rerun at most), so a mistake in the script's
plumbing -- a misspelt flag, a step out of order, a budget that skips the benchmarks -- must show up
here. The stand-in records every command; for `python -m qdarts.benchmark ...` it parses the
arguments with the real `qdarts bench` parser, so an unknown or malformed flag fails the step.
"""

import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")

STAND_IN = """#!/usr/bin/env bash
printf '%s\\n' "$*" >> "$STAND_IN_LOG"
# every call in full too, for _calls: its folder, PYTHONPATH, CC, LDSHARED, TORCH_CUDA_ARCH_LIST, then its
# arguments one by one (the fields end in \\x1f, the arguments start after \\x1e, a call ends in \\x1d)
{{ printf '%s\\x1f' "$PWD" "${{PYTHONPATH:-}}" "${{CC:-}}" "${{LDSHARED:-}}" "${{TORCH_CUDA_ARCH_LIST:-}}"
   printf '\\x1e'; printf '%s\\x1f' "$@"; printf '\\x1d'; }} >> "$STAND_IN_LOG.calls"
# STAND_IN_FAIL=TEXT:STATUS: a command whose arguments hold TEXT exits with STATUS (124: as if timed out)
if [ -n "${{STAND_IN_FAIL:-}}" ] && [[ "$*" == *"${{STAND_IN_FAIL%:*}}"* ]]; then
    exit "${{STAND_IN_FAIL##*:}}"
fi
# a script must be where the repository has it, relative to the folder the command runs in
case "$1" in *.py) [ -f "$1" ] || {{ echo "no $1 in $PWD" >&2; exit 2; }};; esac
# whether a package is installed (a bare import) is answered by the real Python
if [ "$1" = "-c" ] && [[ "$2" =~ ^import\\ [A-Za-z_.]+$ ]]; then
    exec "{python}" -c "$2"
fi
# the README section is made by the real generator
if [ "$1" = "-m" ] && [ "$2" = "qdarts.benchmark.readme" ]; then
    exec "{python}" "$@"
fi
# the probe of C++ errors: STAND_IN_FIX is the fixing environment it reports; a build logs its linker
if [ "$1" = "bench/cpp_error_probe.py" ] && [ -n "${{STAND_IN_FIX:-}}" ]; then
    printf '%s\\n' "$STAND_IN_FIX" > "$2/cpp_error_fix.env"
fi
[ "$1" = "setup.py" ] && printf 'LDSHARED=%s\\n' "${{LDSHARED:-}}" >> "$STAND_IN_LOG"
# the check of a carried ready-built _C: STAND_IN_PREBUILT=1 makes it current
if [ "$1" = "-m" ] && [ "$2" = "qdarts_kernels" ]; then
    shift 2
    "{python}" -c "import argparse, sys
from qdarts_kernels.collect_env import add_arguments
parser = argparse.ArgumentParser()
add_arguments(parser)
assert parser.parse_args(sys.argv[1:]).check_gpu_build" "$@" || exit 2
    [ "${{STAND_IN_PREBUILT:-0}}" = 1 ]
    exit
fi
for tool in profile tune; do
    if [ "$1" = "-m" ] && [ "$2" = "qdarts.benchmark.$tool" ]; then
        shift 2
        exec "{python}" -c "import json, os, sys
from qdarts.benchmark.$tool import parser
args = dict(vars(parser().parse_args(sys.argv[1:])), tool='$tool')
with open(os.environ['STAND_IN_LOG'] + '.parsed', 'a') as f:
    f.write(json.dumps(args, default=str) + '\\n')" "$@"
    fi
done
if [ "$1" = "-m" ] && [ "$2" = "qdarts.benchmark" ]; then
    shift 2
    exec "{python}" -c 'import argparse, json, os, shutil, sys
from qdarts.benchmark import cli
parser = argparse.ArgumentParser()
cli.add_arguments(parser)
args = parser.parse_args(sys.argv[1:])
with open(os.environ["STAND_IN_LOG"] + ".parsed", "a") as f:
    f.write(json.dumps(dict(vars(args), tool="bench"), default=str) + "\\n")
# STAND_IN_RESULTS: a results file the benchmark leaves in its folder
if os.environ.get("STAND_IN_RESULTS"):
    os.makedirs(args.out, exist_ok=True)
    shutil.copy(os.environ["STAND_IN_RESULTS"], os.path.join(args.out, "results.json"))' "$@"
fi
exit 0
"""


def _run(tmp_path, budget_s, steps=None, fix=None, prebuilt=False, env=None, cwd=None, out="out"):
    """Run the script with the stand-in Python; ``env`` adds variables (None: removes one), ``out`` is OUT
    (relative to ``cwd`` if that is given)."""
    stand_in = tmp_path / "python"
    stand_in.write_text(STAND_IN.format(python=sys.executable))
    stand_in.chmod(stand_in.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "commands.log"
    full_env = {name: value for name, value in os.environ.items()  # none of the variables the script reads
                if name not in ("CC", "LDSHARED", "TORCH_CUDA_ARCH_LIST", "GPU_CHECK_STEPS", "STAND_IN_FIX")}
    full_env.update(OUT=str(tmp_path / out) if cwd is None else out, PYTHON=str(stand_in), STAND_IN_LOG=str(log),
                    GPU_CHECK_BUDGET_S=str(budget_s), CUDA_HOME=str(tmp_path / "no-cuda"), PYTHONPATH=ROOT,
                    **({"GPU_CHECK_STEPS": steps} if steps else {}), **({"STAND_IN_FIX": fix} if fix else {}),
                    STAND_IN_PREBUILT="1" if prebuilt else "0",
                    # no compute-sanitizer (nor nvidia-smi) on this PATH
                    PATH=os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if not os.path.isfile(
                        os.path.join(p, "compute-sanitizer"))))
    for name, value in (env or {}).items():
        if value is None:
            full_env.pop(name, None)
        else:
            full_env[name] = value
    proc = subprocess.run(["bash", SCRIPT], env=full_env, cwd=cwd, capture_output=True, text=True, timeout=120)
    summary = ((cwd or tmp_path) / out / "summary.txt").read_text().splitlines()
    commands = log.read_text().splitlines() if log.exists() else []
    return proc, summary, commands


def _calls(tmp_path):
    """The stand-in's calls in full: ({"cwd", "pythonpath", "CC", "LDSHARED", "TORCH_CUDA_ARCH_LIST"}, argv)."""
    path = tmp_path / "commands.log.calls"
    calls = []
    for record in (path.read_text().split("\x1d")[:-1] if path.exists() else []):
        fields, argv = record.split("\x1e")
        calls.append((dict(zip(("cwd", "pythonpath", "CC", "LDSHARED", "TORCH_CUDA_ARCH_LIST"), fields.split("\x1f"))),
                      argv.split("\x1f")[:-1]))
    return calls


def _parsed(tmp_path):
    """The arguments of each `qdarts bench`, tuner and profile command as their own parsers read them."""
    path = tmp_path / "commands.log.parsed"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _status(summary):
    """Each step's status as the summary says it (the words between its name and its seconds)."""
    status = {}
    for line in summary:
        step = re.match(r"(\S+) +(.*?) +\d+s  \S+$", line)
        name, text = step.groups() if step else line.split(None, 1)
        status[name] = text
    return status


def test_steps_run_in_order_with_flags_the_benchmark_cli_accepts(tmp_path):
    proc, summary, commands = _run(tmp_path, budget_s=200)
    steps = [line.split()[0] for line in summary]
    # no rebuild: the probe found nothing to fix
    assert steps == ["build", "backends", "errors", "bench", "tests", "e2e", "tune", "profile", "memcheck",
                     "readme", "total"], summary
    status = {line.split()[0]: line.split()[1] for line in summary}
    assert all(status[s] == "ok" for s in ("build", "backends", "errors", "tests", "bench", "e2e", "profile",
                                           "tune")), summary
    assert "bench/cpp_error_probe.py" in "\n".join(commands) and os.path.isfile(os.path.join(ROOT, "bench",
                                                                                            "cpp_error_probe.py"))
    assert status["memcheck"] == "SKIPPED"
    bench = [c for c in commands if c.startswith("-m qdarts.benchmark ")]
    assert len(bench) == 2
    assert "--skip-end-to-end" in bench[0] and "--device cuda" in bench[0]
    assert "--skip-kernels --append" in bench[1] and bench[0].split("--out")[1] == bench[1].split("--out")[1]
    assert any(c.startswith("setup.py build_ext --inplace") for c in commands)
    # the tests step names test files that exist, and deselects only the CPU backends' cases
    pytest_args = next(c for c in commands if c.startswith("-m pytest ")).split()
    files = [a.split("::")[0] for a in pytest_args if a.startswith("tests/")]
    assert len(files) >= 10 and all(os.path.isfile(os.path.join(ROOT, f)) for f in files), files
    assert "tests/test_backends.py" in files and "tests/test_cudagraph.py" in files
    for test in (a for a in pytest_args if "::" in a):  # a named test exists in its file
        path, name = test.split("::")
        with open(os.path.join(ROOT, path)) as f:
            assert f"def {name}(" in f.read(), test
    # no results.json from the stand-in, so the README section is skipped, and that is said
    assert status["readme"] == "SKIPPED"
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with tarfile.open(tmp_path / "out" / "gpu_check.tar.gz") as archive:  # everything in one file too
        assert {"./summary.txt", "./versions.txt", "./build.log"} <= set(archive.getnames())


def test_a_fix_the_probe_found_rebuilds_the_extension_before_the_tests(tmp_path):
    """The probe's fixing environment (one VAR=value a line, values with spaces) reaches the rebuild."""
    proc, summary, commands = _run(tmp_path, budget_s=200, fix="CC=/usr/bin/gcc\nLDSHARED=/usr/bin/gcc -shared")
    steps = [line.split()[0] for line in summary]
    assert steps[:6] == ["build", "backends", "errors", "rebuild", "bench", "tests"], summary
    assert all(line.split()[1] == "ok" for line in summary[:6]), summary
    builds = [i for i, c in enumerate(commands) if c.startswith("setup.py build_ext")]
    assert len(builds) == 2
    assert commands[builds[0] + 1] == "LDSHARED=" and commands[builds[1] + 1] == "LDSHARED=/usr/bin/gcc -shared"
    # each variable whole (no line end kept from the file), and the rebuild for the same GPU as the build
    builds = [env for env, argv in _calls(tmp_path) if argv[:1] == ["setup.py"]]
    assert [(b["CC"], b["TORCH_CUDA_ARCH_LIST"]) for b in builds] == [("", "9.0"), ("/usr/bin/gcc", "9.0")], builds
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_current_prebuilt_extension_is_not_built_again(tmp_path):
    proc, summary, commands = _run(tmp_path, budget_s=200, prebuilt=True)
    assert summary[0].split()[:4] == ["build", "ok", "(prebuilt", "_C,"], summary
    assert not any(c.startswith("setup.py") for c in commands)
    assert "-m qdarts_kernels --check-gpu-build" in commands
    assert [line.split()[0] for line in summary][1:4] == ["backends", "errors", "bench"], summary
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # not selected, it is not looked at either
    (tmp_path / "second").mkdir()
    proc, summary, commands = _run(tmp_path / "second", budget_s=200, prebuilt=True, steps="tune")
    assert summary[0].startswith("build      SKIPPED (not selected)"), summary
    assert not any("--check-gpu-build" in c for c in commands)


def test_selected_steps_run_alone(tmp_path):
    proc, summary, commands = _run(tmp_path, budget_s=200, steps="tests,tune")
    status = {line.split()[0]: " ".join(line.split()[1:4]) for line in summary}
    assert status["tests"].startswith("ok") and status["tune"].startswith("ok"), summary
    for name in ("build", "backends", "bench", "e2e", "profile"):
        assert status[name] == "SKIPPED (not selected)", summary
    assert not any(c.startswith("setup.py") or c.startswith("-m qdarts.benchmark ") for c in commands)
    assert any(c.startswith("-m pytest tests") for c in commands)
    assert any("qdarts.benchmark.tune" in c for c in commands)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_spent_budget_skips_the_remaining_steps_and_fails(tmp_path):
    proc, summary, commands = _run(tmp_path, budget_s=5)
    assert all("SKIPPED (budget spent)" in line for line in summary[:7]), summary
    assert not any(c.startswith("setup.py") or c.startswith("-m") for c in commands)
    assert proc.returncode != 0


def test_the_script_needs_an_output_folder():
    env = dict(os.environ)
    env.pop("OUT", None)
    proc = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "set OUT" in proc.stderr


def test_every_log_the_summary_names_is_in_the_output_folder(tmp_path):
    """The summary's last column is where to look when a step failed: it must name a file that is there."""
    summary = _run(tmp_path, budget_s=200)[1]
    named = [line.split()[-1] for line in summary if re.search(r" \d+s  \S+$", line)]
    assert len(named) >= 8 and all((tmp_path / "out" / name).is_file() for name in named), summary


def test_the_benchmark_tools_measure_the_gpu_into_the_folders_the_summary_lists(tmp_path):
    """What each tool was asked, read back by its own parser: every one on the GPU, the two `qdarts bench`
    parts quick and into bench/ (the README step reads bench/results.json), the end-to-end part with CUDA
    graphs, the tuner into tune/, the profile with its memory part."""
    _run(tmp_path, budget_s=200)
    parsed = _parsed(tmp_path)
    bench = [p for p in parsed if p["tool"] == "bench"]
    assert [p["tool"] for p in parsed] == ["bench", "bench", "tune", "profile"], parsed
    assert all(p["device"] == "cuda" and p["quick"] and p["out"] == str(tmp_path / "out" / "bench") for p in bench)
    assert bench[0]["skip_end_to_end"] and not bench[0]["skip_kernels"] and not bench[0]["append"]
    assert bench[1]["skip_kernels"] and bench[1]["append"] and bench[1]["cuda_graph_end_to_end"]
    tune, profile = parsed[2], parsed[3]
    assert tune["device"] == "cuda" and tune["out"] == str(tmp_path / "out" / "tune")
    assert profile["device"] == "cuda" and profile["config"] == "cifar" and profile["memory"]


def test_the_tests_step_deselects_slow_and_cpu_cases_and_lists_many_failures(tmp_path):
    """The marker and keyword expressions select as pytest itself selects (a collection of stand-in tests
    with the step's own -m and -k): slow tests and the CPU backends' cases (ids ending in reference-cpu,
    cpu-cpu) out, the GPU backends' cases in; each expression one argument (everything else on the line a
    test path); not stopping at the first failure; spread over processes where pytest-xdist is installed."""
    _run(tmp_path, budget_s=200)
    argv = next(argv for _, argv in _calls(tmp_path) if argv[:2] == ["-m", "pytest"])[2:]
    options = {"-m": None, "-k": None, "-n": None, "-p": None}
    paths = []
    i = 0
    while i < len(argv):
        if argv[i] in options:
            options[argv[i]] = argv[i + 1]
            i += 2
            continue
        paths += [] if argv[i].startswith("-") else [argv[i]]
        i += 1
    assert paths and all(p.startswith("tests/test_") for p in paths), argv

    stand_ins = tmp_path / "stand_ins"
    stand_ins.mkdir()
    (stand_ins / "test_stand_ins.py").write_text(
        "import pytest\n"
        "@pytest.mark.parametrize('backend', ['reference-cpu', 'cpu-cpu', 'cuda-cuda', 'triton-cuda'])\n"
        "def test_op(backend):\n    pass\n"
        "@pytest.mark.gpu\ndef test_no_host_sync_on_cuda_training_step():\n    pass\n"
        "@pytest.mark.slow\n@pytest.mark.gpu\ndef test_cuda_search_end_to_end():\n    pass\n")
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "-o", "markers=gpu\nslow", "-m", options["-m"], "-k", options["-k"], "test_stand_ins.py"],
        cwd=stand_ins, capture_output=True, text=True, timeout=120)
    ids = {line.split("::", 1)[1] for line in collected.stdout.splitlines() if "::" in line}
    assert ids == {"test_op[cuda-cuda]", "test_op[triton-cuda]", "test_no_host_sync_on_cuda_training_step"}, (
        collected.stdout + collected.stderr)
    assert "-x" not in argv and "--exitfirst" not in argv
    assert int(next(a.split("=")[1] for a in argv if a.startswith("--maxfail="))) > 1, argv
    if importlib.util.find_spec("xdist") is not None:
        assert options["-n"] is not None and int(options["-n"]) > 1, argv


def test_a_failed_or_timed_out_step_is_counted_and_the_next_steps_still_run(tmp_path):
    proc, summary, _ = _run(tmp_path, budget_s=200, env={"STAND_IN_FAIL": "qdarts.benchmark.tune:3"})
    status = _status(summary)
    assert status["tune"] == "FAILED (exit 3)" and status["profile"] == "ok", summary
    assert summary[-1].endswith(", 1 step(s) not ok") and proc.returncode != 0
    # a step stopped at its limit (timeout's exit status 124) says so, with the limit it had
    (tmp_path / "second").mkdir()
    proc, summary, _ = _run(tmp_path / "second", budget_s=200, env={"STAND_IN_FAIL": "-m pytest:124"})
    status = _status(summary)
    assert re.fullmatch(r"TIMEOUT \(\d+s\)", status["tests"]) and status["e2e"] == "ok", summary
    assert summary[-1].endswith(", 1 step(s) not ok") and proc.returncode != 0


def test_the_readme_section_is_made_from_the_benchmark_results(tmp_path):
    """With a results.json from the benchmark, the README section is generated into bench/ (and the archive);
    a failure of the generator counts."""
    results = os.path.join(ROOT, "bench", "results", "cpu-2026-11-29.json")
    proc, summary, _ = _run(tmp_path, budget_s=200, env={"STAND_IN_RESULTS": results})
    section = tmp_path / "out" / "bench" / "readme-section.md"
    assert section.read_text().startswith("## Performance\n"), (tmp_path / "out" / "readme.log").read_text()
    assert "readme" not in _status(summary) and proc.returncode == 0, summary
    with tarfile.open(tmp_path / "out" / "gpu_check.tar.gz") as archive:  # the archive is made last
        assert "./bench/readme-section.md" in archive.getnames()
        assert archive.extractfile("./summary.txt").read().decode().splitlines() == summary
    (tmp_path / "second").mkdir()
    proc, summary, _ = _run(tmp_path / "second", budget_s=200,
                            env={"STAND_IN_RESULTS": results, "STAND_IN_FAIL": "qdarts.benchmark.readme:1"})
    assert _status(summary)["readme"].startswith("FAILED"), summary
    assert summary[-1].endswith(", 1 step(s) not ok") and proc.returncode != 0


SANITIZER = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$STAND_IN_LOG.sanitizer"
# its options, each with a value, then the program; STAND_IN_MEMORY_ERRORS=1: it finds errors in the program,
# and exits with --error-exitcode where given (else with the program's status, as compute-sanitizer does)
status=
while [ "${1#--}" != "$1" ]; do
    [ "$1" = --error-exitcode ] && status=$2
    shift 2
done
"$@"
rc=$?
[ "${STAND_IN_MEMORY_ERRORS:-0}" = 1 ] && [ -n "$status" ] && exit "$status"
exit $rc
"""


def test_memcheck_runs_the_kernels_under_cuda_homes_sanitizer_and_fails_on_its_errors(tmp_path):
    """compute-sanitizer is looked for in $CUDA_HOME/bin too (the GPU image has it there, not on PATH); the
    memcheck program is the repository's; an error the sanitizer finds fails the step, even where the program
    itself exits 0."""
    for run, errors in (("clean", "0"), ("errors", "1")):
        (tmp_path / run / "no-cuda" / "bin").mkdir(parents=True)
        sanitizer = tmp_path / run / "no-cuda" / "bin" / "compute-sanitizer"
        sanitizer.write_text(SANITIZER)
        sanitizer.chmod(0o755)
        summary = _run(tmp_path / run, budget_s=200, env={"STAND_IN_MEMORY_ERRORS": errors})[1]
        status = _status(summary)["memcheck"]
        args = (tmp_path / run / "commands.log.sanitizer").read_text().splitlines()
        assert args[args.index("--tool") + 1] == "memcheck", args
        assert status == ("ok" if errors == "0" else "FAILED (exit 1)"), summary


def test_the_script_runs_from_any_folder_with_a_relative_output_folder(tmp_path):
    """Started from elsewhere, with OUT relative to there and no PYTHONPATH: the outputs land in that OUT, and
    every command runs in the repository's root with the repository on PYTHONPATH (the GPU machine has no
    installed qdarts; `python bench/cpp_error_probe.py` does not put the root on sys.path)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    summary = _run(tmp_path, budget_s=200, env={"PYTHONPATH": None}, cwd=elsewhere, out="out")[1]
    status = _status(summary)
    assert all(status[s] == "ok" for s in ("build", "backends", "errors", "bench", "tests", "e2e", "tune")), summary
    assert (elsewhere / "out" / "gpu_check.tar.gz").is_file()
    calls = _calls(tmp_path)
    assert calls and all(c["cwd"] == ROOT and c["pythonpath"].split(os.pathsep)[0] == ROOT for c, _ in calls), calls


def test_a_second_run_into_the_same_folder_starts_a_new_summary(tmp_path):
    first = _run(tmp_path, budget_s=200)[1]
    second = _run(tmp_path, budget_s=200)[1]
    assert len(second) == len(first) and sum(line.startswith("total ") for line in second) == 1, second


def test_selecting_the_rebuild_does_not_select_the_build(tmp_path):
    """Step names are matched whole: "rebuild" (after a probe that found a fix) is not "build"."""
    _, summary, commands = _run(tmp_path, budget_s=200, steps="errors,rebuild", fix="LDFLAGS=-Wl,--eh-frame-hdr")
    status = _status(summary)
    assert status["build"] == "SKIPPED (not selected)" and status["rebuild"] == "ok", summary
    assert sum(c.startswith("setup.py build_ext") for c in commands) == 1, commands


CLOCK = """#!/usr/bin/env bash
# {name}: the stand-in clock in $STAND_IN_CLOCK. `date +%s` reads it; each command run under `timeout` takes
# STAND_IN_STEP_S seconds of it, or its limit where that is less, and then exits 124 as timeout does
if [ {name} = date ]; then
    [ "$*" = "+%s" ] && exec cat "$STAND_IN_CLOCK"
    exec {date} "$@"
fi
[ "${{1#--kill-after=}}" != "$1" ] && shift
limit=$1
shift
"$@"
rc=$?
now=$(cat "$STAND_IN_CLOCK")
if [ "$limit" != 0 ] && [ "$STAND_IN_STEP_S" -ge "$limit" ]; then
    echo $((now + limit)) >"$STAND_IN_CLOCK"
    exit 124
fi
echo $((now + STAND_IN_STEP_S)) >"$STAND_IN_CLOCK"
exit $rc
"""


def test_the_budget_is_shared_out_in_order_and_a_step_gets_at_most_what_is_left(tmp_path):
    """On a stand-in clock where every command takes 100 s (cut at its limit): with 540 s, the check of a
    carried _C is cut at its 60 s, the build takes 100 s of the 480 left, the environment report is cut at its
    60 s, the probe and the kernel figures take 100 s each, the tests get the 120 s left of their 300 and
    take 100, the search-step part gets the last 20 s and is cut, and the rest find the budget spent."""
    clock_bin = tmp_path / "clock"
    clock_bin.mkdir()
    for name in ("date", "timeout"):
        (clock_bin / name).write_text(CLOCK.format(name=name, date=shutil.which("date")))
        (clock_bin / name).chmod(0o755)
    (tmp_path / "clock.txt").write_text("1000000\n")
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                           if not os.path.isfile(os.path.join(p, "compute-sanitizer")))
    proc, summary, _ = _run(tmp_path, budget_s=540, env={
        "STAND_IN_CLOCK": str(tmp_path / "clock.txt"), "STAND_IN_STEP_S": "100", "PATH": f"{clock_bin}:{path}"})
    seconds = {line.split()[0]: line.split()[-2] for line in summary if re.search(r" \d+s  \S+$", line)}
    status = _status(summary)
    assert [(s, status[s], seconds.get(s)) for s in ("build", "backends", "errors", "bench", "tests", "e2e")] == [
        ("build", "ok", "100s"), ("backends", "TIMEOUT (60s)", "60s"), ("errors", "ok", "100s"),
        ("bench", "ok", "100s"), ("tests", "ok", "100s"), ("e2e", "TIMEOUT (20s)", "20s")], summary
    assert status["tune"] == status["profile"] == "SKIPPED (budget spent)", summary
    assert summary[-1] == "total 540s, 4 step(s) not ok" and proc.returncode != 0


# --- the Python tools the script runs: the parts that need no GPU ------------------------------------------


def _load_bench(name):
    """A module of bench/ (not a package), loaded afresh."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _probe_main(tmp_path, monkeypatch, crashes=(), failing_variants=(), ldshared="/usr/bin/gcc -shared"):
    """cpp_error_probe.main without CUDA, its children and builds replaced: a refusal whose code holds a text
    of ``crashes`` crashes, a variant named in ``failing_variants`` crashes, the rest raise. Returns the exit
    status, the codes run and the variants built as (name, quiet)."""
    import torch

    probe = _load_bench("cpp_error_probe")
    children, variants = [], []

    def child(code, import_qdarts):
        children.append(code)
        return "FAILED (exit -11)" if any(text in code for text in crashes) else "ok: RuntimeError: refused"

    def extension_probe(name, cflags, ldflags, env=None, quiet=False):
        variants.append((name, quiet))
        return "FAILED (exit -11)" if name in failing_variants else "ok: RuntimeError: x must have 100 dimensions"

    monkeypatch.setattr(probe, "_run", lambda cmd, timeout=120, **kw: f"$ {cmd}\n")
    monkeypatch.setattr(probe, "_child", child)
    monkeypatch.setattr(probe, "_extension_probe", extension_probe)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("LDSHARED", ldshared)
    return probe, probe.main(str(tmp_path)), children, variants


def test_the_probe_passes_and_asks_for_no_rebuild_where_every_refusal_raises(tmp_path, monkeypatch):
    """Without CUDA only the refusals whose code needs no CUDA device run (the Triton one needs it too);
    every variant is built as its row says; the report is written; no fix file, so no rebuild."""
    probe, status, children, variants = _probe_main(tmp_path, monkeypatch)
    assert status == 0
    assert children == [code for _, code, _ in probe.REFUSALS if "cuda" not in code]
    # the default linker is the system's gcc: no variant with the system's tools
    assert variants == [(name, quiet) for name, _, _, _, quiet, _ in probe.VARIANTS]
    report = (tmp_path / "cpp_error_probe.txt").read_text()
    assert "# 2." in report and "# 3." in report and "cpu op, bad dtype: ok: RuntimeError" in report
    assert not (tmp_path / "cpp_error_fix.env").exists()


def test_a_crash_of_the_extension_that_a_variant_avoids_writes_that_variants_environment(tmp_path, monkeypatch):
    """The H200 case: one of _C's refusals crashes (not the last one run), as does every variant but the one
    linked with --eh-frame-hdr: the probe fails, and cpp_error_fix.env holds that variant's environment."""
    _, status, _, _ = _probe_main(tmp_path, monkeypatch, crashes=("batch_norm_train_forward",),
                                  failing_variants=("as_setup_py", "old_link", "no_backtrace", "no_openmp", "no_flags"))
    assert status == 1
    assert (tmp_path / "cpp_error_fix.env").read_text() == "LDFLAGS=-Wl,--eh-frame-hdr\n"
    assert "cpp_error_fix.env says to rebuild" in (tmp_path / "cpp_error_probe.txt").read_text()


def test_no_fix_is_written_where_the_extension_raises_or_the_fixing_variant_crashed_too(tmp_path, monkeypatch):
    """A rebuild is only asked for where _C crashed and the variant raised: not where _C raised and only a
    variant crashed (the probe still fails: a crash is worth a look), nor where the fixing variant crashed."""
    (tmp_path / "raises").mkdir()
    _, status, _, _ = _probe_main(tmp_path / "raises", monkeypatch, failing_variants=("as_setup_py",))
    assert status == 1 and not (tmp_path / "raises" / "cpp_error_fix.env").exists()
    (tmp_path / "crashes").mkdir()
    _, status, _, _ = _probe_main(tmp_path / "crashes", monkeypatch, crashes=("mixed_fake_quant_forward",),
                                  failing_variants=("eh_frame_hdr",))
    assert status == 1 and not (tmp_path / "crashes" / "cpp_error_fix.env").exists()


def test_the_system_tools_fix_is_one_variable_a_line(tmp_path, monkeypatch):
    """Where the default linker is not the system's gcc, a variant is built with the system's tools; its fix is
    read by gpu_check.sh one VAR=value a line, so each variable has its own line."""
    if not os.path.exists("/usr/bin/gcc"):
        pytest.skip("no /usr/bin/gcc here")
    probe, status, _, variants = _probe_main(
        tmp_path, monkeypatch, crashes=("batch_norm_train_forward",), ldshared="/nonexistent/cc -shared",
        failing_variants=("as_setup_py", "old_link", "no_backtrace", "no_openmp", "no_flags", "eh_frame_hdr"))
    assert variants[-1] == ("system_tools", False) and status == 1
    assert (tmp_path / "cpp_error_fix.env").read_text().splitlines() == [
        f"{key}={value}" for key, value in probe.SYSTEM_TOOLS.items()]


def test_the_probes_variants_differ_from_setup_pys_build_in_what_their_names_say():
    """as_setup_py uses setup.py's flags (each of them in setup.py); no_openmp drops -fopenmp and only that;
    old_link drops -shared-libgcc; eh_frame_hdr links with --eh-frame-hdr and its fix passes that."""
    probe = _load_bench("cpp_error_probe")
    with open(os.path.join(ROOT, "setup.py")) as f:
        setup_py = f.read()
    assert all(f'"{flag}"' in setup_py for flag in probe.SETUP_FLAGS + probe.SETUP_LINK)
    rows = {name: (cflags, ldflags, fix) for name, cflags, ldflags, _, _, fix in probe.VARIANTS}
    assert rows["as_setup_py"][:2] == (probe.SETUP_FLAGS, probe.SETUP_LINK)
    assert rows["no_openmp"][0] == [flag for flag in probe.SETUP_FLAGS if flag != "-fopenmp"]
    assert "-fopenmp" not in rows["no_openmp"][1] and rows["no_openmp"][1]
    assert rows["old_link"][1] == [flag for flag in probe.SETUP_LINK if flag != "-shared-libgcc"]
    assert "-Wl,--eh-frame-hdr" in rows["eh_frame_hdr"][1] and "--eh-frame-hdr" in rows["eh_frame_hdr"][2]


def test_a_probe_child_passes_only_on_a_runtime_error_and_the_first_crash_gets_a_backtrace(monkeypatch):
    """A child passes on a RuntimeError alone (not another exception, not no error); the debugger runs for a
    child killed by a signal, and only the first (a debugger run takes a minute)."""
    probe = _load_bench("cpp_error_probe")
    monkeypatch.setattr(probe, "_debugger", lambda: ["echo", "#0 the crash"])
    no_error = probe._child("pass", False)
    assert no_error.startswith("FAILED (exit 3)") and "#0 the crash" not in no_error
    assert not probe._child("raise ValueError('not a refusal')", False).startswith("ok")
    first, second = (probe._child("import os; os.kill(os.getpid(), 9)", False) for _ in range(2))  # no core file
    assert first.startswith("FAILED (exit -9)") and "#0 the crash" in first, first
    assert second.startswith("FAILED (exit -9)") and "#0 the crash" not in second, second
    assert probe._child("torch.ops.aten.view(torch.zeros(2), [3])", False).startswith("ok: RuntimeError")


def test_the_debugger_is_cuda_gdb_from_cuda_home_where_there_is_no_gdb(tmp_path, monkeypatch):
    probe = _load_bench("cpp_error_probe")
    monkeypatch.setattr(probe.shutil, "which", lambda name: None)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert probe._debugger() is None
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "cuda-gdb").write_text("")
    assert probe._debugger()[:2] == [str(tmp_path / "bin" / "cuda-gdb"), "-batch"]


def test_the_one_op_extension_is_built_with_the_variants_flags_and_environment(tmp_path, monkeypatch):
    """The build and the call of part 3, their subprocesses replaced: setup.py gets the variant's compile and
    link flags, the build the variant's environment on top of this one (PATH kept), the op its own name, and
    only the quiet variant turns c10::Error's backtrace off."""
    import ast
    import tempfile

    probe = _load_bench("cpp_error_probe")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    seen = []

    def run(cmd, cwd=None, env=None, **kw):
        if cmd[1:] == ["setup.py"]:
            with open(os.path.join(cwd, "setup.py")) as f, open(os.path.join(cwd, "probe.cpp")) as g:
                seen.append(("build", f.read(), g.read(), env))
            open(os.path.join(cwd, "variant.cpython-312-x86_64-linux-gnu.so"), "w").close()
            return subprocess.CompletedProcess(cmd, 0, "", "")
        seen.append(("call", cmd[2]))
        return subprocess.CompletedProcess(cmd, 0, "ok: RuntimeError: x must have 100 dimensions\n", "")

    monkeypatch.setattr(probe.subprocess, "run", run)
    for quiet in (False, True):
        seen.clear()
        result = probe._extension_probe("variant", ["-O1"], ["-Wl,-z,now"], {"CC": "/usr/bin/gcc"}, quiet=quiet)
        assert result == "ok: RuntimeError: x must have 100 dimensions"
        (_, setup_py, cpp, env), (_, call) = seen
        extension = next(node for node in ast.walk(ast.parse(setup_py))
                         if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "CppExtension")
        keywords = {k.arg: ast.literal_eval(k.value) for k in extension.keywords}
        assert keywords == {"extra_compile_args": ["-O1"], "extra_link_args": ["-Wl,-z,now"]}
        assert env["CC"] == "/usr/bin/gcc" and env["PATH"] == os.environ["PATH"]
        assert "TORCH_LIBRARY(qdarts_probe_variant," in cpp and "torch.ops.qdarts_probe_variant.fail(" in call
        assert ("torch.ops.qdarts_probe_variant.quiet()" in call) == quiet


def test_memcheck_run_fails_where_there_is_no_cuda_backend():
    """Under compute-sanitizer a run that checked nothing must not pass for a clean one."""
    import torch

    memcheck = _load_bench("cuda_memcheck_run")
    if torch.cuda.is_available() and "cuda" in memcheck.qk.available_backends():
        pytest.skip("the cuda backend runs here")
    assert memcheck.main() != 0


def test_memcheck_run_compares_elementwise_results_tightly_and_sums_with_a_tolerance_growing_with_their_size():
    import torch

    check = _load_bench("cuda_memcheck_run").check
    want = [torch.zeros(4) for _ in range(3)]

    def off(i, by, dtype=torch.float32):
        return [w.to(dtype) + (by if j == i else 0) for j, w in enumerate(want)]

    numel = 10000  # the sums' absolute tolerance: 1e-4 * sqrt(numel) = 1e-2
    check("fp32", off(2, 5e-3), want, torch.float32, 2, numel)  # a sum, within its tolerance
    for i, by in ((0, 1e-3), (1, 1e-3), (2, 5e-2)):  # an output, an input gradient, a sum too far off
        with pytest.raises(AssertionError, match=f"result {i}"):
            check("fp32", off(i, by), want, torch.float32, 2, numel)
    check("bf16", off(0, 1e-2, torch.bfloat16), want, torch.bfloat16, 2, numel)  # bf16's rounding


def _bench_ops(monkeypatch, full=False):
    if full:
        monkeypatch.setenv("QDARTS_BENCH_FULL", "1")
    else:
        monkeypatch.delenv("QDARTS_BENCH_FULL", raising=False)
    return _load_bench("test_bench_ops")


def test_bench_ops_sweeps_the_quick_cases_unless_asked_for_the_full_sweep(monkeypatch):
    """One benchmark per case, implementation and mode, each with its own id that names all three (for -k)."""
    from qdarts.benchmark.cases import MODES, implementations, sweep

    for full in (False, True):
        bench_ops = _bench_ops(monkeypatch, full)
        expected = [(case, impl, mode) for case in sweep(bench_ops.DEVICE, not full)
                    for impl in implementations(case, bench_ops.DEVICE) for mode in MODES]
        assert [tuple(p.values) for p in bench_ops.PARAMS] == expected
        ids = [p.id for p in bench_ops.PARAMS]
        assert len(set(ids)) == len(ids)
        assert all(p.id.endswith(f"-{p.values[1]}-{p.values[2]}") for p in bench_ops.PARAMS)


def test_bench_ops_compiles_a_case_once_for_its_modes_and_resets_dynamo_between_cases(monkeypatch):
    import torch

    bench_ops = _bench_ops(monkeypatch)
    compiled, resets = [], []
    monkeypatch.setattr(bench_ops, "implementation", lambda case, impl: compiled.append(case) or (lambda: case))
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    cache = bench_ops._CompiledCache()
    first, second = bench_ops.sweep("cpu", True)[:2]
    assert [cache.get(case)() for case in (first, first, first, second, second)] == [first] * 3 + [second] * 2
    assert compiled == [first, second] and len(resets) == 2


def test_bench_ops_times_with_warm_up_a_flushed_cache_and_one_group_per_case_and_mode(monkeypatch):
    """test_op itself, with a stand-in for pytest-benchmark's fixture that runs each round as pedantic does."""
    bench_ops = _bench_ops(monkeypatch)

    class Benchmark:
        def __init__(self):
            self.extra_info, self.group, self.rounds = {}, None, 0

        def pedantic(self, target, setup, rounds, warmup_rounds):
            self.warmup_rounds = warmup_rounds
            for _ in range(warmup_rounds + rounds):
                args, kwargs = setup()
                result = target(*args, **kwargs)
                self.rounds += 1
            return result

    case = min((p.values[0] for p in bench_ops.PARAMS), key=lambda c: c.numel)
    groups = {}
    for impl, mode in [(impl, mode) for impl in ("eager", "autograd") for mode in bench_ops.MODES]:
        if (case, impl, mode) not in [tuple(p.values) for p in bench_ops.PARAMS]:
            continue
        benchmark, flushes = Benchmark(), []
        bench_ops.test_op(benchmark, lambda: flushes.append(1), case, impl, mode)
        assert benchmark.warmup_rounds >= 1 and len(flushes) == benchmark.rounds > benchmark.warmup_rounds
        groups.setdefault(benchmark.group, set()).add(mode)
    assert len(groups) == len(bench_ops.MODES) and all(len(modes) == 1 for modes in groups.values()), groups


def test_a_probe_child_or_build_that_hangs_is_reported_and_the_probe_goes_on(tmp_path, monkeypatch):
    """A child that never ends (a deadlock in a broken unwinder, say) is a failure in the report like a crash,
    not an exception that ends the probe before it writes its report."""
    import tempfile

    probe = _load_bench("cpp_error_probe")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def hang(cmd, timeout=None, **kw):
        raise subprocess.TimeoutExpired(cmd, timeout, output=b"started\n", stderr=None)

    monkeypatch.setattr(probe.subprocess, "run", hang)
    result = probe._child("torch.ops.aten.view(torch.zeros(2), [3])", False)
    assert result.startswith("FAILED (no end after 120 s)\nstarted"), result
    assert probe._extension_probe("variant", [], []).startswith("BUILD FAILED (no end after 300 s)")
    # the whole probe with every child hanging: its report is written, and says so
    out = tmp_path / "out"
    assert probe.main(str(out)) != 0
    report = (out / "cpp_error_probe.txt").read_text()
    assert "FAILED (no end after 120 s)" in report and "BUILD FAILED (no end after 300 s)" in report, report
