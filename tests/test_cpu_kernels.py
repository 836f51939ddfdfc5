"""Tests specific to the C++ CPU kernels (csrc/cpu/): their tiling, determinism across thread
counts, 64-bit indexing, and the argument checks of the raw ``torch.ops.qdarts_C`` ops.

The backend matrix in test_backends.py compares every backend with the reference on small shapes;
the shapes here are chosen to cross the CPU kernels' internal boundaries (several tiles, rows split
into pieces, runs that cross channels, channel windows, merged rows; see
csrc/cpu/mixed_fake_quant.cpp), where an off-by-one in the tiling would show.
"""

import math
import os
import re
import subprocess
import sys

import pytest
import torch

import qdarts_kernels as qk
from qdarts_kernels import reference as ref
from qdarts_kernels._validation import GRIDS, grid_params
from qdarts_kernels.cpu_kernels import MAX_CACHE_MB

if "cpu" not in qk.available_backends():
    pytestmark = pytest.mark.skip(reason="qdarts_kernels._C (the C++ CPU kernels) is not built")

BITS = (2, 4, 8)


def _inputs(shape, axis, seed, dtype=torch.float32, bits=BITS):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 2).to(dtype)
    k = len(bits)
    probs = torch.softmax(torch.randn(k, generator=gen), 0)
    c = 1 if axis is None else shape[axis]
    base = torch.tensor([0.5, 0.1, 0.01, 0.003][:k]).reshape(k, 1)
    scales = base * (0.5 + torch.rand(k, c, generator=gen))
    scales = scales.reshape(k) if axis is None else scales
    grad = torch.randn(shape, generator=gen).to(dtype)
    return x, probs, scales, grad


def _run(backend, x, probs, scales, grad, axis, bits=BITS, grid="signed"):
    xl, pl, sl = (t.clone().requires_grad_() for t in (x, probs, scales))
    fn = ref.mixed_fake_quant if backend == "reference" else qk.mixed_fake_quant
    kwargs = {} if backend == "reference" else {"backend": backend}
    y = fn(xl, pl, sl, bits, grid=grid, axis=axis, **kwargs)
    y.backward(grad)
    return y.detach(), xl.grad, pl.grad, sl.grad


# shape, axis: per tensor over several tiles; a row longer than a tile (split into pieces); rows of
# one channel spanning runs with a tail; blocks of merged rows (outer not a multiple of the merge);
# whole-row blocks longer than a run; channel windows (C * inner > kMaxBlock) with a narrower last
# window; inner between 1 and the span threshold; outputs of at least 2 MiB, written in place with
# non-temporal stores (kStreamingStoreBytes, csrc/cpu/cpu_common.h) but for runs that are not whole
# lane groups (a tail, short channel rows), which go through the staging buffer.
TILING_CASES = [
    ((70001,), None),
    ((3, 40000), 0),
    ((2, 16, 1030), 1),
    ((5003, 7), 1),
    ((900, 300), 1),
    ((70, 700, 2), 1),
    ((40, 70, 3), 1),
    ((64, 33, 15), 1),
    ((524301,), None),
    ((2, 7, 37451), 1),
]


