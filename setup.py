"""Build of qdarts: the pure-Python packages plus the compiled extension ``qdarts_kernels._C``.

The extension holds the C++ CPU kernels (always) and the CUDA kernels (when this torch has CUDA and
nvcc is found). It is built against the torch that is already installed, so install with
``pip install --no-build-isolation .`` after installing torch: with build isolation pip would fetch a
second torch (a CUDA build of several GB) only to compile against it.

Build switches (environment variables), all read in this file:

  QDARTS_SKIP_EXTENSION=1   build no extension at all: the package then runs on the reference and
                            Triton backends and warns once that ``_C`` is missing.
  QDARTS_SKIP_CUDA=1        build the CPU kernels only, even where CUDA and nvcc are present.
  QDARTS_FORCE_CUDA=1       build the CUDA kernels even when torch reports no CUDA version (needs
                            a CUDA build of torch's headers and libraries; for cross-building).
  TORCH_CUDA_ARCH_LIST      GPU architectures to compile for (read by torch.utils.cpp_extension);
                            defaults here to "8.0;9.0+PTX" when unset: machine code for the
                            A100 and H100, and sm_90 PTX that the driver compiles for newer GPUs
                            at load time (without it they would find no kernel image).
  MAX_JOBS                  parallel compile jobs (read by torch.utils.cpp_extension / ninja).
  CUDA_HOME                 the CUDA toolkit (read by torch.utils.cpp_extension). When unset, torch
                            takes the directory above the `nvcc` on PATH; where that is a wrapper
                            outside the toolkit (no include/cuda_runtime.h there), this file sets it
                            to /usr/local/cuda if the toolkit is there, else stops with an error.
  QDARTS_DEBUG=1            compile with -O0 -g and assertions, for debugging the kernels.

Run-time switches of the C++ CPU kernels (read in csrc/cpu/): QDARTS_CPU_ISA (simd.h) and
QDARTS_CPU_CACHE_MB (output_cache.h).

Whether CUDA is built is decided by ``torch.version.cuda`` and ``CUDA_HOME`` (nvcc), never by
``torch.cuda.is_available()``, so the CUDA kernels build on a machine without a GPU.

Every build compiles into ``_C`` a record of what it was built from (a digest of ``csrc/``, the torch
version, the CUDA settings above), which ``qdarts_kernels.build_info()`` returns and the package checks
at import (``qdarts_kernels/_build_record.py``).
"""

import glob
import importlib.util
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") == "1"


def _has_cuda_headers(home) -> bool:
    return home is not None and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))


