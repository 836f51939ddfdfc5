"""The CUDA sources compile without a GPU: every kernel file with nvcc for sm_80 and sm_90, and the
torch glue with the host compiler against the installed torch's headers; and the host tests of the
kernels' launch geometry and per-thread code (tests/cuda/*_test.cu) and the launch emulation, whole
launches run on the CPU (tests/cuda/launch_emulation_test.cpp), pass (.ci/compile_cuda.sh).

The kernels themselves run on a GPU only (tests/test_backends.py with the "cuda" backend, through
bench/gpu_check.sh); this test keeps a compile error in them from landing on a CPU-only CI. In a
single-process run the script starts when collection ends, beside the other tests (conftest.py).
"""

import re

import pytest
from conftest import ROOT, nvcc_available


@pytest.mark.skipif(not nvcc_available(), reason="nvcc (the CUDA toolkit) is not installed")
def test_cuda_sources_compile(compile_cuda):
    returncode, stdout, stderr = compile_cuda.result(timeout=1200)
    assert returncode == 0, f"compile_cuda.sh failed:\n{stdout}\n{stderr}"
    cuda_dir = ROOT / "csrc" / "cuda"
    host_tests = sorted((ROOT / "tests" / "cuda").glob("*_test.cu"))
    assert host_tests, "tests/cuda/ holds no host test"
    emulation_test = ROOT / "tests" / "cuda" / "launch_emulation_test.cpp"
    for source in sorted([*cuda_dir.glob("*.cu"), *cuda_dir.glob("*.cpp")]) + host_tests + [emulation_test]:
        assert re.search(rf"^ok\s.*\s{re.escape(source.name)} \(", stdout, re.MULTILINE), (
            f"{source.name} was not compiled:\n{stdout}"
        )
