"""The record of what _C was built from (qdarts_kernels/_build_record.py, setup.py): a stale build is
told from a current one and warned about once at import; a missing one falls back with one warning."""

import json
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

import qdarts_kernels as qk
from qdarts_kernels import _backends, _build_record

needs_extension = pytest.mark.skipif(qk.build_info() is None, reason="qdarts_kernels._C is not built")


@needs_extension
def test_build_info_describes_this_build():
    """The build the tests run matches this torch and, in a checkout, these sources: the same check
    that warns at import (a test run after editing csrc/ without a rebuild fails here, as it should)."""
    info = qk.build_info()
    assert set(info) == {"csrc_digest", "torch", "cuda", "cuda_archs", "debug"}
    assert info["torch"] == str(torch.__version__)
    assert (info["cuda"] is not None) == bool(torch.ops.qdarts_C.has_cuda_kernels())
    assert (info["cuda_archs"] is not None) == (info["cuda"] is not None)
    csrc = _build_record.checkout_csrc(os.path.dirname(qk.__file__))
    if csrc is not None:
        assert info["csrc_digest"] == _build_record.csrc_digest(csrc)
    assert _backends.compiled_stale_reason() is None


def _write(root, files):
    for name, text in files.items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)


def test_digest_covers_the_sources_names_and_contents_only(tmp_path):
    _write(tmp_path, {"ops.cpp": "int a;", "cpu/k.inc": "x", "cuda/k.cu": "y"})
    base = _build_record.csrc_digest(str(tmp_path))
    assert re.fullmatch(r"[0-9a-f]{64}", base)
    _write(tmp_path, {"notes.txt": "not compiled", ".ops.cpp.swp": "an editor's file"})
    assert _build_record.csrc_digest(str(tmp_path)) == base
    _write(tmp_path, {"cpu/k.inc": "x "})
    assert _build_record.csrc_digest(str(tmp_path)) != base
    _write(tmp_path, {"cpu/k.inc": "x"})
    assert _build_record.csrc_digest(str(tmp_path)) == base
    os.rename(tmp_path / "cuda" / "k.cu", tmp_path / "cuda" / "j.cu")
    assert _build_record.csrc_digest(str(tmp_path)) != base
    # content moved across the boundary between two files changes it too (lengths are hashed)
    other = tmp_path / "other"
    _write(other, {"a.h": "ab", "b.h": "c"})
    moved = tmp_path / "moved"
    _write(moved, {"a.h": "a", "b.h": "bc"})
    assert _build_record.csrc_digest(str(other)) != _build_record.csrc_digest(str(moved))


def test_generated_cpp_holds_the_record_as_one_c_string():
    record = {"csrc_digest": "ab" * 32, "torch": '2.13.0+cpu "quoted" \\', "cuda": None,
              "cuda_archs": None, "debug": False}
    text = _build_record.cpp_source(record)
    literal = re.search(r'qdarts_build_record\[\] = (".*");\n\Z', text).group(1)
    # a JSON string of ASCII text is also a C string literal with the same value
    assert literal.isascii() and json.loads(json.loads(literal)) == record


def test_stale_reason_names_the_torch_and_the_sources(tmp_path):
    _write(tmp_path, {"ops.cpp": "int a;"})
    record = {"torch": "2.11.0+cu130", "csrc_digest": _build_record.csrc_digest(str(tmp_path))}
    assert _build_record.stale_reason(record, "2.11.0+cu130", str(tmp_path)) is None
    assert _build_record.stale_reason(record, "2.11.0+cu130", None) is None
    reason = _build_record.stale_reason(record, "2.13.0+cpu", str(tmp_path))
    assert reason == "it was built against torch 2.11.0+cu130, this is torch 2.13.0+cpu"
    _write(tmp_path, {"ops.cpp": "int b;"})
    reason = _build_record.stale_reason(record, "2.11.0+cu130", str(tmp_path))
    assert reason.startswith(f"it was built from other sources than {tmp_path} holds now (digest ")


def test_checkout_csrc_only_in_a_checkout(tmp_path):
    package = tmp_path / "qdarts_kernels"
    package.mkdir()
    assert _build_record.checkout_csrc(str(package)) is None  # an installed package: nothing beside it
    (tmp_path / "csrc").mkdir()
    assert _build_record.checkout_csrc(str(package)) is None  # a csrc/ that is not this project's
    (tmp_path / "setup.py").write_text("")
    assert _build_record.checkout_csrc(str(package)) == str(tmp_path / "csrc")


@needs_extension
def test_a_stale_build_is_warned_about_once(monkeypatch):
    monkeypatch.setattr(_backends, "_warned", False)
    monkeypatch.setattr(_build_record, "checkout_csrc", lambda package_dir: "/a/checkout/csrc")
    monkeypatch.setattr(_build_record, "csrc_digest", lambda csrc_dir: "0" * 64)
    with pytest.warns(RuntimeWarning, match=r"_C may not match this installation: it was built from other "
                                            r"sources than /a/checkout/csrc holds now .* rebuild it"):
        _backends.warn_about_compiled()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _backends.warn_about_compiled()


@needs_extension
def test_a_build_without_a_record_is_warned_about(monkeypatch):
    """A _C built before builds kept a record (an older checkout's library, still beside the package)
    loads, has no build_record op, and is named for what it is instead of failing the import."""
    monkeypatch.setattr(_backends, "_warned", False)
    monkeypatch.setattr(_backends, "build_info", lambda: None)
    with pytest.warns(RuntimeWarning, match="built by an older version of this package, which kept no build"):
        _backends.warn_about_compiled()


def test_without_the_extension_one_warning_and_the_reference():
    """torchao's way: a _C that cannot be loaded (not built, or built for another torch) disables the
    compiled backends with one warning; the ops still run, on the reference."""
    code = (
        "import sys, warnings\n"
        "sys.modules['qdarts_kernels._C'] = None  # import fails as for a missing or broken library\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch, qdarts_kernels as qk\n"
        "    qk.mixed_op_sum([torch.ones(3), torch.zeros(3)], torch.tensor([0.25, 0.75]))\n"
        "messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]\n"
        "print(len(messages)); print(messages[0]); print(qk.available_backends()); print(qk.build_info())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "QDARTS_BACKEND"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    count, message, backends, info = result.stdout.strip().splitlines()
    assert count == "1"
    assert message.startswith("qdarts_kernels._C is not available (ModuleNotFoundError: import of qdarts_kernels._C")
    assert "'cpu' and 'cuda' backends are disabled" in message
    assert "'cpu'" not in backends and "'reference'" in backends
    assert info == "None"


def test_machine_code_for_a_gpu_is_read_from_the_arch_list():
    assert _build_record.has_machine_code_for("8.0;9.0+PTX", (9, 0))
    assert _build_record.has_machine_code_for("9.0", (9, 0))
    assert _build_record.has_machine_code_for("8.0 8.6", (8, 6))
    assert not _build_record.has_machine_code_for("8.0;9.0+PTX", (10, 0))  # PTX only: compiled at load
    assert not _build_record.has_machine_code_for("9.0", (8, 0))
    assert not _build_record.has_machine_code_for(None, (9, 0))  # no CUDA kernels at all
