"""Command line: ``qdarts search``, ``qdarts train``, ``qdarts bench``, ``qdarts env`` (also ``python -m qdarts``)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import fields
from typing import List, Optional

from .signals import how_it_ended, sigterm_as_interrupt

__all__ = ["main", "build_parser"]


def _bits(text: str):
    from .genotype import MAX_BITS

    try:
        bits = tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--bits must be comma-separated ints such as 2,4,8, got {text!r}")
    if not 1 <= len(bits) <= 4 or any(not 1 <= b <= MAX_BITS for b in bits) or len(set(bits)) != len(bits):
        raise argparse.ArgumentTypeError(f"--bits must be 1..4 distinct bit-widths in [1, {MAX_BITS}], got {text!r}")
    return bits


def _default(cls, name):
    return next(f.default for f in fields(cls) if f.name == name)


def _add_common(p: argparse.ArgumentParser) -> None:
    from .fastpath import COMPILE_MODES

    p.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES,
                   help="torch.compile the forward and loss as one graph (fullgraph), backward included; "
                        "MODE: default (inductor; what --compile alone means), reduce-overhead (also CUDA-graph "
                        "capture, CUDA only) or max-autotune (autotuned, CUDA graphs too) (default: not "
                        "compiled). Meant for a GPU: "
                        "compiling takes minutes and grows with the network; on a 2-core CPU, 2.5 minutes "
                        "for `qdarts train` on the digits genotype, and the first search step of the digits "
                        "supernet had not finished after 10 minutes (the 8-cell CIFAR-size one: 20 minutes "
                        "of tracing alone)")
    p.add_argument("--act-dtype", default="fp32", choices=["fp32", "bf16"],
                   help="activation dtype: bf16 runs the network forward under autocast, the quantizers "
                        "then see bf16 activations (default: fp32)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default: cpu)")
    p.add_argument("--backend", default=None, choices=["reference", "cpu", "cuda", "triton"],
                   help="qdarts_kernels backend of every layer: the quantized convs, mixed-op sums, batch norms "
                        "and pools (default: automatic)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default: 1; the digits convs are too small to gain from more, and "
                        "OpenMP threads spinning on a busy machine slow a step down many times; raise it "
                        "for CIFAR-10 on a CPU)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run whose checkpoint is in --out, with the settings saved there: options "
                        "left out take the saved values, and a typed option that differs from them is an error "
                        "(only --device, --backend and, for a search, --cuda-graph may change); the result equals "
                        "an uninterrupted run. Where --out holds no checkpoint, a new run starts, with a note "
                        "(a job script may always pass --resume)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="output folder (created if missing)")


def _search_parser(sub) -> None:
    from .search import SearchConfig

    d = lambda name: _default(SearchConfig, name)  # noqa: E731
    p = sub.add_parser("search", help="search an architecture and its bit-widths (writes genotype.json)",
                       description="Joint differentiable search of the cell architecture and the per-layer "
                                   "activation/weight bit-widths (gradient QDARTS). Writes genotype.json, "
                                   "history.json, PNG plots, summary.md and checkpoint.pt into --out.")
    p.add_argument("--data", default=d("data"), choices=["digits", "synthetic", "cifar10"],
                   help="digits: scikit-learn's bundled 8x8 digits (default, no download); synthetic: "
                        "generated; cifar10: a local folder of the python-pickle CIFAR-10 (--data-dir)")
    p.add_argument("--data-dir", default=None, help="folder with data_batch_1..5, test_batch, batches.meta")
    p.add_argument("--bits", type=_bits, default=d("bits"), help="bit-width choices (default: 2,4,8)")
    p.add_argument("--epochs", type=int, default=d("epochs"), help=f"search epochs (default: {d('epochs')})")
    p.add_argument("--warmup-epochs", type=int, default=d("warmup_epochs"),
                   help=f"epochs before alpha/beta start to learn (default: {d('warmup_epochs')})")
    p.add_argument("--batch-size", type=int, default=d("batch_size"), help=f"(default: {d('batch_size')})")
    p.add_argument("--layers", type=int, default=d("layers"), help=f"cells in the supernet (default: {d('layers')})")
    p.add_argument("--channels", type=int, default=d("channels"), help=f"initial channels C (default: {d('channels')})")
    p.add_argument("--partial-channels", type=int, default=d("partial_channels"),
                   help=f"PC-DARTS K: ops see C/K channels (default: {d('partial_channels')}; 4 for CIFAR-10)")
    p.add_argument("--quantizer", default=d("quantizer"), choices=["paper", "lsq"],
                   help="paper: HWGQ activations + Gaussian mid-rise weights (official); lsq: learnable steps")
    p.add_argument("--act-grid", default=d("act_grid"), choices=["follow", "official"],
                   help="follow: signed grid after depthwise convs (default); official: unsigned everywhere")
    p.add_argument("--gamma-per-conv", action="store_true",
                   help="one (gamma_a, gamma_w) per conv instead of one per op (the official sharing)")
    p.add_argument("--cost", default=d("cost"), choices=["improved", "official"],
                   help="expected-BitOps formula (default: improved: op-probability weighted, group-aware)")
    p.add_argument("--lambda", dest="cost_weight", type=float, default=d("cost_weight"),
                   help=f"weight of the BitOps cost in the loss (default: {d('cost_weight')})")
    p.add_argument("--order", default=d("order"), choices=["first", "second"],
                   help="DARTS approximation order (second: DARTS's finite-difference Hessian term, unreliable on "
                        "quantized convs, whose forward is piecewise constant in the weights; default: %(default)s)")
    p.add_argument("--weight-lr", type=float, default=d("weight_lr"), help=f"(default: {d('weight_lr')})")
    p.add_argument("--gamma-lr", type=float, default=d("gamma_lr"), help=f"(default: {d('gamma_lr')})")
    p.add_argument("--arch-lr", type=float, default=d("arch_lr"), help=f"(default: {d('arch_lr')})")
    p.add_argument("--seed", type=int, default=d("seed"), help=f"(default: {d('seed')})")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--grouped-weights", action=argparse.BooleanOptionalAction, default=d("grouped_weights"),
                   help="quantize the weights of all convs in one grouped launch per step, and take the "
                        "activation quantizers' bit probabilities in one softmax (default: on; "
                        "--no-grouped-weights: launches per conv; the same values up to the order of "
                        "the gradient sums, so a long search may end in another genotype)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="replay each search step from a CUDA graph (CUDA, first order, one process): the "
                        "eager step recorded once per epoch and batch shape after 3 eager steps, then one "
                        "launch per step instead of tens of thousands; not with --compile")
    _add_common(p)
    p.set_defaults(run=_run_search)


def _train_parser(sub) -> None:
    from .train import TrainConfig

    d = lambda name: _default(TrainConfig, name)  # noqa: E731
    p = sub.add_parser("train", help="retrain a genotype with its fixed bits (or fp32); writes summary.json",
                       description="Retrain the derived network of a genotype from scratch with its fixed "
                                   "bit-widths (quantization-aware training), or in fp32 with --fp32, and "
                                   "report test accuracy, BitOps and memory against fp32 in summary.json.")
    p.add_argument("--genotype", required=True,
                   help="genotype.json written by qdarts search, or that search's --out folder")
    p.add_argument("--fp32", action="store_true", help="train the same architecture in full precision")
    p.add_argument("--epochs", type=int, default=d("epochs"), help=f"(default: {d('epochs')})")
    p.add_argument("--batch-size", type=int, default=d("batch_size"), help=f"(default: {d('batch_size')})")
    p.add_argument("--layers", type=int, default=None, help="cells (default: as in the search)")
    p.add_argument("--channels", type=int, default=None, help="initial channels (default: twice the search's)")
    p.add_argument("--lr", type=float, default=d("lr"),
                   help=f"learning rate of the SGD (momentum {d('momentum')}, weight decay {d('weight_decay')}, "
                        f"gradients clipped to norm {d('grad_clip')}), cosine down to {d('lr_min')} per epoch "
                        f"(default: {d('lr')})")
    p.add_argument("--auxiliary", action="store_true",
                   help="auxiliary head at 2/3 depth (weight --aux-weight; not counted in the parameters)")
    p.add_argument("--aux-weight", type=float, default=d("aux_weight"), help=f"(default: {d('aux_weight')})")
    p.add_argument("--drop-path", type=float, default=d("drop_path"),
                   help="drop-path probability P: epoch e (counted from 0) drops a path with probability "
                        f"P * e / epochs, as DARTS (default: {d('drop_path')})")
    p.add_argument("--data", default=None, choices=["digits", "synthetic", "cifar10"], help="default: the search's")
    p.add_argument("--data-dir", default=None, help="CIFAR-10 folder (default: the search's)")
    p.add_argument("--seed", type=int, default=d("seed"), help=f"(default: {d('seed')})")
    _add_common(p)
    p.set_defaults(run=_run_train)


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark the kernels and the end-to-end search step (qdarts.benchmark)",
                       description="Benchmarks of every backend against the PyTorch reference and torch.compile.")
    try:
        module = importlib.import_module("qdarts.benchmark.cli")
    except ImportError as e:
        reason = str(e)
        p.set_defaults(run=lambda args: _bench_missing(reason))
        return
    module.add_arguments(p)
    p.set_defaults(run=module.run)


def _env_parser(sub) -> None:
    from qdarts_kernels import collect_env

    p = sub.add_parser("env", help="what the kernels run on here: versions, extension, backends, GPUs",
                       description=collect_env.DESCRIPTION)
    collect_env.add_arguments(p)
    p.set_defaults(run=collect_env.run)


def _bench_missing(reason: str) -> int:
    print(f"qdarts bench: the benchmark module qdarts.benchmark.cli is not available ({reason})", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qdarts", description="Differentiable mixed-precision NAS (gradient "
                                     "QDARTS) on fused PyTorch kernels.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{search,train,bench,env}")
    _search_parser(sub)
    _train_parser(sub)
    _bench_parser(sub)
    _env_parser(sub)
    return parser


def _typed_options(argv: Optional[List[str]]) -> set:
    """The destinations of the options typed in ``argv``, not left at their defaults (a resumed run refuses
    typed settings that differ from its checkpoint's): ``argv`` parsed again with every default suppressed."""
    parser = build_parser()
    parsers = [parser]
    while parsers:
        for action in parsers.pop()._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
            else:
                action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def _setup(args) -> None:
    import torch

    from .distributed import init_from_env

    if not 1 <= args.threads < 2**31:  # torch takes a 32-bit int
        raise ValueError(f"--threads must be in [1, 2**31 - 1], got {args.threads}")
    torch.set_num_threads(args.threads)
    args.device = init_from_env(args.device)  # under torchrun: join the group, this rank's device


def _is_writer() -> bool:
    """Under torchrun only rank 0 reports (every rank computes the same result)."""
    from .distributed import current

    return current().is_writer


def _note_if_nothing_to_resume(command: str, out: str, checkpoint: str) -> None:
    """--resume where ``out`` holds no checkpoint starts a new run, so that a job script may always pass it; a
    mistyped --out would go unseen without a word, hence the note."""
    if _is_writer() and not os.path.exists(os.path.join(out, checkpoint)):
        print(f"qdarts {command}: note: --resume, but {out!r} holds no {checkpoint}: nothing to resume, a new run "
              "starts", file=sys.stderr)


def _run_search(args) -> int:
    from .search import CHECKPOINT, SearchConfig, run_search

    _setup(args)
    config = SearchConfig(
        data=args.data, data_dir=args.data_dir, bits=args.bits, epochs=args.epochs, warmup_epochs=args.warmup_epochs,
        batch_size=args.batch_size, layers=args.layers, channels=args.channels,
        partial_channels=args.partial_channels, quantizer=args.quantizer, act_grid=args.act_grid,
        share_gamma=not args.gamma_per_conv, cost=args.cost, cost_weight=args.cost_weight, order=args.order,
        weight_lr=args.weight_lr, gamma_lr=args.gamma_lr, arch_lr=args.arch_lr, seed=args.seed,
        device=args.device, backend=args.backend, grouped_weights=args.grouped_weights, act_dtype=args.act_dtype,
        compile=args.compile, cuda_graph=args.cuda_graph)
    explicit = {"share_gamma" if dest == "gamma_per_conv" else dest for dest in args.typed}
    if 1 <= config.epochs <= config.warmup_epochs and not args.resume and _is_writer():
        # allowed (the bit-widths are still searched), but rarely what was meant
        print(f"qdarts search: note: --warmup-epochs ({config.warmup_epochs}) is not below --epochs "
              f"({config.epochs}): alpha and beta are never updated, so only the bit-widths are searched and "
              "the genotype's operations are those of the initial, uniform alpha", file=sys.stderr)
    if args.resume:
        _note_if_nothing_to_resume("search", args.out, CHECKPOINT)
    result = run_search(config, args.out, resume=args.resume, progress=not args.no_progress,
                        plots=not args.no_plots, explicit=explicit)
    if not _is_writer():
        return 0
    cost, last = result["cost"], result["history"][-1]
    print(result["genotype"].describe())
    print(f"val accuracy {last['val_acc']:.4f}; derived BitOps {cost['bitops']:.4g} "
          f"({cost['bitops_fp32'] / max(cost['bitops'], 1):.1f}x fewer than fp32); "
          f"outputs in {os.path.abspath(args.out)}")
    return 0


def _run_train(args) -> int:
    from .train import CHECKPOINT, TrainConfig, run_train

    _setup(args)
    config = TrainConfig(
        genotype=args.genotype, fp32=args.fp32, epochs=args.epochs, batch_size=args.batch_size, layers=args.layers,
        channels=args.channels, lr=args.lr, auxiliary=args.auxiliary, aux_weight=args.aux_weight,
        drop_path=args.drop_path, data=args.data, data_dir=args.data_dir, seed=args.seed, device=args.device,
        backend=args.backend, act_dtype=args.act_dtype, compile=args.compile)
    if args.resume:
        _note_if_nothing_to_resume("train", args.out, CHECKPOINT)
    s = run_train(config, args.out, resume=args.resume, progress=not args.no_progress, explicit=args.typed)
    if not _is_writer():
        return 0
    print(f"test accuracy {s['test_accuracy']:.4f}; BitOps {s['bitops']:.4g} (fp32 {s['bitops_fp32']:.4g}, "
          f"{s['bitops_reduction']:.1f}x); memory {s['memory_bytes']:.0f} B (fp32 {s['memory_bytes_fp32']:.0f} B); "
          f"{os.path.join(os.path.abspath(args.out), 'summary.json')}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        args.typed = _typed_options(argv)
    except KeyboardInterrupt:  # while the parser imports torch: nothing has started
        print("qdarts: interrupted", file=sys.stderr)
        return 130
    try:
        with sigterm_as_interrupt():
            return args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"qdarts {args.command}: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # qdarts.divergence.Diverged (not imported: --help stays torch-free)
        print(f"qdarts {args.command}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the file system failed mid-run (disk full, permissions changed): not a bug
        print(f"qdarts {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        hint = ("; the checkpoint of the last finished epoch, if any, is kept: continue with --resume"
                if args.command != "bench" else " (results.json and report.md hold what was measured)")
        how, status = how_it_ended(e)
        print(f"qdarts {args.command}: {how}{hint}", file=sys.stderr)
        return status
    finally:
        if "qdarts.distributed" in sys.modules:
            sys.modules["qdarts.distributed"].shutdown()


if __name__ == "__main__":  # python -m qdarts.cli, the module's own name, runs it as python -m qdarts does
    raise SystemExit(main())
