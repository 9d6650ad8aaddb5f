"""The figure of `eanet attention`: one image beside its attention maps, as a PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from eanet.plots import plt, save_figure

CMAP = "magma"


def _blank(ax: plt.Axes) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def plot_units(
    picture: np.ndarray, units: np.ndarray, source: str, caption: str, path: str | Path
) -> None:
    """EANet: the image (H, W, 3) on the left; on the right a row per block, a column per
    memory unit, each unit's map over the patches, `units` (blocks, S, grid, grid)."""
    blocks, S, grid = units.shape[:3]
    cell, gap, side = min(0.62, 16 / S), 0.06, 2.4  # inches: a map, between maps, the image
    grid_h = blocks * (cell + gap) + 0.2  # + the unit labels
    width, height = 0.2 + side + 0.5 + S * (cell + gap) + 0.1, 0.6 + max(side + 0.4, grid_h)
    fig = plt.figure(figsize=(width, height))

    def axes(x: float, y: float, w: float, h: float) -> plt.Axes:  # inches from bottom left
        ax = fig.add_axes((x / width, y / height, w / width, h / height))
        _blank(ax)
        return ax

    ax = axes(0.2, height - 0.6 - side, side, side)
    ax.imshow(picture, interpolation="nearest")
    ax.set_title(f"input, {grid}x{grid} patches", fontsize=8)
    ax.set_xlabel(caption, fontsize=8)
    x0, top = 0.2 + side + 0.5, height - 0.6 - 0.2 - max(0.0, side + 0.4 - grid_h) / 2
    for b in range(blocks):
        for s in range(S):
            ax = axes(x0 + s * (cell + gap), top - (b + 1) * (cell + gap) + gap, cell, cell)
            ax.imshow(units[b, s], cmap=CMAP, interpolation="nearest")  # own scale each
            if b == 0:
                ax.set_title(f"unit {s + 1}", fontsize=6, pad=2)
            if s == 0:
                ax.set_ylabel(f"block {b + 1}", fontsize=7)
    fig.suptitle(
        f"{Path(source).name}: EANet, each memory unit's attention over the patches "
        "(mean over heads; each map on its own scale, bright = more)",
        fontsize=9,
        y=1 - 0.15 / height,
    )
    save_figure(fig, path)


def plot_rollout(
    picture: np.ndarray, rollout: np.ndarray, source: str, caption: str, path: str | Path
) -> None:
    """ViT: the image (H, W, 3), the final rollout laid over it, then the rollout after each
    block, `rollout` (blocks, grid, grid)."""
    blocks, grid = rollout.shape[:2]
    h, w = picture.shape[:2]
    fig, axes = plt.subplots(1, blocks + 2, figsize=(1.7 * (blocks + 2), 2.5))
    axes[0].imshow(picture, interpolation="nearest")
    axes[0].set_title(f"input, {grid}x{grid} patches", fontsize=8)
    axes[0].set_xlabel(caption, fontsize=8)
    axes[1].imshow(picture, interpolation="nearest")
    axes[1].imshow(rollout[-1], cmap=CMAP, alpha=0.6, extent=(-0.5, w - 0.5, h - 0.5, -0.5))
    axes[1].set_title("rollout over the input", fontsize=8)
    for b, ax in enumerate(axes[2:]):
        ax.imshow(rollout[b], cmap=CMAP, interpolation="nearest")
        ax.set_title(f"after block {b + 1}", fontsize=8)
    for ax in axes:
        _blank(ax)
    fig.suptitle(
        f"{Path(source).name}: ViT, attention rollout over the patches (each map on "
        "its own scale, bright = more)",
        fontsize=9,
    )
    save_figure(fig, path)
