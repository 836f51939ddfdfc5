"""Bad input to the command line: every user error ends in one clear line naming the argument or the
file (exit status 2, or 1 for a file system failure mid-run), never a traceback, and leaves no
half-written output or checkpoint behind (the folder is as it was before the call).
"""

import errno
import json
import os
import pickle
import signal
import threading

import numpy as np
import pytest
import torch

from qdarts import cli
from qdarts.data import CIFAR10_FILES
from qdarts.search import CHECKPOINT, SearchConfig, run_search
from qdarts.train import CHECKPOINT as TRAIN_CHECKPOINT

TINY = ["--data", "synthetic", "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "256", "--layers", "1",
        "--channels", "4", "--partial-channels", "2", "--bits", "2,4", "--no-progress", "--no-plots"]
TRAIN_TINY = ["--epochs", "1", "--batch-size", "256", "--channels", "4", "--no-progress"]


@pytest.fixture(scope="module")
def finished_search(tmp_path_factory):
    """A finished one-epoch search folder: checkpoint.pt and genotype.json to corrupt in copies."""
    out = tmp_path_factory.mktemp("search")
    run_search(SearchConfig(data="synthetic", epochs=1, warmup_epochs=0, batch_size=256, channels=4, layers=1,
                            steps=2, partial_channels=2, bits=(2, 4)), str(out), progress=False, plots=False)
    return out


def _snapshot(folder):
    """{name: bytes} of a folder (None if it does not exist): what must not change on a refused call."""
    if not os.path.exists(folder):
        return None
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


