"""One process per run directory: the PID lock, a real second `eanet train`, stale locks."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from eanet import checkpoint
from eanet.cli.main import main
from eanet.data.cifar import SAMPLE_ARCHIVE, SAMPLE_MD5
from eanet.errors import EANetError
from eanet.locks import RUN_LOCK, directory_lock
from eanet.train import rundir

TINY_CLI = [
    *("--data-path", str(SAMPLE_ARCHIVE), "--md5", SAMPLE_MD5),
    *("--model-arg", "depth=1", "--model-arg", "dim=32", "--model-arg", "mlp_dim=32"),
    *("--batch-size", "32", "--threads", "1", "--device", "cpu", "--no-progress"),
]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    run = tmp_path / "run"
    with directory_lock(run):
        assert (run / RUN_LOCK).read_text() == str(os.getpid())
        in_use = pytest.raises(EANetError, match=f"run directory in use by PID {os.getpid()}")
        with in_use, directory_lock(run):
            pass
    assert not (run / RUN_LOCK).exists()
    (run / RUN_LOCK).write_text(str(_dead_pid()))  # left by a process killed with -9
    with directory_lock(run):
        assert (run / RUN_LOCK).read_text() == str(os.getpid())
    (run / RUN_LOCK).write_text("")  # killed between creating and writing: garbage
    with directory_lock(run):
        pass
    assert not (run / RUN_LOCK).exists()


def test_other_lock_names_are_independent(tmp_path):
    with directory_lock(tmp_path, ".compare.lock", "compare directory"):
        with directory_lock(tmp_path):  # a run inside a compare's directory
            pass
        in_use = pytest.raises(EANetError, match="compare directory in use by PID")
        with in_use, directory_lock(tmp_path, ".compare.lock", "compare directory"):
            pass


def test_a_stale_run_lock_is_taken_over_by_train(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / RUN_LOCK).write_text(str(_dead_pid()))
    assert main(["train", *TINY_CLI, "--epochs", "1", "--out", str(run)]) == 0
    assert checkpoint.load(run).meta.epoch == 1
    assert not (run / RUN_LOCK).exists()  # released at the end


def test_a_failing_run_releases_its_lock(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY_CLI, "--epochs", "1", "--out", str(run)]) == 0
    # refused by the data check after the lock was taken: the lock must not stay behind
    assert main(["train", "--resume", str(run), "--dataset", "synthetic"]) == 2
    assert not (run / RUN_LOCK).exists()
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 0


def _stray(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.startswith("."))


@pytest.mark.slow
def test_a_second_train_or_resume_on_a_run_in_use_is_refused(tmp_path, capsys):
    """A real `eanet train --resume`, held inside its save; a second --resume and a second
    train get one line and exit 2, and leave the first one's temporary file alone; after a
    kill -9 of the first, the next start takes the stale lock over and leaves no stray file."""
    run, log = tmp_path / "run", tmp_path / "first.log"
    assert main(["train", *TINY_CLI, "--epochs", "1", "--out", str(run)]) == 0
    with open(log, "wb") as f:
        first = subprocess.Popen(
            [sys.executable, "-m", "eanet", "train", "--resume", str(run), "--epochs", "2"],
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**os.environ, "EANET_TEST_SLOW_SAVE": "60"},
        )
    try:
        deadline = time.monotonic() + 120
        while not list(run.glob(".checkpoint.safetensors.*.tmp")):
            assert first.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        temp = list(run.glob(".checkpoint.safetensors.*.tmp"))
        for argv in (
            ["train", "--resume", str(run), "--epochs", "2"],
            ["train", *TINY_CLI, "--epochs", "1", "--out", str(run)],
            ["train", *TINY_CLI, "--epochs", "1", "--out", str(run), "--overwrite"],
        ):
            capsys.readouterr()
            assert main(argv) == 2
            err = capsys.readouterr().err.strip()
            assert err.startswith(f"eanet: error: {run}: run directory in use by PID {first.pid}")
            assert "\n" not in err
        # nothing of the first run's was touched: its save in progress is still there
        assert list(run.glob(".checkpoint.safetensors.*.tmp")) == temp
        assert checkpoint.load(run).meta.epoch == 1 and first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    assert (run / RUN_LOCK).read_text() == str(first.pid)  # stale now
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 0
    assert _stray(run) == []  # the stale lock and the killed save's temporary file are gone
    assert checkpoint.load(run).meta.epoch == 2


def test_two_claims_at_once_never_delete_the_winners_directory(tmp_path, monkeypatch):
    """Two `claim_run_dir` of a new directory at the same instant: both pass the start before
    the lock, then one takes it and starts its run; the loser is refused in one line and
    leaves the winner's directory and files alone (it deleted them in 46 of 200 tries)."""
    out = tmp_path / "run"
    both_started, won, lost = threading.Barrier(2), threading.Event(), threading.Event()
    real_lock = rundir.directory_lock

    def lock_in_turn(path, *args):  # the window made certain: the loser locks second
        both_started.wait(timeout=30)
        if threading.current_thread().name == "loser":
            assert won.wait(timeout=30)
        return real_lock(path, *args)

    monkeypatch.setattr(rundir, "directory_lock", lock_in_turn)
    errors: dict[str, str] = {}

    def claim() -> None:
        me = threading.current_thread().name
        try:
            with contextlib.ExitStack() as held:
                rundir.claim_run_dir(held, out, resume=False, overwrite=False)
                (out / "config.json").write_text("{}")  # the winner's run has begun
                won.set()
                assert lost.wait(timeout=30)
                assert (out / "config.json").is_file() and (out / RUN_LOCK).is_file()
        except EANetError as exc:
            errors[me] = str(exc)
        finally:
            if me == "loser":
                lost.set()

    threads = [threading.Thread(target=claim, name=name) for name in ("winner", "loser")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert list(errors) == ["loser"] and "run directory in use by PID" in errors["loser"]
    assert (out / "config.json").is_file()  # the winner's run is still there
    assert not (out / RUN_LOCK).exists()  # released by the winner at its end


def test_a_failed_start_removes_only_a_directory_it_created(tmp_path):
    """The clean-up after a failed start: the directory this process made goes; one that
    was there already stays with what it holds."""
    made, there = tmp_path / "made", tmp_path / "there"
    there.mkdir()
    for out in (made, there):
        with pytest.raises(RuntimeError), contextlib.ExitStack() as held:
            rundir.claim_run_dir(held, out, resume=False, overwrite=False)
            raise RuntimeError("a bad option found after the claim")
    assert not made.exists()
    assert there.is_dir() and list(there.iterdir()) == []
