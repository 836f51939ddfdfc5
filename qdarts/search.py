"""The joint architecture and bit-width search (gradient QDARTS) with per-epoch atomic checkpoints.

Per step (DESIGN section 2):

1. from the warm-up epoch on, alpha and beta take one Adam step on the validation cross-entropy,
   first order (the gradient at the current weights) or DARTS second order (the gradient at the
   weights after one virtual SGD step, with the finite-difference Hessian-vector product);
2. weights (SGD, cosine learning rate, gradient clipping) and gamma (SGD) take one step on the
   train split's ``CE + lambda * C(gamma)`` (alpha and beta held fixed: they learn only from the
   validation split).

Nothing in a step reads a value back to the host: the losses and accuracies are accumulated as
tensors and read once per epoch. A run is a pure function of its config (seed included): the data
order of epoch e comes from a generator seeded by (seed, e), the global RNG state is saved in the
checkpoint, so resuming continues to exactly the result of an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Callable, Collection, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import qdarts_kernels as qk
from qdarts_kernels import _backends

from . import distributed
from .checkpoint import (atomic_torch_save, atomic_write_text, error_reason, load_checkpoint, pack_tensors,
                         refuse_outputs_without_checkpoint, resumed_config, rng_state, seed_everything, set_rng_state,
                         typed_over_saved, unpack_tensors, warn_if_world_size_changed, writing_into)
from .cost import COST_KINDS, ExpectedCost, network_cost
from .cudagraph import GraphedStep
from .data import (DATASETS, Dataset, absolute_data_dir, batches, check_data_dir, check_split_sizes, load_dataset,
                   num_batches)
from .derive import derive_genotype
from .divergence import check_figures, diagnosed, kept_checkpoint
from .evalnet import EvalNetwork
from .genotype import GENOTYPE_FILE, MAX_BITS, Genotype
from .fastpath import COMPILE_MODES, captures_cuda_graphs, compiled, record_shapes
from .ops import ACT_GRIDS, QUANTIZERS
from .report import HISTORY_FILE
from .supernet import ACT_DTYPES, SearchNetwork, SupernetConfig

__all__ = ["SearchConfig", "Searcher", "run_search", "cosine_lr", "CHECKPOINT", "ORDERS"]

CHECKPOINT = "checkpoint.pt"
ORDERS = ("first", "second")


@dataclass
class SearchConfig:
    """Every setting of a search; the defaults are tuned for the embedded digits set on a laptop CPU."""

    data: str = "digits"
    data_dir: Optional[str] = None
    bits: Tuple[int, ...] = (2, 4, 8)
    epochs: int = 10
    warmup_epochs: int = 3
    batch_size: int = 128
    channels: int = 8
    layers: int = 3
    steps: int = 4
    partial_channels: int = 2
    quantizer: str = "paper"
    act_grid: str = "follow"
    share_gamma: bool = True
    cost: str = "improved"
    cost_weight: float = 1e-3
    order: str = "first"
    weight_lr: float = 0.1
    weight_lr_min: float = 1e-3
    weight_momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    gamma_lr: float = 1.0
    gamma_momentum: float = 0.9
    gamma_decay: float = 1e-3
    arch_lr: float = 3e-3
    arch_betas: Tuple[float, float] = (0.5, 0.999)
    arch_decay: float = 1e-3
    train_portion: float = 0.5
    seed: int = 0
    device: str = "cpu"
    backend: Optional[str] = None
    grouped_weights: bool = True
    act_dtype: str = "fp32"
    compile: Optional[str] = None
    cuda_graph: bool = False

    def __post_init__(self) -> None:
        # sequences as tuples, as a checkpoint's settings are read back: bits=[2, 4, 8] given to the API and
        # the (2, 4, 8) of its checkpoint are one setting of a resumed run
        for name in ("bits", "arch_betas"):
            if isinstance(getattr(self, name), list):
                setattr(self, name, tuple(getattr(self, name)))

    def validate(self) -> None:
        def need(ok, msg):
            if not ok:
                raise ValueError(msg)

        need(self.data in DATASETS, f"data must be one of {', '.join(DATASETS)}, got {self.data!r}")
        check_data_dir(self.data, self.data_dir)
        need(isinstance(self.bits, tuple) and 1 <= len(self.bits) <= 4
             and all(isinstance(b, int) and 1 <= b <= MAX_BITS for b in self.bits),
             f"bits must be 1..4 bit-widths in [1, {MAX_BITS}], got {self.bits}")
        need(len(set(self.bits)) == len(self.bits), f"bits must be distinct, got {self.bits}")
        check_integers(self, ("epochs", "warmup_epochs", "batch_size", "layers", "channels", "steps",
                              "partial_channels"))
        need(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        need(0 <= self.warmup_epochs, f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.layers >= 1, f"layers must be >= 1, got {self.layers}")
        need(self.channels >= 1, f"channels must be >= 1, got {self.channels}")
        need(self.steps >= 2, f"steps (intermediate nodes per cell) must be >= 2, got {self.steps}")
        need(self.partial_channels >= 1, f"partial_channels must be >= 1, got {self.partial_channels}")
        need(self.channels % self.partial_channels == 0,
             f"channels ({self.channels}) must be divisible by partial_channels ({self.partial_channels})")
        need(self.quantizer in QUANTIZERS, f"quantizer must be one of {QUANTIZERS}, got {self.quantizer!r}")
        need(self.act_grid in ACT_GRIDS, f"act_grid must be one of {ACT_GRIDS}, got {self.act_grid!r}")
        need(self.cost in COST_KINDS, f"cost must be one of {COST_KINDS}, got {self.cost!r}")
        need(self.order in ORDERS, f"order must be one of {ORDERS}, got {self.order!r}")
        for name in ("cost_weight", "weight_lr", "weight_lr_min", "weight_momentum", "weight_decay", "grad_clip",
                     "gamma_lr", "gamma_momentum", "gamma_decay", "arch_lr", "arch_decay"):
            check_non_negative(name, getattr(self, name))
        check_seed(self.seed)
        need(self.act_dtype in ACT_DTYPES, f"act_dtype must be one of {ACT_DTYPES}, got {self.act_dtype!r}")
        need(self.compile is None or self.compile in COMPILE_MODES,
             f"compile must be None or one of {COMPILE_MODES}, got {self.compile!r}")
        check_device(self.device, self.backend)
        if self.cuda_graph:
            need(self.device.startswith("cuda"), f"cuda_graph needs a CUDA device, got device {self.device!r}")
            need(self.compile is None, f"cuda_graph and compile ({self.compile!r}) exclude each other: compile "
                 "reduce-overhead and max-autotune capture CUDA graphs of their own")
            need(self.order == "first", f"cuda_graph needs order 'first', got {self.order!r}")

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "SearchConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


#: the CLI options spelt unlike their settings (the others alike: seed is --seed, weight_lr --weight-lr), and
#: None for the settings (of a search or a retraining) the command line does not offer
OPTIONS = {"cost_weight": "--lambda", "share_gamma": "--gamma-per-conv", "lr_min": None, "momentum": None,
           **dict.fromkeys(("steps", "weight_lr_min", "weight_momentum", "weight_decay", "grad_clip", "gamma_momentum",
                            "gamma_decay", "arch_betas", "arch_decay", "train_portion"))}
#: the settings a resumed search may change: where and how a step runs, not what it computes (a run moved
#: from a CPU to a GPU takes another backend; every backend computes the ops' one contract)
RESUME_MAY_CHANGE = ("device", "backend", "cuda_graph")

#: per-epoch data-order seeds are ``seed * 1_000_003 + 2 * epoch (+ 1)``: seeds below 2**32 keep them well
#: within the 64 bits of torch.Generator.manual_seed for any number of epochs
SEED_LIMIT = 2**32


def option(name: str) -> str:
    """``name (--option)``: a setting as the Python API and the command line spell it."""
    flag = OPTIONS.get(name, "--" + name.replace("_", "-"))
    return name if flag is None else f"{name} ({flag})"


def check_non_negative(name: str, value: float) -> None:
    """A ValueError naming the setting and its CLI option unless ``value`` is a finite number >= 0 (learning
    rates: PyTorch's optimisers refuse negative ones, and a NaN or inf one turns every weight into NaN)."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{option(name)} must be a finite number >= 0, got {value!r}")


def check_integers(config: Any, names: Sequence[str]) -> None:
    """A ValueError naming the first of the settings ``names`` of ``config`` that is not an integer (a bool
    neither; None is left to the caller: an optional setting's default): epochs=1.5 would run 2 epochs."""
    for name in names:
        value = getattr(config, name)
        if value is not None and type(value) is not int:
            raise ValueError(f"{option(name)} must be an integer, got {value!r}")


def check_seed(seed: int) -> None:
    if not (isinstance(seed, int) and 0 <= seed < SEED_LIMIT):
        raise ValueError(f"{option('seed')} must be an integer in [0, 2**32), got {seed!r}")


def check_device(device: str, backend: Optional[str]) -> None:
    """A ValueError naming --device or --backend unless ``device`` is the CPU or a CUDA device present here
    and ``backend`` (None: QDARTS_BACKEND if set, else automatic) is one of
    ``qdarts_kernels.available_backends()`` that runs on it; and one naming the variable where the CPU
    kernels' environment holds a value they would refuse."""
    try:
        kind, index = torch.device(device).type, torch.device(device).index
    except (RuntimeError, TypeError):
        kind, index = None, None
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"{option('device')} must be cpu or cuda[:i], got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{option('device')} {device!r} requested but CUDA is not available")
    if kind == "cuda" and index is not None and index >= torch.cuda.device_count():
        raise ValueError(f"{option('device')} {device!r} requested but there are {torch.cuda.device_count()} "
                         "CUDA devices")
    # the environment the kernels read, checked before the run starts (and creates its folder), not at
    # their first call: an unset --backend takes QDARTS_BACKEND, named as such
    qk.cpu_kernels.check_environment()
    backend, source = _backends.requested(backend)
    source = option("backend") if source == "backend" else f"{source} (environment)"
    if backend is None:
        return
    available = qk.available_backends()
    if backend not in available:
        raise ValueError(f"{source} {backend!r} is not available here (available: {', '.join(available)})")
    if backend in ("cpu", "cuda") and kind != backend:
        raise ValueError(f"{source} {backend!r} runs on --device {backend} only, got {device!r}")
    if backend == "triton" and kind == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"{source} 'triton' runs on --device cpu only under TRITON_INTERPRET=1")


