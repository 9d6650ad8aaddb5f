"""`eanet train --auto-resume`: the same command starts, resumes or refuses; torchrun restarts."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eanet import checkpoint
from eanet.cli.main import main
from eanet.data.cifar import SAMPLE_ARCHIVE, SAMPLE_MD5
from eanet.train.config import TrainConfig
from eanet.train.loop import fit

TINY = ["--model-arg", "depth=1", "--model-arg", "dim=32", "--model-arg", "mlp_dim=32"]
SLICE = ["--data-path", str(SAMPLE_ARCHIVE), "--md5", SAMPLE_MD5]
COMMON = [*SLICE, *TINY, "--batch-size", "32", "--threads", "1", "--device", "cpu"]


def _train(run: Path, *extra: str) -> int:
    return main(["train", *COMMON, "--no-progress", "--auto-resume", "--out", str(run), *extra])


def _epochs(run: Path) -> list[int]:
    return [h["epoch"] for h in json.loads((run / "history.json").read_text())]


def test_the_same_command_starts_then_resumes(tmp_path):
    run = tmp_path / "run"
    assert _train(run, "--epochs", "1") == 0  # nothing there: a new run
    assert _epochs(run) == [1]
    assert _train(run, "--epochs", "2") == 0  # a checkpoint: resumed (epochs may change)
    assert _epochs(run) == [1, 2]
    assert checkpoint.load(run).meta.epoch == 2


def test_a_run_killed_before_its_first_checkpoint_starts_again(tmp_path):
    run = tmp_path / "run"
    assert _train(run, "--epochs", "1") == 0
    (run / checkpoint.CHECKPOINT_NAME).unlink()  # as if killed during epoch 1
    assert _train(run, "--epochs", "1") == 0
    assert _epochs(run) == [1] and checkpoint.load(run).meta.epoch == 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--lr", "0.01"], "--lr 0.01 differs from the run's 0.001"),
        (["--model", "vit-cifar"], "--model 'vit-cifar' differs from the run's 'eanet-cifar'"),
    ],
)
def test_other_options_than_the_runs_are_refused(tmp_path, capsys, extra, message):
    run = tmp_path / "run"
    assert _train(run, "--epochs", "1") == 0
    capsys.readouterr()
    assert _train(run, "--epochs", "2", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("eanet: error: ") and message in err and "\n" not in err
    assert _epochs(run) == [1]  # untouched


def test_a_run_of_another_recipe_names_the_recipe_to_repeat(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run, "--epochs", "1", "--recipe", "modern", "--randaugment-ops", "0") == 0
    capsys.readouterr()
    for extra in ([], ["--recipe", "reference"]):  # left out, or another one given
        assert _train(run, "--epochs", "2", "--randaugment-ops", "0", *extra) == 2
        err = capsys.readouterr().err.strip()
        assert err == (
            f"eanet: error: {run} was trained with --recipe 'modern', not 'reference': repeat "
            "the run's --recipe to continue it with --auto-resume, or choose another --out"
        )
    assert _train(run, "--epochs", "2", "--recipe", "modern") == 2  # an option left out
    assert capsys.readouterr().err.strip() == (
        f"eanet: error: {run} was trained with --randaugment-ops 0, not 2: repeat the run's "
        "--randaugment-ops to continue it with --auto-resume, or choose another --out"
    )
    assert _epochs(run) == [1]


def test_auto_resume_needs_out_and_excludes_resume_and_overwrite(tmp_path, capsys):
    args = ["train", *COMMON, "--auto-resume"]
    for extra in ([], ["--out", str(tmp_path), "--overwrite"], ["--resume", str(tmp_path)]):
        assert main([*args, *extra]) == 2
        assert "--auto-resume needs --out RUN_DIR" in capsys.readouterr().err


def test_an_imported_checkpoint_without_a_run_config_is_not_overwritten(tiny_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    before = (tiny_run / checkpoint.CHECKPOINT_NAME).read_bytes()
    (run / checkpoint.CHECKPOINT_NAME).write_bytes(before)
    assert _train(run, "--epochs", "1") == 2  # "already holds a run": not silently replaced
    assert (run / checkpoint.CHECKPOINT_NAME).read_bytes() == before


# --------------------------------------------------------------------------- torchrun

DETERMINISTIC = {"attn_drop": 0.0, "proj_drop": 0.0, "mlp_drop": 0.0}
DDP_ARGS = [
    "train",
    *COMMON,
    *(a for k, v in DETERMINISTIC.items() for a in ("--model-arg", f"{k}={v}")),
    *("--augment", "none", "--epochs", "2", "--no-progress", "--auto-resume"),
]
HERE = Path(__file__).parent
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    src = str(Path(checkpoint.__file__).parents[1])
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": src}


def _launch(cwd: Path, torchrun_args: list[str], worker: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", *torchrun_args, *worker]
    return subprocess.Popen(
        cmd,
        env=_env(),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # so a stuck launch can be killed with its workers
    )


def _finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s:\n{output[-3000:]}")
    assert proc.returncode == 0, output[-3000:]
    return output


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, sample_data):
    """The same recipe in one process, never interrupted (what 2 ranks must equal)."""
    run = tmp_path_factory.mktemp("single")
    cfg = TrainConfig(
        model_args={"depth": 1, "dim": 32, "mlp_dim": 32, **DETERMINISTIC},
        epochs=2,
        batch_size=32,
        augment="none",
        device="cpu",
        threads=1,
    )
    threads = torch.get_num_threads()
    try:
        fit(cfg, run, data=sample_data, progress=False)
    finally:
        torch.set_num_threads(threads)
    return run


def _assert_same_weights(a: Path, b: Path) -> None:
    """As tests/test_distributed.py: every weight within 1e-5, except the three whose
    gradient is exactly zero in theory (float noise that Adam turns into ~1e-6 steps)."""
    free = ("blocks.0.norm1.bias", "blocks.0.attn.proj_in.bias", "blocks.0.attn.mk.bias")
    sa, sb = checkpoint.load(a).model_state, checkpoint.load(b).model_state
    assert sa.keys() == sb.keys()
    diff = max((sa[k] - sb[k]).abs().max().item() for k in sa if k not in free)
    assert diff < 1e-5, diff


@pytest.mark.slow
def test_torchrun_restarts_a_group_whose_rank_died_and_ends_as_uninterrupted(tmp_path, single_run):
    """Rank 1 is killed (SIGKILL) in epoch 2 of 2; torchrun --max-restarts runs the same
    command again; --auto-resume continues from epoch 1's checkpoint (rank 0's stale lock
    taken over) and the weights equal those of a run never interrupted.

    Restarts to spare: on a loaded 2-core machine gloo can give up connecting a pair
    ("Connection refused" after its 3 quick retries) before the peer listens; torchrun's
    answer to that is a restart too, and the outcome must be the same."""
    run = tmp_path / "run"
    record = tmp_path / "record"
    record.mkdir()
    steps_per_epoch = 13  # 388 training images of the slice, global batch 32
    worker = [str(HERE / "ddp_restart_worker.py"), str(steps_per_epoch + 5), str(record)]
    proc = _launch(
        tmp_path,
        ["--standalone", "--nproc_per_node", "2", "--max-restarts", "3"]
        + ["--monitor-interval", "0.5"],
        [*worker, *DDP_ARGS, "--out", str(run)],
    )
    output = _finish(proc)
    assert _epochs(run) == [1, 2]
    ranks = [json.loads((record / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rc"] for r in ranks] == [0, 0]
    assert any("resuming" in m and "after epoch 1" in m for m in ranks[0]["log"]), output[-3000:]
    _assert_same_weights(single_run, run)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_agents_rendezvous_and_train_as_one_process(tmp_path, single_run):
    """Two torchrun agents (--nnodes 2, one process each) meet at a c10d rendezvous on
    127.0.0.1, as two machines would; they reach the weights of one process (which one
    agent with 2 processes reaches too: tests/test_distributed.py)."""
    run = tmp_path / "run"
    endpoint = f"127.0.0.1:{_free_port()}"
    rdzv = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d"]
    rdzv += ["--rdzv_endpoint", endpoint, "--rdzv_id", "eanet-test", "--max-restarts", "0"]
    records = [tmp_path / f"record{i}" for i in (0, 1)]
    procs = []
    for record in records:
        record.mkdir()
        worker = [str(HERE / "ddp_worker.py"), str(record), *DDP_ARGS, "--out", str(run)]
        procs.append(_launch(tmp_path, rdzv, worker))
    outputs = [_finish(p) for p in procs]
    ranks = {}
    for record in records:
        for f in record.glob("rank*.json"):
            ranks[f.stem] = json.loads(f.read_text())
    assert sorted(ranks) == ["rank0", "rank1"], outputs
    assert [ranks[r]["rc"] for r in ("rank0", "rank1")] == [0, 0]
    config = json.loads((run / "config.json").read_text())
    assert config["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert _epochs(run) == [1, 2]
    _assert_same_weights(single_run, run)
