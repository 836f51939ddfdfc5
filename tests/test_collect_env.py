"""``python -m qdarts_kernels`` / ``qdarts env``: the report of what the kernels run on here."""

import json
import os
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
        assert "C++ CPU kernels: error: " in text and "QDARTS_CPU_ISA" in text
    if not torch.cuda.is_available():
        assert "\n  cuda       not available: " in text and "\nGPUs: none" in text
        if _backends._load("triton") is not None:
            assert "\n  triton     not available: Triton compiles for GPUs only" in text


def test_a_stale_extension_shows(monkeypatch):
    monkeypatch.setattr(_backends, "compiled_stale_reason", lambda: "it was built against torch 0.0")
    text = collect_env.render(collect_env.collect())
    if qk.build_info() is not None:
        assert "  matches this installation: NO: it was built against torch 0.0" in text