def set_capturable(optimizer: torch.optim.Optimizer, capturable: bool) -> None:
    """Make an Adam-like optimizer (graph-)capturable or not after the fact: the flag in every param
    group, and each ``step`` count where that mode keeps it (on the parameter's device when
    capturable, a CPU scalar otherwise)."""
    for group in optimizer.param_groups:
        group["capturable"] = capturable
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and "step" in state:
                state["step"] = state["step"].to(p.device if capturable else "cpu")


@contextmanager
def frozen(params: Sequence[torch.nn.Parameter]):
    """Temporarily exclude ``params`` from autograd (no gradient is computed for them at all)."""
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def cosine_lr(epoch: int, epochs: int, lr: float, lr_min: float) -> float:
    """Cosine annealing from ``lr`` at epoch 0 towards ``lr_min`` at ``epochs``."""
    return lr_min + 0.5 * (lr - lr_min) * (1.0 + math.cos(math.pi * epoch / epochs))


def _rounded(t: torch.Tensor) -> List:
    """A tensor as nested lists of floats rounded to 6 decimals (keeps history.json small)."""
    def walk(v):
        return round(v, 6) if isinstance(v, float) else [walk(u) for u in v]

    return walk(t.detach().cpu().double().tolist())


class Searcher:
    """Holds the supernet, its optimisers and the history; ``run`` performs the remaining epochs."""

    def __init__(self, config: SearchConfig, out_dir: str, *, progress: bool = True,
                 dataset: Optional[Dataset] = None):
        """``dataset``: the data to search on; by default ``config.data``, loaded from ``config.data_dir``
        (the end-to-end benchmark passes random data of the shape it times)."""
        config.validate()
        self.config = config
        self.out_dir = out_dir
        self.progress = progress
        self.dist = distributed.current()
        self._replicas_equal = not self.dist.enabled

        self.device = torch.device(config.device)
        self.dataset = load_dataset(config.data, config.data_dir) if dataset is None else dataset
        self.train_x, self.train_y, self.val_x, self.val_y = self.dataset.search_split(config.train_portion)
        check_split_sizes(self.dataset.name, config.data_dir, self.dist.world_size,
                          {"train split": self.train_x.shape[0], "val split": self.val_x.shape[0]})
        seed_everything(config.seed)
        self.net = SearchNetwork(SupernetConfig(
            input_shape=self.dataset.input_shape, num_classes=self.dataset.num_classes, channels=config.channels,
            layers=config.layers, steps=config.steps, partial_channels=config.partial_channels,
            bits=tuple(config.bits), quantizer=config.quantizer, act_grid=config.act_grid,
            share_gamma=config.share_gamma, backend=config.backend, grouped_weights=config.grouped_weights,
            act_dtype=config.act_dtype)).to(self.device)
        self.groups = self.net.param_groups()
        self.arch_params = self.groups["alpha"] + self.groups["beta"]
        self.cost = ExpectedCost(self.net, config.cost)
        if config.compile is not None:  # the cost's constant tables exist before the first trace
            record_shapes(self.net, self.dataset.input_shape, self.device)
            with torch.no_grad():
                self.cost()
        self._train_loss_fn = compiled(self._train_loss_eager, config.compile)
        self._val_loss_fn = compiled(self._val_loss_eager, config.compile)
        c = config
        # foreach on CPU too, where PyTorch's default is a Python loop over the parameters (~550 in the
        # digits supernet: clipping and the SGD step 8.2 -> 4.8 ms per step on the 2-core VM, the same bits)
        self.opt_weights = torch.optim.SGD(self.groups["weights"], lr=c.weight_lr, momentum=c.weight_momentum,
                                           weight_decay=c.weight_decay, foreach=True)
        self.opt_gamma = torch.optim.SGD(self.groups["gamma"], lr=c.gamma_lr, momentum=c.gamma_momentum,
                                         weight_decay=c.gamma_decay, foreach=True) if self.groups["gamma"] else None
        # capturable: its step count lives on the device, so that a CUDA graph can replay the update
        self.opt_arch = torch.optim.Adam(self.arch_params, lr=c.arch_lr, betas=tuple(c.arch_betas),
                                         weight_decay=c.arch_decay, capturable=c.cuda_graph)
        if c.cuda_graph and self.dist.enabled:
            raise ValueError("cuda_graph runs in one process: its graphs do not capture the gradient all-reduce")
        self._graphed = GraphedStep(self._graph_step, self.learning_rates) if c.cuda_graph else None
        # compile modes that capture CUDA graphs warm a function up before each capture (a first call, a
        # recompile): every step runs under rehearse_graph_capture (fastpath's docstring)
        self._rehearse_captures = captures_cuda_graphs(c.compile)
        self.epoch = 0
        self.history: List[Dict[str, Any]] = []
        self.elapsed = 0.0

    # ------------------------------------------------------------------ checkpoints

    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.out_dir, CHECKPOINT)

    def state_dict(self) -> Dict[str, Any]:
        return {
            "format": "qdarts-search-checkpoint",
            "version": 1,
            "config": asdict(self.config),
            "epoch": self.epoch,
            "model": pack_tensors(self.net.state_dict()),
            "opt_weights": self.opt_weights.state_dict(),
            "opt_gamma": self.opt_gamma.state_dict() if self.opt_gamma else None,
            "opt_arch": self.opt_arch.state_dict(),
            "history": self.history,
            "elapsed": self.elapsed,
            "rng": rng_state(),
            "world_size": self.dist.world_size,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        try:
            self._load_state_dict(state)
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
            raise ValueError(f"{self.checkpoint_path!r} does not fit the search it describes ({error_reason(e)}); "
                             "delete it to start afresh, or choose another --out") from e

    def _load_state_dict(self, state: Dict[str, Any]) -> None:
        self.net.load_state_dict(unpack_tensors(state["model"]))
        self.opt_weights.load_state_dict(state["opt_weights"])
        if self.opt_gamma is not None:
            self.opt_gamma.load_state_dict(state["opt_gamma"])
        self.opt_arch.load_state_dict(state["opt_arch"])
        # the checkpoint's param_groups carry the capturable flag of the run that wrote it; a resumed run
        # may switch cuda_graph (run_search), so the arch optimiser follows this run's setting
        set_capturable(self.opt_arch, self.config.cuda_graph)
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])
        self.elapsed = float(state.get("elapsed", 0.0))
        set_rng_state(state["rng"])

    @staticmethod
    def read_checkpoint(out_dir: str) -> Optional[Dict[str, Any]]:
        state = load_checkpoint(os.path.join(out_dir, CHECKPOINT), "qdarts-search-checkpoint")
        if state is not None and not isinstance(state.get("config"), dict):
            raise ValueError(f"{os.path.join(out_dir, CHECKPOINT)!r} holds no search config; delete it to start "
                             "afresh, or choose another --out")
        return state

    # ------------------------------------------------------------------ one step

    def _train_loss(self, x, y):
        """(logits, CE, CE + lambda * C) on a train batch; compiled with ``compile``."""
        return self._train_loss_fn(x, y)

    def _train_loss_eager(self, x, y):
        logits = self.net(x)
        ce = F.cross_entropy(logits, y)
        loss = ce + self.config.cost_weight * self.cost() if self.config.cost_weight else ce
        return logits, ce, loss

    def _val_loss_eager(self, x, y):
        return F.cross_entropy(self.net(x), y)

    def _arch_step(self, xb, yb, xv, yv, lr: float) -> None:
        if self.config.order == "first":
            grads = self._arch_grads(lambda: self._val_loss_fn(xv, yv))
        else:
            grads = self._second_order_grads(xb, yb, xv, yv, lr)
        for p, g in zip(self.arch_params, grads):
            p.grad = torch.zeros_like(p) if g is None else g
        distributed.all_reduce_gradients(self.arch_params)
        self.opt_arch.step()

    def _arch_grads(self, loss_fn: Callable[[], torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:
        """The gradients of ``loss_fn()`` for alpha and beta alone (None where unused). The weights and
        gamma are out of autograd meanwhile, so that no conv computes a weight gradient and the grouped
        weight quantizer runs no backward (the digits search step, fastest of 15: 560-658 -> 518-520 ms on
        the 2-core VM of bench/results); alpha's and beta's gradients are the same bits."""
        with frozen(self.groups["weights"] + self.groups["gamma"]):
            return torch.autograd.grad(loss_fn(), self.arch_params, allow_unused=True)

    def _second_order_grads(self, xb, yb, xv, yv, lr: float):
        """DARTS eq. 7-8: grad_alpha L_val(w - lr * grad_w L_train(w)) with the finite-difference
        Hessian-vector product ``(grad_alpha L_train(w+) - grad_alpha L_train(w-)) / 2r``,
        ``w+- = w +- r * grad_w' L_val``, ``r = 0.01 / ||grad_w' L_val||``. The virtual step uses the
        weight optimiser's momentum and weight decay (not its gradient clipping, as DARTS); gamma is held
        fixed. The quantized forward is piecewise constant in the weights: a step of r crosses rounding
        thresholds, so the finite difference measures those jumps more than the curvature (first order,
        the default, has no such term). The forwards at the virtual weights leave the batch norms'
        running statistics as they were (DARTS takes w' on a copy of the model)."""
        c = self.config
        weights = self.groups["weights"]
        batch_norms = [m for m in self.net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        running = [(b, b.clone()) for m in batch_norms for b in m.buffers()]
        _, _, loss = self._train_loss(xb, yb)
        grads_w = torch.autograd.grad(loss, weights, allow_unused=True)
        backup = [p.detach().clone() for p in weights]
        with torch.no_grad():
            for p, g in zip(weights, grads_w):
                if g is None:
                    continue
                step = g + c.weight_decay * p
                buf = self.opt_weights.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    step = step + c.weight_momentum * buf
                p.sub_(lr * step)
        val_loss = self._val_loss_fn(xv, yv)
        grads = torch.autograd.grad(val_loss, self.arch_params + weights, allow_unused=True)
        d_arch, d_w = grads[: len(self.arch_params)], grads[len(self.arch_params):]
        r = 0.01 / torch.cat([g.flatten() for g in d_w if g is not None]).norm().clamp_min(1e-12)

        def arch_grads_at(sign: float):
            with torch.no_grad():
                for p, b, g in zip(weights, backup, d_w):
                    p.copy_(b)
                    if g is not None:
                        p.add_(g * (sign * r))
            return self._arch_grads(lambda: self._train_loss(xb, yb)[2])

        g_plus, g_minus = arch_grads_at(1.0), arch_grads_at(-1.0)
        with torch.no_grad():
            for p, b in zip(weights, backup):
                p.copy_(b)
            for b, saved in running:
                b.copy_(saved)
        out = []
        for da, gp, gn in zip(d_arch, g_plus, g_minus):
            da = torch.zeros_like(self.arch_params[len(out)]) if da is None else da
            if gp is not None and gn is not None:
                da = da - lr * (gp - gn) / (2 * r)
            out.append(da)
        return out

    def step(self, xb, yb, xv, yv, lr: float, stats: torch.Tensor, *, update_arch: bool) -> None:
        """One search step (module docstring) on a train batch (xb, yb) and a val batch (xv, yv): alpha
        and beta first when ``update_arch`` (from the warm-up epoch on), then weights and gamma;
        ``stats`` accumulates the train CE sum, loss sum, correct count and sample count. With
        ``cuda_graph`` the step is replayed from a CUDA graph (:mod:`qdarts.cudagraph`)."""
        if self._graphed is not None:
            self._graphed(xb, yb, xv, yv, stats, update_arch)
            return
        with qk.rehearse_graph_capture() if self._rehearse_captures else nullcontext():
            self._eager_step(xb, yb, xv, yv, lr, stats, update_arch)

    def _eager_step(self, xb, yb, xv, yv, lr: float, stats: torch.Tensor, update_arch: bool) -> None:
        if update_arch:
            self._arch_step(xb, yb, xv, yv, lr)
        self._weight_step(xb, yb, stats)

    def _graph_step(self, xb, yb, xv, yv, stats: torch.Tensor, update_arch: bool) -> None:
        """The step that :class:`GraphedStep` captures (first order: the arch step reads no lr)."""
        self._eager_step(xb, yb, xv, yv, self.config.weight_lr, stats, update_arch)

    def learning_rates(self) -> Tuple[float, ...]:
        """Every optimiser's learning rates: a captured step holds them as constants."""
        optimisers = (self.opt_weights, self.opt_gamma, self.opt_arch)
        return tuple(float(g["lr"]) for opt in optimisers if opt is not None for g in opt.param_groups)

    def _weight_step(self, xb, yb, stats: torch.Tensor) -> None:
        self.opt_weights.zero_grad(set_to_none=True)
        if self.opt_gamma is not None:
            self.opt_gamma.zero_grad(set_to_none=True)
        with frozen(self.arch_params):
            logits, ce, loss = self._train_loss(xb, yb)
            loss.backward()
        # the first step also hands every rank rank 0's weights: LSQ steps start from each rank's first batch
        distributed.all_reduce_gradients(self.groups["weights"] + self.groups["gamma"],
                                         broadcast_values=not self._replicas_equal)
        self._replicas_equal = True
        torch.nn.utils.clip_grad_norm_(self.groups["weights"], self.config.grad_clip, foreach=True)
        self.opt_weights.step()
        if self.opt_gamma is not None:
            self.opt_gamma.step()
        n = yb.shape[0]
        stats[:3] += torch.stack([ce.detach() * n, loss.detach() * n, (logits.argmax(1) == yb).sum().float()])
        stats[3] += n  # a Python scalar operand: no host-to-device copy

    @torch.no_grad()
    def _evaluate(self, x, y) -> Tuple[float, float]:
        self.net.eval()
        stats = torch.zeros(2, device=self.device)
        n, r, w = x.shape[0], self.dist.rank, self.dist.world_size
        for xb, yb in batches(x[r::w], y[r::w], 256, shuffle=False, device=self.device):
            logits = self.net(xb)
            stats += torch.stack([F.cross_entropy(logits, yb, reduction="sum"), (logits.argmax(1) == yb).sum().float()])
        self.net.train()
        loss_sum, correct = self.dist.all_reduce_sum(stats).tolist()
        return loss_sum / n, correct / n

    # ------------------------------------------------------------------ records

    def gamma_table(self) -> Dict[str, Dict[str, List[float]]]:
        """{layer name: {"act": probs, "weight": probs}} for each distinct gamma pair."""
        table, seen, count = {}, set(), {}
        for name, conv, _ in self.net.quant_layers():
            key = (id(conv.act_quant.logits), id(conv.weight_quant.logits)) if len(self.config.bits) > 1 else None
            if key is None or key in seen:
                continue
            seen.add(key)
            if not self.config.share_gamma:
                count[name] = count.get(name, -1) + 1
                name = f"{name}.conv{count[name]}"
            table[name] = {"act": _rounded(conv.act_quant.probs()), "weight": _rounded(conv.weight_quant.probs())}
        return table

    def _record(self, epoch: int, lr: float, stats: torch.Tensor, seconds: float) -> Dict[str, Any]:
        ce_sum, loss_sum, correct, n = self.dist.all_reduce_sum(stats).tolist()
        distributed.average_buffers(self.net)
        val_loss, val_acc = self._evaluate(self.val_x, self.val_y)
        net = self.net
        return {
            "epoch": epoch + 1,
            "lr": lr,
            "arch_updates": epoch >= self.config.warmup_epochs,
            "train_ce": ce_sum / n,
            "train_loss": loss_sum / n,
            "train_acc": correct / n,
            "val_loss": val_loss,
            "val_acc": val_acc,
            "expected_cost": float(self.cost().detach()),
            "expected_bitops": float(self.cost.expected_bitops()),
            "alpha": {"normal": _rounded(net.op_probs(False)), "reduce": _rounded(net.op_probs(True))},
            "beta": {"normal": _rounded(net.edge_weights(net.betas_normal)),
                     "reduce": _rounded(net.edge_weights(net.betas_reduce))},
            "gamma": self.gamma_table(),
            "seconds": seconds,
        }

    # ------------------------------------------------------------------ the loop

    def run(self, stop_after: Optional[int] = None) -> None:
        """Run epochs ``self.epoch .. epochs-1`` (at most ``stop_after`` of them), checkpointing each."""
        from tqdm.auto import tqdm

        c = self.config
        r, w = self.dist.rank, self.dist.world_size
        steps = min(num_batches(self.train_x.shape[0], c.batch_size, world_size=w),
                    num_batches(self.val_x.shape[0], c.batch_size, world_size=w))
        last = c.epochs if stop_after is None else min(c.epochs, self.epoch + stop_after)
        bar = tqdm(total=c.epochs * steps, initial=self.epoch * steps, desc="search", unit="step",
                   disable=not (self.progress and self.dist.is_writer), dynamic_ncols=True)
        try:
            while self.epoch < last:
                epoch = self.epoch
                start = time.perf_counter()
                # annealed down to weight_lr_min, or held at a weight_lr below it (0 freezes the weights)
                lr = cosine_lr(epoch, c.epochs, c.weight_lr, min(c.weight_lr_min, c.weight_lr))
                for group in self.opt_weights.param_groups:
                    group["lr"] = lr
                g_train = torch.Generator().manual_seed(c.seed * 1_000_003 + 2 * epoch)
                g_val = torch.Generator().manual_seed(c.seed * 1_000_003 + 2 * epoch + 1)
                stats = torch.zeros(4, device=self.device)
                train_iter = batches(self.train_x, self.train_y, c.batch_size, shuffle=True, generator=g_train,
                                     augment=self.dataset.augment, pad_fill=self.dataset.pad_fill, device=self.device,
                                     shard=(r, w))
                val_iter = batches(self.val_x, self.val_y, c.batch_size, shuffle=True, generator=g_val,
                                   augment=self.dataset.augment, pad_fill=self.dataset.pad_fill, device=self.device,
                                   shard=(r, w))
                what, advice = f"the search (epoch {epoch + 1})", self._divergence_advice()
                with diagnosed(what, self.net.named_parameters, advice):
                    for _, (xb, yb), (xv, yv) in zip(range(steps), train_iter, val_iter):
                        self.step(xb, yb, xv, yv, lr, stats, update_arch=epoch >= c.warmup_epochs)
                        bar.update(1)
                    seconds = time.perf_counter() - start
                    record = self._record(epoch, lr, stats, seconds)
                # what a GPU step cannot check without a host sync: its NaN shows in the epoch's figures
                check_figures(what, {k: record[k] for k in ("train_loss", "val_loss", "expected_bitops")}, advice)
                self.history.append(record)
                self.elapsed += seconds
                self.epoch += 1
                bar.set_postfix(val_acc=f"{record['val_acc']:.3f}", exp_gbitops=f"{record['expected_bitops'] / 1e9:.3f}")
                self.save_checkpoint()
        finally:
            bar.close()

    def _divergence_advice(self) -> str:
        """What a :class:`~qdarts.divergence.Diverged` error of this run tells the user to do."""
        c = self.config
        return (f"start again in a new --out with lower learning rates: {option('weight_lr')} is {c.weight_lr:g}, "
                f"{option('gamma_lr')} {c.gamma_lr:g} and {option('arch_lr')} {c.arch_lr:g} (or a smaller cost "
                f"weight: {option('cost_weight')} is {c.cost_weight:g}, the gradient of the bit logits grows with it); "
                f"{kept_checkpoint(self.checkpoint_path, self.epoch)}")

    def save_checkpoint(self) -> None:
        """Rank 0 writes; the other ranks wait until the checkpoint is complete."""
        if self.dist.is_writer:
            os.makedirs(self.out_dir, exist_ok=True)
            atomic_torch_save(self.checkpoint_path, self.state_dict())
            atomic_write_text(os.path.join(self.out_dir, HISTORY_FILE), json.dumps(self.history))
        self.dist.barrier()

    # ------------------------------------------------------------------ results

    def derive(self) -> Tuple[Genotype, Dict[str, Any]]:
        """The genotype and the BitOps / memory of its network at the search size, against fp32."""
        c = self.config
        ds = self.dataset
        info = {
            "data": c.data,
            "data_dir": c.data_dir,
            "input_shape": list(ds.input_shape),
            "num_classes": ds.num_classes,
            "layers": c.layers,
            "channels": c.channels,
            "steps": c.steps,
            "seed": c.seed,
            "epochs": self.epoch,
        }
        genotype = derive_genotype(self.net, info)
        cost = network_cost(EvalNetwork(genotype, ds.input_shape, ds.num_classes, c.channels, c.layers),
                            ds.input_shape, device=torch.device("cpu"))
        last = self.history[-1] if self.history else {}
        genotype.search.update({
            "val_acc": last.get("val_acc"),
            "expected_bitops": last.get("expected_bitops"),
            "derived_bitops": cost["bitops"],
            "derived_bitops_fp32": cost["bitops_fp32"],
            "derived_memory_bytes": cost["memory_bytes"],
            "derived_memory_bytes_fp32": cost["memory_bytes_fp32"],
        })
        return genotype, cost


def run_search(config: SearchConfig, out_dir: str, *, resume: bool = False, progress: bool = True,
               stop_after: Optional[int] = None, plots: bool = True,
               explicit: Optional[Collection[str]] = None) -> Dict[str, Any]:
    """Search (or resume) into ``out_dir``; write genotype.json, history.json, plots and summary.md.

    Returns {"genotype": Genotype, "cost": derived network cost, "history": [...], "config": SearchConfig}.
    With ``stop_after`` the run stops after that many epochs (a checkpoint is left, as after a kill)
    and the final outputs are written only when the last epoch is done. A resumed run continues with the
    checkpoint's settings (but ``RESUME_MAY_CHANGE``); a setting of ``config`` that differs from them is a
    ``ValueError`` (with ``explicit``, only the settings it names are compared: see ``resumed_config``).
    """
    from .report import write_search_report

    config = replace(config, data_dir=absolute_data_dir(config.data_dir))
    state = Searcher.read_checkpoint(out_dir)
    if state is not None and not resume:
        raise FileExistsError(f"{out_dir!r} already holds a search checkpoint; pass --resume to continue it "
                              "or choose another --out")
    if state is None:
        refuse_outputs_without_checkpoint(out_dir, (GENOTYPE_FILE, HISTORY_FILE), CHECKPOINT)
    else:
        try:
            saved = SearchConfig.from_dict(state["config"])
            # the checkpoint's settings (a hand edit may have given them any type) with those this run may change
            replace(saved, **{n: getattr(config, n) for n in RESUME_MAY_CHANGE}).validate()
        except (TypeError, ValueError) as e:
            raise ValueError(f"{os.path.join(out_dir, CHECKPOINT)!r} holds no valid search config ({e}); delete it "
                             "to start afresh, or choose another --out") from e
        # this run's own settings next, over the checkpoint's: an error in them is not the checkpoint's
        typed_over_saved(saved, config, explicit).validate()
        config = resumed_config(saved, config, may_change=RESUME_MAY_CHANGE, explicit=explicit, name=option)
    searcher = Searcher(config, out_dir, progress=progress)  # validates the config and loads the data first
    with writing_into(out_dir, searcher.dist):
        if state is not None:
            warn_if_world_size_changed(state, searcher.dist.world_size, searcher.dist.is_writer)
            searcher.load_state_dict(state)
        searcher.run(stop_after=stop_after)
        result: Dict[str, Any] = {"history": searcher.history, "config": searcher.config, "searcher": searcher}
        if searcher.epoch >= config.epochs:
            genotype, cost = searcher.derive()  # on every rank: the replicas are equal, so are the genotypes
            result.update(genotype=genotype, cost=cost)
            distributed.dump_rank_state(searcher.net)
            if searcher.dist.is_writer:
                genotype.save(os.path.join(out_dir, GENOTYPE_FILE))
                write_search_report(out_dir, searcher.config, searcher.history, genotype, cost, searcher.elapsed,
                                    plots=plots)
            searcher.dist.barrier()
    return result
