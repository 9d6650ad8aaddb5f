"""The served model: a checkpoint loaded once, its forward pass and its description.

Under `--precision auto` on a CPU where bf16 pays (`runtime.cpu_bf16_pays`: large
matmuls), small forward passes may still be faster in fp32: bf16's casts and oneDNN's
calls cost more than its matmuls save on a few images (measured per CPU class in
`benchmarks/results/serve/`: bf16 slower than fp32 for one image, faster from a few). So the
served model times passes of 1, 2, 4, 8 and 16 images in both precisions once at start
(`bf16_from`) and runs the passes below the size from which bf16 was faster in fp32.
"""

import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from eanet import __version__, checkpoint
from eanet.inference import Runtime
from eanet.models.registry import count_parameters
from eanet.runtime import autocast

log = logging.getLogger(__name__)

PROBE_SIZES = (1, 2, 4, 8, 16)  # images per pass timed in both precisions under 'auto'


def bf16_from(seconds: Callable[[int, str], float], sizes: tuple[int, ...]) -> int | None:
    """The smallest of `sizes` from which bf16 passes were faster than fp32 at every larger
    size timed, by `seconds(images, precision)` (the best of 4 passes each, alternating; the
    first, which warms up, is slow if anything, so it can only lose the minimum); None
    where bf16 was not faster at the largest."""
    faster = []
    for n in sizes:
        best = {"fp32": float("inf"), "bf16": float("inf")}
        for _ in range(4):
            for precision in best:
                best[precision] = min(best[precision], seconds(n, precision))
        faster.append(best["bf16"] < best["fp32"])  # the first round (warm-up) counts too
    if not faster or not faster[-1]:
        return None
    k = len(faster) - 1
    while k > 0 and faster[k - 1]:
        k -= 1
    return sizes[k]


class ServedModel:
    """A checkpoint loaded for serving: model, class names, name and version, forward pass."""

    def __init__(
        self,
        path: str | Path,
        device: str = "auto",
        precision: str = "fp32",
        compile: bool = False,
        accel: bool = True,
        max_batch: int = 64,
    ) -> None:
        path = checkpoint.resolve(path)
        self.path = path
        rt = Runtime.resolve(device, precision, accel, compile)
        self.model, ckpt = checkpoint.load_model(path, rt.device)
        self.meta = ckpt.meta
        self.class_names = ckpt.class_names
        self.config = self.model.config
        self.device = next(self.model.parameters()).device
        self.precision = rt.precision  # the forward pass's
        ready = rt.prepare(self.model)
        self.accel, self.runner = ready.accel, ready.runner
        self.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        fallback = "eanet" if self.config.attention == "external" else "vit"
        self.name = str(self.meta.model_name or fallback)
        self.parameters = count_parameters(self.model)
        self.compiled = compile
        self.bf16_from: int | None = None  # passes of fewer images run in fp32
        cpu_auto = precision == "auto" and self.device.type == "cpu"
        if cpu_auto and self.precision == "bf16" and not compile:
            self._choose_small_pass_precision(max_batch)
        if compile:  # batches of 1 then 2: torch then compiles one graph for every size
            for n in (1, 2):
                self.forward(self._blank(n))

    def _blank(self, n: int) -> torch.Tensor:
        """`n` black images in the model's input layout (uint8 [n, C, H, W])."""
        size = self.image_size
        return torch.zeros(n, self.config.in_chans, size, size, dtype=torch.uint8)

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def describe(self) -> dict:
        """Name and version, as every /predict response carries them."""
        return {
            "name": self.name,
            "version": f"sha256:{self.sha256[:12]}",
            "checkpoint_sha256": self.sha256,
            "eanet_version": __version__,
            "trained_with_eanet": self.meta.eanet_version,
        }

    def pass_precision(self, images: int) -> str:
        """The precision of a forward pass of `images` images."""
        small = self.bf16_from is not None and images < self.bf16_from
        return "fp32" if small else self.precision

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images [B, 3, S, S] -> float logits [B, classes] on the CPU."""
        return self._run(x, self.pass_precision(len(x)))

    def _run(self, x: torch.Tensor, precision: str) -> torch.Tensor:
        with torch.inference_mode(), autocast(precision, self.device):
            return self.runner(x.to(self.device)).float().cpu()

    def _seconds(self, images: int, precision: str) -> float:
        """Seconds of one forward pass of `images` blank images in `precision`."""
        x = self._blank(images)
        start = time.perf_counter()
        self._run(x, precision)
        return time.perf_counter() - start

    def _choose_small_pass_precision(self, max_batch: int) -> None:
        """'auto' on a CPU, not compiled (each precision would compile graphs of its own):
        time small passes in both precisions and run in fp32 those where bf16 lost."""
        sizes = tuple(n for n in PROBE_SIZES if n <= max_batch) or (1,)
        start = time.perf_counter()
        first = bf16_from(self._seconds, sizes)
        if first is None:
            self.precision = "fp32"
        elif first > 1:
            self.bf16_from = first
        log.info(
            "--precision auto: bf16 from passes of %s image(s), fp32 below (timed %s in %.1f s)",
            first if first is not None else "(none timed)",
            "/".join(map(str, sizes)),
            time.perf_counter() - start,
        )
