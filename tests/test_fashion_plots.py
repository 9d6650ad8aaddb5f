"""tools/fashion_plots.py draws both figures from records of the runners' shapes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _record(folder: Path, name: str, vals: list[float], per_epoch_test: bool) -> None:
    rows = [
        {"epoch": i + 1, "epoch_seconds": 90.0, "val_top1": v}
        | ({"test_top1": v - 0.01} if per_epoch_test else {})
        for i, v in enumerate(vals)
    ]
    (folder / f"{name}.json").write_text(json.dumps({"history": rows}))


def test_both_figures_are_drawn_from_the_records(tmp_path):
    folder = tmp_path / "results" / "fashion-mnist"
    folder.mkdir(parents=True)
    _record(folder, "eanet-s0", [0.6, 0.8], True)
    _record(folder, "eanet-s1", [0.62, 0.81], True)
    _record(folder, "keras-fixed-s0", [0.55, 0.79], True)
    _record(folder, "eanet-fast", [0.85, 0.91], False)
    out = tmp_path / "figures"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "fashion_plots.py"),
            "--results",
            str(tmp_path / "results"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    for name in ("test_top1.png", "time_to_accuracy.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
