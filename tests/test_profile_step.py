"""benchmarks/profile_step.py: both timers give an operator table that adds up; a bad
option is one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "profile_step.py"


@pytest.mark.parametrize("timer", ["profiler", "dispatch"])
def test_operator_table(tmp_path, timer):
    out = tmp_path / "ops.json"
    cmd = [sys.executable, str(SCRIPT), "--precision", "bf16", "--batch-size", "2"]
    cmd += ["--steps", "1", "--warmup", "1", "--timer", timer, "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    ops = json.loads(out.read_text())["ops"]
    assert abs(sum(r["share"] for r in ops) - 1.0) < 1e-6
    names = " ".join(r["op"] for r in ops)
    assert "double_normalize_cpu" in names
    if timer == "dispatch":  # grouped by input shapes and dtypes
        assert "(2, 256, 16, 16)bfloat16" in names


def test_unknown_model_is_one_line(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--model", "nope", "--out", str(tmp_path / "o.json")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "unknown model 'nope'" in run.stderr.splitlines()[-1]
    assert not (tmp_path / "o.json").exists()