def _refused(argv, capsys, *, match, code=2):
    """Run the CLI and check: the exit status, one stderr line that names what is wrong, no traceback."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's own errors: usage line + "error:" line
        rc = e.code
    err = capsys.readouterr().err
    assert rc == code, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    assert match in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("args, match", [
    (["--bits", "2,x"], "--bits"),
    (["--bits", "0"], "--bits"),
    (["--bits", "17"], "--bits"),
    (["--bits", "2,2"], "--bits"),
    (["--data", "imagenet"], "--data"),
    (["--epochs", "-1"], "epochs must be >= 1"),
    (["--epochs", "two"], "--epochs"),
    (["--batch-size", "0"], "batch_size must be >= 1"),
    (["--threads", "0"], "--threads"),
    (["--threads", "99999999999"], "--threads must be in [1, 2**31 - 1]"),
    (["--channels", "6", "--partial-channels", "4"], "partial_channels"),
    (["--partial-channels", "0"], "partial_channels must be >= 1, got 0"),  # not "divisible by 0"
    (["--data", "cifar10"], "--data-dir is required"),
    (["--data-dir", "somewhere"], "somewhere') is read for data 'cifar10' only, and data is 'synthetic'"),
    (["--lambda", "inf"], "--lambda"),
    (["--weight-lr", "nan"], "--weight-lr"),
    (["--gamma-lr", "-1"], "--gamma-lr"),
    (["--arch-lr", "inf"], "--arch-lr"),
    (["--seed", "10000000000000"], "--seed"),
    (["--seed", "-1"], "--seed"),
    (["--device", "foo"], "--device"),
    (["--backend", "cuda"], "--backend"),  # not built here, or not on --device cpu
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_search_option(args, match, tmp_path, capsys):
    out = tmp_path / "out"
    _refused(["search", *TINY, *args, "--out", str(out)], capsys, match=match)
    assert not out.exists()


@pytest.mark.parametrize("variable, value, match", [
    ("QDARTS_BACKEND", "foo", "QDARTS_BACKEND (environment) 'foo'"),
    ("QDARTS_BACKEND", "cuda", "QDARTS_BACKEND (environment) 'cuda'"),  # not built here, or not on --device cpu
    ("QDARTS_CPU_ISA", "sse9", "QDARTS_CPU_ISA must be"),
    ("QDARTS_CPU_CACHE_MB", "-3", "QDARTS_CPU_CACHE_MB must be"),
    ("QDARTS_CPU_CACHE_MB", str(2**43), "QDARTS_CPU_CACHE_MB must be"),  # its bytes past an int64
], ids=str)
@pytest.mark.parametrize("command", ["search", "train", "bench"])
def test_bad_kernel_environment_variable(variable, value, match, command, finished_search, tmp_path, capsys,
                                         monkeypatch):
    """A value the kernels would refuse at their first call is refused before the run starts: one line
    naming the variable, no output folder."""
    monkeypatch.setenv(variable, value)
    out = tmp_path / "out"
    argv = {"search": ["search", *TINY], "bench": ["bench", "--quick"],
            "train": ["train", "--genotype", str(finished_search / "genotype.json"), *TRAIN_TINY]}[command]
    rc = cli.main([*argv, "--out", str(out)])
    message = capsys.readouterr().err
    assert rc == 2 and match in message and "Traceback" not in message, message
    assert not out.exists()


def test_empty_kernel_environment_variables_are_unset(monkeypatch):
    from qdarts.search import check_device

    for variable in ("QDARTS_BACKEND", "QDARTS_CPU_ISA", "QDARTS_CPU_CACHE_MB"):
        monkeypatch.setenv(variable, "")
    check_device("cpu", None)


@pytest.mark.parametrize("args, match", [
    (["--epochs", "-1"], "epochs must be >= 1"),
    (["--drop-path", "1.5"], "drop_path"),
    (["--data", "nope"], "--data"),
    (["--layers", "0"], "--layers"),
    (["--channels", "0"], "--channels"),
    (["--channels", "-2"], "--channels"),
    (["--device", "foo"], "--device"),
    (["--backend", "cuda"], "--backend"),
    (["--seed", "10000000000000"], "--seed"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "-1"], "--lr"),
    (["--aux-weight", "inf"], "--aux-weight"),
    (["--auxiliary", "--batch-size", "1"], "--batch-size"),
    (["--data-dir", "somewhere"], "somewhere') is read for data 'cifar10' only"),
    (["--layers", "3"], "no searched normal cell"),  # the genotype's 1-cell search has a reduction cell only
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_train_option(args, match, finished_search, tmp_path, capsys):
    out = tmp_path / "out"
    _refused(["train", "--genotype", str(finished_search / "genotype.json"), *TRAIN_TINY, *args, "--out", str(out)],
             capsys, match=match)
    assert not out.exists()


# ---------------------------------------------------------------------------------------- CIFAR-10 folders

def _batch(n=4, cols=3072, dtype=np.uint8, labels=None):
    return {b"data": np.zeros((n, cols), dtype=dtype), b"labels": list(range(n)) if labels is None else labels}


def _write_cifar(folder, *, skip=(), override=None):
    """A CIFAR-10 python folder with 4 images per batch; ``override`` {file: raw bytes or object}."""
    folder.mkdir()
    files = {f"data_batch_{i}": _batch() for i in range(1, 6)}
    files["test_batch"] = _batch()
    files["batches.meta"] = {b"label_names": [f"c{i}".encode() for i in range(10)]}
    files.update(override or {})
    for name, content in files.items():
        if name not in skip:
            (folder / name).write_bytes(content if isinstance(content, bytes) else pickle.dumps(content))
    return folder


_GOOD_PICKLE = pickle.dumps(_batch())


@pytest.mark.parametrize("case, kwargs, match", [
    ("missing file", dict(skip=("data_batch_3",)), "lacks data_batch_3"),
    ("truncated pickle", dict(override={"data_batch_2": _GOOD_PICKLE[: len(_GOOD_PICKLE) // 2]}), "data_batch_2"),
    ("random bytes", dict(override={"test_batch": bytes(np.random.default_rng(0).integers(0, 256, 999,
                                                                                           dtype=np.uint8))}),
     "test_batch"),
    ("empty file", dict(override={"data_batch_1": b""}), "data_batch_1"),
    ("wrong shape", dict(override={"data_batch_4": _batch(cols=3071)}), "[N, 3072]"),
    ("wrong dtype", dict(override={"data_batch_4": _batch(dtype=np.float32)}), "data_batch_4"),
    ("bad labels", dict(override={"data_batch_5": _batch(labels=[0, 1, 2, 10])}), "labels"),
    ("not a dict", dict(override={"data_batch_1": [1, 2, 3]}), "data_batch_1"),
    ("no label names", dict(override={"batches.meta": {b"names": []}}), "batches.meta"),
])
def test_bad_cifar10_folder(case, kwargs, match, tmp_path, capsys):
    data = _write_cifar(tmp_path / "cifar", **kwargs)
    out = tmp_path / "out"
    _refused(["search", *TINY, "--data", "cifar10", "--data-dir", str(data), "--out", str(out)], capsys,
             match=match)
    assert not out.exists()


@pytest.mark.parametrize("command, counts, match", [
    ("search", (1, 0, 0, 0, 0, 2), "train split has 0 samples"),  # the pool of 1 leaves no search train half
    ("search", (1, 1, 0, 0, 0, 0), "cifar"),  # the search does not read the test split
    ("train", (0, 0, 0, 0, 0, 2), "training pool (data_batch_1..5) has 0 samples"),
    ("train", (2, 0, 0, 0, 0, 0), "test split has 0 samples"),
])
def test_too_small_cifar10_folder(command, counts, match, finished_search, tmp_path, capsys):
    data = _write_cifar(tmp_path / "cifar", override={
        name: _batch(n=n, labels=[0] * n) for name, n in zip([*CIFAR10_FILES[:5], "test_batch"], counts)})
    out = tmp_path / "out"
    argv = (["search", *TINY] if command == "search"
            else ["train", "--genotype", str(finished_search / "genotype.json"), *TRAIN_TINY])
    argv += ["--data", "cifar10", "--data-dir", str(data), "--out", str(out)]
    if match == "cifar":  # a search needs a train and a val sample only
        assert cli.main(argv) == 0
        return
    line = _refused(argv, capsys, match=match)
    assert "'cifar10'" in line and str(data) in line
    assert not out.exists()


def test_missing_cifar10_folder(tmp_path, capsys):
    _refused(["search", *TINY, "--data", "cifar10", "--data-dir", str(tmp_path / "nope"), "--out",
              str(tmp_path / "out")], capsys, match="CIFAR-10 folder")
    (tmp_path / "a_file").write_text("")
    _refused(["search", *TINY, "--data", "cifar10", "--data-dir", str(tmp_path / "a_file"), "--out",
              str(tmp_path / "out")], capsys, match="is a file, not a folder")
    # an empty name would have been the working directory
    _refused(["search", *TINY, "--data", "cifar10", "--data-dir", "", "--out", str(tmp_path / "out")], capsys,
             match="data_dir (--data-dir) must name a folder, got ''")


# ---------------------------------------------------------------------------------------- checkpoints

def _corrupt_truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _corrupt_random(path):
    path.write_bytes(bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)))


def _corrupt_empty(path):
    path.write_bytes(b"")


def _corrupt_foreign_torch_file(path):
    torch.save({"state_dict": {"w": torch.zeros(3)}}, path)


def _corrupt_other_config(path):
    """A genuine checkpoint whose weights belong to another supernet than its config says."""
    state = torch.load(path, weights_only=False)
    state["config"]["channels"] = 8
    torch.save(state, path)


def _corrupt_missing_entries(path):
    state = torch.load(path, weights_only=False)
    del state["opt_arch"]
    torch.save(state, path)


def _corrupt_config_types(path):
    """Hand-edited settings of the wrong type: validating them raised a TypeError (a traceback)."""
    state = torch.load(path, weights_only=False)
    state["config"]["epochs"] = "1"
    torch.save(state, path)


def _corrupt_config_bits(path):
    state = torch.load(path, weights_only=False)
    state["config"]["bits"] = None
    torch.save(state, path)


@pytest.mark.parametrize("corrupt, match", [
    (_corrupt_truncated, "cannot be read"),
    (_corrupt_random, "cannot be read"),
    (_corrupt_empty, "cannot be read"),
    (_corrupt_foreign_torch_file, "is not a qdarts-search-checkpoint"),
    (_corrupt_other_config, "does not fit"),
    (_corrupt_missing_entries, "does not fit"),
    (_corrupt_config_types, "holds no valid search config (epochs (--epochs) must be an integer, got '1')"),
    (_corrupt_config_bits, "holds no valid search config (bits must be 1..4 bit-widths in [1, 16], got None)"),
], ids=lambda f: f.__name__[len("_corrupt_"):] if callable(f) else None)
@pytest.mark.parametrize("resume", [True, False], ids=["resume", "fresh"])
def test_corrupt_search_checkpoint(corrupt, match, resume, finished_search, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / CHECKPOINT).write_bytes((finished_search / CHECKPOINT).read_bytes())
    corrupt(out / CHECKPOINT)
    before = _snapshot(out)
    if not resume and match.startswith(("does not fit", "holds no valid")):
        match = "--resume"  # a readable checkpoint is not looked into without --resume: the folder is taken
    # resuming, the options are left out: they would be compared with the checkpoint's config first
    options = ["--resume", "--no-progress"] if resume else TINY
    line = _refused(["search", *options, "--out", str(out)], capsys, match=match)
    assert CHECKPOINT in line or "--resume" in line
    assert _snapshot(out) == before  # nothing written, nothing deleted


@pytest.mark.parametrize("corrupt, match", [
    (_corrupt_truncated, "cannot be read"),
    (_corrupt_foreign_torch_file, "is not a qdarts-train-checkpoint"),
], ids=["truncated", "foreign"])
def test_corrupt_train_checkpoint(corrupt, match, finished_search, tmp_path, capsys):
    out = tmp_path / "train"
    out.mkdir()
    (out / TRAIN_CHECKPOINT).write_bytes((finished_search / CHECKPOINT).read_bytes())
    corrupt(out / TRAIN_CHECKPOINT)
    before = _snapshot(out)
    line = _refused(["train", "--genotype", str(finished_search / "genotype.json"), *TRAIN_TINY, "--resume",
                     "--out", str(out)], capsys, match=match)
    assert TRAIN_CHECKPOINT in line
    assert _snapshot(out) == before


def test_resume_refuses_typed_settings_that_differ_from_the_checkpoint_and_keeps_the_rest(tmp_path, capsys):
    """``--resume --epochs 3`` on a 2-epoch run is an error naming the option (it used to stop at 2 silently);
    options left out take the checkpoint's values, and --device or the checkpoint's own values may be typed."""
    out = tmp_path / "cut"
    run_search(SearchConfig(data="synthetic", epochs=2, warmup_epochs=1, batch_size=256, channels=4, layers=1,
                            steps=2, partial_channels=2, bits=(2, 4)), str(out), progress=False, plots=False,
               stop_after=1)
    before = _snapshot(out)
    line = _refused(["search", "--resume", "--out", str(out), "--epochs", "3", "--bits", "2,4", "--lambda", "0.5"],
                    capsys, match="epochs (--epochs) is 2 there, 3 here")
    assert "cost_weight (--lambda) is 0.001 there, 0.5 here" in line and "bits" not in line.split(". Leave")[0]
    assert _snapshot(out) == before
    # the backend may change too (a run moved from a CPU to a GPU needs another)
    assert cli.main(["search", "--resume", "--out", str(out), "--epochs", "2", "--device", "cpu", "--backend",
                     "reference", "--no-progress", "--no-plots"]) == 0
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 2  # the checkpoint's 2 epochs; its 2-node cells (not the CLI's default 4) built again
    assert len(json.loads((out / "genotype.json").read_text())["normal"]) == 4


def test_train_resume_takes_a_typed_value_equal_to_the_one_taken_from_the_genotype(finished_search, tmp_path, capsys):
    """Layers left out the first time come from the genotype's search (1 here): typed as that value on the resume,
    they are the same setting; another value is refused."""
    genotype = str(finished_search / "genotype.json")
    out = tmp_path / "train"
    assert cli.main(["train", "--genotype", genotype, *TRAIN_TINY, "--out", str(out)]) == 0
    assert cli.main(["train", "--genotype", genotype, "--resume", "--layers", "1", "--data", "synthetic",
                     "--out", str(out)]) == 0
    _refused(["train", "--genotype", genotype, "--resume", "--layers", "2", "--out", str(out)], capsys,
             match="layers (--layers) is None there, 2 here")


def test_train_resume_refuses_a_typed_setting_that_differs(finished_search, tmp_path, capsys):
    genotype = str(finished_search / "genotype.json")
    out = tmp_path / "train"
    assert cli.main(["train", "--genotype", genotype, *TRAIN_TINY, "--out", str(out)]) == 0
    before = _snapshot(out)
    _refused(["train", "--genotype", genotype, "--resume", "--lr", "0.2", "--out", str(out)], capsys,
             match="lr (--lr) is 0.05 there, 0.2 here")
    assert _snapshot(out) == before
    # another file, even with the same contents, is another setting; another spelling of the same file is not
    copy = tmp_path / "copy.json"
    copy.write_text((finished_search / "genotype.json").read_text())
    _refused(["train", "--genotype", str(copy), "--resume", "--out", str(out)], capsys,
             match=f"genotype (--genotype) is {genotype!r} there, {str(copy)!r} here")
    assert _snapshot(out) == before
    (tmp_path / "link").symlink_to(finished_search)
    assert cli.main(["train", "--genotype", str(tmp_path / "link" / "." / "genotype.json"), "--resume",
                     "--out", str(out)]) == 0
    # nor is the search folder, which --genotype also takes
    assert cli.main(["train", "--genotype", str(finished_search), "--resume", "--out", str(out)]) == 0


def test_resume_checks_the_typed_options_against_the_checkpoints_values_not_the_defaults(tmp_path, capsys):
    """Options left out take the checkpoint's values, also where the typed ones are validated: a typed
    --partial-channels 3 fits the checkpoint's 6 channels, whatever the default of --channels."""
    out = tmp_path / "six"
    run_search(SearchConfig(data="synthetic", epochs=2, warmup_epochs=1, batch_size=256, channels=6, layers=1,
                            steps=2, partial_channels=3, bits=(2, 4)), str(out), progress=False, plots=False,
               stop_after=1)
    assert cli.main(["search", "--resume", "--partial-channels", "3", "--no-progress", "--no-plots",
                     "--out", str(out)]) == 0
    assert len(json.loads((out / "history.json").read_text())) == 2
    # a typed value that is wrong in itself is still named as such
    _refused(["search", "--resume", "--partial-channels", "4", "--out", str(out)], capsys,
             match="channels (6) must be divisible by partial_channels (4)")


