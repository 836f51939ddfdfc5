"""What is benchmarked: the op cases, the implementations compared, the modes and the size sweeps.

Shared by the ``qdarts bench`` runner and by the pytest-benchmark files under ``bench/`` so that
both time exactly the same work. Only public APIs are used: ``qdarts_kernels.<op>(..., backend=)``
for the fused backends and ``qdarts_kernels.reference.<op>`` for the eager baseline, which
``torch.compile`` also compiles. The quantizers have one more baseline, ``autograd``: the
straightforward PyTorch code (:func:`straightforward_quant`) that keeps its temporaries for backward,
which is what issue 2's CPU targets and the project design's eager figures compare against.

Minimum memory traffic per element, for fp32 (what GB/s and the share of copy bandwidth count);
tensors in a 2-byte dtype move half of it (the scales, probabilities and weights are negligible):

    mixed_fake_quant / fake_quant   forward 8 B (read x, write y), backward 12 B (read x and g,
                                    write dx), forward+backward 20 B, whatever K
    mixed_op_sum, K inputs          forward (K+1)*4 B, backward (2K+1)*4 B (read g and the K
                                    outputs, write K gradients), forward+backward (3K+2)*4 B
    batch_norm (training, no        forward 8 B (read x, write y), backward 12 B (read g and y,
    affine parameters)              write dx), forward+backward 20 B

The batch norm is the one a DARTS supernet ends each candidate op with, on few channels: the
module :class:`qdarts_kernels.nn.OutputKeepingBatchNorm2d` with its Triton kernels against PyTorch's
``F.batch_norm`` (eager: PyTorch's CUDA kernels; compiled: inductor's), on CUDA tensors only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import qdarts_kernels as qk

MODES = ("forward", "backward", "forward+backward")
EAGER = "eager"
COMPILED = "compiled"
#: The straightforward implementation of a quantizer (issue 2's baseline); see straightforward_quant.
AUTOGRAD = "autograd"
#: Backends whose kernels run on each device type (Triton on CPU only interprets: not timed).
DEVICE_BACKENDS = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}
#: Backends with kernels of their own for each op (the batch norm has Triton kernels only).
OP_BACKENDS = {"batch_norm": ("triton",)}

MFQ_BITS = (2, 4, 8)
FQ_BITS = 4
MOS_K = 8
#: One scale per bit-width, chosen so that each grid spans a few standard deviations of N(0, 1) input.
_SCALE_FOR_BITS = {1: 1.0, 2: 0.75, 3: 0.5, 4: 0.25, 8: 0.02}

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class OpCase:
    """One op on one input shape and dtype.

    ``op`` is "mixed_fake_quant", "fake_quant", "mixed_op_sum" or "batch_norm"; ``scaling`` is
    "per_tensor" or "per_channel" (channel axis 1 of an NCHW tensor) for the quantizers and "-" else;
    ``shape`` is the shape of x (or of each of the K outputs).
    """

    op: str
    scaling: str
    shape: Tuple[int, ...]
    dtype: torch.dtype = torch.float32

    @property
    def bits(self) -> Tuple[int, ...]:
        return {"mixed_fake_quant": MFQ_BITS, "fake_quant": (FQ_BITS,)}.get(self.op, ())

    @property
    def k(self) -> int:
        return MOS_K if self.op == "mixed_op_sum" else len(self.bits)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]

    @property
    def label(self) -> str:
        """The op variant, without size or dtype: the unit of one report table."""
        if self.op == "mixed_op_sum":
            return f"mixed_op_sum K={self.k}"
        if self.op == "batch_norm":
            return "batch_norm training, affine=False"
        bits = ",".join(map(str, self.bits))
        return f"{self.op} bits=({bits}) {self.scaling.replace('_', ' ')}"

    @property
    def id(self) -> str:
        """A short identifier for test ids and file names."""
        shape = "x".join(map(str, self.shape))
        scaling = "" if self.scaling == "-" else f"-{self.scaling}"
        k = "" if self.op == "batch_norm" else f"-K{self.k}"
        return f"{self.op}{scaling}{k}-{shape}-{self.dtype_name}"

    def min_traffic_bytes(self, mode: str) -> int:
        """Bytes a perfect kernel must move for ``mode`` (see the module docstring)."""
        scale = torch.empty(0, dtype=self.dtype).element_size() / 4.0
        if self.op == "mixed_op_sum":
            k = self.k
            per_elem = {"forward": (k + 1) * 4, "backward": (2 * k + 1) * 4, "forward+backward": (3 * k + 2) * 4}
        else:  # the quantizers and the batch norm
            per_elem = {"forward": 8, "backward": 12, "forward+backward": 20}
        return int(per_elem[mode] * scale * self.numel)

    def make_inputs(self, device: str, seed: int = 0) -> List[torch.Tensor]:
        """The leaf tensors of one call, all requiring grad (as in a search step, where x, the
        bit-width probabilities, the LSQ scales and the mixed-op weights all get gradients)."""
        gen = torch.Generator().manual_seed(seed)

        def randn(*shape):
            return torch.randn(*shape, generator=gen).to(device=device, dtype=self.dtype)

        if self.op == "batch_norm":
            leaves = [randn(*self.shape)]
        elif self.op == "mixed_op_sum":
            outputs = [randn(*self.shape) for _ in range(self.k)]
            weights = torch.softmax(torch.randn(self.k, generator=gen), 0).to(device)
            leaves = outputs + [weights]
        else:
            x = randn(*self.shape)
            row = torch.tensor([_SCALE_FOR_BITS.get(b, 2.0 ** (1 - b)) for b in self.bits])
            if self.scaling == "per_channel":
                channels = self.shape[1]
                # vary the step across channels so that per-channel work is not uniform
                spread = torch.linspace(0.5, 1.5, channels)
                scales = row[:, None] * spread[None, :]
            else:
                scales = row
            if self.op == "fake_quant":
                leaves = [x, scales[0].reshape(-1).to(device)]
            else:
                probs = torch.softmax(torch.randn(self.k, generator=gen), 0).to(device)
                leaves = [x, probs, scales.to(device)]
        return [t.requires_grad_() for t in leaves]

    def grad_output(self, device: str, seed: int = 1) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(*self.shape, generator=gen).to(device=device, dtype=self.dtype)

    def function(self, impl: str) -> Callable[..., torch.Tensor]:
        """The un-compiled callable ``f(*leaves) -> y`` for ``impl`` ("eager", "compiled" (the
        same as eager, compiled by the caller) or a backend name)."""
        axis = 1 if self.scaling == "per_channel" else None
        backend = None if impl in (EAGER, COMPILED) else impl
        bits = self.bits
        if self.op == "batch_norm":
            return _batch_norm_function(self.shape[1], impl)
        if impl == AUTOGRAD:
            if self.op == "mixed_op_sum":
                raise ValueError("the autograd baseline is defined for the quantizers; for mixed_op_sum "
                                 "the reference is the straightforward code")
            if self.op == "fake_quant":
                return lambda x, scale: straightforward_quant(x, None, scale.reshape(1, -1), bits, axis)
            return lambda x, probs, scales: straightforward_quant(x, probs, scales, bits, axis)
        if self.op == "mixed_fake_quant":
            if backend is None:
                ref = qk.reference.mixed_fake_quant

                def f(x, probs, scales):
                    return ref(x, probs, scales, bits, axis=axis)
            else:

                def f(x, probs, scales):
                    return qk.mixed_fake_quant(x, probs, scales, bits, axis=axis, backend=backend)
        elif self.op == "fake_quant":
            if backend is None:
                ref = qk.reference.fake_quant

                def f(x, scale):
                    return ref(x, scale, bits[0], axis=axis)
            else:

                def f(x, scale):
                    return qk.fake_quant(x, scale, bits[0], axis=axis, backend=backend)
        elif self.op == "mixed_op_sum":
            if backend is None:
                ref = qk.reference.mixed_op_sum

                def f(*leaves):
                    return ref(list(leaves[:-1]), leaves[-1])
            else:

                def f(*leaves):
                    return qk.mixed_op_sum(list(leaves[:-1]), leaves[-1], backend=backend)
        else:
            raise ValueError(f"unknown op {self.op!r}")
        return f


def implementation(case: OpCase, impl: str) -> Callable[..., torch.Tensor]:
    """``f(*leaves) -> y`` for ``impl``; for "compiled", ``torch.compile`` of the reference with
    static shapes (compilation happens on the first call, one per shape and dtype)."""
    fn = case.function(impl)
    return torch.compile(fn, dynamic=False) if impl == COMPILED else fn


def straightforward_quant(x: torch.Tensor, probs: Optional[torch.Tensor], scales: torch.Tensor,
                          bits: Tuple[int, ...], axis: Optional[int]) -> torch.Tensor:
    """``sum_k p_k * s_k * clamp(round(x * (1/s_k)), -2^(b_k-1), 2^(b_k-1)-1)`` (signed grid, the
    grid of every case here; ``probs`` None means one bit-width with weight 1) as one would write it
    in plain PyTorch: ordinary autograd through every step and a straight-through round
    (``v + (round(v) - v).detach()``). Autograd keeps each bit-width's temporaries for backward."""
    xm = x.float()
    y = None
    for k, b in enumerate(bits):
        s = scales[k].float()
        if axis is not None:
            s = s.reshape([-1 if d == axis else 1 for d in range(x.dim())])
        v = xm * (1.0 / s)
        q = torch.clamp(v + (torch.round(v) - v).detach(), -(2.0 ** (b - 1)), 2.0 ** (b - 1) - 1)
        term = q * s if probs is None else probs[k] * (q * s)
        y = term if y is None else y + term
    return y.to(x.dtype)


