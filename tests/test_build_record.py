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
    (tmp_path / "setup.py").write_text("")
    assert _build_record.checkout_csrc(str(package)) is None  # another project's csrc/ (pip install --target)
    (tmp_path / "csrc" / "ops.cpp").write_text("")
    assert _build_record.checkout_csrc(str(package)) == str(tmp_path / "csrc")


def test_digest_leaves_out_what_is_not_a_source_file(tmp_path):
    """An editor's lock file (a dangling link named .#ops.cpp) or a hidden folder must neither fail the
    digest, and with it the import, nor change it."""
    _write(tmp_path, {"ops.cpp": "int a;"})
    base = _build_record.csrc_digest(str(tmp_path))
    os.symlink("nowhere@1234", tmp_path / ".#ops.cpp")
    os.symlink("nowhere", tmp_path / "dangling.h")
    _write(tmp_path, {".cache/x.cpp": "int b;", "k.cpp.orig": "int c;"})
    assert _build_record.csrc_digest(str(tmp_path)) == base


def test_write_if_changed_keeps_an_unchanged_file(tmp_path):
    path = str(tmp_path / "gen" / "build_record.cpp")
    assert _build_record.write_if_changed(path, "a") is True
    os.utime(path, (1, 1))
    assert _build_record.write_if_changed(path, "a") is False and os.stat(path).st_mtime == 1  # ninja: no work
    assert _build_record.write_if_changed(path, "b") is True and open(path).read() == "b"


def test_older_copies_of_the_library_are_removed(tmp_path):
    built = tmp_path / "_C.abi3.so"
    for name in ("_C.abi3.so", "_C.cpython-311-x86_64-linux-gnu.so", "_C.cpython-312-x86_64-linux-gnu.so",
                 "_Cother.so", "other.cpython-311-x86_64-linux-gnu.so", "_C.py"):
        (tmp_path / name).write_text(name)
    removed = _build_record.remove_other_copies(str(built))
    assert sorted(os.path.basename(p) for p in removed) == ["_C.cpython-311-x86_64-linux-gnu.so",
                                                           "_C.cpython-312-x86_64-linux-gnu.so"]
    assert sorted(os.listdir(tmp_path)) == ["_C.abi3.so", "_C.py", "_Cother.so",
                                            "other.cpython-311-x86_64-linux-gnu.so"]


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
def test_sources_that_cannot_be_read_do_not_fail_the_import(monkeypatch):
    def unreadable(*args):
        raise PermissionError(13, "Permission denied", "csrc/ops.cpp")

    monkeypatch.setattr(_build_record, "checkout_csrc", lambda package_dir: "/a/checkout/csrc")
    monkeypatch.setattr(_build_record, "stale_reason", unreadable)
    reason = _backends.compiled_stale_reason()
    assert reason.startswith("its sources in /a/checkout/csrc could not be read to compare ([Errno 13]")


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


def test_machine_code_archs_from_nvcc_flags():
    flags = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=compute_90",
             "-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_90a,code=sm_90a",
             "-gencode=arch=compute_100,code=[sm_100,compute_100]"]
    assert _build_record.machine_code_archs(flags) == ["8.0", "9.0", "9.0a", "10.0"]
    assert _build_record.machine_code_archs(["-gencode=arch=compute_90,code=compute_90"]) == []  # PTX only


def test_machine_code_runs_on_later_gpus_of_its_major_version():
    has = _build_record.has_machine_code_for
    assert has(["8.0", "9.0"], (9, 0)) and has(["8.0", "9.0"], (8, 0))
    assert has(["8.0", "9.0"], (8, 6)) and has(["8.0"], (8, 9))  # A10, L4: sm_80 code runs there
    assert not has(["8.6"], (8, 0))  # not on an earlier one
    assert not has(["8.0", "9.0"], (10, 0)) and not has(["9.0"], (8, 0))  # nor across major versions
    assert has(["9.0a"], (9, 0)) and not has(["8.0a"], (8, 6))  # arch-specific: that GPU alone
    assert not has(None, (9, 0)) and not has([], (9, 0))  # no CUDA kernels at all