def test_train_resume_from_another_working_directory(finished_search, tmp_path, capsys, monkeypatch):
    """The genotype file is kept by its absolute path: a resume started elsewhere names the same file."""
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    (tmp_path / "a" / "genotype.json").write_text((finished_search / "genotype.json").read_text())
    assert cli.main(["train", "--genotype", "genotype.json", *TRAIN_TINY, "--out", str(tmp_path / "t")]) == 0
    monkeypatch.chdir(tmp_path)
    for spelling in (str(tmp_path / "a" / "genotype.json"), "a/genotype.json", "a"):
        assert cli.main(["train", "--genotype", spelling, "--resume", "--out", "t"]) == 0, capsys.readouterr().err


def test_a_folder_another_run_writes_into_is_refused(tmp_path, capsys):
    """Two runs into one --out would overwrite each other's outputs (and the second would delete the first's
    temporary files): the folder is locked while a run writes into it, until that run ends."""
    from qdarts.checkpoint import LOCK_FILE, prepare_output_folder, release_output_folder

    out = tmp_path / "busy"
    lock = prepare_output_folder(str(out))  # as another run holds it (flock: another open file is another holder)
    line = _refused(["search", *TINY, "--out", str(out)], capsys, match="is writing into")
    assert f"process {os.getpid()}" in line
    _refused(["train", "--genotype", str(tmp_path / "none"), *TRAIN_TINY, "--out", str(out)], capsys,
             match="does not exist")  # the genotype is read first: no lock needed to refuse it
    assert sorted(os.listdir(out)) == [LOCK_FILE]
    release_output_folder(lock)
    assert cli.main(["search", *TINY, "--out", str(out)]) == 0
    assert cli.main(["search", *TINY, "--resume", "--out", str(out)]) == 0  # released when a run ends
    assert LOCK_FILE not in os.listdir(out)


