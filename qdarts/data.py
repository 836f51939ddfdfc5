"""Datasets of the search layer, held as in-memory tensors, and a deterministic batch iterator.

Three sources, all without any download at run time:

- ``digits``: scikit-learn's bundled handwritten digits (1,797 grey 8x8 images, 10 classes).
- ``synthetic``: class templates plus noise, generated from a seed (for tests and smoke runs).
- ``cifar10``: CIFAR-10 read from a local folder in its standard python-pickle format
  (``data_batch_1`` .. ``data_batch_5``, ``test_batch``, ``batches.meta``).

Splits. Every source has a fixed training pool and a held-out test split. ``search`` divides the
training pool into a train half (weights and gamma) and a val half (alpha and beta), as the method
asks; ``train`` retrains on the whole pool and reports accuracy on the test split, which the search
never sees. The digits test split is a fixed stratified 20% (seed 0, whatever the run's seed).
Inputs are standardised per channel with statistics of the training pool.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import torch

__all__ = ["Dataset", "load_dataset", "batches", "num_batches", "absolute_data_dir", "check_data_dir",
           "check_split_sizes", "DATASETS", "CIFAR10_FILES"]

DATASETS = ("digits", "synthetic", "cifar10")
CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")


@dataclass
class Dataset:
    """Images [N, C, H, W] float32 (standardised) and labels [N] int64 for each split."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    #: random crop (pad 4) and horizontal flip while training, as is usual for CIFAR-10
    augment: bool = False
    #: what the crop pads with, per channel [C]: black, standardised as the images are (the raw image
    #: padded with zeros before the normalisation, as DARTS and torchvision crop); None: 0
    pad_fill: Optional[torch.Tensor] = None

    @property
    def input_shape(self) -> Tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])

    def search_split(self, train_portion: float = 0.5) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(train_x, train_y, val_x, val_y): the first ``train_portion`` of the training pool, and the rest.

        The pool is already in a fixed shuffled order, so the halves are class-balanced in expectation.
        """
        if not 0.0 < train_portion < 1.0:
            raise ValueError(f"train_portion must be in (0, 1), got {train_portion}")
        n = int(round(self.train_x.shape[0] * train_portion))
        return self.train_x[:n], self.train_y[:n], self.train_x[n:], self.train_y[n:]


def _standardise(train: torch.Tensor, *others: torch.Tensor):
    """``train`` and ``others`` standardised per channel with the statistics of ``train``, and the
    standardised value of 0 (black) per channel, [C]."""
    mean = train.mean(dim=(0, 2, 3), keepdim=True)
    spread = train.std(dim=(0, 2, 3), keepdim=True)
    std = spread.clamp_min(1e-6)
    # a constant channel (its std clamped) has no black apart from its value: 0, its standardised value
    black = torch.where(spread > 1e-6, -mean / std, 0.0)
    return ((train - mean) / std,) + tuple((o - mean) / std for o in others), black.flatten()


def _digits() -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    # fixed stratified split: every class contributes 20% of its images to the test split
    rng = np.random.default_rng(0)
    test_idx, train_idx = [], []
    for c in range(10):
        idx = np.flatnonzero(d.target == c)
        rng.shuffle(idx)
        n_test = int(round(0.2 * len(idx)))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    train_idx = np.concatenate(train_idx)
    rng.shuffle(train_idx)
    test_idx = np.sort(np.concatenate(test_idx))
    tr, te = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    (train_x, test_x), _ = _standardise(x[tr], x[te])
    return Dataset("digits", train_x, y[tr], test_x, y[te], 10)


def _synthetic(num_train: int = 512, num_test: int = 256, num_classes: int = 10,
               shape: Tuple[int, int, int] = (3, 8, 8), noise: float = 0.8, seed: int = 0) -> Dataset:
    """Each class is a fixed random template; samples are template + Gaussian noise (learnable, not trivial)."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn((num_classes,) + tuple(shape), generator=g)

    def draw(n):
        y = torch.randint(0, num_classes, (n,), generator=g)
        x = templates[y] + noise * torch.randn((n,) + tuple(shape), generator=g)
        return x, y

    train_x, train_y = draw(num_train)
    test_x, test_y = draw(num_test)
    (train_x, test_x), _ = _standardise(train_x, test_x)
    return Dataset("synthetic", train_x, train_y, test_x, test_y, num_classes)