def _batch_norm_function(channels: int, impl: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A training batch norm over ``channels`` without affine parameters: PyTorch's own for eager
    and compiled, else the module on the backend's kernels (running statistics on the device of
    the first input)."""
    if impl in (EAGER, COMPILED):
        stats: List[torch.Tensor] = []

        def f(x):
            if not stats:
                stats.extend([torch.zeros(channels, device=x.device), torch.ones(channels, device=x.device)])
            return torch.nn.functional.batch_norm(x, stats[0], stats[1], training=True)

        return f
    from qdarts_kernels.nn import OutputKeepingBatchNorm2d

    module = OutputKeepingBatchNorm2d(channels, affine=False, backend=impl)
    return lambda x: module.to(x.device)(x)


def implementations(case: OpCase, device: str) -> List[str]:
    """What is timed on ``case``: eager, compiled, the fused backends of the device (those with
    kernels for the op), and for the quantizers the straightforward autograd code (for mixed_op_sum
    the reference already is that)."""
    backends = [b for b in backends_for(device) if b in OP_BACKENDS.get(case.op, (b,))]
    return [EAGER, COMPILED] + backends + ([AUTOGRAD] if case.op not in ("mixed_op_sum", "batch_norm") else [])


def backends_for(device: str) -> List[str]:
    """The fused backends of ``qk.available_backends()`` that run natively on ``device``."""
    native = DEVICE_BACKENDS.get(torch.device(device).type, ())
    return [b for b in qk.available_backends() if b in native]


def _nchw(numel: int, channels: int = 64) -> Tuple[int, int, int, int]:
    """An NCHW activation shape of 32x32 maps with ``channels`` channels and ``numel`` elements."""
    per_image = channels * 32 * 32
    if numel % per_image:
        raise ValueError(f"numel {numel} is not a multiple of {per_image}")
    return (numel // per_image, channels, 32, 32)


M = 2**20
#: The anchor shape of mixed_fake_quant in the issue-3 targets on the H100 (33.5M elements).
ANCHOR_33M = (256, 128, 32, 32)
#: The batch norms of a CIFAR-size supernet at batch 256: 4 partial channels of the first cells'
#: 32x32 maps, and 32 full channels of a reduction cell's 16x16 maps.
_BATCH_NORM_SHAPES = ((256, 4, 32, 32), (256, 32, 16, 16))
#: Size sweeps (shapes of x, or of each mixed-op input), keyed by (device type, quick). The H100
#: anchors are 4.2M and 33.5M (mixed_fake_quant) and 1M and 4.2M (mixed_op_sum, 16 and 64
#: channels); the CPU sweeps include the issue-2 targets (4M for mixed_fake_quant, 1M for
#: mixed_op_sum).
_SWEEPS: Dict[Tuple[str, bool], Dict[str, Sequence[Tuple[int, ...]]]] = {
    ("cpu", True): {
        "mfq_pt": (_nchw(M // 4), _nchw(M), _nchw(4 * M)), "mfq_pc": (_nchw(M),), "fq_pt": (_nchw(M),),
        "mos": (_nchw(M // 4, 16), _nchw(M, 16)),
    },
    ("cpu", False): {
        "mfq_pt": (_nchw(M // 16), _nchw(M // 4), _nchw(M), _nchw(4 * M), _nchw(16 * M)),
        "mfq_pc": (_nchw(M // 4), _nchw(M), _nchw(4 * M)),
        "fq_pt": (_nchw(M), _nchw(4 * M)), "fq_pc": (_nchw(M), _nchw(4 * M)),
        "mos": (_nchw(M // 16, 16), _nchw(M // 4, 16), _nchw(M, 16), _nchw(4 * M)),
    },
    ("cuda", True): {
        "mfq_pt": (_nchw(4 * M), ANCHOR_33M), "mfq_pc": (_nchw(4 * M),), "fq_pt": (_nchw(4 * M),),
        "mos": (_nchw(M, 16), _nchw(4 * M)),
        "bn": _BATCH_NORM_SHAPES[:1],
    },
    ("cuda", False): {
        "mfq_pt": (_nchw(M // 4), _nchw(M), _nchw(4 * M), ANCHOR_33M), "mfq_pc": (_nchw(4 * M), ANCHOR_33M),
        "fq_pt": (_nchw(4 * M), ANCHOR_33M), "fq_pc": (_nchw(4 * M),),
        "mos": (_nchw(M, 16), _nchw(4 * M), _nchw(16 * M)),
        "bn": _BATCH_NORM_SHAPES,
    },
}
_FAMILIES = {
    "mfq_pt": ("mixed_fake_quant", "per_tensor"),
    "mfq_pc": ("mixed_fake_quant", "per_channel"),
    "fq_pt": ("fake_quant", "per_tensor"),
    "fq_pc": ("fake_quant", "per_channel"),
    "mos": ("mixed_op_sum", "-"),
    "bn": ("batch_norm", "-"),
}


def sweep(device: str, quick: bool) -> List[OpCase]:
    """The cases for one device: fp32 everywhere, and bf16 too on a GPU (its mixed-precision
    training dtype); on CPU bf16 has no fast path worth a table."""
    kind = torch.device(device).type
    dtypes = (torch.float32, torch.bfloat16) if kind == "cuda" else (torch.float32,)
    return [
        OpCase(*_FAMILIES[family], shape, dtype)
        for family, shapes in _SWEEPS[(kind, quick)].items()
        for shape in shapes
        # the quick sweep's batch norm in fp32 only: each dtype costs two more inductor compiles
        for dtype in (dtypes[:1] if quick and family == "bn" else dtypes)
    ]
