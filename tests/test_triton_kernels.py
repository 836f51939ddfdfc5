"""Triton-specific tests: the pieces the shared matrix (test_backends.py) cannot see.

- the rounding and fp32 -> bf16/fp16 helpers, bit for bit, on ties and special values;
- int64 tile offsets past 2^31 elements (a probe kernel runs the offset code at a far program id);
- the launch-parameter table and the two tilings of per-channel tensors;
- the two-stage reductions over many programs, in both tilings and all dtypes, against fp64 sums,
  and their run-to-run determinism;
- the compiled path: the kernels are compiled for sm_90 (no GPU needed, nothing is launched) and the
  PTX is checked for what the interpreter cannot show: no FMA contraction, IEEE division, libdevice
  rint, round-to-nearest bf16 conversion, 16-byte vector loads.

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest.py); on a GPU they run compiled.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import qdarts_kernels as qk  # noqa: E402
from qdarts_kernels import _reference_backend as reference_backend  # noqa: E402
from qdarts_kernels import reference as ref  # noqa: E402
from qdarts_kernels._validation import GRIDS  # noqa: E402
from qdarts_kernels.triton._common import (  # noqa: E402
    TileSize, cast_out, flat_block, next_pow2, round_half_even, round_half_even_portable, tile_override, tile_size,
)
from qdarts_kernels.triton.mixed_fake_quant import _tile, layout_for  # noqa: E402
from qdarts.benchmark.tune import CANDIDATES as TUNE_CANDIDATES  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

pytestmark = pytest.mark.skipif(
    "triton" not in qk.available_backends(), reason="the triton backend is not available here"
)


# --------------------------------------------------------------------------------------------------
# rounding and output casts
# --------------------------------------------------------------------------------------------------


@triton.jit
def _elementwise_probe_kernel(X, Y, n, OP: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(X + offsets, mask=mask)
    if OP == "round":
        y = round_half_even(x)
    elif OP == "round_portable":
        y = round_half_even_portable(x)
    else:
        y = cast_out(x, Y.dtype.element_ty)
    tl.store(Y + offsets, y, mask=mask)


def _probe(op: str, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    x = x.to(DEVICE)
    y = torch.empty(x.shape, dtype=out_dtype, device=DEVICE)
    _elementwise_probe_kernel[(1,)](x, y, x.numel(), OP=op, BLOCK=next_pow2(x.numel()))
    return y.cpu()


def _assert_same_bits(actual: torch.Tensor, expected: torch.Tensor):
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan)
    int_dtype = {4: torch.int32, 2: torch.int16}[expected.element_size()]
    a, e = actual[~nan].view(int_dtype), expected[~nan].view(int_dtype)
    bad = (a != e).nonzero().flatten()[:5]
    assert bad.numel() == 0, f"bits differ: got {actual[~nan][bad].tolist()}, want {expected[~nan][bad].tolist()}"


def _rounding_cases() -> torch.Tensor:
    ties = torch.arange(-40, 41, dtype=torch.float32) + 0.5
    edges = torch.tensor(
        [2**22 + 0.5, -(2**22 + 0.5), 2**23 - 0.5, -(2**23 - 0.5), 2**23, 2**23 + 1, -(2**23 + 1), 2**24 + 2,
         3e38, -3e38, 1e-40, -1e-40, 0.0, 0.49999997, -0.49999997, 0.50000006, -0.3,
         float("inf"), -float("inf"), float("nan")],
        dtype=torch.float32,
    )
    return torch.cat([ties, edges, torch.randn(500, generator=torch.Generator().manual_seed(0)) * 100])


@pytest.mark.parametrize("op", ["round", "round_portable"])
def test_rounding_is_torch_round_bit_for_bit(op):
    """round_half_even is what the kernels use here (libdevice rint compiled, the portable
    identity under the interpreter); the portable identity is checked on its own everywhere."""
    x = _rounding_cases()
    _assert_same_bits(_probe(op, x, torch.float32), torch.round(x))


def _midpoints(dtype: torch.dtype) -> torch.Tensor:
    """fp32 values exactly halfway between neighbouring values of ``dtype`` (even and odd last bits),
    a hair either side of them, and values that overflow, underflow or are special."""
    gen = torch.Generator().manual_seed(1)
    low = (torch.randn(400, generator=gen) * 30).to(dtype)
    high = torch.nextafter(low, torch.full_like(low, float("inf")))
    mid = (low.double() + high.double()) / 2  # exact in fp32: one bit more than dtype's significand
    mid32 = mid.float()
    assert torch.equal(mid32.double(), mid)
    hair = torch.cat([torch.nextafter(mid32, mid32 + 1), torch.nextafter(mid32, mid32 - 1)])
    finfo = torch.finfo(dtype)
    special = torch.tensor([finfo.max * 1.01, -finfo.max * 1.01, finfo.tiny / 3, -finfo.tiny / 3,
                            float("inf"), -float("inf"), float("nan"), 0.0], dtype=torch.float32)
    return torch.cat([mid32, -mid32, hair, special])


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_output_cast_rounds_to_nearest_even(dtype):
    x = _midpoints(dtype)
    _assert_same_bits(_probe("cast", x, dtype), x.to(dtype))


# --------------------------------------------------------------------------------------------------
# int64 offsets
# --------------------------------------------------------------------------------------------------


@triton.jit
def _tile_probe_kernel(OFFSETS, MASK, pid, rows, cols, col_blocks, BLOCK_R: tl.constexpr,
                       BLOCK_J: tl.constexpr):
    _, _, _, _, offsets, mask = _tile(pid, rows, cols, col_blocks, BLOCK_R, BLOCK_J)
    slot = tl.arange(0, BLOCK_R)[:, None] * BLOCK_J + tl.arange(0, BLOCK_J)[None, :]
    tl.store(OFFSETS + slot, offsets)
    tl.store(MASK + slot, mask.to(tl.int8))


@triton.jit
def _flat_probe_kernel(OFFSETS, MASK, pid, numel, BLOCK: tl.constexpr):
    offsets, mask = flat_block(pid, numel, BLOCK)
    slot = tl.arange(0, BLOCK)
    tl.store(OFFSETS + slot, offsets)
    tl.store(MASK + slot, mask.to(tl.int8))


def test_tile_offsets_past_2_pow_31():
    """The last tile of an [2^21, 4099] tensor (8.6e9 elements, never allocated): its offsets
    overflow int32 by far; the program id itself fits int32, as tl.program_id does."""
    rows, cols, block_r, block_j = 2**21, 4099, 4, 16
    col_blocks = triton.cdiv(cols, block_j)
    pid = triton.cdiv(rows, block_r) * col_blocks - 1
    assert pid < 2**31
    offsets = torch.empty(block_r, block_j, dtype=torch.int64, device=DEVICE)
    mask = torch.empty(block_r, block_j, dtype=torch.int8, device=DEVICE)
    _tile_probe_kernel[(1,)](offsets, mask, pid, rows, cols, col_blocks, BLOCK_R=block_r, BLOCK_J=block_j)
    row = (pid // col_blocks) * block_r + torch.arange(block_r, dtype=torch.int64)
    col = (pid % col_blocks) * block_j + torch.arange(block_j, dtype=torch.int64)
    assert torch.equal(offsets.cpu(), row[:, None] * cols + col[None, :])
    assert torch.equal(mask.cpu().bool(), (row[:, None] < rows) & (col[None, :] < cols))
    assert offsets.max().item() > 2**33


def test_flat_offsets_past_2_pow_31():
    block = 1024
    numel = 2**32 + 300
    pid = numel // block  # the last, partial block
    offsets = torch.empty(block, dtype=torch.int64, device=DEVICE)
    mask = torch.empty(block, dtype=torch.int8, device=DEVICE)
    _flat_probe_kernel[(1,)](offsets, mask, pid, numel, BLOCK=block)
    expected = pid * block + torch.arange(block, dtype=torch.int64)
    assert torch.equal(offsets.cpu(), expected)
    assert torch.equal(mask.cpu().bool(), expected < numel)


# --------------------------------------------------------------------------------------------------
# launch parameters
# --------------------------------------------------------------------------------------------------


def test_tile_size_table():
    sizes = [1, 100, 2**16, 2**16 + 1, 2**20, 2**22 + 1, 2**30, 2**34]
    tiles = [tile_size(n) for n in sizes]
    for t in tiles:
        assert t.elements & (t.elements - 1) == 0 and t.num_warps in (4, 8)
        assert t.elements // (32 * t.num_warps) >= 8  # at least 8 elements, two 16 B fp32 loads, per thread
    assert [t.elements for t in tiles] == sorted(t.elements for t in tiles)


LAYOUT_CASES = [
    # shape, axis, channel on rows?
    ((33_554_432,), None, True),   # per tensor: one row, one tile per 4096 elements
    ((64, 16, 3, 3), 0, True),     # conv weight, per output channel
    ((32, 1, 3, 3), 0, True),      # depthwise conv weight: rows of 9
    ((256, 16, 32, 32), 1, True),  # NCHW activations, per channel
    ((4096, 4096), 0, True),       # linear weight, per output feature
    ((256, 512), 1, False),        # linear activations, per feature: channel on columns
    ((64, 3, 2, 1000), 2, True),   # channel in the middle, long rows
    ((512, 7, 3), 1, False),       # short rows (3) under many outer rows: channel on columns
]


@pytest.mark.parametrize("shape,axis,on_rows", LAYOUT_CASES, ids=str)
def test_layout_covers_the_tensor_and_keeps_partials_few(shape, axis, on_rows):
    x = torch.empty(shape, device="meta")
    lay = layout_for(x, -1 if axis is None else axis, "mixed_fake_quant_backward")
    numel = x.numel()
    assert lay.channel_on_rows == on_rows
    assert lay.rows * lay.cols == numel
    assert lay.outer * lay.channels * lay.inner == numel
    for block in (lay.block_rows, lay.block_cols):
        assert block >= 1 and block & (block - 1) == 0
    assert lay.block_rows * lay.block_cols <= tile_size(numel).elements
    # every row and column is covered, and no block is empty
    assert (lay.row_blocks - 1) * lay.block_rows < lay.rows <= lay.row_blocks * lay.block_rows
    assert (lay.col_blocks - 1) * lay.block_cols < lay.cols <= lay.col_blocks * lay.block_cols
    # per-channel partial sums of ds (per bit-width): at most one per 8 elements on these shapes
    partials = lay.col_blocks * lay.rows if lay.channel_on_rows else lay.row_blocks * lay.cols
    assert partials * 8 <= numel


# --------------------------------------------------------------------------------------------------
# two-stage reductions
# --------------------------------------------------------------------------------------------------

# shape, axis, dtype: several programs in each tiling (per tensor; channel on rows; on columns),
# each tiling also with a 16-bit input (the interpreter is slow: a few programs each)
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
REDUCTION_CASES = [((3000,), None, F32), ((3000,), None, BF16), ((2, 3, 1100), 1, F32), ((2, 3, 1100), 1, F16),
                   ((300, 40), 1, F32), ((300, 40), 1, BF16)]


def _fp64_gradients(x, g, probs, scales, bits, grid, axis):
    """dprobs and dscales with the fp32 quantizer of the reference and fp64 sums; also the sums of
    absolute terms, the scale of the rounding error a fp32 sum may make."""
    xf, gd = x.float(), g.double()
    ax = -1 if axis is None else axis
    dps, dss, dp_mag, ds_mag = [], [], [], []
    for k, b in enumerate(bits):
        s = ref.broadcast_scale(scales[k], xf, ax)
        q_minus_z, inside, inv_s = ref.quantize_parts(xf, s, b, GRIDS[grid])
        dp_terms = gd * (q_minus_z * s).double()
        ds_terms = gd * probs[k].double() * (q_minus_z - torch.where(inside, xf * inv_s, 0.0)).double()
        dps.append(dp_terms.sum())
        dp_mag.append(dp_terms.abs().sum())
        to_scale = (lambda t: t.sum()) if axis is None else (lambda t: t.sum_to_size(s.shape).reshape(-1))
        dss.append(to_scale(ds_terms))
        ds_mag.append(to_scale(ds_terms.abs()))
    return torch.stack(dps), torch.stack(dss), torch.stack(dp_mag), torch.stack(ds_mag)


@pytest.mark.parametrize("shape,axis,dtype", REDUCTION_CASES, ids=str)
def test_reductions_over_many_programs(shape, axis, dtype):
    """Every program's partial is added exactly once (a lost or doubled tile is far outside the
    tolerance), the sums are identical from run to run, fp16/bf16 inputs reduce in fp32, and y and
    dx are exact in every tiling and dtype."""
    gen = torch.Generator().manual_seed(len(shape))
    x = (torch.randn(shape, generator=gen) * 2).to(dtype)
    g = torch.randn(shape, generator=gen).to(dtype)
    bits, grid = (2, 4, 8), "midrise"
    probs = torch.softmax(torch.randn(3, generator=gen), 0)
    channels = () if axis is None else (shape[axis],)
    scales = 0.05 + 0.3 * torch.rand((3, *channels), generator=gen)
    lay = layout_for(x, -1 if axis is None else axis, "mixed_fake_quant_backward")
    assert lay.programs >= 3

    runs = []
    for _ in range(2):
        xb, pb, sb = (t.to(DEVICE).clone().requires_grad_() for t in (x, probs, scales))
        y = qk.mixed_fake_quant(xb, pb, sb, bits, grid=grid, axis=axis, backend="triton")
        y.backward(g.to(DEVICE))
        runs.append((y, xb.grad, pb.grad, sb.grad))
    for first, second in zip(*runs):
        assert torch.equal(first, second)

    y, dx, dprobs, dscales = (t.cpu() for t in runs[0])
    assert torch.equal(y, ref.mixed_fake_quant(x, probs, scales, bits, grid=grid, axis=axis))
    # dx = g * (p_0 in_0 + p_1 in_1 + ...) in this order, as the reference backend writes it: exact
    ax = -1 if axis is None else axis
    expected_dx, _, _ = reference_backend.mixed_fake_quant_backward(g, x, probs, scales, bits, GRIDS[grid], ax,
                                                                     True, False, False)
    assert torch.equal(dx, expected_dx)
    dp64, ds64, dp_mag, ds_mag = _fp64_gradients(x, g, probs, scales, bits, grid, axis)
    # a tree sum of n fp32 terms errs by at most ~log2(n) eps * sum|terms|; one lost tile, by far more
    eps = torch.finfo(torch.float32).eps
    assert ((dprobs.double() - dp64).abs() <= 16 * eps * dp_mag + 1e-12).all()
    assert ((dscales.double() - ds64).abs() <= 16 * eps * ds_mag + 1e-12).all()


@pytest.mark.parametrize("bits,grid", [((8,), "signed"), ((2, 4), "relu"), ((2, 4, 8), "midrise"),
                                       ((1, 2, 3, 4), "unsigned")], ids=str)
@pytest.mark.parametrize("needs", [(True, True, True), (False, True, False), (True, False, True)], ids=str)
def test_per_tensor_backward_over_several_rounds(monkeypatch, bits, grid, needs):
    """The persistent per-tensor backward with fewer programs than blocks (5 programs, 13 blocks of
    256, the last one partial: three rounds, two programs' third blocks past the end): dx exact, dp
    and ds within a fp32 sum's error of fp64 sums, the same bits from run to run, only the
    requested gradients."""
    from qdarts_kernels.triton import mixed_fake_quant as mfq

    monkeypatch.setattr(mfq, "REDUCE_PROGRAMS", 5)  # under the interpreter
    monkeypatch.setattr(mfq, "_persistent_wave", lambda *args: 5)  # compiled, on a GPU
    gen = torch.Generator().manual_seed(len(bits))
    x = torch.randn(3200, generator=gen) * 2
    g = torch.randn(3200, generator=gen)
    k = len(bits)
    probs = torch.softmax(torch.randn(k, generator=gen), 0)
    scales = 0.05 + 0.3 * torch.rand(k, generator=gen)
    code = GRIDS[grid]
    runs = []
    with tile_override("mixed_fake_quant_backward_per_tensor", TileSize(256, 2)):
        for _ in range(2):
            runs.append(mfq.mixed_fake_quant_backward(g.to(DEVICE), x.to(DEVICE), probs.to(DEVICE), scales.to(DEVICE),
                                                      bits, code, -1, *needs))
    for first, second in zip(*runs):
        assert (first is None) == (second is None) and (first is None or torch.equal(first, second))
    dx, dprobs, dscales = (None if t is None else t.cpu() for t in runs[0])
    assert [t is not None for t in (dx, dprobs, dscales)] == list(needs)
    if needs[0]:
        expected_dx, _, _ = reference_backend.mixed_fake_quant_backward(g, x, probs, scales, bits, code, -1,
                                                                         True, False, False)
        assert torch.equal(dx, expected_dx)
    dp64, ds64, dp_mag, ds_mag = _fp64_gradients(x, g, probs, scales, bits, grid, None)
    eps = torch.finfo(torch.float32).eps
    if needs[1]:
        assert ((dprobs.double() - dp64).abs() <= 16 * eps * dp_mag + 1e-12).all()
    if needs[2]:
        assert ((dscales.double() - ds64).abs() <= 16 * eps * ds_mag + 1e-12).all()


@pytest.mark.parametrize("n_regs,num_warps,shared,expected", [
    (96, 4, 16, 5),      # the per-tensor backward with K = 3 (ptxas, sm_90): 3072 registers a warp, 21 warps
    (193, 4, 16, 2),     # K = 4: 200 a thread once rounded to 256 a warp, 10 warps
    (48, 4, 16, 10),     # K = 1
    (40, 8, 0, 6),       # the cuda backend's backward: 8-warp blocks of 40 registers
    (32, 1, 0, 32),      # at most 32 blocks an SM
    (16, 32, 0, 2),      # at most 2048 threads
    (255, 8, 0, 1),      # one block, whatever it takes
    (32, 4, 48 * 1024, 4),  # 48 KiB of shared memory (and 1 KiB reserved) a block: 4 in 228 KiB
    (65, 4, 16, 7),      # 2080 registers a warp rounded up to 2304: 28 warps (not the 32 of 2048)
], ids=str)
def test_programs_per_sm_counts_as_the_occupancy_calculator(n_regs, num_warps, shared, expected):
    from qdarts_kernels.triton._common import programs_per_sm

    assert programs_per_sm(n_regs, num_warps, shared) == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="reads a compiled kernel's registers on the GPU")
def test_per_tensor_backward_fills_the_gpu_in_one_wave():
    """On a GPU the persistent backward takes as many programs as the GPU holds at once (no partial
    second wave), read off the compiled kernel without a warning, and its gradients stay the
    reference's (dx exactly)."""
    import warnings

    from qdarts_kernels.triton import mixed_fake_quant as mfq

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3_000_001, generator=gen)
    g = torch.randn(x.shape, generator=gen)
    probs = torch.softmax(torch.randn(3, generator=gen), 0)
    scales = torch.tensor([0.5, 0.1, 0.01])
    tile = tile_size(x.numel(), "mixed_fake_quant_backward_per_tensor")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dx, dprobs, dscales = mfq.mixed_fake_quant_backward(g.cuda(), x.cuda(), probs.cuda(), scales.cuda(), (2, 4, 8),
                                                            GRIDS["signed"], -1, True, True, True)
        wave = mfq._persistent_wave(torch.cuda.current_device(), torch.float32, 3, 0.0, False, True, True, True, tile)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert sms <= wave <= 32 * sms and wave % sms == 0
    expected_dx, _, _ = reference_backend.mixed_fake_quant_backward(g, x, probs, scales, (2, 4, 8), GRIDS["signed"],
                                                                     -1, True, False, False)
    assert torch.equal(dx.cpu(), expected_dx)
    dp64, ds64, dp_mag, ds_mag = _fp64_gradients(x, g, probs, scales, (2, 4, 8), "signed", None)
    eps = torch.finfo(torch.float32).eps
    assert ((dprobs.cpu().double() - dp64).abs() <= 16 * eps * dp_mag + 1e-12).all()
    assert ((dscales.cpu().double() - ds64).abs() <= 16 * eps * ds_mag + 1e-12).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mixed_op_sum_weight_gradient_over_many_programs(dtype):
    gen = torch.Generator().manual_seed(3)
    k, numel = 8, 9000
    outs = [torch.randn(numel, generator=gen).to(dtype) for _ in range(k)]
    g = torch.randn(numel, generator=gen).to(dtype)
    w = torch.softmax(torch.randn(k, generator=gen), 0)
    assert triton.cdiv(numel, tile_size(numel).elements) > 4
    grads = []
    for _ in range(2):
        wb = w.to(DEVICE).clone().requires_grad_()
        qk.mixed_op_sum([o.to(DEVICE) for o in outs], wb, backend="triton").backward(g.to(DEVICE))
        grads.append(wb.grad.cpu())
    assert torch.equal(grads[0], grads[1])
    terms = torch.stack([g.double() * o.double() for o in outs])
    eps = torch.finfo(torch.float32).eps
    assert ((grads[0].double() - terms.sum(1)).abs() <= 16 * eps * terms.abs().sum(1)).all()


