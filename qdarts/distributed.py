"""Data-parallel search and retraining over several processes (``torchrun``), NCCL on GPUs, gloo on CPUs.

Launch (one process per GPU, or several CPU processes)::

    torchrun --standalone --nproc-per-node 8 -m qdarts search --device cuda --out run ...
    # on every node of two:
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m qdarts search ...

How the ranks stay identical. The search has two forward/backward passes per step on different
splits (alpha/beta on the val split, weights/gamma on the train split), and the second-order
variant a few more; wrapping the supernet in ``DistributedDataParallel`` would all-reduce inside
every backward, including the ones whose gradients are thrown away. Instead every rank holds a
full replica, computes gradients on its own shard of the batch, and before each optimiser step
the gradients of the parameters that step updates are averaged over the ranks with one coalesced
all-reduce (:func:`all_reduce_gradients`): ``g = (1/W) sum_r g_r``. With equal per-rank batches
this is the gradient of the mean loss over the global batch, exactly what DDP computes (for the
second-order alpha/beta step each rank makes its virtual weight step and finite-difference
Hessian-vector product with its own shard's gradients, and the resulting alpha/beta gradients are
averaged: the mean of the per-rank estimates, not the estimate at the global gradient). Every
rank starts from the same seed, so the replicas start equal and, stepping with the same averaged
gradients, stay equal (the all-reduce hands every rank the same bytes). Two things are local to a
rank and are reconciled explicitly:

- data-dependent initial values (LSQ step sizes are set from the first batch a quantizer sees):
  in the first step of a process, rank 0's parameter values are broadcast before the optimiser
  step (``all_reduce_gradients(..., broadcast_values=True)``);
- BatchNorm running statistics: averaged over the ranks once per epoch (:func:`average_buffers`),
  before evaluation and the checkpoint (BatchNorm normalises each rank's batch with its own batch
  statistics in training, as DDP without SyncBatchNorm does).

Data. ``--batch-size`` is per rank (the global batch is W times larger); rank r takes every W-th
sample of the epoch's permutation, which every rank draws from the same seeded generator, so the
ranks' batches k together are exactly the single-process batch k of size W x batch-size. Metrics
are summed over the ranks once per epoch. Rank 0 alone writes checkpoints and outputs; the other
ranks wait at a barrier, so no rank reads or resumes a half-written folder. Under ``--resume``
every rank reads the checkpoint (``--out`` must be on a file system every node sees).

Outside ``torchrun`` (no ``WORLD_SIZE`` in the environment) everything here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["Dist", "current", "init_from_env", "shutdown", "all_reduce_gradients", "average_buffers",
           "dump_rank_state", "RANK_DUMP_ENV"]

#: a folder; when set, every rank writes ``rank<r>.pt`` with its parameters at the end of a search or a
#: retraining (lets a test compare the replicas)
RANK_DUMP_ENV = "QDARTS_RANK_DUMP"


@dataclass(frozen=True)
class Dist:
    """This process's place in the group: rank r of world_size (1 when not distributed)."""

    rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes checkpoints and outputs."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def raise_writer_error(self, error: Optional[ValueError]) -> None:
        """On every rank, raise the ``ValueError`` that the writer met (``error`` on the writer; None where it
        met none), and return where it met none: in place of a barrier after the writer's own work, as the
        other ranks would otherwise wait in the next collective for a writer that has stopped, then fail
        with a connection error instead of the writer's message."""
        message = None if error is None else str(error)
        if self.enabled:
            box = [message]
            dist.broadcast_object_list(box, src=0)
            message = box[0]
        if error is not None:
            raise error
        if message is not None:
            raise ValueError(message)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place (the epoch's metric sums: one call per epoch)."""
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t


def current() -> Dist:
    """The group this process belongs to (an initialised default process group), else a single process."""
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size())
    return Dist()


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_from_env(device: str) -> str:
    """Join the process group that ``torchrun`` describes in the environment; return this rank's device.

    NCCL for CUDA devices (rank r uses ``cuda:LOCAL_RANK``), gloo for the CPU. Without torchrun's
    variables, or with a world of one, nothing is initialised and ``device`` is returned unchanged.
    """
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) <= 1 or dist.is_initialized():
        return device
    if not dist.is_available():
        raise ValueError("this PyTorch build has no torch.distributed: run without torchrun")
    if device.startswith("cuda"):
        if device != "cuda":
            raise ValueError(f"under torchrun pass --device cuda (rank r uses cuda:LOCAL_RANK), got {device!r}")
        if not torch.cuda.is_available():
            raise ValueError("--device cuda requested but CUDA is not available")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
        dist.init_process_group("nccl", device_id=torch.device(device))
    else:
        dist.init_process_group("gloo")
    return device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _coalesced(tensors: List[torch.Tensor]) -> Iterable[List[torch.Tensor]]:
    """``tensors`` grouped by (device, dtype), so that each group is one flat buffer and one collective."""
    groups: Dict[Tuple[torch.device, torch.dtype], List[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return groups.values()


def _average_in_place(tensors: List[torch.Tensor], world_size: int) -> None:
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    for group in _coalesced(tensors):
        flat = _flatten_dense_tensors(group)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world_size)
        for t, averaged in zip(group, _unflatten_dense_tensors(flat, group)):
            t.copy_(averaged)


@torch.no_grad()
def all_reduce_gradients(params: Iterable[torch.Tensor], *, broadcast_values: bool = False) -> None:
    """Average the ``.grad`` of ``params`` over the ranks (coalesced; parameters without a gradient
    are skipped: every rank runs the same graph, so the same ones lack it everywhere).

    ``broadcast_values``: also overwrite the parameters' values with rank 0's, before the optimiser
    step uses them (weight decay and momentum read the values: the step after a data-dependent
    initialisation must already see equal values, or the optimiser states differ for good).
    """
    d = current()
    if not d.enabled:
        return
    params = list(params)
    _average_in_place([p.grad for p in params if p.grad is not None], d.world_size)
    if broadcast_values:
        _broadcast_in_place([p.data for p in params])


def _broadcast_in_place(tensors: List[torch.Tensor]) -> None:
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    for group in _coalesced(tensors):
        flat = _flatten_dense_tensors(group)
        dist.broadcast(flat, src=0)
        for t, value in zip(group, _unflatten_dense_tensors(flat, group)):
            t.copy_(value)


@torch.no_grad()
def average_buffers(module: nn.Module) -> None:
    """Average the floating-point buffers (BatchNorm running statistics) over the ranks."""
    d = current()
    if d.enabled:
        _average_in_place([b for b in module.buffers() if b.is_floating_point()], d.world_size)


def dump_rank_state(module: nn.Module) -> None:
    """With ``QDARTS_RANK_DUMP=<folder>``, write this rank's parameters to ``<folder>/rank<r>.pt``
    (lets a test compare the replicas of every rank)."""
    folder = os.environ.get(RANK_DUMP_ENV)
    if folder:
        os.makedirs(folder, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in module.named_parameters()},
                   os.path.join(folder, f"rank{current().rank}.pt"))
