"""The CUDA sources compile without a GPU: every kernel file with nvcc for sm_80 and sm_90, and the
torch glue with the host compiler against the installed torch's headers; and the host tests of the
kernels' launch geometry and per-thread code (tests/cuda/*_test.cu) and the launch emulation, whole
launches run on the CPU (tests/cuda/launch_emulation_test.cpp), pass (.ci/compile_cuda.sh).

The kernels themselves run on a GPU only (tests/test_backends.py with the "cuda" backend, through
bench/gpu_check.sh); this test keeps a compile error in them from landing on a CPU-only CI.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "compile_cuda.sh"


def _nvcc_available() -> bool:
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return shutil.which("nvcc") is not None or os.access(os.path.join(cuda_home, "bin", "nvcc"), os.X_OK)


@pytest.mark.skipif(not _nvcc_available(), reason="nvcc (the CUDA toolkit) is not installed")
def test_cuda_sources_compile():
    result = subprocess.run(
        ["bash", str(SCRIPT)],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, f"compile_cuda.sh failed:\n{result.stdout}\n{result.stderr}"
    cuda_dir = ROOT / "csrc" / "cuda"
    host_tests = sorted((ROOT / "tests" / "cuda").glob("*_test.cu"))
    assert host_tests, "tests/cuda/ holds no host test"
    emulation_test = ROOT / "tests" / "cuda" / "launch_emulation_test.cpp"
    for source in sorted([*cuda_dir.glob("*.cu"), *cuda_dir.glob("*.cpp")]) + host_tests + [emulation_test]:
        assert re.search(rf"^ok\s.*\s{re.escape(source.name)} \(", result.stdout, re.MULTILINE), (
            f"{source.name} was not compiled:\n{result.stdout}"
        )
