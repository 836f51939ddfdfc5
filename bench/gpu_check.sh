#!/usr/bin/env bash
# The GPU check: build the extension with CUDA, run the tests on the GPU, benchmark, memcheck.
#
#   OUT=/path/to/output bash bench/gpu_check.sh
#
# Meant for a lent GPU machine (H100; torch with CUDA, triton, nvcc, ninja, pybind11, pytest and
# pytest-benchmark installed; no network), run from anywhere in a copy of the repository. Every
# step has its own time limit and a log under $OUT; a failing step is recorded and the next one
# still runs. The steps stay within GPU_CHECK_BUDGET_S seconds (default 540; the README section is
# generated after it, in seconds): a step gets at most the time that is left, and steps are skipped
# once it is spent, in the order below: the build, the probe of C++ errors (and a rebuild where it found a
# fix), the kernel figures, the tests on CUDA tensors, the search-step figures, the tile tuner, the memory
# profile and memcheck.
#
# A session's device time is 15 minutes, the machine's start and idle time included, and one command
# may run 600 s: so one command, GPU_CHECK_BUDGET_S=540, then, if the machine is still warm and the
# summary shows skipped steps, a second with GPU_CHECK_STEPS naming them (build again first: a no-op
# where the machine kept the first build). Measured on an H100 (2026-11-27): build 68 s, kernel
# benchmarks 72 s, the search-step part over 170 s (an eager-reference CIFAR-size step is 9 s of
# launches there). On an H200 (2026-11-28): build 83-88 s, kernel benchmarks 95 s, the search-step part
# over 200 s (cut there before the digits configuration), the tests on CUDA tensors over 210 s with 6
# processes (the Triton ones 75 s of them, compiling their kernels). Estimated: error probe 100 s, tuner
# 90 s (42 kernel variants), profile 60 s, memcheck 90 s.
#
# Results under $OUT:
#   summary.txt              one line per step: status, seconds, log file
#   nvidia-smi.txt, versions.txt
#   prebuilt.log, build.log, backends.log, errors.log, rebuild.log, tests.log, bench.log, e2e.log, tune.log,
#   profile.log, memcheck.log,
#   readme.log; cpp_error_probe.txt, cpp_error_fix.env (bench/cpp_error_probe.py)
#   bench/results.json, bench/report.md, bench/*.png    (qdarts bench --quick --device cuda, in two parts)
#   bench/readme-section.md                             (the README performance section)
#   tune/tune.json, tune/tune.md                        (python -m qdarts.benchmark.tune: Triton tiles)
#   gpu_check.tar.gz                                     (all of the above in one archive)
set -u -o pipefail

if [ -z "${OUT:-}" ]; then
    echo "set OUT to the output folder" >&2
    exit 2
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# the GPU machine's Python with torch is python3 (there is no plain python there)
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
BUDGET_S=${GPU_CHECK_BUDGET_S:-540}
SUMMARY="$OUT/summary.txt"
STARTED=$(date +%s)
FAILURES=0
: >"$SUMMARY"

# GPU_CHECK_STEPS: the steps to run, comma-separated (default: all), e.g. "build,tune,profile,memcheck" for
# a second command after a first one ran out of budget (the README section step always runs).
STEPS=${GPU_CHECK_STEPS:-all}

# budget_left: the seconds of GPU_CHECK_BUDGET_S not yet spent
budget_left() {
    echo $((BUDGET_S - ($(date +%s) - STARTED)))
}

# selected NAME: whether GPU_CHECK_STEPS asks for step NAME
selected() {
    [ "$STEPS" = all ] || [[ ",$STEPS," == *",$1,"* ]]
}

