#!/usr/bin/env bash
# Compile every CUDA source of the extension without a GPU, so that a compile error cannot land:
#
#   1. each csrc/cuda/*.cu with plain nvcc (no torch headers on the include path: the kernel files
#      must not need them) for sm_80 and sm_90, with the flags the real build uses (setup.py's
#      -std=c++20 --fmad=false and the half/bfloat16 switches torch's CUDAExtension adds);
#      The objects are then linked into one shared library (duplicate symbols fail there);
#   2. each host test tests/cuda/*_test.cu, built with nvcc and run on the CPU: the kernels'
#      launch geometry and element loops, and their per-thread code for every thread of a grid
#      against a direct computation (what a GPU alone can check is left to tests/test_cuda_backend.py);
#   3. the launch emulation (tests/cuda/launch_emulation_test.cpp): tests/cuda/emulate_launches.py
#      rewrites every kernel launch of csrc/cuda/*.cu into a call of tests/cuda/launch_emulation.h
#      (it fails on a launch it cannot rewrite), g++ builds them with that header, and whole launches
#      (block_sum, the second passes, the launch_* grids and partial buffers) run on the CPU against
#      a direct computation;
#   4. each csrc/cuda/*.cpp (the torch glue) with g++ -fsyntax-only against the headers of the
#      installed torch plus the CUDA include directory. A CPU wheel of torch ships the c10/cuda
#      headers but not the generated c10/cuda/impl/cuda_cmake_macros.h, hence
#      -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE (that file only defines export macros).
#
# Environment: PYTHON (default: python) is the interpreter whose torch provides the headers;
# CUDA_HOME (default: /usr/local/cuda, else the directory above `nvcc` on PATH);
# QDARTS_CUDA_ARCHS (default "80 90") the SM versions to compile for.
# Exit status 0 when everything compiles; output names each file and the time it took.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
if [[ -z "${CUDA_HOME:-}" ]]; then
  # /usr/local/cuda first: an `nvcc` on PATH may be a wrapper script outside the toolkit.
  if [[ -x /usr/local/cuda/bin/nvcc ]] || ! command -v nvcc >/dev/null 2>&1; then
    CUDA_HOME=/usr/local/cuda
  else
    CUDA_HOME="$(cd "$(dirname "$(command -v nvcc)")/.." && pwd)"
  fi
fi
NVCC="$CUDA_HOME/bin/nvcc"
if [[ ! -x "$NVCC" ]]; then
  echo "compile_cuda.sh: nvcc not found at $NVCC (set CUDA_HOME)" >&2
  exit 2
fi

gencode=()
for arch in ${QDARTS_CUDA_ARCHS:-80 90}; do
  gencode+=(-gencode "arch=compute_${arch},code=sm_${arch}")
done

OBJ_DIR="$(mktemp -d)"
trap 'rm -rf "$OBJ_DIR"' EXIT

# The same switches as setup.py (nvcc list) and torch.utils.cpp_extension.COMMON_NVCC_FLAGS.
common_flags=(
  -std=c++20 --fmad=false -I "$ROOT/csrc" -DQDARTS_WITH_CUDA=1
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
  -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr --Werror all-warnings
)
nvcc_flags=("${common_flags[@]}" -O3 -lineinfo --compiler-options -fPIC --threads 0)
# The host tests run only host code: a light host optimisation and none for the unused device
# code keep their build short (about 3x faster than -O3).
host_test_flags=("${common_flags[@]}" -O1 -Xptxas -O0)