# --------------------------------------------------------------------------------------------------
# the compiled path, checked on its PTX
# --------------------------------------------------------------------------------------------------


def _compile_for_sm90() -> dict:
    """Compile representative kernels for an H100 (sm_90) without a GPU and count PTX features.

    Run in a fresh process without TRITON_INTERPRET (see the test below): Triton's active driver is
    replaced by one that names the target and never touches a device; ``warmup`` compiles and does
    not launch.
    """
    from triton.backends import backends
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.runtime.driver import driver

    if "nvidia" not in backends:
        return {}

    class CompileOnlyDriver(DriverBase):
        @classmethod
        def is_active(cls):
            return True

        def map_python_to_cpp_type(self, ty):
            return ty

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_benchmarker(self):
            raise NotImplementedError

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

    driver.set_active(CompileOnlyDriver())
    from qdarts_kernels.triton import mixed_fake_quant as mfq
    from qdarts_kernels.triton import mixed_op_sum as mos
    from qdarts_kernels.triton._common import LAUNCH_OPTIONS

    def features(kernel) -> dict:
        ptx = kernel.asm["ptx"]
        count = lambda pattern: len(re.findall(pattern, ptx))  # noqa: E731
        return {
            "fma_f32": count(r"\bfma\.rn\.f32"), "div_rn": count(r"\bdiv\.rn\.f32"),
            "div_approx": count(r"\bdiv\.(?:full|approx)\.f32"), "rint": count(r"\bcvt\.rni\.f32\.f32"),
            "bf16_rn": count(r"\bcvt\.rn\.bf16(?:x2)?\.f32"), "ld_v4": count(r"\bld\.global[.a-z0-9]*\.v4"),
        }

    out = {}
    for name, dtype, shape, axis, grid in [("mfq_f32_tensor", torch.float32, (1 << 22,), -1, "midrise"),
                                           ("mfq_bf16_channel", torch.bfloat16, (256, 16, 1024), 1, "relu")]:
        x = torch.empty(shape, dtype=dtype)
        lay = mfq.layout_for(x, axis, "mixed_fake_quant_backward")
        bits = (2, 4, 8)
        qmin, qmax, zero_point, relu = mfq._grid_ranges(bits, GRIDS[grid])
        probs = torch.empty(3)
        scales = torch.empty(3) if axis < 0 else torch.empty(3, shape[axis])
        part_p, part_s = torch.empty(lay.programs, 3), torch.empty(3, lay.col_blocks, lay.rows)
        common = dict(K=3, ZERO_POINT=zero_point, CHANNEL_ON_ROWS=lay.channel_on_rows, RELU=relu,
                      BLOCK_R=lay.block_rows, BLOCK_J=lay.block_cols, num_warps=lay.num_warps, grid=(1,))
        out[name + "_forward"] = features(mfq._mixed_fake_quant_forward_kernel.warmup(
            x, x, probs, scales, qmin, qmax, lay.rows, lay.cols, lay.channels, lay.inner,
            lay.col_blocks, **common, **LAUNCH_OPTIONS))
        backward_args = (x, x, x, probs, scales, part_p, part_s, qmin, qmax, lay.rows, lay.cols, lay.channels,
                         lay.inner, lay.col_blocks, lay.row_blocks)
        flags = dict(NEED_DX=True, NEED_DP=True, NEED_DS=True)
        out[name + "_backward"] = features(mfq._mixed_fake_quant_backward_kernel.warmup(
            *backward_args, **flags, **common, **LAUNCH_OPTIONS))
        # the same with contraction allowed: the FMAs it adds are the ones the launch options prevent
        out[name + "_backward"]["fma_f32_with_fusion"] = features(mfq._mixed_fake_quant_backward_kernel.warmup(
            *backward_args, **flags, **common, **{**LAUNCH_OPTIONS, "enable_fp_fusion": True}))["fma_f32"]
    # the per-tensor backward launches the persistent kernel, not the tiled one (1024 elements, 4 warps:
    # 8 elements a thread)
    x, probs, part = torch.empty(1 << 22), torch.empty(3), torch.empty(1024, 3)
    qmin, qmax, zero_point, relu = mfq._grid_ranges((2, 4, 8), GRIDS["midrise"])

    def persistent_backward(**options):
        return features(mfq._mixed_fake_quant_backward_per_tensor_kernel.warmup(
            x, x, x, probs, probs, part, part, qmin, qmax, x.numel(), 1024, K=3, ZERO_POINT=zero_point, RELU=relu,
            NEED_DX=True, NEED_DP=True, NEED_DS=True, ROUNDS=3, BLOCK=1024, num_warps=4, grid=(1,), **options))

    out["mfq_f32_tensor_persistent_backward"] = persistent_backward(**LAUNCH_OPTIONS)
    out["mfq_f32_tensor_persistent_backward"]["fma_f32_with_fusion"] = persistent_backward(
        **{**LAUNCH_OPTIONS, "enable_fp_fusion": True})["fma_f32"]
    numel = 1 << 22
    tile = tile_size(numel)
    outs = tuple(torch.empty(numel, dtype=torch.bfloat16) for _ in range(8))
    w, part_w = torch.empty(8), torch.empty(numel // tile.elements, 8)
    common = dict(K=8, BLOCK=tile.elements, num_warps=tile.num_warps, grid=(1,), **LAUNCH_OPTIONS)
    out["mos_bf16_forward"] = features(mos._mixed_op_sum_forward_kernel.warmup(outs, w, outs[0], numel, **common))
    out["mos_bf16_backward"] = features(mos._mixed_op_sum_backward_kernel.warmup(
        outs[0], outs, outs, w, part_w, numel, NEED_DOUTPUTS=True, NEED_DWEIGHTS=True, **common))
    # the batch norm on the CIFAR-size supernet's first-cell tensors (256 x 4 x 32 x 32)
    from qdarts_kernels.triton import batch_norm as bn

    n, c, s = 256, 4, 1024
    p = bn.plan(n, c, s)
    x, stats = torch.empty(n, c, s), torch.empty(c)
    part3, part2 = torch.empty(c, p.partials, 3), torch.empty(c, p.partials, 2)
    sizes = (n, c, s, p.tiles_s, p.tiles, p.partials)
    common = dict(BLOCK_N=p.block_n, BLOCK_S=p.block_s, num_warps=p.num_warps, grid=(1,), **LAUNCH_OPTIONS)
    out["bn_statistics"] = features(bn._statistics_kernel.warmup(x, part3, *sizes, ROUNDS=p.rounds, **common))
    out["bn_normalize"] = features(bn._normalize_kernel.warmup(
        x, x, part3, stats, stats, stats, 0.1, 1e-5, *sizes, UPDATE_RUNNING=True, P_BLOCK=p.partials_block, **common))
    out["bn_grad_sums"] = features(bn._grad_sums_kernel.warmup(x, x, part2, *sizes, ROUNDS=p.rounds, **common))
    out["bn_grad_input"] = features(bn._grad_input_kernel.warmup(
        x, x, x, part2, stats, float(n * s), *sizes, P_BLOCK=p.partials_block, **common))
    return out


def test_compiled_ptx_for_sm90():
    """The compiled kernels keep the reference's roundings: no FMA contraction (the backward's own FMAs
    aside), IEEE division for 1/s, libdevice rint, round-to-nearest bf16 stores; fp32 loads are 16 B
    vectors."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, __file__, "--compile-sm90"], env=env, cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ptx = json.loads(proc.stdout.strip().splitlines()[-1])
    if not ptx:
        pytest.skip("this Triton build has no NVIDIA backend")
    for name, f in ptx.items():
        assert f["div_approx"] == 0, name
        if "fma_f32_with_fusion" in f:
            # the backward's FMAs are its own (the gradients' sums, tl.fma); x * inv_s + z and the
            # other products the reference rounds separately are not contracted
            assert f["fma_f32"] < f["fma_f32_with_fusion"], name
        else:
            assert f["fma_f32"] == 0, name
    # the persistent backward asks for 3 FMAs per element and bit-width (dx's weight, the dp and the ds
    # sums): exactly those, on each of a thread's 8 elements, and no more
    assert ptx["mfq_f32_tensor_persistent_backward"]["fma_f32"] == 3 * 3 * 8
    for name in ("mfq_f32_tensor_forward", "mfq_f32_tensor_backward", "mfq_f32_tensor_persistent_backward",
                 "mfq_bf16_channel_forward", "mfq_bf16_channel_backward"):
        assert ptx[name]["div_rn"] > 0 and ptx[name]["rint"] > 0, name
    for name in ("mfq_bf16_channel_forward", "mfq_bf16_channel_backward", "mos_bf16_forward", "mos_bf16_backward"):
        assert ptx[name]["bf16_rn"] > 0, name
    for name in ("mfq_f32_tensor_forward", "mfq_f32_tensor_backward", "mfq_f32_tensor_persistent_backward"):
        assert ptx[name]["ld_v4"] > 0, name
    assert ptx["mos_bf16_forward"]["ld_v4"] > 0  # 8 bf16 per 16 B load
    for name in ("bn_statistics", "bn_normalize", "bn_grad_sums", "bn_grad_input"):
        assert ptx[name]["ld_v4"] > 0, name
    assert ptx["bn_normalize"]["div_rn"] > 0  # invstd = 1 / sqrt(var + eps), correctly rounded


if __name__ == "__main__" and sys.argv[1:] == ["--compile-sm90"]:
    print(json.dumps(_compile_for_sm90()))


# --------------------------------------------------------------------------------------------------
# candidate tiles (qdarts.benchmark.tune): every one computes the same as the reference
# --------------------------------------------------------------------------------------------------


def test_tile_override_applies_to_its_kernel_only_and_is_checked():
    x = torch.empty(1 << 23, device="meta")
    default = layout_for(x, -1, "mixed_fake_quant_backward")
    with tile_override("mixed_fake_quant_backward", TileSize(1024, 4)):
        assert layout_for(x, -1, "mixed_fake_quant_backward").block_cols == 1024
        assert layout_for(x, -1, "mixed_fake_quant_backward").num_warps == 4
        assert layout_for(x, -1, "mixed_fake_quant_forward") == default
    assert layout_for(x, -1, "mixed_fake_quant_backward") == default
    with pytest.raises(ValueError, match="kernel must be one of"):
        with tile_override("mixed_fake_quant_grouped", TileSize(1024, 4)):
            pass
    with pytest.raises(ValueError, match="tile must be"):
        with tile_override("mixed_op_sum_forward", TileSize(1000, 4)):
            pass


@pytest.mark.parametrize("elements", [16, 32, 64])
def test_tiles_smaller_than_a_column_block_work_with_the_channel_on_columns(elements):
    # x [100, 3] per channel along its last axis lays the channels on columns, whose blocks take up
    # to 64 rows: a tile of fewer elements must take fewer rows (it divided by zero before)
    gen = torch.Generator().manual_seed(elements)
    x, g = torch.randn(100, 3, generator=gen), torch.randn(100, 3, generator=gen)
    probs, scales = torch.tensor([0.25, 0.75]), torch.empty(2, 3).uniform_(0.05, 0.3, generator=gen)
    assert not layout_for(x, 1, "mixed_fake_quant_forward").channel_on_rows
    leaves = [t.to(DEVICE).clone().requires_grad_() for t in (x, probs, scales)]
    ref_leaves = [t.clone().requires_grad_() for t in (x, probs, scales)]
    tile = TileSize(elements, 1)
    with tile_override("mixed_fake_quant_forward", tile), tile_override("mixed_fake_quant_backward", tile):
        y = qk.mixed_fake_quant(*leaves, (2, 4), axis=1, backend="triton")
        got = torch.autograd.grad(y, leaves, g.to(DEVICE))
    want_y = ref.mixed_fake_quant(*ref_leaves, (2, 4), axis=1)
    want = torch.autograd.grad(want_y, ref_leaves, g)
    assert torch.equal(y.detach().cpu(), want_y.detach())
    assert torch.equal(got[0].cpu(), want[0])
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tile", TUNE_CANDIDATES, ids=lambda t: f"{t.elements}x{t.num_warps}")
def test_every_candidate_tile_matches_the_reference(tile):
    # sizes beyond the largest tile, so that every candidate takes several programs and a ragged end
    gen = torch.Generator().manual_seed(tile.elements + tile.num_warps)
    bits = (2, 4, 8)
    probs = torch.softmax(torch.randn(3, generator=gen), 0)
    cases = [((3 * 8192 + 5,), None, torch.empty(3).uniform_(0.05, 0.3, generator=gen)),
             ((3, 5, 1031), 1, torch.empty(3, 5).uniform_(0.05, 0.3, generator=gen))]
    for shape, axis, scales in cases:
        x = torch.randn(shape, generator=gen) * 2
        g = torch.randn(shape, generator=gen)
        want_y = ref.mixed_fake_quant(x, probs, scales, bits, axis=axis)
        leaves = [t.to(DEVICE).clone().requires_grad_() for t in (x, probs, scales)]
        ref_leaves = [t.clone().requires_grad_() for t in (x, probs, scales)]
        with tile_override("mixed_fake_quant_forward", tile), tile_override("mixed_fake_quant_backward", tile), \
                tile_override("mixed_fake_quant_backward_per_tensor", tile):
            y = qk.mixed_fake_quant(*leaves, bits, axis=axis, backend="triton")
            got = torch.autograd.grad(y, leaves, g.to(DEVICE))
        want = torch.autograd.grad(ref.mixed_fake_quant(*ref_leaves, bits, axis=axis), ref_leaves, g)
        assert torch.equal(y.cpu(), want_y)
        assert torch.equal(got[0].cpu(), want[0])  # dx: exact
        for a, b in zip(got[1:], want[1:]):  # sums in another order
            torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-4)
    outs = [torch.randn(8192 + 17, generator=gen) for _ in range(3)]
    w = torch.softmax(torch.randn(3, generator=gen), 0)
    g = torch.randn(8192 + 17, generator=gen)
    leaves = [t.to(DEVICE).clone().requires_grad_() for t in (*outs, w)]
    ref_leaves = [t.clone().requires_grad_() for t in (*outs, w)]
    with tile_override("mixed_op_sum_forward", tile), tile_override("mixed_op_sum_backward", tile):
        y = qk.mixed_op_sum(leaves[:3], leaves[3], backend="triton")
        got = torch.autograd.grad(y, leaves, g.to(DEVICE))
    want_y = ref.mixed_op_sum(ref_leaves[:3], ref_leaves[3])
    want = torch.autograd.grad(want_y, ref_leaves, g)
    assert torch.equal(y.detach().cpu(), want_y.detach())
    for a, b in zip(got[:3], want[:3]):
        assert torch.equal(a.cpu(), b)
    torch.testing.assert_close(got[3].cpu(), want[3], rtol=1e-5, atol=1e-4)