def _unpickle(path: str) -> dict:
    with open(path, "rb") as f:
        try:
            return pickle.load(f, encoding="bytes")
        except Exception as e:  # a torn or foreign file makes the unpickler raise almost anything
            raise ValueError(f"CIFAR-10 file {path!r} is not a python pickle of the CIFAR-10 format "
                             f"({type(e).__name__}: {e})") from e


def _get(d: dict, key: str, path: str):
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise ValueError(f"CIFAR-10 file {path!r} has no {key!r} entry (keys: {sorted(map(str, d))[:8]})")


def _cifar_batch(path: str) -> Tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)
    if not isinstance(d, dict):
        raise ValueError(f"CIFAR-10 file {path!r} holds a {type(d).__name__}, expected a dict")
    data = np.asarray(_get(d, "data", path))
    labels = np.asarray(_get(d, "labels", path))
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise ValueError(f"CIFAR-10 file {path!r}: 'data' must be uint8 of shape [N, 3072], "
                         f"got {data.dtype} {list(data.shape)}")
    # integers only: a cast would truncate 1.7 to 1 and parse "1", training on labels nobody wrote
    integers = labels.size == 0 or np.issubdtype(labels.dtype, np.integer)
    if not integers or labels.shape != (data.shape[0],) or (labels.size and (labels.min() < 0 or labels.max() > 9)):
        raise ValueError(f"CIFAR-10 file {path!r}: 'labels' must be N={data.shape[0]} ints in 0..9")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _cifar10(data_dir: Optional[str]) -> Dataset:
    if not data_dir:
        raise ValueError("--data-dir is required for cifar10: a folder with data_batch_1..5, test_batch and "
                         "batches.meta (the python version of CIFAR-10, e.g. the extracted cifar-10-batches-py)")
    if not os.path.isdir(data_dir):
        what = "is a file, not a folder" if os.path.exists(data_dir) else "does not exist"
        raise FileNotFoundError(f"CIFAR-10 folder {data_dir!r} {what}")
    missing = [f for f in CIFAR10_FILES if not os.path.isfile(os.path.join(data_dir, f))]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 folder {data_dir!r} lacks {', '.join(missing)} "
                                f"(expected the python-pickle version: {', '.join(CIFAR10_FILES)})")
    meta = _unpickle(os.path.join(data_dir, "batches.meta"))
    names = _get(meta, "label_names", os.path.join(data_dir, "batches.meta")) if isinstance(meta, dict) else None
    if names is None or len(names) != 10:
        raise ValueError(f"CIFAR-10 file {os.path.join(data_dir, 'batches.meta')!r} must list 10 label_names")
    parts = [_cifar_batch(os.path.join(data_dir, f"data_batch_{i}")) for i in range(1, 6)]
    tx = np.concatenate([p[0] for p in parts])
    ty = np.concatenate([p[1] for p in parts])
    ex, ey = _cifar_batch(os.path.join(data_dir, "test_batch"))
    # before the statistics of the pool are taken (NaN with a warning for no image at all)
    check_split_sizes("cifar10", data_dir, 1, {"training pool (data_batch_1..5)": len(ty)})
    to_f = lambda a: torch.from_numpy(a.astype(np.float32) / 255.0)  # noqa: E731
    (train_x, test_x), black = _standardise(to_f(tx), to_f(ex))
    # the search's train/val halves are contiguous slices of the pool: shuffle it once, with a fixed seed
    perm = torch.from_numpy(np.random.default_rng(0).permutation(len(ty)))
    return Dataset("cifar10", train_x[perm], torch.from_numpy(ty)[perm], test_x, torch.from_numpy(ey), 10,
                   augment=True, pad_fill=black)


def absolute_data_dir(data_dir: Optional[str]) -> Optional[str]:
    """``data_dir`` as an absolute path (None as it is): a run's checkpoint and genotype keep it, for a resume or
    a retraining started in another working directory."""
    if data_dir == "":  # abspath would make it the working directory
        raise ValueError("data_dir (--data-dir) must name a folder, got ''")
    return os.path.abspath(data_dir) if isinstance(data_dir, str) else data_dir


