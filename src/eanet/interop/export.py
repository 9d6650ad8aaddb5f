"""Export a checkpoint to ONNX or TorchScript, with a parity check against PyTorch.

The exported file holds the whole model, normalization included:

- input `pixels`: float32, (B, 3, H, W) = NCHW, RGB, raw values 0..255, any batch size B;
- output `probabilities`: float32, (B, num_classes), the softmax of the logits;
- the class names (and the model config) as metadata: ONNX `metadata_props`
  (`class_names`, a JSON list), TorchScript `_extra_files` (`class_names.json`).

The file is written atomically, and only after the exported model matched PyTorch on random
pixel batches of two batch sizes; a failed check leaves no output behind.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from eanet import __version__, accel, checkpoint
from eanet.errors import ConfigError, EANetError
from eanet.fileio import atomic_path, check_output
from eanet.models.transformer import VisionTransformer
from eanet.train.rundir import refuse_run_file

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
INPUT_NAME = "pixels"
OUTPUT_NAME = "probabilities"
TOLERANCE = 1e-4
PARITY_BATCH_SIZES = (2, 5)  # the trace uses 2: a second size proves the batch axis is free
PARITY_BATCHES_PER_SIZE = 2
ONNX_OPSET = 17
_EXTRA = "pip install 'eanet[export]' (or pip install onnx onnxruntime)"


class ExportError(EANetError):
    """The exported file does not reproduce the PyTorch model."""


class Probabilities(nn.Module):
    """The exported graph: raw 0..255 NCHW pixels -> class probabilities."""

    def __init__(self, model: VisionTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixels).softmax(dim=-1)


@dataclass
class Parity:
    """How far the exported file's outputs are from PyTorch's."""

    max_abs_diff: float
    batch_sizes: tuple[int, ...]
    batches: int
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def message(self, fmt: str) -> str:
        """One line: the figure, what it was measured on, and the verdict."""
        sizes = ", ".join(map(str, self.batch_sizes))
        verdict = "ok" if self.ok else "FAILED"
        return (
            f"parity {fmt} vs PyTorch: max |diff| of probabilities {self.max_abs_diff:.2e} on "
            f"{self.batches} random pixel batches (batch sizes {sizes}), "
            f"tolerance {self.tolerance:.0e}: {verdict}"
        )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the tracer's and the deprecated torch.jit / legacy exporter warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        yield


def _plain_ops(model: VisionTransformer) -> VisionTransformer:
    """A copy of `model` that runs the plain model's torch ops (`eanet.accel` undone)."""
    # The accel layer's ops are Python autograd Functions and custom ops, which TorchScript
    # and ONNX cannot save; the parity check still compares with `model` itself.
    return accel.restore(copy.deepcopy(model).eval())


def _pixel_batches(shape: tuple[int, int, int], seed: int = 0) -> list[torch.Tensor]:
    """Random integer-valued pixels 0..255 as float32, PARITY_BATCHES_PER_SIZE per size."""
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, 256, (size, *shape), generator=gen).float()
        for size in PARITY_BATCH_SIZES
        for _ in range(PARITY_BATCHES_PER_SIZE)
    ]


def check_parity(
    reference: nn.Module,
    run: Callable[[np.ndarray], np.ndarray],
    shape: tuple[int, int, int],
    tolerance: float = TOLERANCE,
) -> Parity:
    """Compare `run` (pixels -> probabilities, numpy) with `reference` on random batches."""
    worst = 0.0
    batches = _pixel_batches(shape)
    for x in batches:
        with torch.no_grad():
            expected = reference(x).numpy()
        got = np.asarray(run(x.numpy()))
        if got.shape != expected.shape:
            raise ExportError(
                f"exported model returned shape {got.shape} for a batch of {len(x)}, "
                f"expected {expected.shape}"
            )
        diff = float(np.abs(got - expected).max())
        worst = max(worst, diff if np.isfinite(diff) else float("inf"))  # NaN fails too
    return Parity(worst, PARITY_BATCH_SIZES, len(batches), tolerance)


def _metadata(model: VisionTransformer, class_names: list[str]) -> dict[str, str]:
    c, h = model.config, model.config.image_size
    return {
        "class_names": json.dumps(class_names),
        "model_config": json.dumps(c.to_dict()),
        "input": f"{INPUT_NAME}: float32 (B, {c.in_chans}, {h}, {h}) NCHW RGB, values 0..255",
        "output": f"{OUTPUT_NAME}: float32 (B, {c.num_classes}), softmax over the classes",
        "producer": f"eanet {__version__}",
    }


def _require_onnx() -> tuple:
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise ConfigError(f"ONNX export needs onnx and onnxruntime: {_EXTRA}") from exc
    return onnx, onnxruntime


def _export_onnx(wrapper: Probabilities, example: torch.Tensor, path: Path, meta: dict) -> Callable:
    onnx, ort = _require_onnx()
    kwargs: dict = {}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False  # the TorchScript-based exporter: no onnxscript needed
    with _quiet(), torch.no_grad():
        torch.onnx.export(
            wrapper,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=ONNX_OPSET,
            **kwargs,
        )
    proto = onnx.load(str(path))
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]


def _export_torchscript(
    wrapper: Probabilities, example: torch.Tensor, path: Path, meta: dict
) -> Callable:
    with _quiet(), torch.no_grad():
        traced = torch.jit.trace(wrapper, example, check_trace=False)  # parity checks it
        extra = {"class_names.json": meta["class_names"], "eanet.json": json.dumps(meta)}
        torch.jit.save(traced, str(path), _extra_files=extra)
        loaded = torch.jit.load(str(path), map_location="cpu")

    def run(x: np.ndarray) -> np.ndarray:
        with _quiet(), torch.no_grad():
            return loaded(torch.from_numpy(x)).numpy()

    return run


def export(
    source: str | Path,
    fmt: str,
    out: str | Path,
    tolerance: float = TOLERANCE,
    weights: str = "last",
    overwrite: bool = False,
) -> Parity:
    """Export the checkpoint at `source` (its last/best/ema weights) to `out` in `fmt`.

    An existing `out` is replaced only with `overwrite`, and never when it is the checkpoint
    read or a file of a training run. Raises ExportError on failed parity.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    refuse_run_file(out)
    check_output(out, overwrite=overwrite, inputs=[checkpoint.resolve(source, weights)])
    if fmt == "onnx":
        _require_onnx()  # before any work
    model, ckpt = checkpoint.load_model(source, "cpu", weights)
    return export_model(model, ckpt.class_names, fmt, out, tolerance)


def export_model(
    model: VisionTransformer,
    class_names: list[str],
    fmt: str,
    out: str | Path,
    tolerance: float = TOLERANCE,
) -> Parity:
    """Export `model` (probabilities from raw pixels) to `out`; the file appears only on parity."""
    if not tolerance >= 0:
        raise ConfigError(f"tolerance {tolerance} must be >= 0")
    out = Path(out)
    reference = Probabilities(model.cpu().eval()).eval()
    shape = model.input_shape
    example = _pixel_batches(shape, seed=1)[0]
    meta = _metadata(model, class_names)
    writer = _export_onnx if fmt == "onnx" else _export_torchscript
    with atomic_path(out) as tmp:
        run = writer(Probabilities(_plain_ops(model)).eval(), example, tmp, meta)
        parity = check_parity(reference, run, shape, tolerance)
        log.debug("%s", parity.message(fmt))
        if not parity.ok:
            raise ExportError(
                f"{out} not written: {parity.message(fmt)}; "
                "report this with the checkpoint and versions (eanet --version, torch)"
            )
    return parity