# step NAME LIMIT_S COMMAND...: run COMMAND with a time limit, output to $OUT/NAME.log; never aborts.
step() {
    local name=$1 limit=$2 left t0 rc status
    shift 2
    if ! selected "$name"; then
        printf '%-10s %-28s %5s  %s\n' "$name" "SKIPPED (not selected)" "0s" "-" | tee -a "$SUMMARY"
        return 0
    fi
    left=$(budget_left)
    if [ "$left" -lt 10 ]; then
        printf '%-10s %-28s %5s  %s\n' "$name" "SKIPPED (budget spent)" "0s" "-" | tee -a "$SUMMARY"
        FAILURES=$((FAILURES + 1))
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    if [ "$rc" -eq 0 ]; then
        status=ok
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        status="TIMEOUT (${limit}s)"
    else
        status="FAILED (exit $rc)"
    fi
    [ "$rc" -ne 0 ] && FAILURES=$((FAILURES + 1))
    printf '%-10s %-28s %4ss  %s\n' "$name" "$status" "$(($(date +%s) - t0))" "$name.log" | tee -a "$SUMMARY"
    return 0
}

versions() {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "git: $(git rev-parse HEAD 2>/dev/null || echo 'not a git checkout')"
    "$PYTHON" -c 'import sys, torch; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda); print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")'
    "$PYTHON" -c 'import triton; print("triton", triton.__version__)' || true
    command -v nvcc >/dev/null && nvcc --version | tail -n 2
    gcc --version | head -n 1
}

nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed" >>"$OUT/nvidia-smi.txt"
versions >"$OUT/versions.txt" 2>&1

# CUDA kernels for the H100 only (sm_90): the quickest build that exercises them here. A _C carried onto
# the machine ready-built is used as it is when `python -m qdarts_kernels --check-gpu-build` finds it current:
# built against this torch, from the sources of this copy, with machine code for this GPU (its build
# record; the extension uses only Python's stable ABI, so it may come from another Python). That saves the
# build's 83-88 s of device time; see the README's Status for the command that makes one on a CPU machine.
# The check's report, and why it refused a carried _C, are in prebuilt.log.
T0=$(date +%s)
if selected build && [ "$(budget_left)" -ge 70 ] &&
    timeout 60 "$PYTHON" -m qdarts_kernels --check-gpu-build >"$OUT/prebuilt.log" 2>&1; then
    printf '%-10s %-28s %4ss  %s\n' build "ok (prebuilt _C, current)" "$(($(date +%s) - T0))" prebuilt.log |
        tee -a "$SUMMARY"
else
    step build 150 env MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 "$PYTHON" setup.py build_ext --inplace
fi
# the environment report (python -m qdarts_kernels): versions, the extension's build record, each backend or why
# it cannot run, the GPU and whether the extension holds machine code for it; both GPU backends must run
step backends 60 "$PYTHON" -c 'import qdarts_kernels as qk
from qdarts_kernels import collect_env
print(collect_env.render(collect_env.collect()))
assert {"cuda", "triton"} <= set(qk.available_backends()), qk.available_backends()'
# Whether a refusal of bad input inside the extension reaches Python as a RuntimeError: on the H200 of
# 2026-11-28 each one crashed the process instead (see the script); the toolchain, the refusals under
# gdb, and a one-op extension built with and without setup.py's flags.
step errors 180 "$PYTHON" bench/cpp_error_probe.py "$OUT"
# Where _C's refusals crashed and a one-op extension built with another environment raised (the probe wrote
# it to cpp_error_fix.env, one VAR=value a line), _C is rebuilt with it, so that the tests say whether it fixes.
if [ -s "$OUT/cpp_error_fix.env" ]; then
    mapfile -t FIX_ENV <"$OUT/cpp_error_fix.env"
    step rebuild 150 env "${FIX_ENV[@]}" MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 "$PYTHON" setup.py build_ext --inplace
