"""Shared test setup: which backends run here, on which device.

Without a CUDA device the Triton kernels run under the Triton interpreter on CPU tensors; the
interpreter is chosen when the kernels are defined, so the switch is set before anything imports
them. On the GPU machine the same tests run the compiled Triton and CUDA kernels on CUDA tensors.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One intra-op thread: the tests use small tensors, where OpenMP threads only spin (on a busy 2-core
# machine the search tests run about 8x slower with two). Tests of thread-count determinism set
# their own counts.
torch.set_num_threads(1)

import qdarts_kernels as qk  # noqa: E402  (after the interpreter switch)

HAS_CUDA = torch.cuda.is_available()


def backend_cases():
    """(backend, device) pairs to test: every backend on the device it runs on here."""
    cases = [("reference", "cpu"), ("cpu", "cpu")]
    cases.append(("triton", "cuda" if HAS_CUDA else "cpu"))
    cases.append(("cuda", "cuda"))
    return cases


def require_backend(backend: str, device: str) -> None:
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    if backend not in qk.available_backends():
        if backend in ("cpu",) and os.environ.get("CI") == "true":
            pytest.fail("the C++ extension qdarts_kernels._C must be built in CI")
        pytest.skip(f"backend {backend!r} is not available here")


@pytest.fixture(params=backend_cases(), ids=lambda c: f"{c[0]}-{c[1]}")
def backend_device(request):
    backend, device = request.param
    require_backend(backend, device)
    return backend, torch.device(device)


# --- The CUDA sources' compile, started beside the other tests ---------------------------------
#
# .ci/compile_cuda.sh runs nvcc for minutes (tests/test_cuda_sources.py checks its output). The
# tests above run on one thread, so in a single-process run, CI's, the machine's other cores idle
# meanwhile: the script starts when collection ends and its test, moved to the end of the run,
# only collects the result. Under pytest-xdist every worker collects every test, so there the test
# runs the script itself.

ROOT = Path(__file__).resolve().parents[1]
COMPILE_CUDA_SCRIPT = ROOT / ".ci" / "compile_cuda.sh"
COMPILE_CUDA_TEST = "test_cuda_sources.py::test_cuda_sources_compile"
_compile_cuda_key = pytest.StashKey["CompileCuda"]()


def nvcc_available() -> bool:
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return shutil.which("nvcc") is not None or os.access(os.path.join(cuda_home, "bin", "nvcc"), os.X_OK)


class CompileCuda:
    """One run of .ci/compile_cuda.sh in its own process group; its output goes to files, so that a
    long error listing cannot fill a pipe nobody reads yet and stall the script."""

    def __init__(self) -> None:
        self._stdout = tempfile.TemporaryFile("w+")
        self._stderr = tempfile.TemporaryFile("w+")
        self._process = subprocess.Popen(
            ["bash", str(COMPILE_CUDA_SCRIPT)],
            env={**os.environ, "PYTHON": sys.executable},
            stdout=self._stdout,
            stderr=self._stderr,
            text=True,
            start_new_session=True,
        )

    def result(self, timeout: float) -> tuple[int, str, str]:
        """(exit status, stdout, stderr) once the script has ended; stops it after `timeout` s."""
        try:
            returncode = self._process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise
        outputs = []
        for stream in (self._stdout, self._stderr):
            stream.seek(0)
            outputs.append(stream.read())
            stream.close()
        return returncode, outputs[0], outputs[1]

    def stop(self) -> None:
        """Ends the script and its nvcc processes (a run interrupted or ended before its test)."""
        if self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGTERM)
            self._process.wait()


@pytest.hookimpl(trylast=True)  # after -k / -m / --deselect have dropped what does not run
def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYTEST_XDIST_WORKER") or not nvcc_available():
        return
    compile_tests = [item for item in items if item.nodeid.endswith(COMPILE_CUDA_TEST)]
    if compile_tests and not config.option.collectonly:
        items[:] = [item for item in items if item not in compile_tests] + compile_tests
        config.stash[_compile_cuda_key] = CompileCuda()


def pytest_unconfigure(config):
    if _compile_cuda_key in config.stash:
        config.stash[_compile_cuda_key].stop()


@pytest.fixture
def compile_cuda(request) -> CompileCuda:
    """The run started beside the other tests, or else one started now."""
    return request.config.stash.get(_compile_cuda_key, None) or CompileCuda()


def files_named_by_the_summary(folder):
    """The names on summary.md's "Files:" line, without their parenthesised notes."""
    line = next(line for line in (folder / "summary.md").read_text().splitlines() if line.startswith("Files: "))
    return [re.sub(r" \(.*\)$", "", name) for name in line[len("Files: "):].rstrip(".").split(", ")]

