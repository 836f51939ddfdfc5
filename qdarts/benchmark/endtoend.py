"""End to end: time per search step and memory of the supernet, fused ops against the reference.

One search step is ``qdarts.search.Searcher.step`` itself, after the warm-up (DESIGN section 2),
with the defaults of ``SearchConfig`` (first order) but the network's size, on a fixed train and
validation batch of random data of the right shape (values do not change the work): forward +
backward of CE on the validation batch for the gradients of alpha and beta only, and an Adam step
of them; then forward + backward of ``CE + lambda * C(gamma)`` on the train batch with alpha and
beta frozen, an SGD step of the weights (gradient clip 5) and of the bit logits. Compiled, it is
the step of ``qdarts search --compile``.

The same supernet is run with three kinds of ops:

- ``fused``: the public ops with the automatic backend (the C++ ``cpu`` kernels on CPU, the fastest
  GPU backend on CUDA);
- ``reference``: the ``reference`` backend of the public ops (``SupernetConfig(backend=
  "reference")``): the pure-PyTorch maths inside the ops' autograd functions;
- ``eager``: the supernet run inside ``qdarts_kernels.eager_reference()``: every public op, and
  every QAT module that calls one, computes with ``qdarts_kernels.reference`` under ordinary
  autograd, as plain PyTorch code would. The calls are counted, so a supernet that bypassed the
  switch would fail loudly.

Memory: on CUDA the peak allocated memory of one step (``torch.cuda.max_memory_allocated``); on
every device the bytes autograd keeps for backward in the arch half and in the weight half of the
step (saved-tensor hooks, distinct storages, parameters and the input batches excluded), the part
of the peak the ops control; ``saved_mb`` is the larger of the two.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

import qdarts_kernels as qk

from qdarts.data import Dataset
from qdarts.search import SearchConfig, Searcher

from .timing import kept_bytes, measure_interleaved, synchronize

OPS_KINDS = ("fused", "reference", "eager")


@dataclass(frozen=True)
class E2EConfig:
    name: str
    input_shape: Tuple[int, int, int]
    batch: int
    channels: int
    layers: int
    partial_channels: int

    @property
    def description(self) -> str:
        c, h, w = self.input_shape
        return (f"{c}x{h}x{w}, batch {self.batch}, C={self.channels}, {self.layers} cells, "
                f"partial channels 1/{self.partial_channels}")


def digits_config() -> E2EConfig:
    """The supernet of ``qdarts search`` with its defaults (the embedded digits set, 1x8x8)."""
    d = SearchConfig()
    return E2EConfig("digits", (1, 8, 8), d.batch_size, d.channels, d.layers, d.partial_channels)


#: CIFAR size as in the official search (C=16, 8 cells, partial channels 1/4) at batch 64.
CIFAR = E2EConfig("cifar", (3, 32, 32), 64, 16, 8, 4)


def plan(device: str, quick: bool) -> Tuple[List[E2EConfig], Tuple[str, ...]]:
    """The configurations and ops kinds to time. On CPU, where a digits step takes seconds and a
    CIFAR-size step tens of seconds, only fused against eager, and ``--quick`` only digits."""
    if torch.device(device).type == "cpu":
        return ([digits_config()] if quick else [digits_config(), CIFAR]), ("fused", "eager")
    return [digits_config(), CIFAR], OPS_KINDS


class SearchStep:
    """A :class:`Searcher` with the defaults of ``SearchConfig`` for everything but the network's size,
    on one fixed train and one fixed val batch of random data; a call is one search step."""

    def __init__(self, cfg: E2EConfig, device: str, backend: Optional[str], *,
                 compile_mode: Optional[str] = None, seed: int = 0):
        config = SearchConfig(batch_size=cfg.batch, channels=cfg.channels, layers=cfg.layers,
                              partial_channels=cfg.partial_channels, train_portion=0.5, seed=seed,
                              device=device, backend=backend, compile=compile_mode)
        # train_portion 0.5 splits these two batches' worth of samples into one train and one val batch
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn((2 * cfg.batch, *cfg.input_shape), generator=gen)
        y = torch.randint(0, 10, (2 * cfg.batch,), generator=gen)
        data = Dataset("random", x, y, x[:0], y[:0], num_classes=10)  # no test split: the search never reads it
        # out_dir is never written: the benchmark takes no checkpoint
        self.searcher = Searcher(config, out_dir="", progress=False, dataset=data)
        s = self.searcher
        self.train_batch = (s.train_x.to(device), s.train_y.to(device))
        self.val_batch = (s.val_x.to(device), s.val_y.to(device))
        self.stats = torch.zeros(4, device=device)

    def __call__(self) -> None:
        # lr: the first epoch's learning rate (only the second-order arch step reads it)
        self.searcher.step(*self.train_batch, *self.val_batch, self.searcher.config.weight_lr, self.stats,
                           update_arch=True)

    def saved_bytes(self) -> Dict[str, int]:
        """Bytes autograd keeps for backward in each half of a step, ``{"arch": ..., "weight": ...}``
        (parameters and the input batches excluded; one count per distinct storage), counted over
        one arch step and one weight step of the search (which thus also update the parameters).
        The halves keep different tensors (the arch step keeps the candidate outputs for the
        gradient of alpha, the weight step does not), and the larger one bounds the peak."""
        s = self.searcher
        lr = s.config.weight_lr
        return {"arch": self._kept_bytes(lambda: s._arch_step(*self.train_batch, *self.val_batch, lr)),
                "weight": self._kept_bytes(lambda: s._weight_step(*self.train_batch, self.stats))}

    def _kept_bytes(self, run: Callable[[], None]) -> int:
        return kept_bytes(run, [*self.searcher.net.parameters(), *self.train_batch, *self.val_batch])


def _prepare_variant(cfg: E2EConfig, ops: str, device: str, compiled: bool) -> Tuple[Dict[str, Any], Callable]:
    """Build one variant, take its first step (warm-up, and compilation), count what it keeps for
    backward and (on CUDA) its peak memory; returns that record and ``run(_)``, one timed step."""
    backend = {"fused": None, "reference": "reference", "eager": None}[ops]

    def swap():
        return qk.eager_reference() if ops == "eager" else contextlib.nullcontext(None)

    on_cuda = torch.device(device).type == "cuda"
    # what the variants prepared before this one hold (they stay alive to be timed in turn)
    held_by_others = torch.cuda.memory_allocated(device) if on_cuda else 0
    with swap() as calls:
        step = SearchStep(cfg, device, backend, compile_mode="default" if compiled else None)
        synchronize(device)
        t0 = time.perf_counter()
        step()
        synchronize(device)
        first_s = time.perf_counter() - t0
        # compiled steps trace the reference without counting (qk.eager_reference)
        if calls is not None and not compiled and not (calls["mixed_fake_quant"] and calls["mixed_op_sum"]):
            raise RuntimeError(f"the eager-reference swap did not reach the supernet's ops (calls: {dict(calls)})")
        saved = step.saved_bytes()
        peak = None
        if on_cuda:
            torch.cuda.reset_peak_memory_stats(device)
            step()
            synchronize(device)
            peak = (torch.cuda.max_memory_allocated(device) - held_by_others) / 2**20

    def run(_):
        with swap():
            step()

    record = {
        "config": cfg.name, "description": cfg.description, "ops": ops, "mode": "compiled" if compiled else "eager",
        "batch": cfg.batch, "input_shape": list(cfg.input_shape), "channels": cfg.channels, "layers": cfg.layers,
        "first_step_s": first_s, "saved_mb": max(saved.values()) / 2**20,
        "saved_mb_arch": saved["arch"] / 2**20, "saved_mb_weight": saved["weight"] / 2**20, "peak_mb": peak,
    }
    return record, run


def _measure_config(cfg: E2EConfig, kinds: Sequence[str], device: str, quick: bool, compiled: bool,
                    log: Callable[[str], None]) -> List[Dict[str, Any]]:
    """The records of one configuration's variants, timed one step of each in turn (as the kernel
    benchmarks are), so that on a machine whose speed drifts their ratio compares steps taken side
    by side. A variant that fails is reported, and the others still run."""
    mode = "compiled" if compiled else "eager"
    records: Dict[str, Dict[str, Any]] = {}
    runs = {}
    for ops in kinds:
        try:
            records[ops], run = _prepare_variant(cfg, ops, device, compiled)
            runs[ops] = (lambda: None, run)
        except Exception as e:
            records[ops] = {"config": cfg.name, "description": cfg.description, "ops": ops, "mode": mode,
                            "error": f"{type(e).__name__}: {e}"}
    # CPU steps take seconds and the first step was the warm-up: a few rounds
    cpu = torch.device(device).type == "cpu"
    timings = measure_interleaved(runs, device, warmup=0 if cpu else 1, min_samples=(2 if quick else 3) if cpu else 5,
                                  max_samples=20, budget_s=1.0 if cpu or quick else 10.0) if runs else {}
    for ops in kinds:
        r = records[ops]
        timing = timings.get(ops)
        if isinstance(timing, Exception):
            r = records[ops] = {"config": cfg.name, "description": cfg.description, "ops": ops, "mode": mode,
                                "error": f"{type(timing).__name__}: {timing}"}
        elif timing is not None:
            r.update(median_ms=timing.median * 1e3, p20_ms=timing.p20 * 1e3, p80_ms=timing.p80 * 1e3,
                     samples=len(timing.samples))
        if "error" in r:
            log(f"  {cfg.name:<7} {ops:<9} FAILED: {r['error']}")
        else:
            log(f"  {cfg.name:<7} {ops:<9} {mode:<8} {r['median_ms']:9.1f} ms/step  saved {r['saved_mb']:.0f} MB"
                + (f"  peak {r['peak_mb']:.0f} MB" if r["peak_mb"] else ""))
    return [records[ops] for ops in kinds]


def run(device: str, *, quick: bool, compiled: bool = False,
        log: Callable[[str], None] = print) -> Tuple[List[Dict[str, Any]], Optional[str]]:
    """Records for each config x ops kind (x compiled when asked), and a note for the report."""
    try:
        import qdarts.cost  # noqa: F401
        import qdarts.search  # noqa: F401
        import qdarts.supernet  # noqa: F401
    except ImportError as e:
        note = f"Not measured: the search layer could not be imported ({type(e).__name__}: {e})."
        log("  " + note)
        return [], note
    if torch.device(device).type == "cuda":
        fused_backend = "the preferred GPU backend, Triton or CUDA"
    else:
        fused_backend = "cpu" if "cpu" in qk.available_backends() else "reference: the C++ extension is not built"
    note = (f"Random data of the configuration's shape; one step of `qdarts search` itself (`Searcher.step`, "
            f"first order: alpha and beta on the val batch, then weights and bit logits on the train batch), its "
            f"defaults otherwise. `fused` = automatic backend ({fused_backend} here); `reference` = backend "
            f"'reference' of the public ops; `eager` = the same step inside `qdarts_kernels.eager_reference()` "
            f"(every op and QAT module on the reference under plain autograd). The variants of a configuration "
            f"are timed one step of each in turn, after one warm-up step each. "
            "'saved MB': kept for backward by the larger half of the step (arch half / weight half in brackets). "
            + ("Peak MB: CUDA peak allocated memory of one step." if device == "cuda"
               else "Peak memory is not measurable on CPU; 'saved MB' stands for it."))
    records = []
    cfgs, kinds = plan(device, quick)
    for cfg in cfgs:
        for mode in ((False, True) if compiled else (False,)):
            records += _measure_config(cfg, kinds, device, quick, mode, log)
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
    met = speedup >= 2.0 and memory_ratio is not None and memory_ratio >= 2.0
    return {"config": f"CIFAR size ({CIFAR.description})", "speedup": speedup, "memory": memory_key,
            "memory_ratio": memory_ratio, "target": 2.0, "met": met}
