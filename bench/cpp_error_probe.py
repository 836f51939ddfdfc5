"""Does a C++ error (TORCH_CHECK) raised inside an extension reach Python as a RuntimeError here?

    python bench/cpp_error_probe.py OUT_DIR

On the H200 machine of 2026-11-28 (Ubuntu, Python 3.12, torch 2.11.0+cu130, the extension built
by /opt/gcc/bin/g++) every refusal of bad input by qdarts_kernels._C crashed the process with a
segmentation fault instead (tests/test_batch_norm.py::test_cpp_kernels_refuse_bad_input on CPU
tensors, tests/test_cuda_backend.py::test_mixed_op_sum_too_many_inputs_is_an_error), while the
same build on the CPU machines raises. This step of bench/gpu_check.sh tells the causes apart:

1. the toolchain: the compiler torch's build tools take ($CXX, else c++), what built torch, the
   libraries _C loads;
2. the refusals of _C itself, each in a child process (a crash must not take the report with it),
   under gdb (or cuda-gdb, which the GPU image has instead) for a native backtrace where a child dies
   of a signal; and one of torch's own C++ errors, with and without qdarts_kernels imported, which
   tells a machine where every c10::Error crashes from one where only ours do;
3. a one-op extension that only raises, built as setup.py builds _C (a small setup.py: the objects by
   Python's C compiler, the link by its LDSHARED, `gcc -shared`): with setup.py's flags; with the link
   of the builds that crashed (without -shared-libgcc, which setup.py now passes: the C driver may
   otherwise link a private static copy of libgcc's unwinder); without -fopenmp (a second OpenMP
   runtime beside torch's); with no flags; with -Wl,--eh-frame-hdr; with the system's /usr/bin/gcc and
   g++ where the default tools are others; and once with c10::Error recording no C++ backtrace
   (c10::SetStackTraceFetcher), which passing where the others crash would point at the unwinder's
   walk of the stack. Where _C's refusals crashed and a variant with a fixing environment raised, the
   environment goes to OUT_DIR/cpp_error_fix.env, and gpu_check.sh rebuilds _C with it before the tests.

A segmentation fault inside an exception is typically the unwinder's search for the frame
description of a return address (libgcc's linear_search_fdes, when c10::Error records its backtrace:
pytorch/pytorch#117645): a shared library whose .eh_frame_hdr has no search table, or a malformed
.eh_frame. Part 1 therefore also shows the linker, the start of _C's .eh_frame_hdr (its third byte, the encoding
of the table's entry count, is 0xff when there is no table) and whether _C holds its own unwinder.

Writes OUT_DIR/cpp_error_probe.txt; exit status 0 when every refusal is a RuntimeError.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile

#: Refusals of _C's ops: (what, Python code that must raise a RuntimeError, whether to import qdarts_kernels).
REFUSALS = [
    ("torch's own error, qdarts_kernels not imported", "torch.ops.aten.view(torch.zeros(2), [3])", False),
    ("torch's own error, qdarts_kernels imported", "torch.ops.aten.view(torch.zeros(2), [3])", True),
    ("cpu op, bad dtype", "torch.ops.qdarts_C.batch_norm_train_forward(torch.randn(2, 3, 4, 4).double(), None, "
                          "None, 0.1, 1e-5)", True),
    ("cpu op, bad bits", "torch.ops.qdarts_C.mixed_fake_quant_forward(torch.randn(4), torch.ones(1), torch.ones(1), "
                         "[0], 0, -1)", True),
    ("cuda op, 65 outputs", "torch.ops.qdarts_C.mixed_op_sum_forward([torch.zeros(4, device='cuda')] * 65, "
                            "torch.ones(65, device='cuda'))", True),
    # the crashes came in test processes that had used the GPU (and, in one, Triton's launchers): whatever
    # loading the CUDA driver or a Triton kernel registers with the unwinder is there in these two
    ("cuda init, then torch's own error", "torch.zeros(1, device='cuda'); torch.ops.aten.view(torch.zeros(2), [3])",
     True),
    ("a Triton kernel, then cpu op, bad bits",
     "qdarts_kernels.fake_quant(torch.randn(4, device='cuda'), torch.ones(1, device='cuda'), 8, backend='triton'); "
     "torch.ops.qdarts_C.mixed_fake_quant_forward(torch.randn(4), torch.ones(1), torch.ones(1), [0], 0, -1)", True),
]

#: The one-op extension of part 3: a refusal through the dispatcher, as _C's ops make; quiet() makes
#: c10::Error record no C++ backtrace (the unwinder's walk that pytorch#117645 saw crash).
RAISING_OP = r"""
#include <c10/util/Logging.h>
#include <torch/library.h>
at::Tensor probe_fail(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 100, "x must have 100 dimensions, got ", x.dim());
  return x;
}
void probe_quiet() {
  c10::SetStackTraceFetcher(std::function<std::string()>([] { return std::string("(no backtrace)"); }));
}
TORCH_LIBRARY(qdarts_probe_NAME, m) {
  m.def("fail(Tensor x) -> Tensor", &probe_fail);
  m.def("quiet() -> ()", &probe_quiet);
}
"""

#: setup.py's C++ flags for the CPU kernels (the ones that matter to code generation), and its link flags.
SETUP_FLAGS = ["-O3", "-std=c++20", "-ffp-contract=off", "-fvisibility=hidden", "-Wno-psabi", "-fopenmp"]
SETUP_LINK = ["-fopenmp", "-shared-libgcc"]
NO_OPENMP_FLAGS = [flag for flag in SETUP_FLAGS if flag != "-fopenmp"]
#: the link of the builds before -shared-libgcc (which crashed on the H200 of 2026-11-28)
OLD_LINK = ["-fopenmp"]

#: The one-op extension's setup.py: built as setup.py builds _C (the objects by the C compiler of Python's
#: sysconfig, or $CC, the link by its LDSHARED `gcc -shared`), which load_inline (linking with $CXX) would not.
PROBE_SETUP = """
import sys
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension
setup(name="{name}", ext_modules=[CppExtension("{name}", ["probe.cpp"], extra_compile_args={cflags!r},
      extra_link_args={ldflags!r})], cmdclass={{"build_ext": BuildExtension}},
      script_args=["-q", "build_ext", "--inplace"])
