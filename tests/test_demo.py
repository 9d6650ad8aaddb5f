"""`eanet demo`: offline, it visibly learns the shipped digits, runs the CIFAR-100 slice, and
shows the shipped trained model on real Fashion-MNIST photos."""

import re
import shutil

import pytest

from eanet.cli import build_parser, main
from eanet.cli.commands import unused_dir


@pytest.mark.slow
def test_demo_learns_digits_and_runs_the_cifar_pipeline_offline(tmp_path, capsys):
    out_dir = tmp_path / "demo"
    args = ["demo", "--epochs", "1", "--threads", "2", "--out", str(out_dir), "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    # Part 1 learns: >= 90% held-out top-1 on the 449 real digits, and the shown ones mostly right.
    top1 = float(re.search(r"Held-out top-1 ([\d.]+)% on 449 digits", out).group(1))
    assert top1 >= 90.0, out
    shown = re.search(r"(\d+) of the (\d+) shown are right", out)
    assert int(shown.group(2)) == 8 and int(shown.group(1)) >= 6, out
    assert (out_dir / "digits" / "checkpoint.safetensors").exists()
    # Part 2 runs the reference pipeline on the real slice and says it cannot learn from it.
    assert "true class" in out and "mountain" in out  # first test image of CIFAR-100
    assert "far too small to learn" in out
    for name in (
        "metrics.json",
        "curves.png",
        "confusion_test.png",
        "per_class_test.csv",
        "checkpoint.safetensors",
    ):
        assert (out_dir / name).exists(), name
    # Part 3: the shipped trained model classifies real Fashion-MNIST photos, nothing trained.
    top1 = float(re.search(r"top-1 ([\d.]+)% \([\d.]+ s, nothing trained", out).group(1))
    assert top1 >= 85.0, out
    photos = sorted((out_dir / "fashion-photos").glob("*.png"))
    assert len(photos) == 8 and photos[0].name == "0000-ankle-boot.png"  # the first test photo
    assert f"eanet predict eanet-fashion-mnist {out_dir / 'fashion-photos'}" in out


def test_the_default_output_is_runs_demo_then_a_free_suffix(tmp_path):
    base = tmp_path / "runs" / "demo"
    assert unused_dir(base) == base
    base.mkdir(parents=True)
    assert unused_dir(base) == tmp_path / "runs" / "demo-2"
    (tmp_path / "runs" / "demo-2").mkdir()
    assert unused_dir(base) == tmp_path / "runs" / "demo-3"


def test_the_help_says_where_the_demo_goes_and_how_long_it_takes():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    text = " ".join(sub.choices["demo"].format_help().split())
    assert "(default: runs/demo, or runs/demo-2" in text and "a few minutes on 2 CPU cores" in text


@pytest.fixture
def no_demo_training(monkeypatch):
    """Record the parts the demo would train instead of training them."""
    import eanet.demo

    parts = []
    monkeypatch.setattr(eanet.demo, "run_cifar", lambda out, *a: parts.append(out))
    monkeypatch.setattr(eanet.demo, "run_digits", lambda out, *a: parts.append(out))
    return parts


def test_an_explicit_out_holding_a_run_is_replaced_only_with_overwrite(
    tiny_run, tmp_path, capsys, no_demo_training
):
    """`eanet demo --out RUN` replaced the run in RUN (the demo trained with overwrite)."""
    out = tmp_path / "demo"
    shutil.copytree(tiny_run, out)  # an earlier demo: a run in OUT and one in OUT/digits
    shutil.copytree(tiny_run, out / "digits")
    before = (out / "checkpoint.safetensors").read_bytes()
    assert main(["demo", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"eanet: error: {out} holds a run (an earlier demo's?); "
        "pass --overwrite to replace it, or choose another --out"
    ]
    assert no_demo_training == []  # refused before anything was trained
    assert (out / "checkpoint.safetensors").read_bytes() == before
    with pytest.raises(AttributeError):  # the recording stand-ins return no part to print
        main(["demo", "--out", str(out), "--no-progress", "--overwrite"])
    assert no_demo_training == [out, out / "digits"]


def test_an_out_folder_that_is_no_run_is_refused(tmp_path, capsys, no_demo_training):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "cat.png").write_bytes(b"the user's")
    for overwrite in ([], ["--overwrite"]):
        assert main(["demo", "--out", str(out), "--no-progress", *overwrite]) == 2
        err = capsys.readouterr().err
        assert f"{out} is not an eanet run and is not empty (cat.png)" in err
    assert no_demo_training == [] and [p.name for p in out.iterdir()] == ["cat.png"]
