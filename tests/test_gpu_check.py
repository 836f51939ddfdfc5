"""bench/gpu_check.sh, the one script a lent GPU machine runs, checked on CPU with a stand-in Python.

Device time is scarce (one run per session, and a rerun at most), so a mistake in the script's
plumbing -- a misspelt flag, a step out of order, a budget that skips the benchmarks -- must show up
here. The stand-in records every command; for `python -m qdarts.benchmark ...` it parses the
arguments with the real `qdarts bench` parser, so an unknown or malformed flag fails the step.
"""

import os
import stat
import subprocess
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")

STAND_IN = """#!/usr/bin/env bash
printf '%s\\n' "$*" >> "$STAND_IN_LOG"
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
        exec "{python}" -c "import sys
from qdarts.benchmark.$tool import parser
parser().parse_args(sys.argv[1:])" "$@"
    fi
done
if [ "$1" = "-m" ] && [ "$2" = "qdarts.benchmark" ]; then
    shift 2
    exec "{python}" -c 'import argparse, sys
from qdarts.benchmark import cli
parser = argparse.ArgumentParser()
cli.add_arguments(parser)
parser.parse_args(sys.argv[1:])' "$@"
fi
exit 0
"""


def _run(tmp_path, budget_s, steps=None, fix=None, prebuilt=False):
    stand_in = tmp_path / "python"
    stand_in.write_text(STAND_IN.format(python=sys.executable))
    stand_in.chmod(stand_in.stat().st_mode | stat.S_IXUSR)
    out, log = tmp_path / "out", tmp_path / "commands.log"
    env = dict(os.environ, OUT=str(out), PYTHON=str(stand_in), STAND_IN_LOG=str(log),
               GPU_CHECK_BUDGET_S=str(budget_s), CUDA_HOME=str(tmp_path / "no-cuda"), PYTHONPATH=ROOT,
               **({"GPU_CHECK_STEPS": steps} if steps else {}), **({"STAND_IN_FIX": fix} if fix else {}),
               STAND_IN_PREBUILT="1" if prebuilt else "0",
               # no compute-sanitizer (nor nvidia-smi) on this PATH
               PATH=os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if not os.path.isfile(
                   os.path.join(p, "compute-sanitizer"))))
    proc = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    summary = (out / "summary.txt").read_text().splitlines()
    commands = log.read_text().splitlines() if log.exists() else []
    return proc, summary, commands


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
