"""The README's examples as a user copies them: its Python blocks run (in order, in one namespace, as a
reader runs them one after the other), every `qdarts` command it shows parses with the CLI's own parser,
and the options it names inline exist, so that a renamed option or subcommand cannot leave the README behind."""

import argparse
import os
import re
import shlex

import pytest
import torch

from qdarts.cli import build_parser

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _fenced_blocks(language: str):
    """The fenced ``language`` blocks of the README, each dedented by its fence's indentation (a block inside
    a list item is indented)."""
    text = open(README, encoding="utf-8").read()
    pattern = re.compile(r"^( *)```" + language + r"\n(.*?)^\1```", re.M | re.S)
    return [re.sub(r"^" + m.group(1), "", m.group(2), flags=re.M) for m in pattern.finditer(text)]


def _qdarts_commands():
    """Every `qdarts ...` command line in the README's bash blocks (continuation lines joined, comments
    dropped, the part after `&&`, `-m qdarts` under torchrun)."""
    commands = []
    for block in _fenced_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("#", 1)[0].split("&&"):
                words = shlex.split(part)
                if "qdarts" in words[:1] or words[:1] == ["torchrun"] and "qdarts" in words:
                    commands.append(words[words.index("qdarts") + 1:])
    return commands


def _inline_options():
    """(subcommand, words) of each inline code span that names options of one, as `qdarts search --cuda-graph`:
    a fragment, not a whole command line."""
    text = open(README, encoding="utf-8").read()
    return [(words[1], words[2:]) for words in map(shlex.split, re.findall(r"`(qdarts [a-z]+ --[^`]*)`", text))]


def test_the_readme_python_examples_run():
    blocks = _fenced_blocks("python")
    assert len(blocks) >= 3  # the ops, their per-sample gradients, the drop-in QAT modules
    namespace = {}
    for block in blocks:
        exec(compile(block, README, "exec"), namespace)
    # what the examples say they compute
    assert namespace["y"].shape == namespace["x"].shape and namespace["ds"].shape == (len(namespace["x"]), 3)
    assert torch.isfinite(namespace["s"]).all()
    assert type(namespace["model"][0]).__name__ == "QuantConv2d"


def test_every_qdarts_command_in_the_readme_parses():
    commands = _qdarts_commands()
    assert len(commands) >= 8 and {c[0] for c in commands} >= {"search", "train"}
    parser = build_parser()
    for argv in commands:
        try:
            parser.parse_args(argv)
        except SystemExit as e:  # argparse's way of refusing: name the README line
            pytest.fail(f"README: `qdarts {' '.join(argv)}` does not parse (exit {e.code})")


def test_the_options_the_readme_names_inline_exist_with_the_values_it_gives():
    spans = _inline_options()
    assert len(spans) >= 5
    (subparsers,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    for command, words in spans:
        assert command in subparsers.choices, f"README: `qdarts {command}` is no subcommand"
        options = subparsers.choices[command]._option_string_actions
        for i, word in enumerate(words):
            if word.startswith("--"):
                assert word in options, f"README: `qdarts {command}` has no option {word}"
                choices = options[word].choices
                if choices is not None and i + 1 < len(words):
                    assert words[i + 1] in choices, f"README: `qdarts {command} {word} {words[i + 1]}`: not a choice"
