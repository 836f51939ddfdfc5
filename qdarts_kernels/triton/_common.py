"""Pieces shared by the Triton kernels: rounding, output casts, tile sizes and the device guard.

The same kernel source runs compiled on a GPU and under the Triton interpreter
(``TRITON_INTERPRET=1``, CPU tensors, used by the CPU test suite). Two operations need a different
*implementation* under the interpreter, with the same result bit for bit:

- round half to even: compiled code uses libdevice ``rint`` (one ``cvt.rni`` instruction); the
  interpreter cannot call libdevice, so it uses the add-and-subtract-2^23 identity below.
- fp32 -> bf16: the interpreter truncates instead of rounding to nearest even, so under the
  interpreter the cast is done on the bits; compiled code uses the hardware conversion.

Everything else (indexing, masks, quantizer, reductions) is one code path.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

#: True when the kernels are interpreted on the CPU; ``triton.jit`` reads the same switch when a
#: kernel is defined, so it is fixed once this module is imported.
_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")

#: Below 2^23 an fp32 value may have a fractional part; from 2^23 on it is an integer.
_TWO_POW_23 = tl.constexpr(8388608.0)


@triton.jit
def round_half_even_portable(v):
    """``rint(v)`` (round half to even) from fp32 additions, exact wherever they are IEEE.

    For 0 <= a < 2^23, ``a + 2^23`` lies in [2^23, 2^24) where the fp32 spacing is 1, so the
    addition rounds a to an integer, ties to even (2^23 is even), and subtracting 2^23 is exact.
    The sign is put back afterwards; |v| >= 2^23, inf and NaN pass through unchanged. The one
    difference from rint is rint(-0.0) = -0.0 where this gives +0.0, which the quantizer does not
    see: it compares levels with == (-0.0 == +0.0) and makes level 0 +0.0 either way.
    """
    a = tl.abs(v)
    ra = (a + _TWO_POW_23) - _TWO_POW_23
    # ra * -1.0, not -ra: Triton's negation is 0.0 - ra, which turns -0.0 (rint(-0.3)) into +0.0
    r = tl.where(v < 0.0, ra * -1.0, ra)
    return tl.where(a < _TWO_POW_23, r, v)


@triton.jit
def round_half_even(v):
    """Round fp32 ``v`` to the nearest integer, ties to even (torch.round, C nearbyint)."""
    if _INTERPRETED:
        return round_half_even_portable(v)
    else:
        return libdevice.rint(v)


@triton.jit
def to_bf16_rne_bits(v):
    """fp32 -> bf16 rounded to nearest even through the bits (PyTorch's c10 rule, NaN -> 0x7FC0)."""
    bits = v.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(v != v, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def cast_out(v, dtype: tl.constexpr):
    """Cast fp32 ``v`` to the output ``dtype`` rounding to nearest even, as torch's ``.to`` does."""
    if _INTERPRETED and dtype == tl.bfloat16:
        return to_bf16_rne_bits(v)
    else:
        return v.to(dtype)


@triton.jit
def flat_block(block, numel, BLOCK: tl.constexpr):
    """Flat block ``block``'s int64 offsets (past 2^31 elements) and their in-bounds mask."""
    offsets = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return offsets, offsets < numel


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


class TileSize(NamedTuple):
    elements: int  # elements one program handles
    num_warps: int


#: The kernels whose tile :func:`tile_size` chooses, each on its own (``qdarts.benchmark.tune`` times
#: candidate tiles per kernel; :func:`tile_override` applies one).
TUNABLE_KERNELS = ("mixed_fake_quant_forward", "mixed_fake_quant_backward", "mixed_fake_quant_backward_per_tensor",
                   "mixed_op_sum_forward", "mixed_op_sum_backward")

#: Set by :func:`tile_override` only.
_tile_overrides = {}


@functools.lru_cache(maxsize=None)
def _default_tile_size(numel: int, kernel: str) -> TileSize:
    if kernel == "mixed_fake_quant_backward_per_tensor":
        # the persistent kernel keeps 2K per-lane sums across its blocks: 8 elements per thread take
        # 80 registers (K = 3, sm_90, Triton 3.6), 16 take 162, for no more elements in flight per SM
        return TileSize(1024, 4)
    if numel <= 1 << 16:
        return TileSize(1024, 4)
    if numel <= 1 << 22:
        return TileSize(2048, 4)
    return TileSize(4096, 8)


def tile_size(numel: int, kernel: str = "") -> TileSize:
    """Elements per program and warps for a memory-bound pass of ``kernel`` over ``numel`` elements.

    Small tensors get small tiles, so that they still spread over many SMs; large ones get 4096
    elements (16 per thread with 8 warps: four 16-byte loads per fp32 input) to amortise each
    program's fixed work (index set-up, per-bit-width scale loads and partial-sum stores). The
    compiled kernels use at most 165 registers with these tiles (the per-channel backward with the
    channel on columns in bf16, 64 x 64; a bf16 mixed_op_sum of 35 inputs 148; one block of 8 warps
    per SM at that count) and spill nothing (ptxas, sm_90, Triton 3.6).
    The break points are first choices from that reasoning, the same for every kernel but the
    persistent per-tensor backward (see _default_tile_size), still to be confirmed per kernel by
    ``python -m qdarts.benchmark.tune`` on an H100 (bench/gpu_check.sh runs it); a table rather
    than ``triton.autotune`` because the partial-sum buffers are sized by the tile, and autotuning
    would rerun the reductions on every new shape. ``kernel`` (one of
    TUNABLE_KERNELS, or "" for the others) selects a :func:`tile_override` in force.
    """
    override = _tile_overrides.get(kernel)
    return override if override is not None else _default_tile_size(numel, kernel)


@contextlib.contextmanager
def tile_override(kernel: str, tile: TileSize):
    """Launch ``kernel`` (one of TUNABLE_KERNELS) with ``tile`` for every size inside the block
    (for timing candidate tiles, and for tests)."""
    if kernel not in TUNABLE_KERNELS:
        raise ValueError(f"kernel must be one of {TUNABLE_KERNELS}, got {kernel!r}")
    elements, warps = tile
    if elements < 16 or elements & (elements - 1) or warps not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"tile must be (power-of-two elements >= 16, warps in 1..32 a power of two), got {tile!r}")
    before = _tile_overrides.get(kernel)
    _tile_overrides[kernel] = TileSize(elements, warps)
    try:
        yield
    finally:
        if before is None:
            del _tile_overrides[kernel]
        else:
            _tile_overrides[kernel] = before


#: Programs a per-channel reduction aims at in all: enough to fill an H100 (132 SMs) several
#: times, few enough that a program merging one channel's partials reads at most this many.
REDUCE_PROGRAMS = 1024


def split_channel_reduction(items: int, channels: int, budget: int = REDUCE_PROGRAMS) -> tuple:
    """(partials, rounds): each of ``channels`` reductions over ``items`` work items (tiles) is
    split over ``partials`` programs, each taking ``rounds`` items (item p + r * partials in round
    r; some past the last, empty). ``rounds`` is a power of two, a constant of the kernels (so
    that few sizes are compiled), and ``partials`` as few as then take all items."""
    rounds = next_pow2(triton.cdiv(items, max(1, budget // channels)))
    return triton.cdiv(items, rounds), rounds


def programs_per_sm(n_regs: int, num_warps: int, shared_bytes: int, *, regs_per_sm: int = 65536,
                    threads_per_sm: int = 2048, shared_per_sm: int = 233472, warp_size: int = 32) -> int:
    """How many programs (thread blocks) of a kernel one SM holds at once, as CUDA's occupancy
    calculator counts them for sm_80/sm_90: registers are allocated per warp in units of 256,
    threads are at most ``threads_per_sm``, each block takes its shared memory plus 1 KiB the
    hardware reserves, and an SM takes at most 32 blocks. At least 1 (a kernel that fits at all)."""
    regs_per_warp = -(-max(1, n_regs) * warp_size // 256) * 256
    by_regs = (regs_per_sm // regs_per_warp) // num_warps
    by_threads = threads_per_sm // (num_warps * warp_size)
    by_shared = shared_per_sm // (shared_bytes + 1024)
    return max(1, min(by_regs, by_threads, by_shared, 32))


def programs_in_one_wave(compiled, device: torch.device) -> int:
    """How many programs of ``compiled`` (a Triton ``CompiledKernel``) ``device`` runs at once: its
    SMs times :func:`programs_per_sm` for the kernel's registers (loading it to read them), warps
    and shared memory. A persistent kernel launched with this many programs runs in one wave; with
    more, the programs beyond a whole wave run on a partly idle GPU after the others finished."""
    if hasattr(compiled, "result"):  # a future, where Triton compiles in the background
        compiled = compiled.result()
    compiled._init_handles()
    props = torch.cuda.get_device_properties(device)
    per_sm = programs_per_sm(compiled.n_regs, compiled.metadata.num_warps, compiled.metadata.shared,
                             regs_per_sm=props.regs_per_multiprocessor,
                             threads_per_sm=props.max_threads_per_multi_processor,
                             shared_per_sm=props.shared_memory_per_multiprocessor, warp_size=props.warp_size)
    return props.multi_processor_count * per_sm


def device_guard(t: torch.Tensor):
    """Make ``t``'s GPU the current device: Triton launches on the current device."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


#: Launch options of every kernel: no FMA contraction, so that x * inv_s + z and the running sums
#: round exactly as the reference's separate multiplications and additions do (the interpreter
#: ignores launch options; numpy does not contract).
LAUNCH_OPTIONS = {"enable_fp_fusion": False}
