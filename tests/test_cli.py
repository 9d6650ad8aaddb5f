"""The `eanet` command end to end on the shipped real CIFAR-100 slice."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from eanet.cli import commands
from eanet.cli.flags import RESUME_LEGEND
from eanet.cli.main import build_parser, main
from eanet.data.cifar import SAMPLE_ARCHIVE, SAMPLE_MD5
from eanet.train.config import GROUPS, TrainConfig

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


def test_train_help_groups_the_options_and_says_each_default_once():
    text = _help("train")
    starts = [text.index(f"\n{group}:\n") for group in GROUPS]
    assert starts == sorted(starts), "the groups in their order"
    after = {g: text[text.index(f"\n{g}:\n") :].splitlines()[2] for g in GROUPS[:2]}
    assert after[GROUPS[0]].startswith("  --out ") and after[GROUPS[1]].startswith("  --dataset ")
    entries = re.split(r"\n  (?=-)", text.split("\noptions:\n", 1)[1])
    assert len(entries) > 50
    for entry in entries:  # one option's flag and help
        assert entry.count("(default:") <= 1, entry
    flat = " ".join(text.split())
    assert flat.count(" ".join(RESUME_LEGEND.split())) == 1 and "on --resume must" not in flat
    assert "(default: 50) [changeable]" in flat and "(default: 0.001) " in flat
    assert "(default: none) [new run only]" in flat  # --init-from
    assert flat.startswith("usage: eanet train [--out DIR] [--dataset NAME]")


# Every command's --help, the top-level help and version, and a bad flag.
FAST = [["--help"], ["--version"], ["train", "--bogus"], ["predict"]]
FAST += [[c, "--help"] for c in ("train", "evaluate", "demo", "predict", "serve", "compare")]
FAST += [[c, "--help"] for c in ("bench", "export", "import-keras", "info", "sample-images")]


def _modules_loaded_by(code: str) -> str:
    """Run `code` in a fresh interpreter; the heavy modules (torch, numpy) it imported."""
    heavy = "sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy'})"
    check = f"{code}\nimport sys\nprint({heavy})"
    run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip().splitlines()[-1]


def test_help_version_and_a_bad_flag_answer_without_loading_torch():
    code = (
        "from eanet.cli.main import main\n"
        f"for argv in {FAST!r}:\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code in (0, 2), (argv, exc.code)\n"
        "    else:\n"
        "        raise AssertionError(argv)\n"
    )
    assert _modules_loaded_by(code) == "[]"


def test_a_new_run_is_named_before_torch_loads(tmp_path):
    """`train` says its run directory first; torch loads after (about 2 s on 2 cores)."""
    argv = ["train", "--dataset", "digits", "--recipe", "modern", "--lr", "0.002"]
    code = (
        "from eanet.cli.main import build_parser\n"
        "from eanet.cli.commands import train_config_from_args\n"
        f"cfg, out, resume = train_config_from_args(build_parser().parse_args({argv!r}))\n"
        "assert cfg.lr == 0.002 and cfg.epochs == 300 and not resume, cfg\n"
        "assert out.name.startswith('eanet-cifar-digits-'), out\n"
    )
    assert _modules_loaded_by(code) == "[]"


def test_an_unknown_model_is_refused_before_the_run_directory_is_made(tmp_path, capsys):
    assert main(["train", "--model", "resnet", "--out", str(tmp_path / "run")]) == 2
    assert "--model 'resnet' is unknown; choose one of eanet-cifar" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_bars_only_on_a_terminal(monkeypatch, terminal):
    bars = []
    monkeypatch.setattr(commands, "cmd_evaluate", lambda args: bars.append(args.progress) or 0)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal, raising=False)
    assert main(["evaluate", "runs/x"]) == 0
    assert main(["evaluate", "runs/x", "--no-progress"]) == 0
    assert bars == [terminal, False]


def test_the_summary_names_each_score_by_its_weights():
    metrics = {"test_top1": 0.5, "test_top5": 0.9, "test_loss": 1.5, "test_images": 10}
    metrics.update(epochs=3, best_epoch=2, best_test_top1=0.6, best_test_top5=0.95)
    metrics.update(best_test_loss=1.2, ema_test_top1=0.7, ema_test_top5=0.96, ema_test_loss=1.1)
    lines = commands.score_lines(metrics, Path("runs/r")).splitlines()
    assert lines[0].startswith("test top-1 50.00%  top-5 90.00%  loss 1.5000  last weights: ")
    assert "epoch 3, checkpoint.safetensors" in lines[0]
    assert "60.00%" in lines[1] and "best weights: epoch 2 (best val top-1), best." in lines[1]
    assert "70.00%" in lines[2] and "EMA weights" in lines[2]
    assert lines[3] == "(10 test images) -> runs/r"
    del metrics["best_epoch"], metrics["ema_test_top1"]
    assert len(commands.score_lines(metrics, Path("r")).splitlines()) == 2


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
    assert out.count("361,380") == 1 and out.count("623,268") == 1  # said once, not twice


def test_train_evaluate_resume_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *SLICE, *TINY, "--epochs", "1", "--out", str(run)]) == 0
    summary = capsys.readouterr().out
    assert "test top-1" in summary and "last weights: epoch 1" in summary
    assert "best weights: epoch 1" in summary
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
        (["train", *SLICE, "--batch-size", "0"], "--batch-size 0 must be an integer in [1,"),
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


def _bad_arguments(tmp_path: Path) -> list[tuple[list[str], str, bool]]:
    """Arguments each command refuses, what its one line says, and whether before torch."""
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"\xff\xd8\xff\xe0 a JPEG's first bytes")
    ckpt = tmp_path / "run.safetensors"  # found; what it holds is read later
    ckpt.write_bytes(b"")
    early = [
        (["predict", "/nonexistent/run", str(photo)], "/nonexistent/run: no checkpoint there"),
        (["predict", str(photo), str(ckpt)], "photo.jpg is an image, not a run or checkpoint"),
        (["predict", str(ckpt), str(photo), "--top-k", "0"], "--top-k 0 must be a positive"),
        (["predict", str(ckpt), str(photo), "--weights", "best"], "no best.safetensors there"),
        (["evaluate", "/nonexistent/run"], "no checkpoint there"),
        (["evaluate", str(ckpt), "--batch-size", "0"], "--batch-size 0 must be a positive"),
        (["evaluate", str(ckpt), "--data-path", "/nonexistent/d"], "/nonexistent/d: no such"),
        (["train", "--data-path", "/nonexistent/cifar.tar.gz"], "/nonexistent/cifar.tar.gz"),
        (["train", "--epochs", "0"], "--epochs 0"),
        (["demo", "--epochs", "0"], "--epochs 0"),
        (["compare", "--seeds", "0", "--out", str(tmp_path / "c")], "--seeds 0 must be"),
        (["compare", "--data-path", "/nonexistent/d", "--out", str(tmp_path / "c")], "no such"),
    ]
    # the model names are checked by the registry, which loads torch
    late = [(["compare", "--models", "no-such", "--out", str(tmp_path / "c")], "no-such")]
    return [(argv, message, True) for argv, message in early] + [(*c, False) for c in late]


def test_bad_arguments_are_refused_first_in_one_line_without_torch(tmp_path):
    """Checked before anything is said or loaded: one line, exit 2, torch never imported."""
    for argv, message, torch_free in _bad_arguments(tmp_path):
        result = tmp_path / "result"
        code = (
            "import sys\nfrom eanet.cli.main import main\n"
            f"rc = main({argv!r})\n"
            f"open({str(result)!r}, 'w').write(repr((rc, 'torch' in sys.modules)))\n"
        )
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert run.stdout == "", (argv, run.stdout)
        err = run.stderr.splitlines()
        assert len(err) == 1 and err[0].startswith("eanet: error: "), (argv, run.stderr)
        assert message in err[0], (argv, err[0])
        assert result.read_text() == f"(2, {not torch_free})", argv


@pytest.mark.parametrize("terminal", [True, False])
def test_the_interruption_starts_its_own_line(monkeypatch, capsys, terminal):
    def interrupted(args):
        sys.stderr.write("epoch 1/5:  40%|####      | 4/10")  # a bar, cut by Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "cmd_models", interrupted)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal, raising=False)
    assert main(["models"]) == 130
    bar = "epoch 1/5:  40%|####      | 4/10"
    assert capsys.readouterr().err == bar + ("\n" if terminal else "") + "eanet: interrupted\n"