@pytest.mark.parametrize("grid", ["signed", "relu"])  # the relu grid has kernels of its own (kRelu)
@pytest.mark.parametrize("shape,axis", TILING_CASES, ids=str)
def test_tiling_matches_reference(shape, axis, grid):
    x, probs, scales, grad = _inputs(shape, axis, seed=len(shape) * 1000 + shape[-1])
    y, dx, dp, ds = _run("cpu", x, probs, scales, grad, axis, grid=grid)
    yr, dxr, dpr, dsr = _run("reference", x, probs, scales, grad, axis, grid=grid)
    torch.testing.assert_close(y, yr, rtol=0, atol=0)
    torch.testing.assert_close(dx, dxr, rtol=1e-6, atol=1e-6)
    tol = 2e-5
    atol = tol * math.sqrt(x.numel())
    torch.testing.assert_close(dp, dpr, rtol=tol, atol=atol)
    torch.testing.assert_close(ds, dsr, rtol=tol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape,axis", [((70001,), None), ((900, 300), 1)], ids=str)
def test_tiling_reduced_precision(shape, axis, dtype):
    """Staging through fp32 buffers: the forward is still exact, the output keeps x's dtype."""
    x, probs, scales, grad = _inputs(shape, axis, seed=5, dtype=dtype)
    y, dx, dp, ds = _run("cpu", x, probs, scales, grad, axis)
    yr, dxr, dpr, dsr = _run("reference", x, probs, scales, grad, axis)
    assert y.dtype == dtype and dx.dtype == dtype
    torch.testing.assert_close(y, yr, rtol=0, atol=0)
    torch.testing.assert_close(dx, dxr, rtol=1e-2, atol=1e-2)
    atol = 2e-5 * math.sqrt(x.numel())
    torch.testing.assert_close(dp, dpr, rtol=2e-5, atol=atol)
    torch.testing.assert_close(ds, dsr, rtol=2e-5, atol=atol)


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# large enough for 5 threads: a thread gets at least 2^16 elements (kMinElementsPerThread)
@pytest.mark.parametrize("shape,axis", [((400003,), None), ((3, 130000), 0), ((50003, 7), 1), ((300, 700, 2), 1)],
                         ids=str)
def test_same_bits_for_any_thread_count(shape, axis, restore_threads):
    x, probs, scales, grad = _inputs(shape, axis, seed=17)
    results = []
    for threads in (1, 2, 3, 5):
        torch.set_num_threads(threads)
        results.append(_run("cpu", x, probs, scales, grad, axis))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_mixed_op_sum_same_bits_for_any_thread_count(restore_threads):
    gen = torch.Generator().manual_seed(3)
    outs = [torch.randn(400003, generator=gen) for _ in range(5)]  # 7 tiles of 2^16 elements
    w = torch.softmax(torch.randn(5, generator=gen), 0)
    g = torch.randn(400003, generator=gen)
    results = []
    for threads in (1, 2, 3, 5):
        torch.set_num_threads(threads)
        ol = [o.clone().requires_grad_() for o in outs]
        wl = w.clone().requires_grad_()
        y = qk.mixed_op_sum(ol, wl, backend="cpu")
        y.backward(g)
        results.append([y.detach(), wl.grad] + [o.grad for o in ol])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# many tiles with a ragged last one; outputs of >= 2 MiB, written with non-temporal stores
# (kStreamingStoreBytes, csrc/cpu/cpu_common.h) in place but for the staged tail
@pytest.mark.parametrize("shape,k", [((3, 50001), 8), ((524301,), 3)], ids=str)
def test_mixed_op_sum_many_tiles_matches_reference(shape, k):
    gen = torch.Generator().manual_seed(4)
    outs = [torch.randn(shape, generator=gen) for _ in range(k)]
    w = torch.softmax(torch.randn(k, generator=gen), 0)
    g = torch.randn(shape, generator=gen)
    results = []
    for fn, kwargs in ((qk.mixed_op_sum, {"backend": "cpu"}), (ref.mixed_op_sum, {})):
        ol = [o.clone().requires_grad_() for o in outs]
        wl = w.clone().requires_grad_()
        y = fn(ol, wl, **kwargs)
        y.backward(g)
        results.append((y.detach(), wl.grad, [o.grad for o in ol]))
    (y, dw, douts), (yr, dwr, doutsr) = results
    assert torch.equal(y, yr)
    for a, b in zip(douts, doutsr):
        assert torch.equal(a, b)
    torch.testing.assert_close(dw, dwr, rtol=2e-5, atol=2e-5 * math.sqrt(y.numel()))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OpenMP is built in on Linux only")
def test_kernels_run_on_every_thread(restore_threads):
    """at::parallel_for is compiled into the extension: without OpenMP flags it runs on one thread
    without a word (setup.py)."""
    torch.set_num_threads(2)
    assert qk.cpu_kernels.info()["threads"] == 2



@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="an ELF check (Linux builds)")
def test_extension_unwinds_with_the_shared_libgcc():
    """Every refusal (TORCH_CHECK) unwinds _C's frames from libc10's throw to torch's catch: _C must
    use the process's one unwinder, libgcc_s, never a private static copy (setup.py links with
    -shared-libgcc). A private copy shows as defined _Unwind_* symbols in _C's symbol table."""
    import importlib.util
    import shutil

    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf (binutils) is not installed")
    library = importlib.util.find_spec("qdarts_kernels._C").origin
    symbols = subprocess.run([readelf, "-sW", library], capture_output=True, text=True, check=True).stdout
    unwinder = [line.split() for line in symbols.splitlines() if re.search(r"\s_Unwind_\w+", line)]
    assert unwinder, "no _Unwind_ reference at all: is the C++ code built with exceptions?"
    defined = sorted({fields[7] for fields in unwinder if fields[6] != "UND"})
    assert not defined, f"_C holds its own unwinder: {defined}"
    needed = subprocess.run([readelf, "-dW", library], capture_output=True, text=True, check=True).stdout
    assert "libgcc_s.so" in needed


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="an ELF check (Linux builds)")
def test_extension_is_built_against_the_stable_python_abi():
    """setup.py builds _C with py_limited_api: one build loads on every Python from 3.10 on. That holds
    only while it takes nothing from libtorch_python or libpython, and of CPython's API only what it
    needs to create its empty module (PyModule_Create2, part of the stable ABI)."""
    import importlib.util
    import shutil

    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf (binutils) is not installed")
    library = importlib.util.find_spec("qdarts_kernels._C").origin
    assert library.endswith(".abi3.so"), library
    needed = subprocess.run([readelf, "-dW", library], capture_output=True, text=True, check=True).stdout
    assert "libtorch_python" not in needed and "libpython" not in needed, needed
    symbols = subprocess.run([readelf, "--dyn-syms", "-W", library], capture_output=True, text=True, check=True)
    python_api = {fields[7] for fields in map(str.split, symbols.stdout.splitlines())
                  if len(fields) >= 8 and fields[6] == "UND" and re.match(r"_?Py", fields[7])}
    assert python_api == {"PyModule_Create2"}, python_api