def _locate_cuda_toolkit() -> None:
    """Sets CUDA_HOME where torch's own guess (the directory above `nvcc` on PATH) holds no CUDA
    headers but /usr/local/cuda does: an `nvcc` wrapper script in /usr/local/bin, as some images
    have, would otherwise make the C++ glue fail on `cuda_runtime.h` after the kernels compiled."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    import shutil

    nvcc = shutil.which("nvcc")
    guess = os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None
    if not _has_cuda_headers(guess) and _has_cuda_headers("/usr/local/cuda"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"


def _record_module():
    """qdarts_kernels/_build_record.py, loaded by path: the package cannot be imported before it is built."""
    spec = importlib.util.spec_from_file_location("_qdarts_build_record",
                                                  os.path.join(ROOT, "qdarts_kernels", "_build_record.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cuda_machine_code(record_module):
    """The architectures the CUDA kernels get machine code for: from the -gencode flags torch passes to
    nvcc (named architectures such as "Hopper" resolved), else read from TORCH_CUDA_ARCH_LIST as given."""
    try:
        from torch.utils.cpp_extension import _get_cuda_arch_flags

        flags = _get_cuda_arch_flags()
    except Exception:  # a private function of torch's, so not relied on
        flags = ["sm_" + arch.split("+")[0].replace(".", "")
                 for arch in os.environ["TORCH_CUDA_ARCH_LIST"].replace(",", ";").replace(" ", ";").split(";")]
    return record_module.machine_code_archs(flags)


def _extensions():
    if _flag("QDARTS_SKIP_EXTENSION"):
        return [], {}
    import torch  # needed only to build the extension

    _locate_cuda_toolkit()
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    debug = _flag("QDARTS_DEBUG")
    with_cuda = not _flag("QDARTS_SKIP_CUDA") and (
        (torch.version.cuda is not None and CUDA_HOME is not None) or _flag("QDARTS_FORCE_CUDA")
    )
    # -ffp-contract=off: a fused multiply-add in x*inv_s + z would change which way a tie rounds
    # compared with PyTorch's own fake-quant kernels; the quantizer must match them bit for bit.
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # -Wno-psabi: the SIMD kernels pass GCC vector types between inlined helpers; the ABI note
    # about passing them by value concerns calls across translation units, which never happen.
    # -std=c++20: torch 2.13's default for extensions (its headers use C++20 features and warn under C++17);
    # torch 2.11 defaults to C++17, and its headers and our CUDA glue build under C++20 too (checked:
    # torch 2.11.0+cu130 with nvcc 13.0, 2026-11-28). .ci/compile_cuda.sh compiles the CUDA sources with it.
    cxx = opt + ["-std=c++20", "-ffp-contract=off", "-fvisibility=hidden", "-Wno-psabi"]
    # OpenMP: at::parallel_for is a header template whose OpenMP backend is a `#pragma omp parallel`
    # compiled into *this* extension; without -fopenmp it silently runs on one thread. Linking with
    # -fopenmp adds a dependency on libgomp.so.1, which resolves to the copy torch already loaded.
    # Off where the compiler has no OpenMP (Apple clang): the kernels then run on one thread.
    link = []
    if sys.platform.startswith("linux"):
        cxx.append("-fopenmp")
        link.append("-fopenmp")
        # -shared-libgcc: the extension is linked by Python's LDSHARED, the C driver (`gcc -shared`), and
        # GCC's manual asks for the shared libgcc in a library that exceptions pass through: every refusal
        # (TORCH_CHECK) unwinds our frames from libc10's throw to torch's catch, and a private static copy
        # of the unwinder in _C would handle those frames apart from the one that started the unwinding.
        # Where the driver already links libgcc_s (the usual case) the flag changes nothing. (Whether a
        # private unwinder was what crashed every refusal on the H200 of 2026-11-28 is for
        # bench/cpp_error_probe.py to tell on the next GPU run; tests/test_cpu_kernels.py checks the link.)
        link.append("-shared-libgcc")
    if not debug:
        cxx.append("-DNDEBUG")
    sources = ["csrc/ops.cpp", "csrc/autograd.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc")]
    define_macros = []
    if with_cuda and not _has_cuda_headers(CUDA_HOME):
        sys.exit(f"qdarts setup.py: the CUDA toolkit at CUDA_HOME={CUDA_HOME!r} has no include/cuda_runtime.h; "
                 "set CUDA_HOME to the toolkit, or QDARTS_SKIP_CUDA=1 to build the CPU kernels only")
    # py_limited_api: the extension uses no CPython API beyond creating its (empty) module, and nothing
    # of libtorch_python (its ops are reached through the dispatcher), so it is built against the
    # stable ABI: the library is named _C.abi3.so, and a wheel (tagged abi3 below) loads on every
    # Python from 3.10 on. It still needs the torch it was built against.
    # torch defines Py_LIMITED_API itself from 2.7 on, and leaves libtorch_python out from 2.6 on; defined
    # here too (the same value) so that the library holds to the stable ABI with older torch as well.
    define_macros.append(("Py_LIMITED_API", "0x030A0000"))
    common = dict(include_dirs=include_dirs, define_macros=define_macros, extra_link_args=link,
                  py_limited_api=True)
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        define_macros.append(("QDARTS_WITH_CUDA", "1"))
        # --fmad=false for the same reason as -ffp-contract=off above.
        nvcc = opt + ["-std=c++20", "--fmad=false", "-lineinfo"]
        ext = CUDAExtension("qdarts_kernels._C", sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **common)
    else:
        ext = CppExtension("qdarts_kernels._C", sources, extra_compile_args={"cxx": cxx}, **common)
    # The build record (qdarts_kernels/_build_record.py says why): a generated file, rewritten only when
    # its text changes, so that ninja then recompiles that one small file and a build with nothing
    # changed stays a no-op.
    record_module = _record_module()
    record = {
        "csrc_digest": record_module.csrc_digest(os.path.join(ROOT, "csrc")),
        "torch": str(torch.__version__),
        "cuda": torch.version.cuda if with_cuda else None,
        "cuda_archs": _cuda_machine_code(record_module) if with_cuda else None,
        "debug": debug,
    }
    record_source = os.path.join("build", "qdarts_generated", "build_record.cpp")
    record_module.write_if_changed(os.path.join(ROOT, record_source), record_module.cpp_source(record))
    ext.sources.append(record_source)

    class BuildWithoutStaleCopies(BuildExtension):
        """Deletes, after a build, any other copy of _C beside the one just built (see
        _build_record.remove_other_copies: Python would import an older _C.cpython-*.so first)."""

        def run(self):
            super().run()
            for extension in self.extensions:
                record_module.remove_other_copies(self.get_ext_fullpath(extension.name))

    return [ext], {"build_ext": BuildWithoutStaleCopies}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["qdarts_kernels", "qdarts_kernels.*", "qdarts", "qdarts.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    # the wheel's tag for the stable-ABI extension above (cp310-abi3: requires-python's minimum)
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)
