"""A command never deletes or replaces what it did not create: `--out` folders that are no
run, a `--config` read from the run it replaces, a finished run resumed, a run's lock file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from eanet import checkpoint
from eanet.cli.main import main
from eanet.data.cifar import SAMPLE_ARCHIVE, SAMPLE_MD5
from eanet.errors import EANetError
from eanet.locks import RUN_LOCK
from eanet.train import loop as train_loop

TINY = ["--model-arg", "depth=1", "--model-arg", "dim=32", "--model-arg", "mlp_dim=32"]
COMMON = [
    *("--data-path", str(SAMPLE_ARCHIVE), "--md5", SAMPLE_MD5, *TINY),
    *("--batch-size", "32", "--threads", "1", "--device", "cpu", "--no-progress"),
]


def _contents(folder: Path) -> dict[str, bytes | None]:
    """Every entry under `folder` with its bytes (None: a folder)."""
    return {
        str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes()
        for p in sorted(folder.rglob("*"))
    }


def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("eanet: error: ")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if anything is loaded or trained."""

    def refuse(*args, **kwargs):
        raise AssertionError("the command went on to train")

    monkeypatch.setattr(train_loop, "load_dataset", refuse)


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_folder_that_is_no_run_is_refused_and_left_as_it_was(
    tmp_path, capsys, monkeypatch, no_training, overwrite
):
    """`eanet train --config config.yaml --out . --overwrite` in a project folder deleted its
    tensorboard/ tree and replaced the config file it read; without --overwrite the refusal
    said it "already holds a run"."""
    (tmp_path / "config.yaml").write_text("epochs: 1\nbatch_size: 32\n")
    (tmp_path / "tensorboard" / "old").mkdir(parents=True)
    (tmp_path / "tensorboard" / "old" / "events.out").write_bytes(b"the user's events")
    before = _contents(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", "config.yaml", *COMMON, "--out", ".", *overwrite]) == 2
    error = _one_error(capsys)
    assert "is not an eanet run and is not empty (config.yaml, tensorboard)" in error
    assert "choose another --out" in error and "already holds a run" not in error
    assert _contents(tmp_path) == before  # nothing deleted, replaced, or left (no lock)


def test_no_run_file_is_written_among_a_users_images(tmp_path, capsys, no_training):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.png").write_bytes(b"\x89PNG the user's")
    assert main(["train", *COMMON, "--out", str(photos)]) == 2
    assert f"{photos} is not an eanet run and is not empty (cat.png)" in _one_error(capsys)
    assert _contents(photos) == {"cat.png": b"\x89PNG the user's"}


def test_overwrite_refuses_to_replace_the_config_it_reads(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = _contents(run)
    argv = ["train", "--config", str(run / "config.yaml"), "--out", str(run), "--overwrite"]
    assert main(argv) == 2
    error = _one_error(capsys)
    assert f"--config {run / 'config.yaml'} is the config.yaml of {run}" in error
    assert _contents(run) == before


def test_overwrite_of_a_run_keeps_what_is_not_the_runs(tiny_run, tmp_path, capsys, monkeypatch):
    """--overwrite deletes the run's own files only: a user's notes and folders stay."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "notes").mkdir()
    (run / "notes" / "todo.txt").write_text("the user's")

    def stop(*args, **kwargs):
        raise EANetError("stopped")  # once the directory is prepared: before any training

    monkeypatch.setattr(train_loop, "load_dataset", stop)
    assert main(["train", *COMMON, "--out", str(run), "--overwrite"]) == 2
    assert (run / "notes" / "todo.txt").read_text() == "the user's"
    assert not (run / "config.json").exists()  # the old run's own files went


def test_resuming_a_finished_run_says_it_is_complete(tmp_path, capsys, monkeypatch):
    """`--resume` (and `--auto-resume`) of a run whose epochs are all trained and tested:
    one line saying so and how to extend it, exit 0, nothing run again."""
    run = tmp_path / "run"
    assert main(["train", *COMMON, "--epochs", "1", "--out", str(run)]) == 0
    capsys.readouterr()
    before = _contents(run)

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was trained or tested again")

    monkeypatch.setattr(train_loop, "fit", refuse)
    for argv in (
        ["train", "--resume", str(run)],
        ["train", *COMMON, "--epochs", "1", "--auto-resume", "--out", str(run)],
    ):
        assert main(argv) == 0
        out = capsys.readouterr().out.strip().splitlines()
        assert out == [
            f"{run} is complete: 1 epochs trained and tested (metrics.json); to train it "
            f"longer: eanet train --resume {run} --epochs N, with N > 1"
        ]
    assert _contents(run) == before
    called = []
    monkeypatch.setattr(train_loop, "fit", lambda *a, **kw: called.append(kw) or {})
    monkeypatch.setattr("eanet.cli.commands.score_lines", lambda *a: "")
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 0  # extended: trains
    assert called and called[0]["resume"]


def test_a_run_extended_and_interrupted_is_not_complete(tiny_run, tmp_path):
    """metrics.json of the first 1 epoch, config and checkpoint of a run extended to 3."""
    from eanet.train.rundir import finished_epochs

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert finished_epochs(run, 1) == 1
    assert finished_epochs(run, 3) is None
    (run / "metrics.json").write_text("{broken")
    assert finished_epochs(run, 1) is None  # tested again, which rewrites it


@pytest.mark.parametrize("name", [RUN_LOCK, ".compare.lock"])
def test_export_never_writes_over_a_lock_file(tiny_run, tmp_path, capsys, name):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / name).write_text("12345")
    argv = ["export", str(run), "--format", "torchscript", "--out", str(run / name)]
    assert main([*argv, "--overwrite"]) == 2
    assert f"{run / name} is the lock file of the directory {run}" in _one_error(capsys)
    assert (run / name).read_text() == "12345"
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 1
    assert checkpoint.load(run).meta.epoch == 1