"""

#: Variants of part 3: (name, C++ flags, link flags, environment, quiet, the environment that would fix _C's
#: build should _C crash and this variant raise). The environment fixes are what gpu_check.sh can rebuild with.
VARIANTS = [
    ("as_setup_py", SETUP_FLAGS, SETUP_LINK, None, False, None),
    ("old_link", SETUP_FLAGS, OLD_LINK, None, False, None),
    ("no_backtrace", SETUP_FLAGS, OLD_LINK, None, True, None),
    ("no_openmp", NO_OPENMP_FLAGS, ["-shared-libgcc"], None, False, None),
    ("no_flags", [], [], None, False, None),
    ("eh_frame_hdr", SETUP_FLAGS, SETUP_LINK + ["-Wl,--eh-frame-hdr"], None, False, "LDFLAGS=-Wl,--eh-frame-hdr"),
]
#: ... and the system's compiler and linker, where the default ones are others
SYSTEM_TOOLS = {"CC": "/usr/bin/gcc", "CXX": "/usr/bin/g++", "LDSHARED": "/usr/bin/gcc -shared"}


def _finished(cmd, timeout: int, what: str = "FAILED", **kw):
    """``subprocess.run(cmd)``'s result, or, for a child that did not end in ``timeout`` seconds (a hang, say
    a deadlock in a broken unwinder), the report of it with what it printed so far: a hung child must not
    take the report with it."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as e:
        out, err = ((s.decode(errors="replace") if isinstance(s, bytes) else s or "") for s in (e.stdout, e.stderr))
        return f"{what} (no end after {e.timeout:.0f} s)\n{out[-2000:]}{err[-3000:]}"


def _run(cmd, timeout=120, **kw) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"$ {' '.join(cmd)}\n  {type(e).__name__}: {e}\n"
    return f"$ {' '.join(cmd)}  (exit {done.returncode})\n{done.stdout}{done.stderr}"


#: the code of the child that ran under the debugger (one does: the same crash needs no second backtrace)
_DEBUGGED: list[str] = []