# The child computes every result below with the instruction set capped by QDARTS_CPU_ISA and
# saves them; the parent compares the bits.
_ISA_CHILD = r"""
import sys, torch
import qdarts_kernels as qk
sys.path.insert(0, sys.argv[2])
from test_cpu_kernels import _inputs, _run, TILING_CASES
results = []
for (shape, axis) in TILING_CASES:
    for dtype in (torch.float32, torch.bfloat16):
        results.append(_run("cpu", *_inputs(shape, axis, seed=7, dtype=dtype), axis))
    results.append(_run("cpu", *_inputs(shape, axis, seed=8), axis, grid="relu"))
gen = torch.Generator().manual_seed(9)
outs = [torch.randn(70001, generator=gen).requires_grad_() for _ in range(3)]
w = torch.softmax(torch.randn(3, generator=gen), 0).requires_grad_()
y = qk.mixed_op_sum(outs, w, backend="cpu")
y.backward(torch.randn(70001, generator=gen))
results.append([y.detach(), w.grad] + [o.grad for o in outs])
for stride, padding, dilation in (([1, 1], [2, 2], [2, 2]), ([2, 1], [1, 0], [1, 1])):  # padded-plane and row paths
    x, wd = torch.randn(3, 5, 19, 23, generator=gen), torch.randn(5, 1, 3, 3, generator=gen)
    xb = torch.randn(17, 5, 7, 9, generator=gen)  # the pools by plane blocks (85 planes: a block and a part)
    yb = torch.ops.qdarts_C.max_pool2d_forward(xb, [3, 3], stride, [1, 1], dilation)
    results.append([yb, torch.ops.qdarts_C.max_pool2d_backward(torch.randn(yb.shape, generator=gen), xb, [3, 3], stride,
                                                                [1, 1], dilation)])
    yb = torch.ops.qdarts_C.avg_pool2d_forward(xb, [3, 3], stride, [1, 1], True)
    results.append([yb, torch.ops.qdarts_C.avg_pool2d_backward(torch.randn(yb.shape, generator=gen), list(xb.shape),
                                                                [3, 3], stride, [1, 1], True)])
    yd = torch.ops.qdarts_C.depthwise_conv2d_forward(x, wd, stride, padding, dilation)
    grads = torch.ops.qdarts_C.depthwise_conv2d_backward(torch.randn(yd.shape, generator=gen), x, wd, stride, padding,
                                                         dilation, True, True)
    results.append([yd, *grads])
    yp = torch.ops.qdarts_C.max_pool2d_forward(x, [3, 3], stride, [1, 1], [1, 1])
    results.append([yp, torch.ops.qdarts_C.max_pool2d_backward(torch.randn(yp.shape, generator=gen), x, [3, 3], stride,
                                                                [1, 1], [1, 1])])
    ya = torch.ops.qdarts_C.avg_pool2d_forward(x, [3, 3], stride, [1, 1], False)
    results.append([ya, torch.ops.qdarts_C.avg_pool2d_backward(torch.randn(ya.shape, generator=gen), list(x.shape),
                                                                [3, 3], stride, [1, 1], False)])
for shape in ((3, 5, 19, 23), (4, 3, 300)):  # planes of whole lane groups or not, of one run or two
    x = torch.randn(shape, generator=gen) * 3 + 1
    running = [torch.zeros(shape[1]), torch.ones(shape[1])]
    yb, invstd = torch.ops.qdarts_C.batch_norm_train_forward(x, *running, 0.1, 1e-5)
    results.append([yb, invstd, *running,
                    torch.ops.qdarts_C.batch_norm_train_backward(torch.randn(shape, generator=gen), yb, invstd)])
torch.save({"isa": qk.cpu_kernels.info()["isa"], "results": results}, sys.argv[1])
"""