fi
# The kernel figures before the tests (about 95 s on the H200): they are what the bandwidth targets need.
step bench 120 "$PYTHON" -m qdarts.benchmark --quick --device cuda --skip-end-to-end --out "$OUT/bench"
# The tests that run on CUDA tensors: every backend against the reference (cuda and triton on the GPU),
# the Triton-only kernels, CUDA graphs, no host sync in a step. The rest of the suite is CPU work that CI
# runs (and tests/test_cuda_sources.py, nvcc compiling every .cu for sm_80/sm_90, CI does too), so the
# CPU backends' cases are deselected as well. Spread over 12 processes when pytest-xdist is there (the
# GPU machine has 16 cores). Up to 25 failures are listed rather than stopping at the first: a rerun
# costs device time. Verbose: each result is logged as it comes, so a run cut by its limit still names its failures.
GPU_TESTS=(tests/test_nn.py::test_no_host_sync_on_cuda_training_step
           tests/test_nn.py::test_chained_quant_convs_on_the_gpu_equal_the_two_calls
           tests/test_search_speed.py::test_no_device_sync_in_a_search_step_on_the_gpu
           tests/test_search_ops.py::test_the_networks_backend_reaches_every_layer)
for name in backends bad_input batch_norm cuda_backend cudagraph depthwise_conv functorch grouped ops properties \
            search_backends triton_kernels; do
    GPU_TESTS+=("tests/test_$name.py")
done
XDIST=()
"$PYTHON" -c 'import xdist' >/dev/null 2>&1 && XDIST=(-n 12)
step tests 300 "$PYTHON" -m pytest "${GPU_TESTS[@]}" -m "not slow" \
    -k "not reference-cpu and not cpu-cpu" "${XDIST[@]}" --maxfail=25 -v -rfE -p no:cacheprovider
# The search step after the tests (issue 6's fused-against-eager CIFAR step, issue 9's batch 64/256 x bits
# matrix), appending to the kernel figures' results: it keeps what it measured if cut short.
step e2e 240 "$PYTHON" -m qdarts.benchmark --quick --device cuda --skip-kernels --append --cuda-graph-end-to-end \
    --out "$OUT/bench"
# the Triton kernels' candidate tiles at the issue-3 sizes (the measured table tile_size is to take);
# tune.json is written after each kernel and size, so a run cut short keeps what it measured
step tune 90 "$PYTHON" -m qdarts.benchmark.tune --device cuda --out "$OUT/tune"
# where the fused CIFAR-size step's time goes (host against GPU busy time, ops by time) and what its peak
# memory holds beyond what autograd keeps, at batch 64 (issue 6's peak-memory ratio)
step profile 60 "$PYTHON" -m qdarts.benchmark.profile --device cuda --config cifar --memory
# last, with what is left of the budget: compute-sanitizer over the CUDA and Triton kernels
SANITIZER=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
if [ -x "$SANITIZER" ]; then
    step memcheck 90 "$SANITIZER" --tool memcheck --error-exitcode 1 --leak-check no "$PYTHON" bench/cuda_memcheck_run.py
else
    echo "memcheck   SKIPPED (compute-sanitizer not found)" | tee -a "$SUMMARY"
fi
# outside the budget (seconds), and also from partial results should the benchmark have been stopped
if [ ! -f "$OUT/bench/results.json" ]; then
    echo "readme     SKIPPED (no bench/results.json)" | tee -a "$SUMMARY"
elif ! timeout 30 "$PYTHON" -m qdarts.benchmark.readme "$OUT/bench/results.json" \
    >"$OUT/bench/readme-section.md" 2>"$OUT/readme.log"; then
    echo "readme     FAILED (see readme.log)" | tee -a "$SUMMARY"
    FAILURES=$((FAILURES + 1))
fi

echo "total $(($(date +%s) - STARTED))s, $FAILURES step(s) not ok" | tee -a "$SUMMARY"
# everything above in one file too, for machines that hand back only a few files
ARCHIVE=$(mktemp)
tar czf "$ARCHIVE" -C "$OUT" --exclude=gpu_check.tar.gz . && mv "$ARCHIVE" "$OUT/gpu_check.tar.gz"
[ "$FAILURES" -eq 0 ]