status=0
echo "nvcc: $("$NVCC" --version | tail -n 1)"
for src in "$ROOT"/csrc/cuda/*.cu; do
  name="$(basename "$src")"
  start=$SECONDS
  if "$NVCC" -c "$src" -o "$OBJ_DIR/${name%.cu}.o" "${gencode[@]}" "${nvcc_flags[@]}"; then
    echo "ok    nvcc $name ($((SECONDS - start)) s; archs ${QDARTS_CUDA_ARCHS:-80 90})"
  else
    echo "FAIL  nvcc $name" >&2
    status=1
  fi
done

# One shared library of all kernel objects: a symbol defined in two files fails here, as it would
# when setup.py links the extension.
if [[ $status -eq 0 ]]; then
  start=$SECONDS
  if "$NVCC" -shared -o "$OBJ_DIR/libqdarts_cuda_kernels.so" "$OBJ_DIR"/*.o "${gencode[@]}"; then
    echo "ok    nvcc -shared link of the kernel objects ($((SECONDS - start)) s)"
  else
    echo "FAIL  nvcc -shared link of the kernel objects" >&2
    status=1
  fi
fi

# Host-side tests of the kernels' per-thread code (tests/cuda/*_test.cu): built with nvcc, run on the CPU.
for src in "$ROOT"/tests/cuda/*_test.cu; do
  name="$(basename "$src")"
  start=$SECONDS
  if "$NVCC" "$src" -o "$OBJ_DIR/${name%.cu}" "${host_test_flags[@]}" && "$OBJ_DIR/${name%.cu}"; then
    echo "ok    host test $name ($((SECONDS - start)) s)"
  else
    echo "FAIL  host test $name" >&2
    status=1
  fi
done

# The launch emulation: the rewritten kernel files and the test built in parallel (the two
# largest take most of the time), with the host flags of the kernels' own build. The kernel
# files' CUDA pragmas mean nothing to g++, and its -Wmaybe-uninitialized misreads their
# first-iteration assignments (acc[j] = k == 0 ? term : ...), which nvcc's own -Werror build checks.
start=$SECONDS
emu_dir="$OBJ_DIR/launch_emulation"
emu_flags=(-std=c++20 -O1 -ffp-contract=off -Wall -Wextra -Werror -Wno-unknown-pragmas -Wno-maybe-uninitialized
           -include "$ROOT/tests/cuda/launch_emulation.h" -I "$ROOT/csrc" -isystem "$CUDA_HOME/include"
           -DQDARTS_WITH_CUDA=1 -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
           -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__)
emu_ok=0
if "$PYTHON" "$ROOT/tests/cuda/emulate_launches.py" "$ROOT/csrc/cuda" "$emu_dir"; then
  emu_ok=1
  emu_pids=()
  for src in "$emu_dir"/*.cpp "$ROOT/tests/cuda/launch_emulation_test.cpp" \
             "$ROOT/tests/cuda/quant_math_device_branch.cpp"; do
    "${CXX:-g++}" "${emu_flags[@]}" -c "$src" -o "$emu_dir/$(basename "${src%.cpp}").o" &
    emu_pids+=($!)
  done
  for pid in "${emu_pids[@]}"; do
    wait "$pid" || emu_ok=0
  done
fi
if [[ $emu_ok -eq 1 ]] && "${CXX:-g++}" -o "$emu_dir/launch_emulation_test" "$emu_dir"/*.o &&
  "$emu_dir/launch_emulation_test"; then
  echo "ok    launch emulation launch_emulation_test.cpp ($((SECONDS - start)) s)"
else
  echo "FAIL  launch emulation launch_emulation_test.cpp" >&2
  status=1
fi

torch_includes="$("$PYTHON" -c '
from torch.utils.cpp_extension import include_paths
import sysconfig
print("\n".join(include_paths() + [sysconfig.get_paths()["include"]]))
')"
cxx_flags=(-fsyntax-only -std=c++20 -Wall -Wextra -Werror -I "$ROOT/csrc" -isystem "$CUDA_HOME/include"
           -DQDARTS_WITH_CUDA=1 -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE)
while IFS= read -r dir; do
  cxx_flags+=(-isystem "$dir")
done <<<"$torch_includes"
for src in "$ROOT"/csrc/cuda/*.cpp; do
  name="$(basename "$src")"
  start=$SECONDS
  if "${CXX:-g++}" "${cxx_flags[@]}" "$src"; then
    echo "ok    ${CXX:-g++} -fsyntax-only $name ($((SECONDS - start)) s)"
  else
    echo "FAIL  ${CXX:-g++} -fsyntax-only $name" >&2
    status=1
  fi
done
exit $status
