"""Figures of a run: training curves and the confusion matrix (PNG, written atomically)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator, NullFormatter, PercentFormatter  # noqa: E402

from eanet.fileio import atomic_path  # noqa: E402


def _save(fig: plt.Figure, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def save_figure(fig: plt.Figure, path: str | Path) -> None:
    """Write `fig` as PNG atomically, in the style of every eanet figure, and close it."""
    _save(fig, path)


def curve_panels(classes: int | None) -> tuple[tuple[str, str], ...]:
    """(history key, label) of each panel: top-5 only above 5 classes (below, it is 100%)."""
    panels = (("loss", "loss"), ("top1", "top-1"))
    return panels if classes is not None and classes <= 5 else (*panels, ("top5", "top-5"))


def plot_curves(
    history: list[dict], path: str | Path, title: str = "", classes: int | None = None
) -> None:
    """Loss, top-1 and (with more than 5 `classes`) top-5 per epoch, train vs validation."""
    epochs = [h["epoch"] for h in history]
    panels = curve_panels(classes)
    fig, axes = plt.subplots(1, len(panels), figsize=(14 * len(panels) / 3, 4))
    for ax, (key, label) in zip(axes, panels, strict=True):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], "o-", label=f"train {label}")
        val = [h.get(f"val_{key}") for h in history]
        if any(v is not None for v in val):
            ax.plot(epochs, val, "o-", label=f"val {label}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if key != "loss":
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    _save(fig, path)


def plot_confusion(
    confusion: np.ndarray, class_names: list[str], path: str | Path, title: str = ""
) -> None:
    """Row-normalised confusion matrix (true class per row); names shown up to 30 classes."""
    confusion = np.asarray(confusion, dtype=np.float64)
    rows = confusion.sum(axis=1, keepdims=True)
    norm = np.divide(confusion, rows, out=np.zeros_like(confusion), where=rows > 0)
    n = len(class_names)
    size = min(4 + 0.12 * n, 16)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(norm, cmap="viridis", vmin=0, vmax=1)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= 30:
        ax.set_xticks(range(n), class_names, rotation=90, fontsize=7)
        ax.set_yticks(range(n), class_names, fontsize=7)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_title(title or "confusion matrix (row-normalised)")
    _save(fig, path)


def plot_scaling(rows: list[dict], path: str | Path) -> None:
    """Log-log time and activation memory per image against tokens, with N and N^2 guides."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    keys = (
        ("infer_ms_per_image", "inference ms / image"),
        ("train_ms_per_image", "training step ms / image"),
        ("activation_mb_per_image", "activation memory MB / image"),
    )
    models = sorted({r["model"] for r in rows})
    for ax, (key, label) in zip(axes, keys, strict=True):
        for name in models:
            pts = sorted((r["tokens"], r[key]) for r in rows if r["model"] == name)
            ax.plot(*zip(*pts, strict=True), "o-", label=name)
        tokens = np.array(sorted({r["tokens"] for r in rows}), dtype=float)
        base = min(r[key] for r in rows if r["tokens"] == tokens[0])
        ax.plot(tokens, base * tokens / tokens[0], "k:", alpha=0.6, label="~ N (linear)")
        ax.plot(tokens, base * (tokens / tokens[0]) ** 2, "k--", alpha=0.4, label="~ N^2")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(tokens, [str(int(t)) for t in tokens])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("tokens N (patch 2: image side / 2, squared)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle("external attention (EANet) vs self attention (ViT) as the token count grows")
    _save(fig, path)
