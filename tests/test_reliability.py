"""Reliability: kills and Ctrl-C, divergence, a full disk, bad options, tampering, determinism.

The kill tests run `python -m eanet train` in a subprocess on the shipped CIFAR-100 slice
and kill it for real; the rest run in this process with a tiny model.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import eanet
from eanet import checkpoint, fileio
from eanet.cli.main import main
from eanet.data.cifar import SAMPLE_ARCHIVE, SAMPLE_MD5
from eanet.errors import CheckpointError, ConfigError, EANetError
from eanet.train import guard, provenance
from eanet.train import loop as train_loop
from eanet.train.augmentation import BatchAugment
from eanet.train.config import TrainConfig
from eanet.train.loop import fit
from eanet.train.rundir import load_run_config

TINY = {"depth": 1, "dim": 32, "mlp_dim": 32}
SLICE = ["--data-path", str(SAMPLE_ARCHIVE), "--md5", SAMPLE_MD5]
TINY_CLI = [
    *SLICE,
    *("--model-arg", "depth=1", "--model-arg", "dim=32", "--model-arg", "mlp_dim=32"),
    *("--batch-size", "16", "--threads", "1", "--device", "cpu", "--no-progress"),
]


def tiny_config(**kw) -> TrainConfig:
    base = dict(model_args=dict(TINY), epochs=2, batch_size=32, device="cpu")
    return TrainConfig(**{**base, **kw})


def assert_same_training_state(a: checkpoint.Checkpoint, b: checkpoint.Checkpoint) -> None:
    """Bit equality of every weight and every AdamW tensor, and the same history."""
    assert a.meta.epoch == b.meta.epoch
    assert a.model_state.keys() == b.model_state.keys()
    for key in a.model_state:
        assert torch.equal(a.model_state[key], b.model_state[key]), key
    assert a.optimizer_state["state"].keys() == b.optimizer_state["state"].keys()
    for idx, state in a.optimizer_state["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b.optimizer_state["state"][idx][name]), (idx, name)

    def untimed(history: list[dict]) -> list[dict]:
        return [
            {k: v for k, v in h.items() if "seconds" not in k and "per_s" not in k} for h in history
        ]

    assert untimed(a.meta.history) == untimed(b.meta.history)


def temp_files(run: Path) -> list[str]:
    return sorted(p.name for p in run.glob(".*.tmp"))


# --------------------------------------------------------------------------- kill -9 and Ctrl-C


def _spawn(args: list[str], log: Path, **env: str) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "eanet", *args],
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
        )


def _wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"training ended (rc {proc.returncode}) too early:\n{log.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting:\n{log.read_text()}")
        time.sleep(0.02)


def _saved_epoch(run: Path) -> int:
    """The epoch of the checkpoint on disk, 0 if none (a torn read would be an error)."""
    if not (run / checkpoint.CHECKPOINT_NAME).exists():
        return 0
    return checkpoint.load(run).meta.epoch


def _check_consistent(run: Path) -> int:
    """After a kill: the checkpoint loads, and history.json is whole and at most 1 epoch behind."""
    epoch = _saved_epoch(run)
    ckpt = checkpoint.load(run)
    assert all(torch.isfinite(t).all() for t in ckpt.model_state.values())
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] in (
        list(range(1, epoch + 1)),
        list(range(1, epoch)),  # killed between the checkpoint and the history write
    )
    return epoch


def _kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> int:
    proc.send_signal(sig)
    return proc.wait(timeout=120)


@pytest.mark.slow
def test_killed_anywhere_and_resumed_ends_bit_identical(tmp_path):
    """SIGKILL mid-epoch, SIGKILL mid-save, Ctrl-C mid-epoch; each time resume; compare."""
    epochs = 6
    rng = random.Random(int(os.environ.get("EANET_TEST_SEED", "0")))
    run, log = tmp_path / "run", tmp_path / "train.log"
    common = [*TINY_CLI, "--epochs", str(epochs)]

    # 1. SIGKILL at a random moment after the first checkpoint exists
    proc = _spawn(["train", *common, "--out", str(run)], log)
    _wait_for(lambda: _saved_epoch(run) >= 1, proc, log)
    time.sleep(rng.uniform(0.0, 1.0))
    assert _kill(proc) == -signal.SIGKILL, log.read_text()
    first = _check_consistent(run)
    assert 1 <= first < epochs

    # 2. SIGKILL while the next checkpoint is being written (the test hook holds the save)
    resume = ["train", "--resume", str(run), "--no-progress"]
    proc = _spawn(resume, log, EANET_TEST_SLOW_SAVE="30")
    _wait_for(lambda: any(run.glob(".checkpoint.safetensors.*.tmp")), proc, log)
    time.sleep(rng.uniform(0.0, 0.5))
    assert _kill(proc) == -signal.SIGKILL
    assert _check_consistent(run) == first  # the half-done save never replaced the file
    stale = list(run.glob(".checkpoint.safetensors.*.tmp"))
    assert stale  # what a killed writer leaves

    # 3. Ctrl-C during a later epoch: stops after the step, keeps the last complete epoch
    proc = _spawn(resume, log)
    _wait_for(lambda: _saved_epoch(run) > first, proc, log)
    # The stale temporary file was removed at the start (other temporary files may be in
    # flight: the history and curves are being written right after the checkpoint).
    assert not any(p.exists() for p in stale)
    time.sleep(0.3)
    assert _kill(proc, signal.SIGINT) == 130, log.read_text()
    assert f"eanet: interrupted; resume with eanet train --resume {run}" in log.read_text()
    third = _check_consistent(run)
    assert first < third < epochs and temp_files(run) == []

    # 4. resume to the end
    done = subprocess.run(
        [sys.executable, "-m", "eanet", *resume], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert temp_files(run) == []
    assert [h["epoch"] for h in json.loads((run / "history.json").read_text())] == list(
        range(1, epochs + 1)
    )

    # the same run, never interrupted (in this process: the same single thread)
    threads = torch.get_num_threads()
    try:
        cfg = load_run_config(run)
        assert cfg.threads == 1 and cfg.epochs == epochs
        fit(cfg, tmp_path / "straight", progress=False)
    finally:
        torch.set_num_threads(threads)
    assert_same_training_state(checkpoint.load(tmp_path / "straight"), checkpoint.load(run))


def _signal_at_call(monkeypatch, call: int, sig: int = signal.SIGINT, times: int = 1) -> None:
    """Send `sig` to this process `times` times inside the forward pass of training step `call`."""
    real = BatchAugment.__call__
    count = {"n": 0}

    def forward(*args, **kwargs):
        count["n"] += 1
        if count["n"] == call:
            for _ in range(times):
                os.kill(os.getpid(), sig)
                time.sleep(0.01)  # let the handler run
        return real(*args, **kwargs)

    monkeypatch.setattr(BatchAugment, "__call__", forward)


def test_ctrl_c_keeps_the_last_complete_epoch_and_resumes_exactly(
    tmp_path, small_sample, monkeypatch
):
    cfg = tiny_config(epochs=3)
    fit(cfg, tmp_path / "straight", data=small_sample, progress=False)
    run = tmp_path / "run"
    _signal_at_call(monkeypatch, 5)  # 3 steps per epoch: step 2 of epoch 2
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the test runner is a background job
    with pytest.raises(guard.TrainingInterrupted) as info:
        fit(cfg, run, data=small_sample, progress=False)
    assert str(info.value).startswith(f"interrupted; resume with eanet train --resume {run}")
    assert "partial epoch 2/3 is discarded" in str(info.value)
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler is restored
    assert checkpoint.load(run).meta.epoch == 1
    assert [h["epoch"] for h in json.loads((run / "history.json").read_text())] == [1]
    monkeypatch.undo()
    fit(cfg, run, data=small_sample, resume=True, progress=False)
    assert_same_training_state(checkpoint.load(tmp_path / "straight"), checkpoint.load(run))


def test_sigterm_before_the_first_checkpoint_says_there_is_nothing_to_resume(
    tmp_path, small_sample, monkeypatch
):
    _signal_at_call(monkeypatch, 1, signal.SIGTERM)
    with pytest.raises(guard.TrainingInterrupted, match="before any epoch was complete"):
        fit(tiny_config(), tmp_path, data=small_sample, progress=False)
    assert not (tmp_path / checkpoint.CHECKPOINT_NAME).exists()


def test_second_ctrl_c_stops_at_once(tmp_path, small_sample, monkeypatch):
    _signal_at_call(monkeypatch, 4, times=2)  # two presses within one step of epoch 2
    with pytest.raises(KeyboardInterrupt) as info:
        fit(tiny_config(), tmp_path, data=small_sample, progress=False)
    assert not isinstance(info.value, guard.TrainingInterrupted)
    assert checkpoint.load(tmp_path).meta.epoch == 1 and temp_files(tmp_path) == []


def test_cli_ctrl_c_exit_code_and_message(tmp_path, monkeypatch, capsys):
    _signal_at_call(monkeypatch, 1)
    run = tmp_path / "run"
    assert main(["train", *TINY_CLI, "--epochs", "1", "--out", str(run)]) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("eanet: interrupted in epoch 1/1 before any epoch was complete")


def test_stale_temp_files_of_a_killed_writer_are_removed(tmp_path, small_sample):
    fit(tiny_config(epochs=1), tmp_path, data=small_sample, progress=False)
    stale = [tmp_path / ".checkpoint.safetensors.k1ll3d.tmp", tmp_path / ".history.json.x.tmp"]
    for path in stale:
        path.write_bytes(b"half a file")
    other = tmp_path / ".notes.txt.x.tmp"  # not a run file: not ours to delete
    other.write_bytes(b"x")
    fit(tiny_config(epochs=2), tmp_path, data=small_sample, resume=True, progress=False)
    assert not any(p.exists() for p in stale) and other.exists()


# --------------------------------------------------------------------------- divergence


def _nan_at_calls(monkeypatch, calls: set[int]) -> None:
    """Make the logits of the given training steps NaN (as a diverged model's would be)."""
    real = BatchAugment.__call__
    count = {"n": 0}

    def forward(*args, **kwargs):
        count["n"] += 1
        logits, target = real(*args, **kwargs)
        return (logits * float("nan") if count["n"] in calls else logits), target

    monkeypatch.setattr(BatchAugment, "__call__", forward)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(
    tmp_path, small_sample, monkeypatch
):
    _nan_at_calls(monkeypatch, {5})  # epoch 2, step 2 of 3
    with pytest.raises(EANetError) as info:
        fit(tiny_config(epochs=3, lr=0.5), tmp_path, data=small_sample, progress=False)
    message = str(info.value)
    assert message.startswith("epoch 2/3, step 2/3: the training loss is nan")
    assert "keeps the checkpoint of its last complete epoch" in message
    assert "lower --lr (this run: 0.5)" in message and "--on-nonfinite skip" in message
    ckpt = checkpoint.load(tmp_path)
    assert ckpt.meta.epoch == 1 and len(ckpt.meta.history) == 1
    assert all(torch.isfinite(t).all() for t in ckpt.model_state.values())


def test_skip_mode_skips_and_counts_nonfinite_batches(tmp_path, small_sample, monkeypatch):
    _nan_at_calls(monkeypatch, {2, 6})  # epoch 1 step 2, epoch 2 step 3
    fit(tiny_config(on_nonfinite="skip"), tmp_path, data=small_sample, progress=False)
    ckpt = checkpoint.load(tmp_path)
    assert [h["skipped_batches"] for h in ckpt.meta.history] == [1, 1]
    assert all(torch.isfinite(t).all() for t in ckpt.model_state.values())
    steps = {float(s["step"]) for s in ckpt.optimizer_state["state"].values()}
    assert steps == {4.0}  # 2 epochs x 3 batches, 2 of them without an optimizer step
    csv = (tmp_path / "history.csv").read_text().splitlines()
    assert csv[0].endswith(",skipped_batches")


def test_cli_huge_learning_rate_is_a_one_line_error(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", *TINY_CLI, "--epochs", "2", "--lr", "1e6", "--out", str(run)])
    assert code == 2
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("eanet: error:")]
    assert len(errors) == 1
    assert re.match(
        r"eanet: error: epoch 1/2, step \d+/25: the training loss is (nan|inf)", errors[0]
    )
    assert "lower --lr (this run: 1e+06)" in errors[0]
    assert not (run / checkpoint.CHECKPOINT_NAME).exists()


# --------------------------------------------------------------------------- disk and paths


def _enospc_on_second_save(monkeypatch) -> None:
    """The 2nd checkpoint write gets 1000 bytes into its temporary file, then ENOSPC."""
    real = checkpoint._write_data
    count = {"n": 0}

    def write_data(tmp, data):
        count["n"] += 1
        if count["n"] == 2:
            Path(tmp).write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(tmp, data)

    monkeypatch.setattr(checkpoint, "_write_data", write_data)


@pytest.mark.parametrize("where", ["checkpoint", "history"])
def test_full_disk_stops_with_one_line_and_keeps_the_last_good_files(
    tmp_path, small_sample, monkeypatch, where
):
    if where == "checkpoint":
        _enospc_on_second_save(monkeypatch)
    else:
        real_write_text = fileio.write_text

        def write_text(path, text):  # history.json of the 2nd epoch: half written, ENOSPC
            if Path(path).name == "history.json" and json.loads(text)[-1]["epoch"] == 2:
                with fileio.atomic_path(path) as tmp:
                    tmp.write_text(text[: len(text) // 2])
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real_write_text(path, text)

        monkeypatch.setattr(fileio, "write_text", write_text)
    with pytest.raises(EANetError) as info:
        fit(tiny_config(epochs=3), tmp_path, data=small_sample, progress=False)
    name = "checkpoint.safetensors" if where == "checkpoint" else "history.json"
    assert str(info.value) == (
        f"cannot write {tmp_path / name}: No space left on device; "
        "check free disk space and permissions"
    )
    ckpt = checkpoint.load(tmp_path)
    assert ckpt.meta.epoch == (1 if where == "checkpoint" else 2)
    assert [h["epoch"] for h in json.loads((tmp_path / "history.json").read_text())] == [1]
    assert temp_files(tmp_path) == []
    monkeypatch.undo()  # space again: the run resumes from what was kept
    fit(tiny_config(epochs=3), tmp_path, data=small_sample, resume=True, progress=False)
    assert [h["epoch"] for h in json.loads((tmp_path / "history.json").read_text())] == [1, 2, 3]


@pytest.mark.parametrize("kind", ["under-a-file", "proc"])
def test_unwritable_run_directory_fails_before_training(tmp_path, monkeypatch, capsys, kind):
    if kind == "under-a-file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "run"
    else:
        out = Path("/proc/eanet-test-run")

    def no_data(*args, **kwargs):
        raise AssertionError("data loaded before the run directory was checked")

    monkeypatch.setattr(train_loop, "load_dataset", no_data)
    assert main(["train", *TINY_CLI, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"eanet: error: cannot write to run directory {out}:"
    )


def test_existing_run_needs_resume_or_overwrite(tmp_path, small_sample, capsys):
    fit(tiny_config(epochs=1), tmp_path, data=small_sample, progress=False)
    before = (tmp_path / checkpoint.CHECKPOINT_NAME).read_bytes()
    assert main(["train", *TINY_CLI, "--out", str(tmp_path)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (tmp_path / checkpoint.CHECKPOINT_NAME).read_bytes() == before


# --------------------------------------------------------------------------- bad options


def _copy_run(tiny_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    return run


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"lr": "fast"}, "--lr 'fast' must be a number, not str"),
        ({"epochs": 2.5}, "--epochs 2.5 must be an integer, not float"),
        ({"seed": None}, "--seed None must be an integer, not NoneType"),
        ({"verify": "yes"}, "--verify 'yes' must be true or false, not str"),
        ({"model_args": [1]}, "--model-args [1] must be a JSON object, not list"),
        ({"data_path": 3}, "--data-path 3 must be a string or null, not int"),
        (
            {"turbo": True},
            f"unknown training option 'turbo'; known: {', '.join(sorted(vars(TrainConfig())))}",
        ),
    ],
)
def test_hand_edited_config_is_a_one_line_error_on_resume(
    tiny_run, tmp_path, capsys, edit, message
):
    run = _copy_run(tiny_run, tmp_path)
    config = json.loads((run / "config.json").read_text())
    config["train"].update(edit)
    (run / "config.json").write_text(json.dumps(config))
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0] == (
        f"eanet: error: {run / 'config.json'}: {message}; correct the file (or start a new run)"
    )


@pytest.mark.parametrize("content", ["{not json", '{"train": [1, 2]}', "[]"])
def test_broken_config_json_is_a_one_line_error_on_resume(tiny_run, tmp_path, capsys, content):
    run = _copy_run(tiny_run, tmp_path)
    (run / "config.json").write_text(content)
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("eanet: error: ") and "config.json" in err[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model-arg", "dim=30"], "dim=30 is not divisible by num_heads=4"),
        (["--model-arg", "patch_size=3"], "patch_size=3 does not divide image_size=32"),
        (["--model-arg", "attn_drop=lots"], "attn_drop='lots' must be a number"),
        (["--model-arg", "depth=0"], "depth=0 must be a positive integer"),
        (
            ["--model-arg", "dim=3", "--model-arg", "num_heads=1"],
            "dim=3 and dim_coefficient=4 give an external-attention memory of "
            "dim // dim_coefficient = 0 slots; set memory_size=N",
        ),
        (["--model-arg", "wings=2"], "unknown model option"),
        (["--lr", "-1"], "--lr -1.0 must be a positive number"),
        (["--lr", "nan"], "--lr nan must be a positive number"),
        (["--epochs", "0"], "--epochs 0 must be an integer in [1, 1,000,000]"),
        (["--batch-size", "0"], "--batch-size 0 must be an integer in [1, 1,000,000]"),
        (["--val-fraction", "1.5"], "--val-fraction 1.5 must be in [0, 1)"),
        (["--threads", "0"], "--threads 0 must be a positive integer"),
        (["--image-size", "0"], "--image-size 0 must be a positive integer"),
    ],
)
def test_impossible_options_are_one_line_errors(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert main(["train", *TINY_CLI, *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("eanet: error:")]
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in "\n".join(err)
    assert not out.exists()  # the run directory it created is removed


def test_a_failed_start_keeps_a_directory_that_existed(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's")
    assert main(["train", *TINY_CLI, "--model-arg", "depth=0", "--out", str(mine)]) == 2
    assert main(["train", *TINY_CLI, "--data-path", "/nowhere", "--out", str(mine)]) == 2
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]  # no config, no lock


def test_overwrite_clears_everything_the_previous_run_wrote(tmp_path, small_sample, capsys):
    run = tmp_path / "run"
    fit(tiny_config(epochs=1, log="tensorboard"), run, data=small_sample, progress=False)
    (run / "evaluation_test.json").write_text("{}")  # as `eanet evaluate RUN` writes
    (run / "notes.txt").write_text("the user's")
    old_events = sorted((run / "tensorboard").iterdir())
    assert old_events
    assert main(["train", *TINY_CLI, "--out", str(run)]) == 2
    assert "tensorboard" in capsys.readouterr().err
    fit(tiny_config(epochs=1, seed=1), run, data=small_sample, overwrite=True, progress=False)
    assert not (run / "tensorboard").exists() and not (run / "evaluation_test.json").exists()
    assert (run / "notes.txt").exists() and checkpoint.load(run).meta.epoch == 1


def test_debug_shows_the_traceback():
    args = [sys.executable, "-m", "eanet", "train", *TINY_CLI, "--lr", "-1"]
    plain = subprocess.run(args, capture_output=True, text=True)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.strip() == "eanet: error: --lr -1.0 must be a positive number"
    debug = subprocess.run([*args[:3], "--debug", *args[3:]], capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    assert "eanet.errors.ConfigError: --lr -1.0 must be a positive number" in debug.stderr


# --------------------------------------------------------------------------- safe loading


def _tensor_area(path: Path) -> int:
    """Offset of the first tensor byte in a safetensors file (after the JSON header)."""
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def _save_tiny(path: Path, **meta) -> torch.nn.Module:
    torch.manual_seed(0)
    model = eanet.create_model("eanet-cifar", **TINY, num_classes=3)
    checkpoint.save(path, model, {"class_names": ["a", "b", "c"], "epoch": 3, **meta})
    return model


def test_checkpoint_records_a_checksum_of_its_contents(tmp_path):
    path = tmp_path / "m.safetensors"
    _save_tiny(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert re.fullmatch(r"[0-9a-f]{64}", f.metadata()["sha256"])
    assert checkpoint.load(path).meta.epoch == 3


@pytest.mark.parametrize("offset", [0, 1000, -1])
def test_flipped_bytes_in_the_tensor_area_are_detected(tmp_path, offset):
    path = tmp_path / "m.safetensors"
    _save_tiny(path)
    data = bytearray(path.read_bytes())
    position = _tensor_area(path) + offset if offset >= 0 else len(data) + offset
    data[position] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(
        CheckpointError, match="checksum mismatch: the file was modified or corrupted"
    ):
        checkpoint.load(path)


def test_edited_json_header_is_detected(tmp_path):
    path = tmp_path / "m.safetensors"
    _save_tiny(path)
    data = path.read_bytes()
    edited = data.replace(b'\\"epoch\\": 3', b'\\"epoch\\": 9')  # same length: still parses
    assert edited != data
    path.write_bytes(edited)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        checkpoint.load(path)


def test_checkpoint_without_checksum_still_loads(tmp_path):
    """Checkpoints written before the checksum existed stay loadable."""
    from safetensors.torch import save_file

    path = tmp_path / "old.safetensors"
    model = _save_tiny(path)
    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    meta = {"class_names": ["a", "b", "c"], "epoch": 3, "model_config": model.config.to_dict()}
    header = {"format": "eanet-checkpoint", "format_version": "1", "meta": json.dumps(meta)}
    save_file(tensors, str(path), metadata=header)
    loaded, ckpt = checkpoint.load_model(path)
    assert ckpt.meta.epoch == 3
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ({"epoch": "three"}, "epoch 'three' is not a count"),
        ({"history": {"a": 1}}, "history is not a list"),
        ({"class_names": "abc"}, "class_names is not a list of strings"),
        ({"class_names": ["a", "b"]}, "2 class names for a model with other classes"),
    ],
)
def test_impossible_metadata_is_a_checkpoint_error(tmp_path, meta, message):
    path = tmp_path / "m.safetensors"
    with pytest.raises((TypeError, ValueError), match=re.escape(message)):
        _save_tiny(path, **meta)  # save refuses to write it
    _save_tiny(path)
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:  # so a file is forged
        header = dict(f.metadata())
    header["meta"] = json.dumps({**json.loads(header["meta"]), **meta})
    header["sha256"] = checkpoint.digest(load_file(str(path)), header)
    save_file(load_file(str(path)), str(path), metadata=header)
    with pytest.raises(CheckpointError, match=f"metadata is damaged .*{re.escape(message)}"):
        checkpoint.load(path)


def test_weights_only_checkpoint_cannot_be_resumed(tiny_run, tmp_path, capsys):
    run = _copy_run(tiny_run, tmp_path)
    model, ckpt = checkpoint.load_model(run)
    checkpoint.save(run / checkpoint.CHECKPOINT_NAME, model, {"class_names": ckpt.class_names})
    assert main(["train", "--resume", str(run), *SLICE]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "holds weights only" in err and "--init-from" in err


def test_resume_with_a_checkpoint_of_another_architecture(tiny_run, tmp_path, capsys):
    run = _copy_run(tiny_run, tmp_path)
    other = eanet.create_model("vit-cifar", **TINY)
    ckpt = checkpoint.load(run)
    optimizer = torch.optim.AdamW(other.parameters())
    checkpoint.save(run / checkpoint.CHECKPOINT_NAME, other, ckpt.meta, optimizer)
    assert main(["train", "--resume", str(run), "--epochs", "2", *SLICE]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "weights do not fit the model" in err and "another architecture" in err


def test_the_package_never_unpickles_untrusted_data():
    """torch.load only with weights_only=True; pickle only in data.py's restricted unpickler."""
    package = Path(eanet.__file__).parent
    allowed = {
        ("data/cifar.py", "pickle.Unpickler"),  # the restricted unpickler (find_class allowlist)
        ("data/cifar.py", "pickle.UnpicklingError"),
        ("interop/export.py", "torch.jit.load"),  # re-reads the file export itself just wrote
    }
    risky = re.compile(
        r"\b(torch\.load|torch\.jit\.load|pickle\.\w+|cPickle|dill|joblib\.load|"
        r"np\.load|numpy\.load|shelve|marshal\.loads?)\b"
    )
    found = set()
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).as_posix()
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            for match in risky.finditer(line):
                name = match.group(1)
                if name == "torch.load" and "weights_only=True" in line:
                    continue
                if name in ("np.load", "numpy.load") and "allow_pickle=False" in line:
                    continue
                found.add((rel, name))
                assert (rel, name) in allowed, f"{rel}:{lineno}: {line.strip()}"
    assert ("data/cifar.py", "pickle.Unpickler") in found


# --------------------------------------------------------------------------- determinism


@pytest.fixture
def restore_determinism():
    state = (
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    )
    yield
    torch.use_deterministic_algorithms(state[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = state[1], state[2]
    if state[3] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = state[3]


def test_deterministic_runs_are_identical_and_recorded(tmp_path, small_sample, restore_determinism):
    os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    cfg = tiny_config(deterministic=True)
    fit(cfg, tmp_path / "a", data=small_sample, progress=False)
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    fit(cfg, tmp_path / "b", data=small_sample, progress=False)
    assert_same_training_state(checkpoint.load(tmp_path / "a"), checkpoint.load(tmp_path / "b"))

    config = json.loads((tmp_path / "a" / "config.json").read_text())
    r = config["reproducibility"]
    assert r["python"] == sys.version.split()[0] and r["torch"] == torch.__version__
    assert r["numpy"] and r["eanet"] == eanet.__version__
    assert r["seed"] == 0 and r["device"] == "cpu" and r["deterministic"] is True
    assert r["cublas_workspace_config"] == ":4096:8"
    assert config["train"]["deterministic"] is True
    commit = r["git_commit"]
    assert commit is None or re.fullmatch(r"[0-9a-f]{40}", commit)


def test_git_commit_is_none_outside_a_checkout(monkeypatch, tmp_path):
    provenance.git_commit.cache_clear()
    monkeypatch.setattr(provenance, "__file__", str(tmp_path / "eanet" / "train" / "provenance.py"))
    (tmp_path / "eanet").mkdir()
    try:
        assert provenance.git_commit() == (None, None)
        monkeypatch.setenv("PATH", "")  # no git at all: still no failure
        provenance.git_commit.cache_clear()
        assert provenance.git_commit() == (None, None)
    finally:
        provenance.git_commit.cache_clear()


def test_cli_has_the_reliability_options():
    from eanet.cli.main import build_parser

    args = build_parser().parse_args(["train", "--deterministic", "--on-nonfinite", "skip"])
    assert args.deterministic is True and args.on_nonfinite == "skip"
    with pytest.raises(ConfigError, match="--on-nonfinite 'sometimes'"):
        TrainConfig(on_nonfinite="sometimes")
