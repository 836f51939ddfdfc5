"""End to end: time per search step and memory of the supernet, fused ops against the reference.

One search step is the first-order ∇QDARTS step of DESIGN section 2 on random data of the right
shape (values do not change the work): forward + backward of ``CE + lambda * C(gamma)`` on a train
batch and an SGD step of the weights and bit logits (gradient clip 5), then forward + backward of
CE on a validation batch and an Adam step of alpha and beta.

The same supernet is run with three kinds of ops:

- ``fused``: the public ops with the automatic backend (the C++ ``cpu`` kernels on CPU, the fastest
  GPU backend on CUDA);
- ``reference``: the ``reference`` backend of the public ops (``SupernetConfig(backend=
  "reference")``): the pure-PyTorch maths inside the custom ops, which keep only their inputs for
  backward and recompute the rest;
- ``eager``: the supernet calling ``qdarts_kernels.reference`` directly with ordinary autograd, what
  a straightforward PyTorch implementation does (every per-bit temporary kept for backward). The
  public ops are swapped for the reference functions while the network is built and run; the swap is
  checked (calls are counted) so a supernet that bypassed it would fail loudly.

Memory: on CUDA the peak allocated memory of one step (``torch.cuda.max_memory_allocated``); on
every device the bytes autograd keeps for the backward of the training forward (saved-tensor hooks,
distinct storages, parameters and the input batch excluded), the part of the peak the ops control.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F

import qdarts_kernels as qk

from .timing import measure, synchronize

#: λ of the official code (DESIGN section 2).
COST_WEIGHT = 1e-4
_PUBLIC_OPS = ("fake_quant", "mixed_fake_quant", "mixed_op_sum")
OPS_KINDS = ("fused", "reference", "eager")


@dataclass(frozen=True)
class E2EConfig:
    name: str
    description: str
    input_shape: Tuple[int, int, int]
    batch: int
    channels: int
    layers: int


DIGITS = E2EConfig("digits", "digits defaults: 1x8x8, batch 64, C=16, 5 cells", (1, 8, 8), 64, 16, 5)
CIFAR = E2EConfig("cifar", "CIFAR size: 3x32x32, batch 64, C=16, 8 cells", (3, 32, 32), 64, 16, 8)


def plan(device: str, quick: bool) -> Tuple[List[E2EConfig], Tuple[str, ...]]:
    """The configurations and ops kinds to time. On CPU, where a digits step takes seconds and a
    CIFAR-size step tens of seconds, only fused against eager, and ``--quick`` only digits."""
    if torch.device(device).type == "cpu":
        return ([DIGITS] if quick else [DIGITS, CIFAR]), ("fused", "eager")
    return [DIGITS, CIFAR], OPS_KINDS


@contextlib.contextmanager
def eager_reference_ops() -> Iterator[Counter]:
    """Within the block, every reference to the public ops in the loaded ``qdarts_kernels`` and
    ``qdarts`` modules calls ``qdarts_kernels.reference`` instead (ordinary autograd; the
    ``backend`` argument is ignored). Yields a Counter of the calls made."""
    calls: Counter = Counter()
    originals = {name: getattr(qk.ops, name) for name in _PUBLIC_OPS}

    def to_reference(name: str) -> Callable[..., torch.Tensor]:
        ref = getattr(qk.reference, name)

        def call(*args, backend=None, **kwargs):
            calls[name] += 1
            return ref(*args, **kwargs)

        return call

    replacements = {name: to_reference(name) for name in _PUBLIC_OPS}
    patched = []
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not (mod_name.startswith("qdarts_kernels") or mod_name.startswith("qdarts")):
            continue
        if mod_name.startswith("qdarts_kernels.reference") or mod_name.startswith("qdarts.benchmark"):
            continue
        for name in _PUBLIC_OPS:
            if getattr(mod, name, None) is originals[name]:
                setattr(mod, name, replacements[name])
                patched.append((mod, name))
    try:
        yield calls
    finally:
        for mod, name in patched:
            setattr(mod, name, originals[name])


class SearchStep:
    """The supernet, its optimisers and one search step (see the module docstring)."""

    def __init__(self, cfg: E2EConfig, device: str, backend: Optional[str], seed: int = 0):
        from qdarts.cost import ExpectedCost
        from qdarts.supernet import SearchNetwork, SupernetConfig

        torch.manual_seed(seed)
        self.net = SearchNetwork(SupernetConfig(input_shape=cfg.input_shape, num_classes=10, channels=cfg.channels,
                                                layers=cfg.layers, backend=backend)).to(device)
        gen = torch.Generator().manual_seed(seed)
        shape = (cfg.batch, *cfg.input_shape)
        self.batches = [(torch.randn(shape, generator=gen).to(device), torch.randint(0, 10, (cfg.batch,),
                                                                                     generator=gen).to(device))
                        for _ in range(2)]
        with torch.no_grad():
            self.net(self.batches[0][0])  # the convs record their MACs for the cost model
        self.cost = ExpectedCost(self.net)
        groups = self.net.param_groups()
        self.weights = groups["weights"]
        self.opt_w = torch.optim.SGD(self.weights, lr=0.1, momentum=0.9, weight_decay=3e-4)
        self.opt_gamma = torch.optim.SGD(groups["gamma"], lr=0.01, weight_decay=1e-3)
        self.opt_arch = torch.optim.Adam(groups["alpha"] + groups["beta"], lr=6e-4, betas=(0.5, 0.999),
                                         weight_decay=1e-3)

    def train_loss(self) -> torch.Tensor:
        x, y = self.batches[0]
        return F.cross_entropy(self.net(x), y) + COST_WEIGHT * self.cost()

    def __call__(self) -> None:
        for opt in (self.opt_w, self.opt_gamma):
            opt.zero_grad(set_to_none=True)
        self.train_loss().backward()
        torch.nn.utils.clip_grad_norm_(self.weights, 5.0)
        self.opt_w.step()
        self.opt_gamma.step()
        self.opt_arch.zero_grad(set_to_none=True)
        x, y = self.batches[1]
        F.cross_entropy(self.net(x), y).backward()
        self.opt_arch.step()

    def saved_bytes(self) -> int:
        """Bytes autograd keeps for the backward of one training forward (parameters and the input
        batch excluded)."""
        own = {p.untyped_storage().data_ptr() for p in self.net.parameters()}
        own |= {t.untyped_storage().data_ptr() for b in self.batches for t in b}
        kept: Dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in own:
                kept[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = self.train_loss()
        del loss
        return sum(kept.values())


def _measure_variant(cfg: E2EConfig, ops: str, device: str, quick: bool, compiled: bool) -> Dict[str, Any]:
    backend = {"fused": None, "reference": "reference", "eager": None}[ops]
    swap = eager_reference_ops() if ops == "eager" else contextlib.nullcontext(None)
    with swap as calls:
        step = SearchStep(cfg, device, backend)
        if compiled:
            step.net.compile()
        synchronize(device)
        t0 = time.perf_counter()
        step()  # first step: warm-up (and compilation)
        synchronize(device)
        first_s = time.perf_counter() - t0
        if calls is not None and not (calls["mixed_fake_quant"] and calls["mixed_op_sum"]):
            raise RuntimeError(f"the eager-reference swap did not reach the supernet's ops (calls: {dict(calls)})")
        saved = step.saved_bytes()
        peak = None
        if torch.device(device).type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            step()
            synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) / 2**20
        # the first step above was the warm-up; CPU steps are long and steady: few samples
        few = quick or torch.device(device).type == "cpu"
        timing = measure(lambda _: step(), lambda: None, device, warmup=0 if few else 1,
                         min_samples=2 if few else 5, max_samples=20, budget_s=1.0 if few else 10.0)
    return {
        "config": cfg.name, "description": cfg.description, "ops": ops, "mode": "compiled" if compiled else "eager",
        "batch": cfg.batch, "input_shape": list(cfg.input_shape), "channels": cfg.channels, "layers": cfg.layers,
        "median_ms": timing.median * 1e3, "p20_ms": timing.p20 * 1e3, "p80_ms": timing.p80 * 1e3,
        "samples": len(timing.samples), "first_step_s": first_s, "saved_mb": saved / 2**20, "peak_mb": peak,
    }


def run(device: str, *, quick: bool, compiled: bool = False,
        log: Callable[[str], None] = print) -> Tuple[List[Dict[str, Any]], Optional[str]]:
    """Records for each config x ops kind (x compiled when asked), and a note for the report."""
    try:
        import qdarts.cost  # noqa: F401
        import qdarts.supernet  # noqa: F401
    except ImportError as e:
        note = f"Not measured: the search layer could not be imported ({type(e).__name__}: {e})."
        log("  " + note)
        return [], note
    if torch.device(device).type == "cuda":
        fused_backend = "the preferred GPU backend, Triton or CUDA"
    else:
        fused_backend = "cpu" if "cpu" in qk.available_backends() else "reference: the C++ extension is not built"
    note = (f"Random data of the configuration's shape; first-order step (train: weights and bit logits, val: "
            f"alpha and beta). `fused` = automatic backend ({fused_backend} here); `reference` = backend "
            f"'reference' of the public ops; `eager` = `qdarts_kernels.reference` with plain autograd. "
            + ("Peak MB: CUDA peak allocated memory of one step." if device == "cuda"
               else "Peak memory is not measurable on CPU; 'saved MB' (kept for backward) stands for it."))
    records = []
    cfgs, kinds = plan(device, quick)
    for cfg in cfgs:
        for mode in ((False, True) if compiled else (False,)):
            for ops in kinds:
                try:
                    r = _measure_variant(cfg, ops, device, quick, mode)
                    log(f"  {cfg.name:<7} {ops:<9} {r['mode']:<8} {r['median_ms']:9.1f} ms/step  "
                        f"saved {r['saved_mb']:.0f} MB" + (f"  peak {r['peak_mb']:.0f} MB" if r["peak_mb"] else ""))
                except Exception as e:  # reported, and the other variants still run
                    r = {"config": cfg.name, "description": cfg.description, "ops": ops,
                         "mode": "compiled" if mode else "eager", "error": f"{type(e).__name__}: {e}"}
                    log(f"  {cfg.name:<7} {ops:<9} FAILED: {r['error']}")
                records.append(r)
                if torch.device(device).type == "cuda":
                    torch.cuda.empty_cache()
    return records, note


def check_target(records: List[Dict[str, Any]], device: str) -> Optional[Dict[str, Any]]:
    """Issue 6's end-to-end target (set for an H100): the CIFAR-size step with the fused ops at least
    2x faster and with at least 2x less peak memory than on the eager reference ops. Off CUDA the
    memory compared is the memory kept for backward (no peak is measurable there)."""
    by_ops = {r["ops"]: r for r in records if r.get("config") == CIFAR.name and r.get("mode") == "eager"
              and "median_ms" in r}
    if "fused" not in by_ops or "eager" not in by_ops:
        return None
    fused, eager = by_ops["fused"], by_ops["eager"]
    memory_key = "peak_mb" if torch.device(device).type == "cuda" else "saved_mb"
    speedup = eager["median_ms"] / fused["median_ms"]
    memory_ratio = eager[memory_key] / fused[memory_key] if fused[memory_key] else None
    return {"config": CIFAR.description, "speedup": speedup, "memory": memory_key, "memory_ratio": memory_ratio,
            "target": 2.0, "met": speedup >= 2.0 and memory_ratio is not None and memory_ratio >= 2.0}
