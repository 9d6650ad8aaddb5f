"""benchmarks/gpu/run.sh: its syntax, its --dry-run on the CPU, and the summary it writes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu" / "run.sh"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "gpu" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_script_parses():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_an_unknown_argument_is_refused(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", str(SCRIPT), "--fast"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "unknown argument --fast" in proc.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_dry_run_writes_every_result_file(tmp_path):
    """All steps at tiny sizes on the CPU: recipe.json, bench.json, table.md, steps.tsv."""
    out = tmp_path / "gpu-out"
    src = str(ROOT / "src")
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, env=env, timeout=2400
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    steps = dict(line.split("\t")[:2] for line in (out / "steps.tsv").read_text().splitlines())
    assert steps["tests"] == steps["recipe"] == steps["bench"] == steps["summary"] == "0"
    assert steps["probe"].startswith("skipped") and steps["install"].startswith("skipped")

    recipe = json.loads((out / "recipe.json").read_text())
    assert [(r["model"], r["precision"]) for r in recipe] == [
        ("eanet-cifar", "bf16"),
        ("eanet-cifar", "fp32-tf32"),
        ("vit-cifar", "bf16"),
        ("vit-cifar", "fp32-tf32"),
    ]
    for r in recipe:
        assert r["rc"] == 0 and r["epochs"] == 2 and r["seconds"] > 0 and r["train_img_s"] > 0
        assert r["compile_mode"] == "none" and r["torch_version"] == torch.__version__
        assert r["device"] == "cpu" and r["device_name"] and "eanet train" in r["eanet_command"]
        assert "--synthetic-images 100" in r["command"] and not r["tf32"]
        history = json.loads(
            (out / "runs" / f"{r['model']}-{r['precision']}-none" / "history.json").read_text()
        )
        assert len(history) == 2

    bench = json.loads((out / "bench.json").read_text())
    assert len(bench) == 4 and all(b["rc"] == 0 for b in bench)
    assert {(b["model"], b["result"]["precision"]) for b in bench} == {
        (m, p) for m in ("eanet-cifar", "vit-cifar") for p in ("fp32", "bf16")
    }
    assert all(b["result"]["train_img_s"] > 0 and b["batch_size"] == 16 for b in bench)

    table = (out / "table.md").read_text()
    assert table.count("| eanet-cifar |") == 4 and table.count("| vit-cifar |") == 4
    assert "not comparable: 2 epochs on cpu" in table
    if not torch.cuda.is_available():  # the CUDA tests are collected and skipped, not lost
        xml = (out / "pytest-cuda.xml").read_text()
        assert 'skipped="' in xml and 'errors="0"' in xml and 'failures="0"' in xml
    assert not list(out.rglob("*.safetensors"))  # checkpoints are not results


def test_best_mode_is_the_fastest_compiled_training_step(tmp_path):
    runs = _load("runs")
    rows = [
        {"compile_mode": "default", "rc": 0, "result": {"train_img_s": 10.0}},
        {"compile_mode": "max-autotune", "rc": 0, "result": {"train_img_s": 30.0}},
        {"compile_mode": "reduce-overhead", "rc": 1},
        {"compile_mode": "none", "rc": 0, "result": {"train_img_s": 99.0}},
    ]
    path = tmp_path / "modes.json"
    path.write_text(json.dumps(rows))
    assert runs.best_mode(path) == "max-autotune"
    path.write_text(json.dumps(rows[2:3]))
    assert runs.best_mode(path) == "default"  # nothing compiled: torch's default mode
    assert runs.best_mode(tmp_path / "missing.json") == "default"


def test_the_summary_judges_only_50_epoch_cuda_runs_against_the_targets(tmp_path):
    summarize = _load("summarize")
    base = {"model": "eanet-cifar", "precision": "bf16", "compile_mode": "default", "rc": 0}
    rows = [
        {**base, "epochs": 50, "device": "cuda", "seconds": 59.0},
        {**base, "epochs": 50, "device": "cuda", "seconds": 61.0},
        {**base, "epochs": 5, "device": "cuda", "seconds": 6.0},
        {**base, "epochs": 50, "device": "cuda", "seconds": 30.0, "rc": 124},
    ]
    (tmp_path / "recipe.json").write_text(json.dumps(rows))
    assert summarize.main([str(tmp_path)]) == 0
    lines = [
        ln for ln in (tmp_path / "table.md").read_text().splitlines() if ln.startswith("| eanet")
    ]
    assert "<= 60 s: met" in lines[0] and "<= 60 s: NOT met" in lines[1]
    assert "not comparable: 5 epochs on cuda" in lines[2] and "NOT met" in lines[3]
