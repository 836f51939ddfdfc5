"""Quantization-aware training of a small CNN with qdarts_kernels.nn, timed against PyTorch's own.

Data: scikit-learn's bundled handwritten digits (1797 8x8 images, no download), 80/20 split.
Network: conv 1->16 3x3, ReLU, conv 16->32 3x3, ReLU, max-pool 2 (32x4x4), linear 512->10.
Five trainings of the same network from the same initialisation, 8-bit weights and activations:

  fp32                  no quantization (reference accuracy and step time)
  ours quantize_        qdarts_kernels.nn.quantize_: QuantConv2d / QuantLinear, LSQ scales
                        (weights per output channel), activations quantized at each layer's input
  ours prepare_qat      torch.ao prepare_qat with QConfig(qdarts_kernels.nn.FakeQuantize, ...)
  torch FakeQuantize    prepare_qat with PyTorch's default QAT qconfig (FusedMovingAvgObsFakeQuantize:
                        moving-average min/max observer and fake quant in one op)
  torch LearnableFQ     prepare_qat with torch.ao's _LearnableFakeQuantize (LSQ, per-tensor
                        weights: it cannot size per-channel scales from a QConfig)

prepare_qat quantizes each module's *output* (and the input through QuantStub), quantize_ each
layer's *input*; both place one fake quantizer per weight. All five train on the same batches in
lockstep (see train_all_and_time). Prints the time per training step (median over the steps after
warm-up) and the test accuracy. Runs in well under a minute on 2 CPU cores.

    python examples/qat_small_cnn.py [--epochs 3] [--batch-size 64] [--threads 1] [--backend reference|cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.ao.quantization as tq
from torch import nn
from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize

import qdarts_kernels as qk
from qdarts_kernels import nn as qnn


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()  # identities unless prepared
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        return self.dequant(self.classifier(self.features(self.quant(x)).flatten(1)))


def load_digits_split(seed: int = 0):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # in [0, 1]
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_train = int(0.8 * len(x))
    return (x[perm[:n_train]], y[perm[:n_train]]), (x[perm[n_train:]], y[perm[n_train:]])


def ours_quantize_(model: nn.Module, backend) -> nn.Module:
    # every quantized layer's input is non-negative here (pixels in [0, 1], then ReLU outputs)
    return qnn.quantize_(model, weight_bits=8, act_bits=8, act_signed=False, backend=backend)


def ours_prepare_qat(model: nn.Module, backend) -> nn.Module:
    model.qconfig = tq.QConfig(
        # signed levels stored as quint8 (zero point 128): conv outputs and logits can be negative
        activation=qnn.FakeQuantize.with_args(bits=8, grid="signed", dtype=torch.quint8, backend=backend),
        weight=qnn.FakeQuantize.with_args(bits=8, grid="signed", ch_axis=0, backend=backend),
    )
    return tq.prepare_qat(model)


def torch_default_qat(model: nn.Module, backend) -> nn.Module:
    model.qconfig = tq.get_default_qat_qconfig("x86")
    return tq.prepare_qat(model)


def torch_learnable_qat(model: nn.Module, backend) -> nn.Module:
    model.qconfig = tq.QConfig(
        activation=_LearnableFakeQuantize.with_args(
            observer=tq.MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.quint8,
            qscheme=torch.per_tensor_affine, scale=1.0, zero_point=0.0, use_grad_scaling=True),
        weight=_LearnableFakeQuantize.with_args(
            observer=tq.MovingAverageMinMaxObserver, quant_min=-128, quant_max=127, dtype=torch.qint8,
            qscheme=torch.per_tensor_symmetric, scale=1.0, zero_point=0.0, use_grad_scaling=True),
    )
    return tq.prepare_qat(model)


VARIANTS = {
    "fp32": lambda model, backend: model,
    "ours quantize_": ours_quantize_,
    "ours prepare_qat": ours_prepare_qat,
    "torch FakeQuantize": torch_default_qat,
    "torch LearnableFQ": torch_learnable_qat,
}


def train_all_and_time(variants: dict, train, test, *, epochs: int, batch_size: int, lr: float, warmup: int,
                       seed: int, backend) -> dict:
    """Train every variant on the same batches in lockstep, rotating which goes first, so that
    load from other processes on the machine falls on all of them alike."""
    runs = {}
    for name, prepare in variants.items():
        torch.manual_seed(seed)
        model = prepare(SmallCNN().train(), backend)
        with torch.no_grad():
            model(train[0][:batch_size])  # first batch: observers / LSQ initialisation, lazy scales
        runs[name] = (model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), [])
    x_train, y_train = train
    gen = torch.Generator().manual_seed(seed)
    names = list(runs)
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(x_train) - batch_size + 1, batch_size):
            xb, yb = x_train[perm[i:i + batch_size]], y_train[perm[i:i + batch_size]]
            for name in names[step % len(names):] + names[:step % len(names)]:
                model, opt, times = runs[name]
                t0 = time.perf_counter()
                loss = nn.functional.cross_entropy(model(xb), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                times.append(time.perf_counter() - t0)
            step += 1
    results = {}
    for name, (model, _, times) in runs.items():
        model.eval()
        with torch.no_grad():
            acc = (model(test[0]).argmax(1) == test[1]).float().mean().item()
        results[name] = (statistics.median(times[warmup:]), len(times), acc)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (momentum 0.9)")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    # one thread by default: this network is too small to gain from more, and timings with several
    # threads swing widely when other processes share the cores
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default=None, help="qdarts_kernels backend (default: automatic)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # torch.ao.quantization's notice
    warnings.filterwarnings("ignore", message=".*_C is not available.*")
    warnings.filterwarnings("ignore", message="Please use quant_min and quant_max")  # torch's default qconfig

    if args.threads:
        torch.set_num_threads(args.threads)
    train, test = load_digits_split(args.seed)
    print(f"digits: train {tuple(train[0].shape)}, test {tuple(test[0].shape)}; batch {args.batch_size}, "
          f"{args.epochs} epochs; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"qdarts_kernels backend: {args.backend or 'automatic'} (available: {qk.available_backends()})")
    print(f"{'variant':<20} {'ms/step':>9} {'steps':>6} {'test acc':>9}")
    results = train_all_and_time(VARIANTS, train, test, epochs=args.epochs, batch_size=args.batch_size,
                                 lr=args.lr, warmup=args.warmup, seed=args.seed, backend=args.backend)
    for name, (t, steps, acc) in results.items():
        print(f"{name:<20} {t * 1e3:9.2f} {steps:6d} {acc:9.3f}")

if __name__ == "__main__":
    main()