@pytest.mark.slow  # subprocesses, one per instruction set (bench/gpu_check.sh skips slow tests)
def test_same_bits_on_every_instruction_set(tmp_path):
    """Every instruction set the CPU has gives the same bits: the reductions sum in fixed lanes
    whatever the vector width (csrc/cpu/simd.h)."""
    native = qk.cpu_kernels.info()["isa"]
    levels = ["baseline", "avx2", "avx512"]
    if native not in levels:
        pytest.skip(f"the x86 instruction sets only (this CPU runs {native})")
    runs = {}
    for level in levels[: levels.index(native) + 1]:
        out = tmp_path / f"{level}.pt"
        env = {**os.environ, "QDARTS_CPU_ISA": level}
        done = subprocess.run([sys.executable, "-c", _ISA_CHILD, str(out), os.path.dirname(__file__)], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[level] = torch.load(out)
        assert runs[level]["isa"] == level
    for level, run in runs.items():
        for got, want in zip(run["results"], runs[native]["results"]):
            for a, b in zip(got, want):
                assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8)), level


_LANE_ORDER_CHILD = r"""
import torch, qdarts_kernels as qk
o = torch.zeros(16)
o[1], o[2], o[8] = 2.0**60, -(2.0**60), 1.0  # lane 8's 1 survives only if lanes 1 and 2 cancel first
ol, w = o.clone().requires_grad_(), torch.ones(1, requires_grad=True)
qk.mixed_op_sum([ol], w, backend="cpu").backward(torch.ones(16))
print(qk.cpu_kernels.info()["isa"], w.grad.item())
"""


