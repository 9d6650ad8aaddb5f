"""Turn the JSON files of benchmarks/gpu/run.sh into one markdown page, OUT/table.md.

    python benchmarks/gpu/summarize.py OUT

Reads OUT/recipe.json, OUT/bench.json and, where present, OUT/compile_modes.json and
OUT/steps.tsv; prints nothing it did not read from them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# 50-epoch reference recipe on one H200, seconds end to end (docs/gpu.md)
TARGETS = {
    ("eanet-cifar", "bf16"): 60,
    ("eanet-cifar", "fp32-tf32"): 120,
    ("vit-cifar", "bf16"): 180,
}
REFERENCE_EPOCHS = 50


def _load(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.exists() else []


def _num(value: object, fmt: str = "{:.1f}") -> str:
    return fmt.format(value) if isinstance(value, (int, float)) else "-"


def _target(r: dict) -> str:
    target = TARGETS.get((r["model"], r["precision"]))
    if target is None:
        return "-"
    if r.get("epochs") != REFERENCE_EPOCHS or not r.get("device", "").startswith("cuda"):
        return f"<= {target} s (not comparable: {r.get('epochs')} epochs on {r.get('device')})"
    met = r.get("rc") == 0 and r["seconds"] <= target
    return f"<= {target} s: {'met' if met else 'NOT met'}"


def recipe_table(rows: list[dict]) -> list[str]:
    lines = [
        "| model | precision | compile | epochs | seconds | first epoch s | train img/s "
        "| target | device | torch | rc |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['precision']} | {r['compile_mode']} | {r.get('epochs', '-')} "
            f"| {_num(r.get('seconds'))} | {_num(r.get('first_epoch_seconds'))} "
            f"| {_num(r.get('train_img_s'), '{:.0f}')} | {_target(r)} "
            f"| {r.get('device_name', '-')} | {r.get('torch_version', '-')} | {r.get('rc')} |"
        )
    return lines


def bench_table(rows: list[dict]) -> list[str]:
    lines = [
        "| model | precision | batch | compile | train img/s | inference img/s "
        "| train share of matmul peak | peak memory MB | device | rc |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        res = r.get("result") or {}
        env = res.get("environment", {})
        where = env.get("cuda") or env.get("cpu_model") or res.get("device", "-")
        lines.append(
            f"| {r['model']} | {r['precision']} | {r['batch_size']} | {r['compile_mode']} "
            f"| {_num(res.get('train_img_s'), '{:.0f}')} "
            f"| {_num(res.get('infer_img_s'), '{:.0f}')} "
            f"| {_num(res.get('train_fraction_of_peak'), '{:.1%}')} "
            f"| {_num(res.get('peak_memory_mb'), '{:.0f}')} | {where} | {r.get('rc')} |"
        )
    return lines


def summarize(out: Path) -> str:
    """The markdown page for the results under `out`."""
    parts = [f"# GPU check results ({out})", ""]
    steps = out / "steps.tsv"
    if steps.exists():
        parts += ["## Steps", "", "| step | rc | seconds |", "|---|---|---|"]
        for line in steps.read_text().splitlines():
            parts.append("| " + " | ".join(line.split("\t")) + " |")
        parts.append("")
    modes = _load(out / "compile_modes.json")
    if modes:
        parts += ["## torch.compile modes (eanet bench, training step)", ""]
        parts += bench_table(modes) + [""]
    parts += ["## Reference recipe end to end (eanet train --dataset synthetic)", ""]
    parts += recipe_table(_load(out / "recipe.json")) + [""]
    parts += ["## eanet bench", ""]
    parts += bench_table(_load(out / "bench.json")) + [""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python benchmarks/gpu/summarize.py OUT", file=sys.stderr)
        return 2
    out = Path(argv[0])
    (out / "table.md").write_text(summarize(out))
    print(f"wrote {out / 'table.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
