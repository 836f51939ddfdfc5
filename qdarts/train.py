"""Retraining of a derived genotype from scratch with its fixed bits (QAT), or in fp32 as the baseline.

The network trains on the whole training pool of the data set (the search's train and val halves)
and is evaluated once, at the end, on the held-out test split. SGD with momentum, cosine learning
rate, gradient clipping, optional auxiliary head and drop-path (DARTS retraining). Checkpointed
atomically every epoch; ``resume`` continues to the same result as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Collection, Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import distributed
from .checkpoint import (atomic_torch_save, atomic_write_text, error_reason, load_checkpoint,
                         refuse_outputs_without_checkpoint, resumed_config, rng_state, seed_everything, set_rng_state,
                         typed_over_saved, warn_if_world_size_changed, writing_into)
from .cost import network_cost
from .data import absolute_data_dir, batches, check_data_dir, check_split_sizes, load_dataset, num_batches
from .divergence import check_figures, diagnosed, kept_checkpoint
from .evalnet import EvalNetwork
from .fastpath import COMPILE_MODES, compiled
from .genotype import genotype_path, load_genotype
from .search import check_device, check_integers, check_non_negative, check_seed, cosine_lr, option

__all__ = ["TrainConfig", "run_train"]

CHECKPOINT = "train_checkpoint.pt"
FORMAT = "qdarts-train-checkpoint"
SUMMARY_FILE = "summary.json"


@dataclass
class TrainConfig:
    """Retraining settings; None means "as in the genotype's search" (data, layers) or a digits default."""

    genotype: str
    fp32: bool = False
    epochs: int = 40
    batch_size: int = 64
    channels: Optional[int] = None
    layers: Optional[int] = None
    lr: float = 0.05
    lr_min: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    auxiliary: bool = False
    aux_weight: float = 0.4
    drop_path: float = 0.0
    data: Optional[str] = None
    data_dir: Optional[str] = None
    seed: int = 0
    device: str = "cpu"
    backend: Optional[str] = None
    act_dtype: str = "fp32"
    compile: Optional[str] = None

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def validate(self) -> None:
        check_integers(self, ("epochs", "batch_size", "layers", "channels"))
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {self.drop_path}")
        if self.act_dtype not in ("fp32", "bf16"):
            raise ValueError(f"act_dtype must be fp32 or bf16, got {self.act_dtype!r}")
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be None or one of {COMPILE_MODES}, got {self.compile!r}")
        for name in ("layers", "channels"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{option(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "lr_min", "momentum", "weight_decay", "grad_clip", "aux_weight"):
            check_non_negative(name, getattr(self, name))
        if self.auxiliary and self.batch_size < 2:
            raise ValueError(f"--auxiliary needs {option('batch_size')} >= 2, got {self.batch_size}: the auxiliary "
                             "head's BatchNorm normalises a 1x1 map, over the batch alone")
        check_seed(self.seed)
        check_device(self.device, self.backend)


def _default_channels(search_channels: int) -> int:
    """Retraining width: twice the search width (the DARTS habit: C=16 in search, 36 in evaluation)."""
    return 2 * search_channels


@torch.no_grad()
def _accuracy(model, x, y, device) -> float:
    """Accuracy on (x, y); under torchrun each rank scores every W-th sample and the counts are summed."""
    d = distributed.current()
    model.eval()
    correct = torch.zeros((), device=device)
    for xb, yb in batches(x[d.rank::d.world_size], y[d.rank::d.world_size], 256, shuffle=False, device=device):
        correct += (model(xb).argmax(1) == yb).sum()
    model.train()
    return float(d.all_reduce_sum(correct)) / x.shape[0]


def rank_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of a process's global RNG for an epoch of distributed training: each rank draws its own
    drop-path masks (every rank is seeded alike for the same initial weights, and would otherwise give
    the i-th sample of its shard the same mask as every other rank's); per epoch, so that a resumed run
    draws what an uninterrupted one does (the checkpoint holds the writer's RNG state only)."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, dtype=np.uint64)[0])


def run_train(config: TrainConfig, out_dir: str, *, resume: bool = False, progress: bool = True,
              stop_after: Optional[int] = None, explicit: Optional[Collection[str]] = None) -> Dict[str, Any]:
    """Retrain ``config.genotype`` into ``out_dir``; write summary.json (and return it when finished).

    A resumed run continues with the checkpoint's settings but ``device`` and ``backend``; a setting of
    ``config`` that differs from them is a ``ValueError`` (with ``explicit``, only those it names: see
    ``resumed_config``), and so is a genotype file whose cells, bits or search settings read here
    changed since the checkpoint was written.
    """
    from tqdm.auto import tqdm

    ckpt_path = os.path.join(out_dir, CHECKPOINT)
    dist = distributed.current()
    # absolute, as the data folder: a resume started in another working directory names the same file
    config = replace(config, genotype=os.path.abspath(genotype_path(config.genotype)))
    config = replace(config, data_dir=absolute_data_dir(config.data_dir))
    state = load_checkpoint(ckpt_path, FORMAT)
    if state is not None and not resume:
        raise FileExistsError(f"{out_dir!r} already holds a training checkpoint; pass --resume to continue it "
                              "or choose another --out")
    if state is None:
        config.validate()
        refuse_outputs_without_checkpoint(out_dir, (SUMMARY_FILE,), CHECKPOINT)
    else:
        try:
            saved = TrainConfig.from_dict(state["config"])
            saved = replace(saved, genotype=genotype_path(saved.genotype))  # written before it was resolved
            # the checkpoint's settings (a hand edit may have given them any type) with this run's device
            replace(saved, device=config.device).validate()
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{ckpt_path!r} holds no valid training config ({e}); delete it to start afresh, "
                             "or choose another --out") from e
        # this run's own settings next, over the checkpoint's: an error in them is not the checkpoint's
        typed_over_saved(saved, config, explicit).validate()
        # a setting the checkpoint's run left to the genotype (None) and this one types as the value it took
        # from there (--layers 3 where the search had 3) is the same setting
        took = state["config"].get("trained_on")
        took = took if isinstance(took, dict) else {}
        config = replace(config, **{name: None for name in ("data", "data_dir", "layers", "channels")
                                    if getattr(saved, name) is None and getattr(config, name) is not None
                                    and getattr(config, name) == took.get(name)})
        config = resumed_config(saved, config, may_change=("device", "backend"), explicit=explicit, name=option)
    genotype = load_genotype(config.genotype)
    search = genotype.search
    data = config.data or search.get("data", "digits")
    # the search's folder is its data's: it goes with the search's data, not with another --data
    data_dir = config.data_dir or (search.get("data_dir") if data == search.get("data", "digits") else None)
    check_data_dir(data, data_dir)
    layers = config.layers if config.layers is not None else search.get("layers", 3)
    channels = config.channels if config.channels is not None else _default_channels(search.get("channels", 8))
    # what the checkpoint's weights were trained as, since the genotype file may have changed under its path (a
    # search re-run into its folder): its cells and bits, and the settings taken from its search (not the results);
    # a checkpoint written before these were saved resumes unchecked
    trained_on = {"genotype": {k: v for k, v in genotype.to_dict().items() if k != "search"}, "data": data,
                  "data_dir": data_dir, "layers": layers, "channels": channels}
    if state is not None and state["config"].get("trained_on", trained_on) != trained_on:
        raise ValueError(f"the genotype file {config.genotype!r} has changed since {ckpt_path!r} was trained on it "
                         "(other ops, bits, or search data, layers or channels); put back the one it was trained "
                         "on, or delete the checkpoint to start afresh, or choose another --out")
    dataset = load_dataset(data, data_dir)
    # the auxiliary head needs two samples in a batch (TrainConfig.validate), so two per process
    check_split_sizes(data, data_dir, dist.world_size * (2 if config.auxiliary else 1),
                      {"training pool": dataset.train_x.shape[0]})
    check_split_sizes(data, data_dir, 1, {"test split": dataset.test_x.shape[0]})
    device = torch.device(config.device)

    seed_everything(config.seed)
    try:
        model = EvalNetwork(genotype, dataset.input_shape, dataset.num_classes, channels, layers, fp32=config.fp32,
                            auxiliary=config.auxiliary, backend=config.backend).to(device)
    except ValueError as e:  # the genotype does not fit a network of this depth: say which file
        raise ValueError(f"{config.genotype}: {e}") from e
    # one forward so that lazily shaped quantizer state exists before the optimiser sees the parameters
    cost = network_cost(model, dataset.input_shape, device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    with writing_into(out_dir, dist):
        epoch, history, elapsed = 0, [], 0.0
        if state is not None:
            warn_if_world_size_changed(state, dist.world_size, dist.is_writer)
            try:
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
                epoch, history, elapsed = int(state["epoch"]), list(state["history"]), float(state["elapsed"])
                set_rng_state(state["rng"])
            except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
                raise ValueError(f"{ckpt_path!r} does not fit the training it describes ({error_reason(e)}); "
                                 "delete it to start afresh, or choose another --out") from e

        def train_loss(xb, yb):
            """(logits, loss); the forward under bf16 autocast with act_dtype bf16, compiled with compile."""
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.act_dtype == "bf16"):
                out = model(xb)
            logits, aux = out if isinstance(out, tuple) else (out, None)
            loss = F.cross_entropy(logits.float(), yb)
            if aux is not None:
                loss = loss + config.aux_weight * F.cross_entropy(aux.float(), yb)
            return logits, loss

        train_loss = compiled(train_loss, config.compile)
        shard = (dist.rank, dist.world_size)
        replicas_equal = not dist.enabled  # until the first step hands every rank rank 0's LSQ steps
        # with the auxiliary head a trailing batch of one sample is dropped: the head's BatchNorm sees a
        # [1, C, 1, 1] map there, one value per channel, which training-mode BatchNorm cannot normalise
        drop_last = config.auxiliary and dataset.train_x.shape[0] // dist.world_size % config.batch_size == 1
        n_steps = num_batches(dataset.train_x.shape[0], config.batch_size, drop_last, world_size=dist.world_size)
        last = config.epochs if stop_after is None else min(config.epochs, epoch + stop_after)
        bar = tqdm(total=config.epochs * n_steps, initial=epoch * n_steps,
                   desc="train (fp32)" if config.fp32 else "train", unit="step",
                   disable=not (progress and dist.is_writer), dynamic_ncols=True)
        try:
            while epoch < last:
                start = time.perf_counter()
                lr = cosine_lr(epoch, config.epochs, config.lr, config.lr_min)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                model.drop_path_prob = config.drop_path * epoch / config.epochs
                if dist.enabled:
                    torch.manual_seed(rank_seed(config.seed, epoch, dist.rank))
                g = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
                stats = torch.zeros(3, device=device)
                what = f"the training (epoch {epoch + 1})"
                advice = (f"start again in a new --out with a lower learning rate: {option('lr')} is {config.lr:g}; "
                          f"{kept_checkpoint(ckpt_path, epoch)}")
                with diagnosed(what, model.named_parameters, advice):
                    for xb, yb in batches(dataset.train_x, dataset.train_y, config.batch_size, shuffle=True,
                                          generator=g, augment=dataset.augment, pad_fill=dataset.pad_fill,
                                          device=device, drop_last=drop_last, shard=shard):
                        optimizer.zero_grad(set_to_none=True)
                        logits, loss = train_loss(xb, yb)
                        loss.backward()
                        distributed.all_reduce_gradients(model.parameters(), broadcast_values=not replicas_equal)
                        replicas_equal = True
                        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                        optimizer.step()
                        n = yb.shape[0]
                        stats[:2] += torch.stack([loss.detach() * n, (logits.argmax(1) == yb).sum().float()])
                        stats[2] += n
                        bar.update(1)
                loss_sum, correct, n = dist.all_reduce_sum(stats).tolist()
                # what a GPU step cannot check without a host sync: its NaN shows in the epoch's loss
                check_figures(what, {"train_loss": loss_sum / n}, advice)
                distributed.average_buffers(model)
                seconds = time.perf_counter() - start
                elapsed += seconds
                epoch += 1
                history.append({"epoch": epoch, "lr": lr, "train_loss": loss_sum / n, "train_acc": correct / n,
                                "seconds": seconds})
                bar.set_postfix(loss=f"{loss_sum / n:.3f}", acc=f"{correct / n:.3f}")
                if dist.is_writer:
                    atomic_torch_save(ckpt_path, {"format": FORMAT,
                                                  "config": {**asdict(config), "trained_on": trained_on},
                                                  "epoch": epoch, "model": model.state_dict(),
                                                  "optimizer": optimizer.state_dict(),
                                                  "history": history, "elapsed": elapsed, "rng": rng_state(),
                                                  "world_size": dist.world_size})
                dist.barrier()
        finally:
            bar.close()
        if epoch < config.epochs:
            return {}
        distributed.dump_rank_state(model)
        summary = {
            "test_accuracy": _accuracy(model, dataset.test_x, dataset.test_y, device),
            "bitops": cost["bitops"],
            "bitops_fp32": cost["bitops_fp32"],
            "bitops_reduction": cost["bitops_fp32"] / max(cost["bitops"], 1),
            "memory_bytes": cost["memory_bytes"],
            "memory_bytes_fp32": cost["memory_bytes_fp32"],
            "macs": cost["macs"],
            "fp32": config.fp32,
            "data": data,
            "layers": layers,
            "channels": channels,
            # as DARTS counts them: the auxiliary head only helps training, the network is without it
            "parameters": sum(p.numel() for name, p in model.named_parameters()
                              if not name.startswith("auxiliary_head.")),
            "train_seconds": elapsed,
            "history": history,
            "bits_per_layer": cost["layers"],
            "config": asdict(config),
        }
        if dist.is_writer:
            atomic_write_text(os.path.join(out_dir, SUMMARY_FILE), json.dumps(summary, indent=1))
        dist.barrier()
        return summary
