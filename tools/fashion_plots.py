"""The figures of docs/fashion-mnist.md, drawn from the Fashion-MNIST records.

    python tools/fashion_plots.py            # writes docs/fashion-mnist/*.png

- `test_top1.png`: test top-1 after every epoch of the runs that record it (the constant-lr
  runs of benchmarks/fashion_mnist.py and the Keras example's code, tools/keras_fashion.py),
  one colour per experiment, its seeds as thin lines and their mean as a thick one;
- `time_to_accuracy.png`: validation top-1 against minutes of training and validation, for
  every run (one colour per experiment, as above), with the 90% and 92% lines the targets speak of.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from itertools import accumulate
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from matplotlib.ticker import PercentFormatter  # noqa: E402

from eanet.plots import plt, save_figure  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "results_tables", ROOT / "tools" / "results_tables.py"
)
tables = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = tables
_spec.loader.exec_module(tables)

THRESHOLDS = (0.90, 0.92)  # the targets' validation top-1 levels
STYLE = {  # experiment group: (colour, line style); the Keras code dashed
    "reference": ("tab:red", "-"),
    "eanet": ("tab:blue", "-"),
    "vit": ("tab:orange", "-"),
    "eanet-bug": ("tab:green", "-"),
    "eanet-modern": ("tab:purple", "-"),
    "eanet-fast": ("tab:brown", "-."),
    "eanet-best": ("tab:cyan", "-."),
    "keras-fixed": ("tab:blue", "--"),
    "keras-reference": ("tab:green", "--"),
}


def _groups(records: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for name, (_, rec) in records.items():
        out.setdefault(tables._seed_group(name), []).append(rec)
    return out


def plot_test_curves(records: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, (group, recs) in enumerate(_groups(records).items()):
        curves = [c for c in map(tables._curve, recs) if c]
        if not curves:
            continue
        color, style = STYLE.get(group, (plt.get_cmap("tab10")(i % 10), ":"))
        for c in curves if len(curves) > 1 else []:
            ax.plot(list(c), list(c.values()), style, color=color, alpha=0.35, linewidth=0.8)
        epochs = sorted(set.intersection(*(set(c) for c in curves)))
        mean = [sum(c[e] for c in curves) / len(curves) for e in epochs]
        label = f"{group} ({len(curves)} seeds)" if len(curves) > 1 else group
        ax.plot(epochs, mean, style, color=color, marker=".", linewidth=2, label=label)
    _finish(ax, "epoch", "test top-1 after each epoch (10,000 test photos)")
    save_figure(fig, path)


def plot_time_to_accuracy(records: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, (group, recs) in enumerate(_groups(records).items()):
        color, style = STYLE.get(group, (plt.get_cmap("tab10")(i % 10), ":"))
        label = f"{group} ({len(recs)} seeds)" if len(recs) > 1 else group
        for rec in (r for r in recs if r.get("history")):
            minutes = list(accumulate(row["epoch_seconds"] / 60 for row in rec["history"]))
            vals = [row["val_top1"] for row in rec["history"]]
            ax.plot(minutes, vals, style, color=color, marker=".", label=label)
            label = "_nolegend_"  # one legend entry per experiment, its seeds in one colour
    for level in THRESHOLDS:
        ax.axhline(level, color="grey", linewidth=0.7, linestyle=":")
    _finish(
        ax, "minutes of training and validation (the machine of each record)", "validation top-1"
    )
    save_figure(fig, path)


def _finish(ax, xlabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"Fashion-MNIST: {title}", fontsize=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=tables.RESULTS)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "fashion-mnist")
    args = parser.parse_args(argv)
    records = tables.load_fashion(args.results)
    args.out.mkdir(parents=True, exist_ok=True)
    plot_test_curves(records, args.out / "test_top1.png")
    plot_time_to_accuracy(records, args.out / "time_to_accuracy.png")
    print(f"wrote {args.out / 'test_top1.png'} and {args.out / 'time_to_accuracy.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