@pytest.mark.slow  # subprocesses, one per instruction set
def test_lane_sums_add_in_position_order_on_every_instruction_set():
    """Position j's term goes to lane j mod 16 and the lanes are added in order (csrc/cpu/simd.h) on
    every vector width: terms that cancel only in that order give the same sum everywhere."""
    native = qk.cpu_kernels.info()["isa"]
    levels = ["baseline", "avx2", "avx512"]
    if native not in levels:
        pytest.skip(f"the x86 instruction sets only (this CPU runs {native})")
    for level in levels[: levels.index(native) + 1]:
        done = subprocess.run([sys.executable, "-c", _LANE_ORDER_CHILD], env={**os.environ, "QDARTS_CPU_ISA": level},
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.split() == [level, "1.0"]


@pytest.mark.slow  # subprocesses
def test_bad_isa_switch_is_refused_and_an_empty_one_is_unset():
    code = "import torch, qdarts_kernels as qk; qk.mixed_fake_quant(torch.ones(3), torch.ones(1), torch.ones(1), (4,))"
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "QDARTS_CPU_ISA": "sse9"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "QDARTS_CPU_ISA must be avx512, avx2 or baseline, got 'sse9'" in done.stderr
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "QDARTS_CPU_ISA": ""},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_output_cache_reuses_freed_outputs():
    qk.cpu_kernels.empty_cache()
    x = torch.randn(1 << 20)
    before = qk.cpu_kernels.info()["cache"]
    y = qk.mixed_fake_quant(x, torch.ones(1), torch.ones(1), (4,), backend="cpu")
    ptr = y.data_ptr()
    del y
    assert qk.cpu_kernels.info()["cache"]["cached_bytes"] >= x.nbytes
    y = qk.mixed_fake_quant(x, torch.ones(1), torch.ones(1), (4,), backend="cpu")
    after = qk.cpu_kernels.info()["cache"]
    assert y.data_ptr() == ptr and after["hits"] == before["hits"] + 1
    assert after["in_use_bytes"] == before["in_use_bytes"] + x.nbytes
    assert torch.equal(y, ref.mixed_fake_quant(x, torch.ones(1), torch.ones(1), (4,)))
    # a cached buffer is an ordinary tensor storage: writable, resizable, freed with the tensor
    y.resize_(3 << 20).fill_(1.0)
    assert y.sum().item() == 3 << 20
    del y
    qk.cpu_kernels.empty_cache()
    assert qk.cpu_kernels.info()["cache"]["cached_bytes"] == 0
    # small outputs do not go through the cache
    qk.mixed_fake_quant(torch.randn(1000), torch.ones(1), torch.ones(1), (4,), backend="cpu")
    assert qk.cpu_kernels.info()["cache"]["cached_bytes"] == 0


def test_output_cache_hit_takes_the_buffer_out_of_the_cached_bytes():
    qk.cpu_kernels.empty_cache()
    x = torch.randn(1 << 20)
    y = qk.mixed_fake_quant(x, torch.ones(1), torch.ones(1), (4,), backend="cpu")
    del y
    assert qk.cpu_kernels.info()["cache"]["cached_bytes"] == x.nbytes
    y = qk.mixed_fake_quant(x, torch.ones(1), torch.ones(1), (4,), backend="cpu")  # a hit: nothing left cached
    assert qk.cpu_kernels.info()["cache"]["cached_bytes"] == 0
    del y
    assert qk.cpu_kernels.info()["cache"]["cached_bytes"] == x.nbytes
    qk.cpu_kernels.empty_cache()


def test_profiler_memory_view_counts_cached_outputs():
    # cache hit and miss alike: the profiler sees what PyTorch's own allocator would report
    x = torch.randn(1 << 20)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(2):
            y = qk.mixed_op_sum([x, x], torch.ones(2), backend="cpu")
            del y
    sizes = [e.cpu_memory_usage for e in prof.events() if e.name == "[memory]" or "mixed_op_sum_forward" in e.name]
    assert sizes.count(x.nbytes) == 2 and sizes.count(-x.nbytes) == 2, sizes


_CACHE_CHILD = r"""
import torch, qdarts_kernels as qk
x = torch.randn(1 << 20)
for _ in range(3):
    qk.mixed_fake_quant(x, torch.ones(1), torch.ones(1), (4,), backend="cpu")
print(qk.cpu_kernels.info()["cache"])
"""


