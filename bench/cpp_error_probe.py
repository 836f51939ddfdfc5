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
   under gdb for a native backtrace where a child dies of a signal and gdb is there;
3. a one-op extension that only raises, built by torch.utils.cpp_extension.load_inline with
   setup.py's flags, with none, and with /usr/bin/g++ where the default compiler is another: a crash
   of all says the machine, of the first alone our flags, of the default compiler's alone that one;
   and once with c10::Error recording no C++ backtrace (c10::SetStackTraceFetcher), which passing
   where the others crash would point at the unwinder's walk of the stack.

A segmentation fault inside an exception is typically the unwinder's search for the frame
description of a return address (libgcc's linear_search_fdes, when c10::Error records its backtrace:
pytorch/pytorch#117645): a shared library whose .eh_frame_hdr has no search table, or a malformed
.eh_frame. Part 1 therefore also shows the linker and the start of _C's .eh_frame_hdr (its third byte,
the encoding of the table's entry count, is 0xff when there is no table).

Writes OUT_DIR/cpp_error_probe.txt; exit status 0 when every refusal is a RuntimeError.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile

#: Refusals of _C's ops: (what, Python code that must raise a RuntimeError).
REFUSALS = [
    ("cpu op, bad dtype", "torch.ops.qdarts_C.batch_norm_train_forward(torch.randn(2, 3, 4, 4).double(), None, "
                          "None, 0.1, 1e-5)"),
    ("cpu op, bad bits", "torch.ops.qdarts_C.mixed_fake_quant_forward(torch.randn(4), torch.ones(1), torch.ones(1), "
                         "[0], 0, -1)"),
    ("cuda op, 65 outputs", "torch.ops.qdarts_C.mixed_op_sum_forward([torch.zeros(4, device='cuda')] * 65, "
                            "torch.ones(65, device='cuda'))"),
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

#: setup.py's C++ flags for the CPU kernels (the ones that matter to code generation).
SETUP_FLAGS = ["-O3", "-std=c++20", "-ffp-contract=off", "-fvisibility=hidden", "-Wno-psabi", "-fopenmp"]


def _run(cmd, timeout=120, **kw) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"$ {' '.join(cmd)}\n  {type(e).__name__}: {e}\n"
    return f"$ {' '.join(cmd)}  (exit {done.returncode})\n{done.stdout}{done.stderr}"


def _child(code: str) -> str:
    """Run ``code`` in a child Python with faulthandler; 'ok: RuntimeError ...' or what went wrong."""
    prog = ("import faulthandler, sys, torch, qdarts_kernels; faulthandler.enable()\n"
            f"try:\n    {code}\nexcept RuntimeError as e:\n    print('ok: RuntimeError:', str(e).splitlines()[0])\n"
            "    sys.exit(0)\nprint('no error raised'); sys.exit(3)")
    done = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=120)
    if done.returncode == 0:
        return done.stdout.strip()
    report = f"FAILED (exit {done.returncode})\n{done.stdout}{done.stderr[-3000:]}"
    if done.returncode < 0 and shutil.which("gdb"):
        report += _run(["gdb", "-batch", "-ex", "run", "-ex", "bt 30", "--args", sys.executable, "-c", prog],
                       timeout=180)[-6000:]
    return report


def _inline_probe(name: str, flags, env=None, quiet=False) -> str:
    prog = ("import faulthandler, sys, torch; faulthandler.enable()\n"
            "from torch.utils.cpp_extension import load_inline\n"
            f"load_inline(name={name!r}, cpp_sources=[{RAISING_OP.replace('NAME', name)!r}], "
            f"extra_cflags={list(flags)!r}, extra_ldflags={['-fopenmp'] if '-fopenmp' in flags else []!r}, "
            "is_python_module=False, build_directory=sys.argv[1])\n"
            + (f"torch.ops.qdarts_probe_{name}.quiet()\n" if quiet else "")
            + f"try:\n    torch.ops.qdarts_probe_{name}.fail(torch.ones(2))\n"
            "except RuntimeError as e:\n    print('ok: RuntimeError:', str(e).splitlines()[0]); sys.exit(0)\n"
            "print('no error raised'); sys.exit(3)")
    build = tempfile.mkdtemp(prefix=f"probe_{name}_")
    done = subprocess.run([sys.executable, "-c", prog, build], capture_output=True, text=True, timeout=300,
                          env=None if env is None else {**os.environ, **env})
    if done.returncode == 0:
        return done.stdout.strip().splitlines()[-1]
    return f"FAILED (exit {done.returncode})\n{done.stdout[-2000:]}{done.stderr[-3000:]}"


def main(out_dir: str) -> int:
    import torch

    lines = ["# 1. toolchain", f"python {sys.version.split()[0]}; torch {torch.__version__}",
             f"CXX={os.environ.get('CXX')!r} CC={os.environ.get('CC')!r}"]
    compiler = os.environ.get("CXX", "c++")
    lines += [_run([compiler, "--version"]),
              _run(["bash", "-c", f"p=$(command -v {compiler}); echo $p; readlink -f $p; file -L $p"])]
    lines.append("torch was built with: " + next((line.strip() for line in torch.__config__.show().splitlines()
                                                  if "GCC" in line or "Compiler" in line), "?"))
    lines.append(_run(["bash", "-c",
                       f"ld=$({compiler} -print-prog-name=ld); echo linker $ld; $ld --version | head -1"]))
    spec = importlib.util.find_spec("qdarts_kernels._C")
    if spec is not None and spec.origin:
        lines += [_run(["readelf", "-p", ".comment", spec.origin]), _run(["ldd", spec.origin]),
                  _run(["bash", "-c", f"readelf -lW {spec.origin} | grep -i -A1 eh_frame; "
                                      f"readelf -x .eh_frame_hdr {spec.origin} | head -4"])]

    lines.append("# 2. refusals of qdarts_kernels._C")
    ok = True
    for what, code in REFUSALS:
        if "cuda" in what and not torch.cuda.is_available():
            lines.append(f"{what}: skipped (no CUDA device)")
            continue
        result = _child(code)
        ok &= result.startswith("ok")
        lines.append(f"{what}: {result}")

    lines.append("# 3. a one-op extension that raises, built with setup.py's flags and with none")
    variants = [("setup_flags", SETUP_FLAGS, None), ("no_flags", [], None)]
    quiet_result = _inline_probe("no_backtrace", SETUP_FLAGS, quiet=True)
    lines.append(f"no_backtrace {SETUP_FLAGS} (c10::Error records no backtrace): {quiet_result}")
    default = shutil.which(compiler)
    if os.path.exists("/usr/bin/g++") and (default is None or os.path.realpath(default) != os.path.realpath(
            "/usr/bin/g++")):
        variants.append(("system_gxx", SETUP_FLAGS, {"CXX": "/usr/bin/g++"}))
    for name, flags, env in variants:
        result = _inline_probe(name, flags, env)
        ok &= result.startswith("ok")
        lines.append(f"{name} {flags} {env or ''}: {result}")

    text = "\n".join(lines) + "\n"
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "cpp_error_probe.txt"), "w") as f:
        f.write(text)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python bench/cpp_error_probe.py OUT_DIR")
    raise SystemExit(main(sys.argv[1]))
