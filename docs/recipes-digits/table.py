"""Print the table of docs/recipes.md from the two comparisons' report.json files.

Run from the repository root: python docs/recipes-digits/table.py
"""

import json
import statistics
from pathlib import Path

HERE = Path(__file__).parent


def _pct(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.mean(values) * 100
    spread = statistics.stdev(values) * 100 if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {spread:.1f}"


def main() -> None:
    print(
        "| recipe | model | params | test top-1 %, last weights | test top-1 %, best-val "
        "weights | test top-1 %, EMA weights | best val top-1 % | test top-5 %, last | "
        "training s / run |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for recipe in ("reference", "modern"):
        report = json.loads((HERE / recipe / "report.json").read_text())
        for g in report["groups"]:
            runs = g["runs"]

            def col(key: str, runs: list[dict] = runs) -> list[float]:
                return [r[key] for r in runs if r.get(key) is not None]

            seconds = statistics.mean(col("train_seconds"))
            print(
                f"| {recipe} | {g['model']} | {g['params']:,} | {_pct(col('test_top1'))} | "
                f"{_pct(col('best_test_top1'))} | {_pct(col('ema_test_top1'))} | "
                f"{_pct(col('best_val_top1'))} | {_pct(col('test_top5'))} | {seconds:.0f} |"
            )


if __name__ == "__main__":
    main()
