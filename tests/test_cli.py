"""The `eanet` command end to end on the shipped real CIFAR-100 slice."""

import json
import subprocess
import sys

import pytest

from eanet.cli.main import build_parser, main
from eanet.data.cifar import SAMPLE_ARCHIVE, SAMPLE_MD5
from eanet.train.config import TrainConfig

SLICE = ["--dataset", "cifar100", "--data-path", str(SAMPLE_ARCHIVE), "--md5", SAMPLE_MD5]
TINY = ["--model-arg", "depth=1", "--batch-size", "64", "--no-progress"]


def _help(command: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[command].format_help()


def test_train_help_documents_every_option():
    text = _help("train")
    options = [
        "--model",
        "--model-arg",
        "--dataset",
        "--data-path",
        "--md5",
        "--no-verify",
        "--epochs",
        "--batch-size",
        "--eval-batch-size",
        "--lr",
        "--weight-decay",
        "--label-smoothing",
        "--val-fraction",
        "--augment",
        "--seed",
        "--device",
        "--threads",
        "--out",
        "--resume",
        "--overwrite",
        "--no-progress",
    ]
    for option in options:
        assert option in text, option
    # every recipe field of TrainConfig is reachable from the command line
    for field in TrainConfig().to_dict():
        if field not in ("model_args", "verify", "adam_eps"):
            assert f"--{field.replace('_', '-')}" in text, field
    assert "default: 50" in text and "default: 0.001" in text


def test_console_script_help_and_version():
    out = subprocess.run(
        [sys.executable, "-m", "eanet", "train", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--reference-bug" not in out.stdout and "reference-bug" in out.stdout
    out = subprocess.run(
        [sys.executable, "-m", "eanet", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("eanet ")


def test_models_lists_the_registry(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "eanet-cifar" in out and "361,380" in out and "623,268" in out


def test_train_evaluate_resume_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *SLICE, *TINY, "--epochs", "1", "--out", str(run)]) == 0
    assert "test top-1" in capsys.readouterr().out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_images"] == 916 and metrics["epochs"] == 1

    assert main(["train", "--resume", str(run), "--epochs", "2", "--no-progress"]) == 0
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]

    capsys.readouterr()
    assert main(["evaluate", str(run), "--json", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 916 and 0 <= result["test_top1"] <= 1
    per_class = (run / "per_class_test.csv").read_text().splitlines()
    assert per_class[0] == "class,name,images,correct,accuracy"
    assert per_class[1].startswith("0,apple,") and len(per_class) == 101
    assert (run / "confusion_test.png").stat().st_size > 10_000

    assert main(["evaluate", str(run), "--split", "val", "--no-progress"]) == 0
    assert "cifar100 val:" in capsys.readouterr().out


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eanet", *args], capture_output=True, text=True)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--data-path", "/nonexistent/cifar.tar.gz"], "/nonexistent/cifar.tar.gz"),
        (["train", "--data-path", str(SAMPLE_ARCHIVE)], "does not match the expected"),
        (["train", *SLICE, "--batch-size", "0"], "--batch-size 0 must be a positive integer"),
        (["train", *SLICE, "--model-arg", "patch_size=3"], "patch_size=3 does not divide"),
        (["evaluate", "/nonexistent/run"], "no checkpoint there"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(args, message):
    result = _run_cli(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("eanet: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr


def test_corrupt_archive_names_the_file(tmp_path):
    bad = tmp_path / "cifar-100-python.tar.gz"
    bad.write_bytes(SAMPLE_ARCHIVE.read_bytes()[:100_000])
    result = _run_cli(
        "train", "--data-path", str(bad), "--no-verify", "--out", str(tmp_path / "run")
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert str(bad) in result.stderr
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()
