"""TensorBoard logging (`--log tensorboard`): scalars per step and per epoch, one image grid.

Events go to RUN/tensorboard/; the CSV/JSON history is written as always. Per step: the
training loss, the learning rate and images per second (each a host sync, so only with
this option). Per epoch: every number of the history row. Once: a grid of augmented
training images, drawn under a forked RNG so that logging does not change the run.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from eanet.errors import ConfigError

TAG_IMAGES = "train/augmented_images"


def check_tensorboard() -> None:
    """ConfigError in one line unless TensorBoard's writer can be imported."""
    _writer_class()


def _writer_class() -> type:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ConfigError(
            "--log tensorboard needs the tensorboard package: pip install 'eanet[tensorboard]'"
        ) from exc
    return SummaryWriter


def image_grid(images: torch.Tensor, columns: int = 8) -> torch.Tensor:
    """Pixel images [B, C, H, W] (0..255) as one grid [C, rows*H, columns*W] in 0..1."""
    b, c, h, w = images.shape
    rows = -(-b // columns)
    padded = torch.zeros(rows * columns, c, h, w)
    padded[:b] = images.detach().float().cpu().clamp(0, 255) / 255.0
    grid = padded.view(rows, columns, c, h, w).permute(2, 0, 3, 1, 4)
    return grid.reshape(c, rows * h, columns * w)


class TensorBoardLog:
    """A SummaryWriter on RUN/tensorboard/ with the scalars of `eanet train`."""

    def __init__(self, out: Path) -> None:
        self.writer = _writer_class()(log_dir=str(Path(out) / "tensorboard"))
        self._last = time.perf_counter()

    def log_step(self, step: int, loss: torch.Tensor, lr: float, images: int) -> None:
        """The training loss, learning rate and images/s of optimizer step `step`."""
        now = time.perf_counter()
        self.writer.add_scalar("step/train_loss", float(loss.detach()), step)
        self.writer.add_scalar("step/lr", lr, step)
        self.writer.add_scalar("step/images_per_s", images / max(now - self._last, 1e-9), step)
        self._last = now

    def log_epoch(self, row: dict) -> None:
        """Every number of an epoch's history row, under epoch/NAME."""
        for name, value in row.items():
            if name != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"epoch/{name}", value, row["epoch"])
        self.writer.flush()
        self._last = time.perf_counter()

    def log_images(self, images: torch.Tensor) -> None:
        """A grid of augmented training images (pixels 0..255)."""
        self.writer.add_image(TAG_IMAGES, image_grid(images), 0)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
