"""Shared test setup: which backends run here, on which device.

Without a CUDA device the Triton kernels run under the Triton interpreter on CPU tensors; the
interpreter is chosen when the kernels are defined, so the switch is set before anything imports
them. On the GPU machine the same tests run the compiled Triton and CUDA kernels on CUDA tensors.
"""

import os

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