def test_a_file_system_without_locks_does_not_stop_a_run(tmp_path, monkeypatch):
    """flock fails otherwise than for a held lock (ENOLCK on some network file systems): the run goes on."""
    import fcntl

    from qdarts.checkpoint import LOCK_FILE

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    assert cli.main(["search", *TINY, "--out", str(tmp_path / "nfs")]) == 0
    assert (tmp_path / "nfs" / "genotype.json").exists() and not (tmp_path / "nfs" / LOCK_FILE).exists()


def test_outputs_without_a_checkpoint_are_not_overwritten(finished_search, tmp_path, capsys):
    """A folder with a finished run's outputs whose checkpoint was deleted: a new run there would replace
    them and leave the old plots beside the new genotype; refused, with or without --resume."""
    out = tmp_path / "old"
    out.mkdir()
    for name in ("genotype.json", "history.json", "summary.md"):
        (out / name).write_bytes((finished_search / name).read_bytes())
    before = _snapshot(out)
    for resume in ([], ["--resume"]):
        _refused(["search", *TINY, *resume, "--out", str(out)], capsys,
                 match="holds a run's outputs (genotype.json, history.json) but no checkpoint.pt")
    assert _snapshot(out) == before
    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / "summary.json").write_text("{}")
    _refused(["train", "--genotype", str(finished_search), *TRAIN_TINY, "--out", str(trained)], capsys,
             match=f"holds a run's outputs (summary.json) but no {TRAIN_CHECKPOINT}")