def _debugger() -> list[str] | None:
    """gdb's batch command line for a native backtrace, or cuda-gdb's (the GPU image has no gdb)."""
    for name in ("gdb", "cuda-gdb"):
        path = shutil.which(name) or (name == "cuda-gdb" and os.path.join(
            os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", name))
        if path and os.path.isfile(path):
            return [path, "-batch", "-ex", "run", "-ex", "bt 30"]
    return None


def _child(code: str, import_qdarts: bool) -> str:
    """Run ``code`` in a child Python with faulthandler; 'ok: RuntimeError ...' or what went wrong."""
    prog = (f"import faulthandler, sys, torch{', qdarts_kernels' if import_qdarts else ''}; faulthandler.enable()\n"
            f"try:\n    {code}\nexcept RuntimeError as e:\n    print('ok: RuntimeError:', str(e).splitlines()[0])\n"
            "    sys.exit(0)\nprint('no error raised'); sys.exit(3)")
    done = _finished([sys.executable, "-c", prog], 120)
    if isinstance(done, str):
        return done
    if done.returncode == 0:
        return done.stdout.strip()
    report = f"FAILED (exit {done.returncode})\n{done.stdout}{done.stderr[-3000:]}"
    debugger = _debugger()
    if done.returncode < 0 and debugger and not _DEBUGGED:
        _DEBUGGED.append(code)  # the first crash only: a debugger run takes a minute, the step has three
        trace = _run(debugger + ["--args", sys.executable, "-c", prog], timeout=90)
        start = trace.find("#0 ")  # the innermost frames are the ones that say where it crashed
        report += trace[start:start + 6000] if start >= 0 else trace[-6000:]
    return report


def _extension_probe(name: str, cflags, ldflags, env=None, quiet=False) -> str:
    """Build the raising one-op extension as setup.py builds _C and call it in a child: 'ok: ...' or the failure."""
    build = tempfile.mkdtemp(prefix=f"probe_{name}_")
    with open(os.path.join(build, "probe.cpp"), "w") as f:
        f.write(RAISING_OP.replace("NAME", name))
    with open(os.path.join(build, "setup.py"), "w") as f:
        f.write(PROBE_SETUP.format(name=name, cflags=list(cflags), ldflags=list(ldflags)))
    env = None if env is None else {**os.environ, **env}
    built = _finished([sys.executable, "setup.py"], 300, "BUILD FAILED", cwd=build, env=env)
    if isinstance(built, str):
        return built
    if built.returncode != 0:
        return f"BUILD FAILED (exit {built.returncode})\n{built.stdout[-1500:]}{built.stderr[-2500:]}"
    library = next(f for f in os.listdir(build) if f.startswith(name) and f.endswith(".so"))
    prog = ("import faulthandler, sys, torch; faulthandler.enable()\n"
            f"torch.ops.load_library({os.path.join(build, library)!r})\n"
            + (f"torch.ops.qdarts_probe_{name}.quiet()\n" if quiet else "")
            + f"try:\n    torch.ops.qdarts_probe_{name}.fail(torch.ones(2))\n"
            "except RuntimeError as e:\n    print('ok: RuntimeError:', str(e).splitlines()[0]); sys.exit(0)\n"
            "print('no error raised'); sys.exit(3)")
    done = _finished([sys.executable, "-c", prog], 120)
    if isinstance(done, str):
        return done
    if done.returncode == 0:
        return done.stdout.strip().splitlines()[-1]
    return f"FAILED (exit {done.returncode})\n{done.stdout[-2000:]}{done.stderr[-3000:]}"


def main(out_dir: str) -> int:
    import torch

    os.makedirs(out_dir, exist_ok=True)
    lines = ["# 1. toolchain", f"python {sys.version.split()[0]}; torch {torch.__version__}",
             f"CXX={os.environ.get('CXX')!r} CC={os.environ.get('CC')!r} "
             f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES')!r} LD_PRELOAD={os.environ.get('LD_PRELOAD')!r}",
             # the kernel says gVisor or Firecracker; shstk in x86_Thread_features is a CET shadow stack
             _run(["bash", "-c", "uname -r; ldd --version | head -1; grep -i x86_ /proc/self/status; "
                                 "grep -o -w -m1 'shstk' /proc/cpuinfo | head -1"])]
    compiler = os.environ.get("CXX", "c++")
    lines += [_run([compiler, "--version"]),
              _run(["bash", "-c", f"p=$(command -v {compiler}); echo $p; readlink -f $p; file -L $p; "
                                  f"{compiler} -print-libgcc-file-name; {compiler} -print-file-name=libgomp.so"])]
    lines.append("torch was built with: " + next((line.strip() for line in torch.__config__.show().splitlines()
                                                  if "GCC" in line or "Compiler" in line), "?"))
    lines.append(_run(["bash", "-c",
                       f"ld=$({compiler} -print-prog-name=ld); echo linker $ld; $ld --version | head -1"]))
    import sysconfig

    lines.append(f"sysconfig CC={sysconfig.get_config_var('CC')!r} LDSHARED={sysconfig.get_config_var('LDSHARED')!r}; "
                 f"environment LDSHARED={os.environ.get('LDSHARED')!r} LDFLAGS={os.environ.get('LDFLAGS')!r}")
    # the compile and link lines of _C's build (gpu_check.sh's build step logs them beside this report)
    lines.append(_run(["bash", "-c", f"grep -m1 -E -- ' -c .*csrc/ops.cpp' {out_dir}/build.log | cut -c1-600; "
                                     f"grep -m1 -E -- ' -shared ' {out_dir}/build.log | cut -c1-600"]))
    spec = importlib.util.find_spec("qdarts_kernels._C")
    if spec is not None and spec.origin:
        lines += [_run(["readelf", "-p", ".comment", spec.origin]), _run(["ldd", spec.origin]),
                  _run(["bash", "-c", f"readelf -lW {spec.origin} | grep -i -A1 eh_frame; "
                                      f"readelf -x .eh_frame_hdr {spec.origin} | head -4; "
                                      # a private copy of the unwinder (static libgcc_eh) shows as defined
                                      # _Unwind_* symbols; the shared one's as undefined (UND) references
                                      f"readelf -sW {spec.origin} | "
                                      "grep -E ' _Unwind_(Resume|RaiseException|Find_FDE)' | sort -u -k8 | head -8"])]
    lines.append(f"debugger for crashed children: {(_debugger() or ['none'])[0]}")

    lines.append("# 2. torch's own C++ error and the refusals of qdarts_kernels._C")
    ok = True
    for what, code, import_qdarts in REFUSALS:
        if ("cuda" in what or "Triton" in what) and not torch.cuda.is_available():
            lines.append(f"{what}: skipped (no CUDA device)")
            continue
        result = _child(code, import_qdarts)
        ok &= result.startswith("ok")
        lines.append(f"{what}: {result}")

    lines.append("# 3. a one-op extension that raises, built as setup.py builds _C, and variations")
    variants = list(VARIANTS)
    c_driver = (os.environ.get("LDSHARED") or os.environ.get("CC") or sysconfig.get_config_var("LDSHARED")).split()[0]
    default = shutil.which(c_driver)
    if os.path.exists("/usr/bin/gcc") and (default is None or os.path.realpath(default) != os.path.realpath(
            "/usr/bin/gcc")):
        variants.append(("system_tools", SETUP_FLAGS, SETUP_LINK, SYSTEM_TOOLS, False,
                         "\n".join(f"{key}={value}" for key, value in SYSTEM_TOOLS.items())))
    # built side by side: each is one compile of torch's headers (about 30 s), and the machine has cores
    with concurrent.futures.ThreadPoolExecutor(len(variants)) as pool:
        results = list(pool.map(lambda v: _extension_probe(v[0], v[1], v[2], v[3], quiet=v[4]), variants))
    fix = None
    for (name, cflags, ldflags, env, quiet, fix_env), result in zip(variants, results):
        note = " (c10::Error records no backtrace)" if quiet else ""
        lines.append(f"{name} {cflags} link {ldflags} {env or ''}{note}: {result}")
        if fix_env and fix is None and result.startswith("ok"):
            fix = fix_env
    # A crash of _C's refusals that a variant's environment avoids: gpu_check.sh rebuilds _C with it before
    # the tests, so that they say whether it is the whole fix.
    fix_file = os.path.join(out_dir, "cpp_error_fix.env")
    if not ok and fix is not None:
        with open(fix_file, "w") as f:
            f.write(fix + "\n")
        lines.append(f"_C crashed where a variant raised: {fix_file} says to rebuild with {fix!r}")
    ok &= all(result.startswith("ok") for result in results)

    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "cpp_error_probe.txt"), "w") as f:
        f.write(text)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python bench/cpp_error_probe.py OUT_DIR")
    raise SystemExit(main(sys.argv[1]))
