"""``python -m qdarts_kernels`` / ``qdarts env``: the report of what the kernels run on here."""

import json
import os
import shutil
import subprocess
import sys

import torch

import qdarts_kernels as qk
from qdarts import cli
from qdarts_kernels import _backends, collect_env


def _module(*args, **env):
    environment = {k: v for k, v in os.environ.items() if not k.startswith("QDARTS_")}
    environment.update(env)
    result = subprocess.run([sys.executable, "-m", "qdarts_kernels", *args], capture_output=True, text=True,
                            env=environment, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_report_agrees_with_the_package():
    report = collect_env.collect()
    json.dumps(report)  # plain values only
    assert report["torch"] == str(torch.__version__) and report["qdarts_kernels"] == qk.__version__
    assert [name for name, reason in report["backends"].items() if reason is None] == qk.available_backends()
    assert report["extension"]["build"] == qk.build_info()
    assert report["automatic_choice"]["cpu"] == _backends.resolve(None, torch.device("cpu"))
    assert len(report["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if report["gpus"]:
        assert report["automatic_choice"]["cuda"] == _backends.resolve(None, torch.device("cuda"))
    text = collect_env.render(report)
    for name in _backends.BACKEND_NAMES:
        assert f"\n  {name:<10} " in text
    assert f"torch {torch.__version__} " in text


def test_json_and_text_from_the_command_line(capsys):
    report = json.loads(_module("--json", QDARTS_BACKEND="reference"))
    assert report["environment"] == {k: v for k, v in report["environment"].items()
                                     if k.startswith("QDARTS_") or k in collect_env.OTHER_VARIABLES}
    assert report["environment"]["QDARTS_BACKEND"] == "reference"
    assert report["automatic_choice"]["cpu"] == "reference"  # the variable overrides the choice, and it shows
    assert cli.main(["env"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"qdarts_kernels {qk.__version__}\n") and "\nbackends:\n" in text


def test_what_cannot_run_says_why():
    text = _module(QDARTS_BACKEND="no-such-backend", QDARTS_CPU_ISA="avx9000", TRITON_INTERPRET="0")
    assert "automatic choice: CPU tensors -> error: QDARTS_BACKEND must be one of" in text
    if qk.build_info() is not None:  # the C++ kernels refuse the variable; the report says so and goes on
        assert "\nC++ CPU kernels: cannot start: QDARTS_CPU_ISA must be " in text
        assert "\n  cpu        not available: its kernels cannot start: QDARTS_CPU_ISA must be " in text
        # chosen all the same (the automatic choice does not start the kernels): the report says it cannot run
        chosen = _module(QDARTS_CPU_ISA="avx9000")
        assert "automatic choice: CPU tensors -> cpu, which cannot run here: its kernels cannot start" in chosen
    if not torch.cuda.is_available():
        assert "\n  cuda       not available: " in text and "\nGPUs: none" in text
        if _backends._load("triton") is not None:
            assert "\n  triton     not available: Triton compiles for GPUs only" in text


def test_a_stale_extension_shows(monkeypatch):
    monkeypatch.setattr(_backends, "compiled_stale_reason", lambda: "it was built against torch 0.0")
    text = collect_env.render(collect_env.collect())
    if qk.build_info() is not None:
        assert "  matches this installation: NO: it was built against torch 0.0" in text


def _gpu_report(**changes):
    """A report of a current CUDA build on one H100-class GPU, with ``changes`` made."""
    report = {
        "extension": {"path": "/x/_C.abi3.so", "load_error": None, "stale": None,
                      "build": {"cuda": "13.0", "cuda_archs": ["8.0", "9.0"], "torch": "2.11.0+cu130",
                                "csrc_digest": "0" * 64, "debug": False}},
        "gpus": [{"index": 0, "name": "H", "compute_capability": "9.0", "memory_gib": 80.0,
                  "extension_machine_code": True}],
    }
    for key, value in changes.items():
        section = "extension" if key in report["extension"] else None
        (report[section] if section else report)[key] = value
    return report


def test_a_gpu_build_is_ready_only_when_loaded_current_and_with_machine_code_for_every_gpu():
    refusal = collect_env.gpu_build_refusal
    assert refusal(_gpu_report()) is None
    assert refusal(_gpu_report(path=None)) == "the extension is not built"
    assert refusal(_gpu_report(load_error="OSError: undefined symbol")).endswith("undefined symbol")
    assert "no build record" in refusal(_gpu_report(build=None))
    assert refusal(_gpu_report(stale="it was built against torch 2.10")).endswith("torch 2.10")
    cpu_only = _gpu_report()
    cpu_only["extension"]["build"]["cuda"] = None
    assert refusal(cpu_only) == "the extension was built without CUDA kernels"
    assert refusal(_gpu_report(gpus=[])) == "there is no CUDA device"
    second = {"index": 1, "name": "B", "compute_capability": "10.0", "memory_gib": 180.0,
              "extension_machine_code": False}
    assert refusal(_gpu_report(gpus=_gpu_report()["gpus"] + [second])) == (
        "the extension holds no machine code for GPU 1 (compute capability 10.0; it has 8.0, 9.0)")


def test_check_gpu_build_sets_the_exit_status(capsys):
    ready = collect_env.gpu_build_refusal(collect_env.collect()) is None
    assert cli.main(["env", "--check-gpu-build"]) == (0 if ready else 1)
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == "GPU build: ready" if ready else last.startswith("GPU build: not ready: ")


def test_a_library_that_does_not_load_is_reported_as_such(tmp_path):
    """The case the report is most needed for (a torch upgraded under a built _C, whose loading then
    fails): a copy of the package with a _C.abi3.so that is no library at all."""
    package = tmp_path / "qdarts_kernels"
    shutil.copytree(os.path.dirname(qk.__file__), package, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    (package / "_C.abi3.so").write_text("not a library")
    code = ("import warnings; warnings.simplefilter('ignore')\n"
            "from qdarts_kernels import collect_env\n"
            "assert collect_env.__file__.startswith(%r), collect_env.__file__\n"
            "report = collect_env.collect(); print(collect_env.render(report))\n"
            "print(collect_env.gpu_build_refusal(report))\n") % str(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "matches this installation" not in result.stdout
    assert f"extension qdarts_kernels._C: {package / '_C.abi3.so'}\n  could not be loaded: " in result.stdout
    assert "\n  cpu        not available: " in result.stdout
    assert result.stdout.splitlines()[-1].startswith("the extension could not be loaded: ")
