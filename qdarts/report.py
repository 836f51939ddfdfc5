"""The run folder of a search: history.json, plots (PNG, matplotlib Agg) and summary.md."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Any, Dict, List

from .checkpoint import atomic_write, atomic_write_text
from .genotype import PRIMITIVES, Genotype

__all__ = ["write_search_report", "PLOTS"]

PLOTS = ("bits_per_layer.png", "op_weights.png", "accuracy_bitops.png")
#: the epochs' figures, written after every epoch and with the report
HISTORY_FILE = "history.json"


def _save(fig, path: str) -> None:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))


def _plot(out_dir: str, history: List[Dict[str, Any]], cost: Dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = cost["layers"]
    fig, ax = plt.subplots(figsize=(max(6, 0.12 * len(layers)), 3.2))
    idx = range(len(layers))
    ax.step(idx, [r["act_bits"] for r in layers], where="mid", label="activation bits")
    ax.step(idx, [r["weight_bits"] for r in layers], where="mid", label="weight bits", linestyle="--")
    ax.set_xlabel("quantized conv of the derived network (depth order)")
    ax.set_ylabel("bits")
    ax.set_title("Derived bit-width per layer")
    ax.legend()
    _save(fig, os.path.join(out_dir, PLOTS[0]))
    plt.close(fig)

    last = history[-1]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, kind in zip(axes, ("normal", "reduce")):
        probs = last["alpha"][kind]
        im = ax.imshow(probs, aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(PRIMITIVES)))
        ax.set_xticklabels(PRIMITIVES, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("edge")
        ax.set_title(f"softmax(alpha), {kind} cell")
        fig.colorbar(im, ax=ax)
    _save(fig, os.path.join(out_dir, PLOTS[1]))
    plt.close(fig)

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    ax.plot(epochs, [h["train_acc"] for h in history], label="train acc")
    ax.plot(epochs, [h["val_acc"] for h in history], label="val acc")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax2 = ax.twinx()
    ax2.plot(epochs, [h["expected_bitops"] / 1e6 for h in history], color="tab:red", label="expected MBitOps")
    ax2.set_ylabel("expected MBitOps / sample")
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="center right")
    ax.set_title("Search: accuracy and expected BitOps")
    _save(fig, os.path.join(out_dir, PLOTS[2]))
    plt.close(fig)


def write_search_report(out_dir: str, config, history: List[Dict[str, Any]], genotype: Genotype,
                        cost: Dict[str, Any], elapsed: float, *, plots: bool = True) -> None:
    atomic_write_text(os.path.join(out_dir, HISTORY_FILE), json.dumps(history))
    if plots:
        _plot(out_dir, history, cost)
    last = history[-1]
    ratio = cost["bitops_fp32"] / max(cost["bitops"], 1)
    mem_ratio = cost["memory_bytes_fp32"] / max(cost["memory_bytes"], 1)
    lines = [
        "# qdarts search summary",
        "",
        f"- data: {config.data}; bits searched: {list(config.bits)}; quantizer: {config.quantizer}; "
        f"cost: {config.cost} (lambda {config.cost_weight}); order: {config.order}",
        f"- supernet: {config.layers} cells, C={config.channels}, {config.steps} nodes, partial channels 1/"
        f"{config.partial_channels}; {config.epochs} epochs (alpha/beta from epoch {config.warmup_epochs + 1}); "
        f"seed {config.seed}",
        f"- search time: {elapsed:.1f} s",
        "",
        "## Result",
        "",
        "| | value |",
        "|---|---|",
        f"| supernet train accuracy (last epoch) | {last['train_acc']:.4f} |",
        f"| supernet val accuracy (last epoch) | {last['val_acc']:.4f} |",
        f"| expected BitOps / sample (improved formula, every edge of the supernet) | {last['expected_bitops']:.4g} |",
        f"| derived network BitOps / sample | {cost['bitops']:.4g} |",
        f"| same network in fp32 | {cost['bitops_fp32']:.4g} ({ratio:.1f}x more) |",
        f"| derived memory (weights + activations) | {cost['memory_bytes']:.0f} B |",
        f"| same network in fp32 | {cost['memory_bytes_fp32']:.0f} B ({mem_ratio:.1f}x more) |",
        "",
        "Derived network at the search size; stem and classifier are fp32 and not counted. The expected "
        "BitOps count every edge of the supernet's cells; the derived network keeps two inputs per node.",
        "",
        "## Genotype (a/w = activation/weight bits)",
        "",
        "```",
        genotype.describe(),
        "```",
        "",
        "Files: genotype.json (retrain with `qdarts train --genotype genotype.json --out DIR`), "
        + ", ".join(["history.json", *(PLOTS if plots else ()), "checkpoint.pt"]) + ".",
        "",
        "<details><summary>config</summary>",
        "",
        "```json",
        json.dumps(asdict(config), indent=1),
        "```",
        "</details>",
        "",
    ]
    atomic_write_text(os.path.join(out_dir, "summary.md"), "\n".join(lines))