def check_data_dir(data: str, data_dir: Optional[str]) -> None:
    """A ValueError where a data folder is given for data that is not read from one (it would be passed over
    without a word: ``--data-dir ~/cifar`` with the default ``--data digits``)."""
    if data_dir is not None and data != "cifar10":
        raise ValueError(f"data_dir ({data_dir!r}) is read for data 'cifar10' only, and data is {data!r}")


def load_dataset(name: str, data_dir: Optional[str] = None) -> Dataset:
    """Load ``digits`` | ``synthetic`` | ``cifar10`` (the latter from ``data_dir``)."""
    if name == "digits":
        return _digits()
    if name == "synthetic":
        return _synthetic()
    if name == "cifar10":
        return _cifar10(data_dir)
    raise ValueError(f"data must be one of {', '.join(DATASETS)}, got {name!r}")


def check_split_sizes(data: str, data_dir: Optional[str], need: int, splits: Dict[str, int]) -> None:
    """A ValueError naming the data set and each split ({"train split": sample count, ...}) with fewer than
    ``need`` samples: a run needs a sample of each split it reads per process, as its means divide by the count."""
    short = [f"{name} has {n}" for name, n in splits.items() if n < need]
    if short:
        where = f" in {data_dir!r}" if data == "cifar10" and data_dir else ""
        raise ValueError(f"data set {data!r}{where} is too small: its {' and its '.join(short)} samples, "
                         f"at least {need} needed")


def _augment(x: torch.Tensor, g: torch.Generator, pad_fill: Optional[torch.Tensor]) -> torch.Tensor:
    """Random crop with 4-pixel padding (``pad_fill`` per channel, or 0) and random horizontal flip, drawn
    from ``g``."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    if pad_fill is not None:
        border = torch.ones(h + 8, w + 8, dtype=torch.bool)
        border[4:-4, 4:-4] = False
        padded = torch.where(border, pad_fill.to(x.dtype).reshape(1, c, 1, 1), padded)
    dy = torch.randint(0, 9, (n,), generator=g)
    dx = torch.randint(0, 9, (n,), generator=g)
    flip = torch.rand(n, generator=g) < 0.5
    rows = dy[:, None] + torch.arange(h)[None, :]
    cols = dx[:, None] + torch.arange(w)[None, :]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    # advanced indices around a slice put the indexed dims first: [n, h, w, C]
    out = padded[torch.arange(n)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool, generator: Optional[torch.Generator] = None,
            augment: bool = False, pad_fill: Optional[torch.Tensor] = None, device: torch.device | str = "cpu",
            drop_last: bool = False, shard: Tuple[int, int] = (0, 1)) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches of (x, y) moved to ``device``; the order and augmentation come from ``generator`` only
    (the crop pads with ``pad_fill`` per channel, 0 where None: :attr:`Dataset.pad_fill`).

    ``shard=(rank, world_size)``: every rank draws the same permutation, cut to a multiple of
    ``world_size`` (each rank then yields as many batches), and takes every ``world_size``-th sample
    of it from ``rank`` on; the ranks' k-th batches together are the k-th batch of size
    ``world_size * batch_size`` of one process. Each rank augments with its own stream, forked from
    ``generator`` after the permutation (the same stream on every rank would crop alike).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rank, world_size = shard
    n = x.shape[0]
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if world_size > 1:
        order = order[: n - n % world_size][rank::world_size]
        n = order.shape[0]
        if augment:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            generator = torch.Generator().manual_seed(seed + rank)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        idx = order[start: start + batch_size]
        xb = x[idx]
        if augment:
            xb = _augment(xb, generator, pad_fill)
        yield xb.to(device, non_blocking=True), y[idx].to(device, non_blocking=True)


def num_batches(n: int, batch_size: int, drop_last: bool = False, world_size: int = 1) -> int:
    """How many batches :func:`batches` yields for ``n`` samples (per rank, sharded over ``world_size``)."""
    n //= world_size
    return n // batch_size if drop_last and n >= batch_size else -(-n // batch_size)
