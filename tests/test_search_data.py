"""qdarts.data: embedded digits, synthetic set, CIFAR-10 pickle folder, deterministic batches."""

import os
import pickle

import numpy as np
import pytest
import torch

from qdarts import data as data_module
from qdarts.data import CIFAR10_FILES, batches, load_dataset


def test_digits_splits_are_fixed_disjoint_and_standardised():
    d = load_dataset("digits")
    assert d.train_x.shape == (1438, 1, 8, 8) and d.test_x.shape == (359, 1, 8, 8)
    assert torch.bincount(d.test_y).tolist() == [36, 36, 35, 37, 36, 36, 36, 36, 35, 36]  # 20% of each class
    tx, ty, vx, vy = d.search_split(0.5)
    assert tx.shape[0] == vx.shape[0] == 719
    assert abs(float(d.train_x.mean())) < 1e-5 and abs(float(d.train_x.std()) - 1) < 1e-3
    torch.testing.assert_close(load_dataset("digits").test_x, d.test_x, rtol=0, atol=0)
    with pytest.raises(ValueError, match="train_portion"):
        d.search_split(1.0)


def test_synthetic_and_unknown_names():
    s = load_dataset("synthetic")
    assert s.train_x.shape == (512, 3, 8, 8) and s.num_classes == 10
    with pytest.raises(ValueError, match="data must be one of"):
        load_dataset("mnist")


def _write_cifar(folder, n=3, drop=None, corrupt=None):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in CIFAR10_FILES:
        if name == drop:
            continue
        path = os.path.join(folder, name)
        if name == corrupt:
            with open(path, "wb") as f:
                f.write(b"not a pickle")
            continue
        if name == "batches.meta":
            obj = {b"label_names": [f"c{i}".encode() for i in range(10)], b"num_cases_per_batch": n}
        else:
            obj = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                   b"labels": rng.integers(0, 10, n).tolist(), b"batch_label": name.encode()}
        with open(path, "wb") as f:
            pickle.dump(obj, f)


def test_cifar10_from_a_pickle_folder(tmp_path):
    _write_cifar(str(tmp_path))
    d = load_dataset("cifar10", str(tmp_path))
    assert d.train_x.shape == (15, 3, 32, 32) and d.test_x.shape == (3, 3, 32, 32) and d.augment
    # pixel layout: 1024 red, then green, then blue values, row-major
    with open(tmp_path / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="bytes")[b"data"][0]
    std_img = d.test_x[0]
    first = torch.tensor(raw.reshape(3, 32, 32), dtype=torch.float32)
    corr = np.corrcoef(first.flatten().numpy(), std_img.flatten().numpy())[0, 1]
    assert corr > 0.99


@pytest.mark.parametrize("kind, error, match", [
    ("no_dir", FileNotFoundError, "does not exist"),
    ("missing", FileNotFoundError, "lacks data_batch_3"),
    ("corrupt", ValueError, "not a python pickle"),
    ("bad_shape", ValueError, r"uint8 of shape \[N, 3072\]"),
    ("no_arg", ValueError, "--data-dir is required"),
    # labels that a cast would truncate (1.7 -> 1) or parse ("1" -> 1)
    ("float_labels", ValueError, r"'labels' must be N=2 ints in 0\.\.9"),
    ("text_labels", ValueError, r"'labels' must be N=2 ints in 0\.\.9"),
])
def test_cifar10_clear_errors(tmp_path, kind, error, match):
    folder = str(tmp_path / "cifar")
    if kind == "missing":
        _write_cifar(folder, drop="data_batch_3")
    elif kind == "corrupt":
        _write_cifar(folder, corrupt="data_batch_2")
    elif kind == "bad_shape":
        _write_cifar(folder)
        with open(os.path.join(folder, "test_batch"), "wb") as f:
            pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    elif kind in ("float_labels", "text_labels"):
        _write_cifar(folder)
        with open(os.path.join(folder, "test_batch"), "wb") as f:
            labels = [1.7, 2.0] if kind == "float_labels" else ["1", "2"]
            pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": labels}, f)
    with pytest.raises(error, match=match):
        load_dataset("cifar10", None if kind == "no_arg" else folder)


def test_batches_are_deterministic_per_generator_and_augment_keeps_shapes():
    x = torch.randn(10, 3, 8, 8)
    y = torch.arange(10)
    run = lambda: [yb.tolist() for _, yb in batches(x, y, 4, shuffle=True, generator=torch.Generator().manual_seed(3))]  # noqa: E731
    assert run() == run() and sorted(sum(run(), [])) == list(range(10))
    xb, _ = next(batches(x, y, 10, shuffle=False, augment=True, generator=torch.Generator().manual_seed(0)))
    assert xb.shape == x.shape and not torch.equal(xb, x)
    # every augmented image is a shifted (zero-filled) and possibly mirrored copy of its source
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for src, out in zip(padded, xb):
        crops = [src[:, i: i + 8, j: j + 8] for i in range(9) for j in range(9)]
        assert any(torch.equal(out, c) or torch.equal(out, c.flip(-1)) for c in crops)


def test_augmentation_mirrors_about_half_the_images():
    """Each image is flipped with probability 1/2: a row of rising values reads falling in a mirrored crop."""
    x = torch.arange(1.0, 9.0).expand(256, 1, 16, 8)  # 16 rows: output row 8 is always an image row
    xb, _ = next(batches(x, torch.zeros(256), 256, shuffle=False, augment=True,
                         generator=torch.Generator().manual_seed(0)))
    row = xb[:, 0, 8]  # an image row: a crop of the 8 values with zeros beside them
    mirrored = [bool((v[v > 0].diff() < 0).all()) for v in row]
    assert all(m or bool((v[v > 0].diff() > 0).all()) for m, v in zip(mirrored, row))
    assert 96 < sum(mirrored) < 160


def test_the_crop_pads_cifar_images_with_black():
    """As DARTS and torchvision crop: the raw image padded with zeros, then normalised, so the padding
    is each channel's standardised black (-mean/std), not 0 (the mean colour)."""
    raw = torch.rand(6, 3, 8, 8)
    (x,), black = data_module._standardise(raw)
    torch.testing.assert_close(black, (-raw.mean(dim=(0, 2, 3)) / raw.std(dim=(0, 2, 3))))
    g = torch.Generator().manual_seed(1)
    xb, _ = next(batches(x, torch.arange(6), 6, shuffle=False, augment=True, pad_fill=black, generator=g))
    # the same crops of the raw image padded with zeros, standardised afterwards
    g = torch.Generator().manual_seed(1)
    want, _ = next(batches(raw, torch.arange(6), 6, shuffle=False, augment=True, generator=g))
    mean, std = raw.mean(dim=(0, 2, 3), keepdim=True), raw.std(dim=(0, 2, 3), keepdim=True)
    torch.testing.assert_close(xb, (want - mean) / std)
    assert (xb == black.reshape(1, 3, 1, 1)).any()  # some crop reaches into the padding
    raw[:, 1] = 0.5  # a constant channel (its std clamped): no black apart from its value, 0 standardised
    assert data_module._standardise(raw)[1][1] == 0.0
