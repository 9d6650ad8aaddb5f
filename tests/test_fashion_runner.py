"""benchmarks/fashion_mnist.py: a curve experiment records every epoch's test figures and
goes on where it stopped; the time-to-accuracy rule; the record names its machine."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "fashion_mnist.py"


@pytest.fixture
def runner(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("fashion_runner", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "fashion_runner", mod)  # dataclasses look it up
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "RESULTS", tmp_path / "results")
    tiny = mod.Experiment("a 1-block EANet on digits", "--model-arg depth=1", 2, curve=True)
    monkeypatch.setattr(mod, "EXPERIMENTS", {"tiny": tiny})
    real = mod.train_command

    def on_digits(exp, out, epochs, threads):  # the shipped digits instead of Fashion-MNIST
        cmd = real(exp, out, epochs, threads)
        return [a if a != "fashion-mnist" else "digits" for a in cmd]

    monkeypatch.setattr(mod, "train_command", on_digits)
    return mod


def _args(tmp_path, **kw) -> argparse.Namespace:
    base = dict(runs=str(tmp_path / "runs"), epochs=None, threads=1, record_only=False, idle=False)
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.slow
def test_curve_experiment_records_each_epoch_and_goes_on(runner, tmp_path):
    mach = {"class": "test", "cpu_model": None, "cpu_count": 2, "torch": "x"}
    runner.run("tiny", _args(tmp_path, epochs=1), mach)
    first = json.loads((tmp_path / "results" / "tiny.json").read_text())["test_per_epoch"]
    # killed after epoch 1 trained, before its test and record: the next call makes both up
    run_dir = tmp_path / "runs" / "tiny"
    for name in ("metrics.json", "test_per_epoch.json"):
        (run_dir / name).unlink()
    (tmp_path / "results" / "tiny.json").unlink()
    runner.run("tiny", _args(tmp_path), mach)  # the planned 2 epochs: only epoch 2 trains
    rec = json.loads((tmp_path / "results" / "tiny.json").read_text())
    assert rec["epochs_done"] == 2 and [h["epoch"] for h in rec["history"]] == [1, 2]
    assert [r["epoch"] for r in rec["test_per_epoch"]] == [1, 2]
    assert rec["test_per_epoch"][0] == first[0]  # `eanet evaluate` of the same weights
    assert all(0 <= r["test_top1"] <= 1 for r in rec["test_per_epoch"])
    assert [s["epochs"] for s in rec["segments"]] == [[1, 1], [2, 2]]
    assert rec["segments"][0]["from"].startswith("config.json")  # its machine, recorded late
    assert rec["segments"][0]["class"] in ("avx2", "avx512", "avx512-bf16", "amx-bf16")
    assert rec["segments"][1]["class"] == "test" and rec["segments"][1]["threads"] == 1
    assert rec["test"]["epochs"] == 2 and rec["command"].endswith("fashion_mnist.py tiny")
    runner.run("tiny", _args(tmp_path, record_only=True), mach)  # rewrites, trains nothing
    again = json.loads((tmp_path / "results" / "tiny.json").read_text())
    assert again["history"] == rec["history"] and len(again["segments"]) == 2


def test_a_record_of_epochs_the_run_directory_lacks_starts_over(runner, tmp_path, capsys):
    old = [{"epochs": [1, 3], "threads": 2, "idle": True}]
    run_dir = tmp_path / "runs" / "tiny"
    assert runner._fresh_segments("tiny", old, run_dir) == []  # directory gone: start over
    assert "covers 3 epochs" in capsys.readouterr().out
    run_dir.mkdir(parents=True)
    (run_dir / "history.json").write_text(json.dumps([{"epoch": e} for e in (1, 2, 3)]))
    assert runner._fresh_segments("tiny", old, run_dir) == old  # the same run: kept


def test_first_reached_counts_minutes_until_the_first_epoch_at_the_threshold(runner):
    rows = [
        {"epoch": 1, "epoch_seconds": 60.0, "val_top1": 0.85},
        {"epoch": 2, "epoch_seconds": 90.0, "val_top1": 0.91},
        {"epoch": 3, "epoch_seconds": 60.0, "val_top1": 0.93},
    ]
    assert runner.first_reached(rows, 0.90) == {"epoch": 2, "minutes": 2.5}
    assert runner.first_reached(rows, 0.92) == {"epoch": 3, "minutes": 3.5}
    assert runner.first_reached(rows, 0.95) is None


def test_unknown_experiment_is_one_line(tmp_path):
    import subprocess

    run = subprocess.run(
        [sys.executable, str(SCRIPT), "no-such"], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 1 and "unknown experiment(s): no-such" in run.stderr