def test_ctrl_c_while_the_command_line_is_read_ends_without_a_traceback(monkeypatch, capsys):
    def interrupted():
        raise KeyboardInterrupt  # the parser imports torch: a second or so in which Ctrl-C is likely

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["search"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err


def test_train_resume_refuses_a_checkpoint_config_of_the_wrong_type(finished_search, tmp_path, capsys):
    out = tmp_path / "train"
    assert cli.main(["train", "--genotype", str(finished_search / "genotype.json"), *TRAIN_TINY, "--out",
                     str(out)]) == 0
    state = torch.load(out / TRAIN_CHECKPOINT, weights_only=False)
    state["config"]["epochs"] = "1"
    torch.save(state, out / TRAIN_CHECKPOINT)
    before = _snapshot(out)
    line = _refused(["train", "--genotype", str(finished_search / "genotype.json"), "--resume", "--out", str(out)],
                    capsys, match="holds no valid training config (epochs (--epochs) must be an integer, got '1')")
    assert TRAIN_CHECKPOINT in line
    assert _snapshot(out) == before


def test_train_resume_refuses_a_genotype_file_that_changed(finished_search, tmp_path, capsys):
    """A search re-run into the genotype's folder rewrites the file under the same path; resumed, the other bits
    fit the same weights, so the rest of the training silently trained another network."""
    genotype = tmp_path / "genotype.json"
    original = json.loads((finished_search / "genotype.json").read_text())
    genotype.write_text(json.dumps(original))
    out = tmp_path / "train"
    assert cli.main(["train", "--genotype", str(genotype), *TRAIN_TINY, "--out", str(out)]) == 0
    before = _snapshot(out)
    resume = ["train", "--genotype", str(genotype), "--resume", "--out", str(out)]
    for changed in ({**original, "cells": [{**c, "preprocess1": [[8, 8]]} for c in original["cells"]]},
                    {**original, "search": {**original["search"], "layers": 2}}):  # --layers was left out
        genotype.write_text(json.dumps(changed))
        line = _refused(resume, capsys, match=f"the genotype file {str(genotype)!r} has changed since")
        assert TRAIN_CHECKPOINT in line
        assert _snapshot(out) == before
    # the search's results are not what retraining reads: they may change
    genotype.write_text(json.dumps({**original, "search": {**original["search"], "val_acc": 0.5}}))
    assert cli.main(resume) == 0
    # a checkpoint written before the genotype was saved in it resumes unchecked
    state = torch.load(out / TRAIN_CHECKPOINT, weights_only=False)
    del state["config"]["trained_on"]
    torch.save(state, out / TRAIN_CHECKPOINT)
    assert cli.main(resume) == 0


# ---------------------------------------------------------------------------------------- output folders

def _out_under_a_file(tmp_path):
    """Fails for root too: a path through a regular file cannot be created by anyone."""
    (tmp_path / "file").write_text("x")
    return tmp_path / "file" / "sub"


def _out_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    return tmp_path / "file"


def _out_read_only(tmp_path):
    """Permission bits: root ignores them, so this case runs for other users only."""
    if os.geteuid() == 0:
        pytest.skip("root writes into a 0o500 folder; the path-under-a-file case covers root")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    return folder


@pytest.mark.parametrize("make_out", [_out_under_a_file, _out_is_a_file, _out_read_only],
                         ids=["under_a_file", "is_a_file", "read_only"])
@pytest.mark.parametrize("command", ["search", "train"])
def test_unwritable_output_folder(make_out, command, finished_search, tmp_path, capsys):
    out = make_out(tmp_path)
    before = _snapshot(tmp_path)
    argv = (["search", *TINY] if command == "search"
            else ["train", "--genotype", str(finished_search / "genotype.json"), *TRAIN_TINY])
    _refused([*argv, "--out", str(out)], capsys, match="cannot be written")
    assert _snapshot(tmp_path) == before


def test_disk_full_during_a_checkpoint_leaves_no_partial_file(tmp_path, capsys, monkeypatch):
    """A write that fails half-way (here: the disk fills) ends with exit status 1 and leaves neither the
    torn file nor its temporary behind."""
    real_save = torch.save

    def save_then_fail(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save_then_fail)
    out = tmp_path / "out"
    _refused(["search", *TINY, "--out", str(out)], capsys, match="No space left on device", code=1)
    assert os.listdir(out) == []


# ---------------------------------------------------------------------------------------- genotype files

def _genotype_text(finished_search, edit):
    d = json.loads((finished_search / "genotype.json").read_text())
    return json.dumps(edit(d))


def _search_setting(name, value):
    return lambda g: _genotype_text(g, lambda d: {**d, "search": {**d["search"], name: value}})


def _edge_pairs(change):
    """The genotype with ``change`` applied to the bit pairs of its first edge that has convs."""
    def edit(d):
        edges = [list(e) for e in d["cells"][0]["edges"]]
        j = next(j for j, e in enumerate(edges) if e)
        edges[j] = change(edges[j])
        return {**d, "cells": [{**d["cells"][0], "edges": edges}, *d["cells"][1:]]}
    return lambda g: _genotype_text(g, edit)


GENOTYPE_CASES = {
    "missing": (None, "does not exist"),
    "empty": (lambda g: "", "not valid JSON"),
    "nested_too_deeply": (lambda g: "[" * 100000, "nested too deeply"),
    "version_true": (lambda g: _genotype_text(g, lambda d: {**d, "version": True}), "unsupported genotype version"),
    "reduction_text": (lambda g: _genotype_text(g, lambda d: {**d, "cells": [{**c, "reduction": "false"}
                                                                             for c in d["cells"]]}),
                       "cell 0 reduction must be true or false, got 'false'"),
    "bit_choices_empty": (lambda g: _genotype_text(g, lambda d: {**d, "bit_choices": []}),
                          "bit_choices must be bit-widths in 1..16, got []"),
    "truncated": (lambda g: (g / "genotype.json").read_text()[:100], "not valid JSON"),
    "binary": (lambda g: b"\x80\x81\xfe\xff" * 8, "genotype.json"),
    "a_list": (lambda g: "[1, 2]", "not a genotype file"),
    "wrong_version": (lambda g: _genotype_text(g, lambda d: {**d, "version": 99}), "unsupported genotype version"),
    "wrong_format": (lambda g: _genotype_text(g, lambda d: {**d, "format": "x"}), "not a genotype file"),
    "unknown_op": (lambda g: _genotype_text(g, lambda d: {**d, "normal": [{**d["normal"][0], "op": "conv_9x9"}]
                                                           + d["normal"][1:]}), "unknown op"),
    "missing_cells": (lambda g: _genotype_text(g, lambda d: {k: v for k, v in d.items() if k != "cells"}),
                      "malformed genotype"),
    "no_cells": (lambda g: _genotype_text(g, lambda d: {**d, "cells": []}), "cells is empty"),
    "concat_out_of_range": (lambda g: _genotype_text(g, lambda d: {**d, "normal_concat": [9]}), "normal_concat"),
    "empty_concat": (lambda g: _genotype_text(g, lambda d: {**d, "reduce_concat": []}), "reduce_concat"),
    "node_without_edges": (lambda g: _genotype_text(g, lambda d: {**d, "reduce": [
        {**e, "node": e["node"] + (e["node"] >= 3)} for e in d["reduce"]]}), "reduce node 3 has no edges"),
    "edge_into_an_input": (lambda g: _genotype_text(g, lambda d: {**d, "normal": [
        {"node": 1, "input": 0, "op": "skip_connect"}, *d["normal"]]}), "nodes 0 and 1 are the cell inputs"),
    "pair_of_one": (lambda g: _genotype_text(g, lambda d: {**d, "cells": [{**c, "preprocess1": [[2]]}
                                                                          for c in d["cells"]]}),
                    "cell 0 preprocess1 must be a list of [act_bits, weight_bits] pairs"),
    "pairs_per_conv": (lambda g: _genotype_text(g, lambda d: {**d, "cells": [{**c, "preprocess1": [[2, 2]] * 2}
                                                                             for c in d["cells"]]}),
                       "2 preprocess1 bit pairs"),
    # the edge's own place named, as for the other pair errors: in the file, and in the network
    "edge_pairs_short": (_edge_pairs(lambda pairs: pairs[:-1]),
                         "the genotype's cell 0 (for cell 0 of the network): edge "),
    "edge_pairs_long": (_edge_pairs(lambda pairs: pairs + [[2, 2]]),
                        "the genotype's cell 0 (for cell 0 of the network): edge "),
    "bits_32": (lambda g: _genotype_text(g, lambda d: {**d, "cells": [{**c, "preprocess1": [[32, 2]]}
                                                                      for c in d["cells"]]}), "outside 1..16"),
    # a hand-edited non-integer is refused, not truncated to one
    "bits_4.5": (lambda g: _genotype_text(g, lambda d: {**d, "cells": [{**c, "preprocess1": [[4.5, 2]]}
                                                                       for c in d["cells"]]}),
                 "cell 0 preprocess1 must hold integers, got 4.5"),
    "bits_true": (lambda g: _genotype_text(g, lambda d: {**d, "cells": [{**c, "preprocess1": [[True, 2]]}
                                                                        for c in d["cells"]]}),
                  "must hold integers, got True"),
    "bit_choices_2.5": (lambda g: _genotype_text(g, lambda d: {**d, "bit_choices": [2.5, 4]}),
                        "bit_choices must hold integers, got 2.5"),
    "node_2.5": (lambda g: _genotype_text(g, lambda d: {**d, "normal": [{**d["normal"][0], "node": 2.5}]
                                                        + d["normal"][1:]}), "normal edge node must hold integers"),
    "concat_text": (lambda g: _genotype_text(g, lambda d: {**d, "normal_concat": "2345"}),
                    "normal_concat must be a list of integers"),
    "reduction_flag": (lambda g: _genotype_text(g, lambda d: {**d, "cells": [{**c, "reduction": False}
                                                                             for c in d["cells"]]}),
                       "the reduction cells are [0]"),
    # the search settings retraining reads (with --channels given too: the file is refused as a whole)
    "search_layers_null": (_search_setting("layers", None), "search.layers must be an integer >= 1, got None"),
    "search_layers_text": (_search_setting("layers", "three"), "search.layers must be an integer >= 1"),
    "search_layers_true": (_search_setting("layers", True), "search.layers must be an integer >= 1"),
    "search_channels_null": (_search_setting("channels", None), "search.channels must be an integer >= 1"),
    "search_channels_0": (_search_setting("channels", 0), "search.channels must be an integer >= 1, got 0"),
    "search_data_number": (_search_setting("data", 5), "search.data must be one of digits, synthetic, cifar10"),
    "search_data_dir_number": (_search_setting("data_dir", 5), "search.data_dir must be a folder name or null"),
}


@pytest.mark.parametrize("case", GENOTYPE_CASES)
def test_bad_genotype_file(case, finished_search, tmp_path, capsys):
    content, match = GENOTYPE_CASES[case]
    path = tmp_path / "genotype.json"
    if content is not None:
        data = content(finished_search)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
    out = tmp_path / "out"
    line = _refused(["train", "--genotype", str(path), *TRAIN_TINY, "--out", str(out)], capsys, match=match)
    assert "genotype" in line
    assert not out.exists()


def test_only_the_genotypes_bit_pairs_are_blamed_on_the_genotype(finished_search):
    """The cell and edge are named for bit pairs that do not fit an op, not for the caller's own bad
    argument met while the cells are built."""
    from qdarts.evalnet import EvalNetwork
    from qdarts.genotype import load_genotype

    genotype = load_genotype(str(finished_search / "genotype.json"))
    with pytest.raises(ValueError, match=r"^backend must be one of"):
        EvalNetwork(genotype, (1, 8, 8), 10, 4, 1, backend="nope")


def test_outputs_get_the_usual_file_mode(finished_search):
    """Atomic writes go through mkstemp (mode 0o600); the files must end with what open() gives
    (0o666 less the umask), or the other users of a shared run folder cannot read the results."""
    umask = os.umask(0)
    os.umask(umask)
    for name in ("genotype.json", "history.json", "summary.md", CHECKPOINT):
        assert (finished_search / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_ctrl_c_ends_with_a_resume_hint_and_no_traceback(tmp_path, capsys, monkeypatch):
    from qdarts.search import Searcher

    def interrupted(self, stop_after=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(Searcher, "run", interrupted)
    assert cli.main(["search", *TINY, "--out", str(tmp_path / "out")]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume" in err and "Traceback" not in err


@pytest.fixture
def sigterm_default():
    """SIGTERM at its default action for the test (as in a process just started), whatever the test runner
    set, and the runner's own handler back afterwards."""
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("entry", ["qdarts search", "python -m qdarts.benchmark"])
def test_sigterm_within_a_run_ends_it_as_ctrl_c_and_the_handler_is_put_back(entry, sigterm_default, tmp_path,
                                                                            capsys, monkeypatch):
    """In the process itself: SIGTERM raised as Terminated only while a command runs, with the status
    128 + SIGTERM and its own word; the default action back after each of two runs in one process."""
    from qdarts.benchmark import cli as bench_cli
    from qdarts.search import Searcher

    def terminated(*args, **kwargs):
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not end the run")

    monkeypatch.setattr(Searcher, "run", terminated)
    monkeypatch.setattr(bench_cli, "run", terminated)
    main = {"qdarts search": lambda: cli.main(["search", *TINY, "--out", str(tmp_path / "out")]),
            "python -m qdarts.benchmark": lambda: bench_cli.main(["--out", str(tmp_path / "bench")])}[entry]
    for _ in range(2):
        assert main() == 128 + signal.SIGTERM
        err = capsys.readouterr().err
        assert "terminated (SIGTERM)" in err and "Traceback" not in err, err
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_an_ignored_sigterm_stays_ignored_and_a_run_in_another_thread_sets_no_handler(sigterm_default, tmp_path):
    """A launcher's choice to ignore SIGTERM is kept (Python keeps an ignored SIGINT too); a command run
    from another thread than the main one (a library's use of cli.main) runs, without a handler."""
    from qdarts.signals import sigterm_as_interrupt

    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as a launcher may leave it, across exec
    with sigterm_as_interrupt():
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    seen = []

    def in_a_thread():  # signal.signal would raise ValueError outside the main thread
        with sigterm_as_interrupt():
            seen.append(signal.getsignal(signal.SIGTERM))
        seen.append(cli.main(["search", *TINY, "--out", str(tmp_path / "out")]))

    worker = threading.Thread(target=in_a_thread)
    worker.start()
    worker.join()
    assert seen == [signal.SIG_DFL, 0]


class _FailingFile:
    """A file whose third write raises ``error``: a Ctrl-C, or a disk filling up, while torch.save writes."""

    def __init__(self, f, error):
        self.f, self.error, self.writes = f, error, 0

    def write(self, data):
        self.writes += 1
        if self.writes == 3:
            raise self.error
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)


def _writes_fail_with(error, monkeypatch):
    from qdarts import checkpoint

    real_fdopen = os.fdopen
    monkeypatch.setattr(checkpoint.os, "fdopen", lambda fd, mode, *a: _FailingFile(real_fdopen(fd, mode, *a), error))


def test_ctrl_c_while_torch_save_writes_a_checkpoint_stays_an_interrupt(tmp_path, monkeypatch, capsys):
    """A Ctrl-C inside torch.save comes back from it as the RuntimeError of its zip writer's clean-up;
    atomic_write gives back the KeyboardInterrupt (so the CLI prints its resume hint, exit 130), keeps
    the file that was there and leaves no temporary."""
    from qdarts import checkpoint

    path = tmp_path / "state.pt"
    path.write_bytes(b"the previous checkpoint")
    _writes_fail_with(KeyboardInterrupt(), monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_write(str(path), lambda f: torch.save({"w": torch.zeros(1000)}, f))
    assert path.read_bytes() == b"the previous checkpoint" and os.listdir(tmp_path) == ["state.pt"]
    assert cli.main(["search", *TINY, "--out", str(tmp_path / "out")]) == 130  # the first checkpoint write
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume" in err and "Traceback" not in err, err


def test_a_full_disk_while_torch_save_writes_a_checkpoint_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    """torch.save turns a failed write into its zip writer's "unexpected pos 64 vs 0"; atomic_write gives
    back the write's own error with the file's name, which the CLI prints as one line (exit 1), keeping
    the file that was there and leaving no temporary."""
    from qdarts import checkpoint

    path = tmp_path / "state.pt"
    path.write_bytes(b"the previous checkpoint")
    _writes_fail_with(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), monkeypatch)
    with pytest.raises(OSError) as failed:
        checkpoint.atomic_write(str(path), lambda f: torch.save({"w": torch.zeros(1000)}, f))
    assert (failed.value.errno, failed.value.filename) == (errno.ENOSPC, str(path))
    assert failed.value.__suppress_context__  # not chained to the zip writer's RuntimeError
    assert path.read_bytes() == b"the previous checkpoint" and os.listdir(tmp_path) == ["state.pt"]
    out = tmp_path / "out"
    assert cli.main(["search", *TINY, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"qdarts search: error: [Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)}: " \
                          f"{str(out / CHECKPOINT)!r}", err


def test_atomic_write_names_the_file_on_a_failed_write_and_passes_other_errors_on(tmp_path, monkeypatch):
    """A write's own OSError (no torch.save around it) gets the file's name and keeps its type; an error
    raised while handling an OSError is the code's own failure and comes back as it is, not as the OSError
    it was handling; and a Ctrl-C while a full disk's error is handled stays a Ctrl-C."""
    from qdarts import checkpoint

    path = str(tmp_path / "state.json")
    _writes_fail_with(BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE)), monkeypatch)
    with pytest.raises(BrokenPipeError) as failed:
        checkpoint.atomic_write(path, lambda f: [f.write(b"x") for _ in range(3)])
    assert failed.value.filename == path

    def fails_while_handling(f):
        try:
            f.write(b"x"), f.write(b"x"), f.write(b"x")
        except OSError:
            {}["a bug in the handler"]

    with pytest.raises(KeyError, match="a bug in the handler"):
        checkpoint.atomic_write(path, fails_while_handling)

    def interrupted_while_handling(f):
        try:
            f.write(b"x"), f.write(b"x"), f.write(b"x")
        except OSError:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_write(path, interrupted_while_handling)
    assert os.listdir(tmp_path) == []


def test_resume_where_there_is_nothing_to_resume_starts_a_new_run_with_a_note(finished_search, tmp_path, capsys):
    """A job script may always pass --resume; a mistyped --out is then named in a note, not passed over."""
    out = tmp_path / "search"
    assert cli.main(["search", *TINY, "--resume", "--out", str(out)]) == 0
    assert f"qdarts search: note: --resume, but {str(out)!r} holds no checkpoint.pt" in capsys.readouterr().err
    assert (out / "genotype.json").exists()
    assert cli.main(["search", *TINY, "--resume", "--out", str(out)]) == 0  # a checkpoint now: no note
    assert "note" not in capsys.readouterr().err
    out = tmp_path / "train"
    assert cli.main(["train", "--genotype", str(finished_search), *TRAIN_TINY, "--resume", "--out", str(out)]) == 0
    assert f"qdarts train: note: --resume, but {str(out)!r} holds no {TRAIN_CHECKPOINT}" in capsys.readouterr().err
    assert (out / "summary.json").exists()


def test_a_relative_data_dir_is_kept_absolute(tmp_path, capsys, monkeypatch):
    """The genotype keeps the search's data folder for the retraining, which may start in another folder."""
    _write_cifar(tmp_path / "cifar", override={
        name: _batch(n=2, labels=[0, 1]) for name in [*CIFAR10_FILES[:5], "test_batch"]})
    monkeypatch.chdir(tmp_path)
    assert cli.main(["search", *TINY, "--data", "cifar10", "--data-dir", "cifar", "--out", "s"]) == 0
    genotype = json.loads((tmp_path / "s" / "genotype.json").read_text())
    assert genotype["search"]["data_dir"] == str(tmp_path / "cifar")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert cli.main(["train", "--genotype", str(tmp_path / "s"), *TRAIN_TINY, "--out", "t"]) == 0


def test_a_checkpoint_that_does_not_fit_says_what_does_not():
    """load_state_dict's message opens with a line announcing what follows: the reason names that too
    (an --auxiliary checkpoint of before the head grew to DARTS's 768 channels said only the header)."""
    from qdarts.checkpoint import error_reason

    e = RuntimeError("Error(s) in loading state_dict for EvalNetwork:\n\tsize mismatch for auxiliary_head.classifier."
                     "weight: copying a param with shape torch.Size([10, 256]) ...")
    assert error_reason(e) == ("Error(s) in loading state_dict for EvalNetwork: size mismatch for "
                               "auxiliary_head.classifier.weight: copying a param with shape torch.Size([10, 256]) ...")
    assert error_reason(KeyError()) == "KeyError" and error_reason(ValueError("one\ntwo")) == "one"
