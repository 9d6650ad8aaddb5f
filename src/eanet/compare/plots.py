"""Figures of `eanet compare`: accuracy and loss curves over seeds, cost, first-layer inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.ticker import FuncFormatter, MaxNLocator, PercentFormatter

from eanet.compare.report import Group
from eanet.plots import plt, save_figure

_MARKERS = {"fixed": "o", "reference-bug": "X", "none": "s"}


def _label(g: Group) -> str:
    return f"{g.model} ({g.augment})"


def _colors(groups: list[Group]) -> list:
    cmap = plt.get_cmap("tab10")
    return [cmap(i % 10) for i in range(len(groups))]


def _band(ax, x, mean, std, color, style: str = "-", label: str | None = None, alpha=0.18):
    mean, std = np.asarray(mean), np.asarray(std)
    ax.plot(x, mean, style, color=color, label=label, marker="." if len(x) < 30 else None)
    if std.any():
        ax.fill_between(x, mean - std, mean + std, color=color, alpha=alpha, linewidth=0)


def plot_val_top1(groups: list[Group], path: str | Path, title: str = "") -> None:
    """Validation top-1 per epoch, mean over seeds with a +-std band; training top-1 dotted."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for g, color in zip(groups, _colors(groups), strict=True):
        c = g.curves
        if "val_top1" not in c:
            continue
        _band(ax, c["epoch"], c["val_top1"], c["val_top1_std"], color, "-", f"{_label(g)} val")
        ax.plot(
            c["epoch"], c["train_top1"], ":", color=color, alpha=0.8, label=f"{_label(g)} train"
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("top-1 accuracy")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"validation top-1 (mean ± std over seeds), {title}", fontsize=10)
    save_figure(fig, path)


def plot_loss_curves(groups: list[Group], path: str | Path, title: str = "") -> None:
    """One panel per model and order: training and validation loss per epoch (mean +- std)."""
    n = len(groups)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n + 0.6, 3.6), sharey=True, squeeze=False)
    for ax, g in zip(axes[0], groups, strict=True):
        c = g.curves
        _band(ax, c["epoch"], c["train_loss"], c["train_loss_std"], "tab:blue", "-", "train")
        if "val_loss" in c:
            _band(ax, c["epoch"], c["val_loss"], c["val_loss_std"], "tab:red", "-", "val")
        ax.set_title(_label(g), fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("loss (label-smoothed cross-entropy)")
    fig.suptitle(f"training and validation loss, {title}", fontsize=10)
    save_figure(fig, path)


def plot_accuracy_vs_params(groups: list[Group], path: str | Path, title: str = "") -> None:
    """Test top-1 (mean, error bar = std over seeds) against trainable parameters."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for g, color in zip(groups, _colors(groups), strict=True):
        s = g.summary["test_top1"]
        ax.errorbar(
            g.params,
            s["mean"],
            yerr=s["std"] or 0.0,
            fmt=_MARKERS.get(g.augment, "o"),
            color=color,
            markersize=8,
            capsize=4,
            label=f"{_label(g)}: {100 * s['mean']:.1f}%",
        )
    params = [g.params for g in groups]
    lo, hi = min(params), max(params)
    ax.set_xlim(lo - 0.25 * (hi - lo or lo), hi + 0.25 * (hi - lo or lo))
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("test top-1")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"test top-1 vs parameters, {title}", fontsize=10)
    save_figure(fig, path)


def plot_input_distribution(
    values: dict[str, np.ndarray], stats: dict[str, dict], path: str | Path, title: str = ""
) -> None:
    """Histograms of first-layer inputs: per order, training inputs against inference inputs."""
    inference = next(k for k in values if k.startswith("inference"))
    orders = [k for k in values if k != inference]
    everything = np.concatenate(list(values.values()))
    bins = np.linspace(float(everything.min()), float(everything.max()), 81)
    fig, axes = plt.subplots(1, len(orders), figsize=(6 * len(orders), 3.8), sharey=True)
    axes = np.atleast_1d(axes)
    for ax, key in zip(axes, orders, strict=True):
        for name, color in ((inference, "tab:gray"), (key, "tab:red")):
            s = stats[name]
            ax.hist(
                values[name],
                bins=bins,
                density=True,
                histtype="stepfilled" if name == inference else "step",
                alpha=0.45 if name == inference else 1.0,
                color=color,
                linewidth=1.5,
                label=f"{name}: mean {s['mean']:.2f}, {100 * s['negative']:.0f}% < 0",
            )
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("value entering the patch embedding")
        ax.set_title(key.split(" / ")[0] + " order", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("density (log)")
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)