@pytest.mark.slow  # a subprocess each
@pytest.mark.parametrize("value,expect", [
    ("0", "'hits': 0"),
    ("lots", "QDARTS_CPU_CACHE_MB must be a whole number"),
    # the most MiB whose bytes an int64 holds; one more wrapped round to a negative limit (the cache off),
    # and a number past long long's range read as its maximum, also wrapped round
    (str(MAX_CACHE_MB), f"'limit_bytes': {MAX_CACHE_MB << 20}"),
    (str(MAX_CACHE_MB + 1), f"QDARTS_CPU_CACHE_MB must be a whole number of MiB in [0, {MAX_CACHE_MB}]"),
    ("18446744073709551615", f"QDARTS_CPU_CACHE_MB must be a whole number of MiB in [0, {MAX_CACHE_MB}]"),
])
def test_output_cache_switch(value, expect):
    """The kernels' own reading of the variable (check_environment, the CLI's early check, is not called
    here)."""
    env = {**os.environ, "QDARTS_CPU_CACHE_MB": value}
    done = subprocess.run([sys.executable, "-c", _CACHE_CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert expect in done.stdout + done.stderr, done.stdout + done.stderr
    if value == "0":
        assert "'cached_bytes': 0" in done.stdout


def test_rounding_matches_torch_round_over_the_16_bit_range():
    """The kernels round with an add-and-subtract-2^23 trick (csrc/quant_math.h); it must equal
    torch.round everywhere a 16-bit grid can see, ties and the sign of zero included."""
    n = torch.arange(-(2**15), 2**15, dtype=torch.float32)
    x = torch.cat([n, n + 0.5, n + 0.25, n + 0.75, torch.tensor([-0.0, -0.3, -0.5, 0.3, 0.5])])
    for grid, z in (("signed", 0.0), ("midrise", 0.5)):
        y = qk.mixed_fake_quant(x, torch.ones(1), torch.ones(1), (16,), grid=grid, backend="cpu")
        yr = ref.mixed_fake_quant(x, torch.ones(1), torch.ones(1), (16,), grid=grid)
        assert torch.equal(y, yr)
        assert torch.equal(torch.signbit(y), torch.signbit(yr))


@pytest.mark.parametrize("grid", ["signed", "unsigned", "midrise", "relu"])
def test_gradient_mask_at_the_clip_ties(grid):
    """in = (qmin <= round(v) <= qmax) at v = qmin - 0.5 and qmax + 0.5, where the tie rounds to even
    (in_range_bounds, csrc/quant_math.h): inside exactly when the bound is even; and just inside them."""
    for bits in (1, 2, 3, 4, 5, 8):
        qmin, qmax, z = grid_params(GRIDS[grid], bits)
        v = torch.tensor([qmin - 0.5, qmax + 0.5], dtype=torch.float32)
        v = torch.cat([v, torch.nextafter(v, torch.zeros(2) + (qmin + qmax) / 2)])
        x = (v - z).requires_grad_()
        xr = x.detach().clone().requires_grad_()
        qk.mixed_fake_quant(x, torch.ones(1), torch.ones(1), (bits,), grid=grid, backend="cpu").sum().backward()
        ref.mixed_fake_quant(xr, torch.ones(1), torch.ones(1), (bits,), grid=grid).sum().backward()
        assert torch.equal(x.grad, xr.grad), (bits, v, x.grad, xr.grad)


def test_relu_grid_keeps_nan_and_signed_zero():
    """The relu grid quantizes torch.relu(x), which keeps NaN (and -0.0): NaN in, NaN out, as the
    reference, in the span path and in the table path."""
    special = torch.tensor([float("nan"), -0.0, 0.0, -1.0, 1.3, float("inf"), -float("inf"), 0.2])
    for shape, axis, scales in (((40,), None, torch.tensor([0.1, 0.3])), ((5, 8), 1, torch.full((2, 8), 0.1))):
        x = special.repeat(5)[: math.prod(shape)].reshape(shape)
        y = qk.mixed_fake_quant(x, torch.tensor([0.25, 0.75]), scales, (2, 4), grid="relu", axis=axis, backend="cpu")
        yr = ref.mixed_fake_quant(x, torch.tensor([0.25, 0.75]), scales, (2, 4), grid="relu", axis=axis)
        torch.testing.assert_close(y, yr, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(torch.signbit(y), torch.signbit(yr)) and y.isnan().sum() == 5


# --------------------------------------------------------------------------------------------------
# direct calls of the raw ops: their own argument checks
# --------------------------------------------------------------------------------------------------

_ops = torch.ops.qdarts_C if "cpu" in qk.available_backends() else None


def _fq_args(**change):
    args = dict(x=torch.randn(4, 5), probs=torch.tensor([0.5, 0.5]), scales=torch.tensor([0.1, 0.2]),
                bits=[2, 4], grid=0, axis=-1)
    args.update(change)
    return args


def _fq_forward(a):
    return _ops.mixed_fake_quant_forward(a["x"], a["probs"], a["scales"], a["bits"], a["grid"], a["axis"])


BAD_FAKE_QUANT = [
    (dict(x=torch.randn(4, 5, dtype=torch.float64)), "x must be float32, float16 or bfloat16"),
    (dict(x=torch.ones(4, 5, dtype=torch.int32)), "x must be float32, float16 or bfloat16"),
    (dict(probs=torch.tensor([0.5, 0.5], dtype=torch.float64)), "probs must be float32"),
    (dict(scales=torch.tensor([0.1, 0.2], dtype=torch.float16)), "scales must be float32"),
    (dict(probs=torch.tensor([1.0])), "probs must have shape [2]"),
    (dict(scales=torch.tensor([0.1, 0.2, 0.3])), "scales must have shape [2]"),
    (dict(axis=1), "scales must have shape [2, 5]"),
    (dict(axis=2), "axis must be -1 (per tensor) or a dimension of x in [0, 2)"),
    (dict(axis=-2), "axis must be -1 (per tensor) or a dimension of x in [0, 2)"),
    (dict(bits=[]), "bits must hold 1..4 bit-widths, got 0"),
    (dict(bits=[2, 2, 2, 2, 2], probs=torch.ones(5) / 5, scales=torch.ones(5)), "bits must hold 1..4"),
    (dict(bits=[0, 4]), "bits must be in [1, 16], got bits[0] = 0"),
    (dict(bits=[2, 17]), "bits must be in [1, 16], got bits[1] = 17"),
    (dict(grid=4), "grid must be 0 (signed), 1 (unsigned), 2 (midrise) or 3 (relu), got 4"),
    (dict(scales=torch.tensor([0.1, 0.0])), "scales must be finite and >= 2**-126, got scales[1] = 0"),
    (dict(scales=torch.tensor([float("nan"), 0.2])), "scales must be finite and >= 2**-126, got scales[0] = nan"),
    (dict(scales=torch.tensor([0.1, 1e-40])), "scales must be finite and >= 2**-126, got scales[1] = 9.99995e-41"),
    (dict(scales=torch.tensor([[0.1] * 5, [0.2] * 4 + [-1.0]]), axis=1),
     "scales must be finite and >= 2**-126, got scales[1, 4] = -1"),
]


@pytest.mark.parametrize("change,message", BAD_FAKE_QUANT, ids=lambda v: v if isinstance(v, str) else None)
def test_raw_mixed_fake_quant_rejects_bad_arguments(change, message):
    a = _fq_args(**change)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        _fq_forward(a)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        _ops.mixed_fake_quant_backward(torch.ones_like(a["x"]) if a["x"].is_floating_point() else a["x"],
                                       a["x"], a["probs"], a["scales"], a["bits"], a["grid"], a["axis"],
                                       True, True, True)


@pytest.mark.parametrize(
    "grad,message",
    [(torch.ones(4, 4), "grad has shape [4, 4] but x has [4, 5]"),
     (torch.ones(4, 5, dtype=torch.bfloat16), "grad has dtype BFloat16 but x has Float")],
    ids=["shape", "dtype"],
)
def test_raw_mixed_fake_quant_backward_rejects_bad_grad(grad, message):
    a = _fq_args()
    with pytest.raises(RuntimeError, match=re.escape(message)):
        _ops.mixed_fake_quant_backward(grad, a["x"], a["probs"], a["scales"], a["bits"], 0, -1, True, True, True)


def test_raw_mixed_fake_quant_backward_returns_empty_for_unneeded():
    a = _fq_args()
    dx, dp, ds = _ops.mixed_fake_quant_backward(torch.ones(4, 5), a["x"], a["probs"], a["scales"], a["bits"], 0,
                                                -1, False, True, False)
    assert dx.numel() == 0 and ds.numel() == 0
    assert dp.shape == (2,) and dp.dtype == torch.float32


BAD_OP_SUM = [
    (lambda: ([], torch.ones(0)), "outputs must hold at least one tensor"),
    (lambda: ([torch.ones(3), torch.ones(4)], torch.ones(2)), "outputs[1] has shape [4] but outputs[0] has [3]"),
    (lambda: ([torch.ones(3), torch.ones(3, dtype=torch.float16)], torch.ones(2)),
     "outputs[1] has dtype Half but outputs[0] has Float"),
    (lambda: ([torch.ones(3, dtype=torch.float64)], torch.ones(1)), "outputs[0] must be float32, float16 or bfloat16"),
    (lambda: ([torch.ones(3), torch.ones(3)], torch.ones(3)), "weights must have shape [2] (one per output)"),
    (lambda: ([torch.ones(3)], torch.ones(1, dtype=torch.float64)), "weights must be float32"),
]


@pytest.mark.parametrize("make,message", BAD_OP_SUM, ids=lambda v: v if isinstance(v, str) else None)
def test_raw_mixed_op_sum_rejects_bad_arguments(make, message):
    outputs, weights = make()
    with pytest.raises(RuntimeError, match=re.escape(message)):
        _ops.mixed_op_sum_forward(outputs, weights)
    grad = torch.ones_like(outputs[0]) if outputs else torch.ones(3)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        _ops.mixed_op_sum_backward(grad, outputs, weights, True, True)


def test_raw_mixed_op_sum_backward_rejects_bad_grad():
    with pytest.raises(RuntimeError, match=re.escape("grad has shape [4] but outputs[0] has [3]")):
        _ops.mixed_op_sum_backward(torch.ones(4), [torch.ones(3)], torch.ones(1), True, True)


# --------------------------------------------------------------------------------------------------
# 64-bit indexing
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("QDARTS_TEST_LARGE") != "1",
                    reason="allocates ~9 GB; set QDARTS_TEST_LARGE=1 to run")
@pytest.mark.parametrize("axis", [None, 1], ids=["per-tensor", "per-channel"])
def test_more_than_2_to_the_31_elements(axis):
    """A bf16 tensor of more than 2^31 elements: the elements past 2^31 are quantized with the right
    channel's scale and their gradient lands in the right place (int32 offsets would wrap)."""
    channels, inner = 3, 4096
    outer = 2**31 // (channels * inner) + 2
    x = torch.zeros(outer, channels, inner, dtype=torch.bfloat16)
    assert x.numel() > 2**31
    gen = torch.Generator().manual_seed(0)
    tail = x[-3:]
    tail.copy_(torch.randn(tail.shape, generator=gen) * 2)
    probs = torch.tensor([0.2, 0.3, 0.5])
    scales = torch.tensor([0.5, 0.1, 0.01]).reshape(3, 1).expand(3, channels) * torch.tensor([1.0, 1.5, 2.0])
    scales = scales.contiguous() if axis is not None else scales[:, 0].contiguous()
    ax = -1 if axis is None else axis
    y = torch.ops.qdarts_C.mixed_fake_quant_forward(x, probs, scales, list(BITS), 0, ax)
    expected = ref.mixed_fake_quant(x[-3:], probs, scales, BITS, axis=axis)
    assert torch.equal(y[-3:], expected)
    assert not y[:-3].any()
    del y
    # x as its own incoming gradient: dx = x * sum_k p_k * in_k
    dx, _, _ = torch.ops.qdarts_C.mixed_fake_quant_backward(x, x, probs, scales, list(BITS), 0, ax, True, False,
                                                            False)
    xr = x[-3:].float().requires_grad_()
    ref.mixed_fake_quant(xr, probs, scales, BITS, axis=axis).backward(x[-3:].float())
    torch.testing.assert_close(dx[-3:].float(), xr.grad, rtol=1e-2, atol=1e-2)
    assert not dx[:-3].any()
