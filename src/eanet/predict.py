"""Top-k class predictions for image files, directories, arrays and tensors.

Every image goes through `eanet.images` (decode, RGB, whole-image resize), so prediction sees
exactly what folder training saw. Files are decoded and predicted a batch at a time; a file
that cannot be used becomes a `Failure` in the stream and the others go on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from eanet.data import images as imgs
from eanet.errors import ConfigError, DataError
from eanet.inference import predict_logits
from eanet.models.transformer import VisionTransformer

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    """The k most probable classes of one image, best first."""

    classes: list[str]
    probabilities: list[float]
    indices: list[int]
    source: str | None = None  # the file, when the image came from one

    @property
    def label(self) -> str:
        """The most probable class."""
        return self.classes[0]

    @property
    def probability(self) -> float:
        """The probability of the most probable class."""
        return self.probabilities[0]

    def to_dict(self) -> dict:
        """JSON-ready: {"file", "predictions": [{"class", "index", "probability"}, ...]}."""
        preds = [
            {"class": c, "index": i, "probability": round(p, 6)}
            for c, i, p in zip(self.classes, self.indices, self.probabilities, strict=True)
        ]
        return {"file": self.source, "predictions": preds}


@dataclass
class Failure:
    """A file that could not be predicted, and why (one line)."""

    source: str
    reason: str


def check_top_k(top_k: int) -> None:
    """Raise ConfigError unless top_k is a positive integer."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ConfigError(f"--top-k {top_k!r} must be a positive integer")


def top_k_predictions(
    logits: torch.Tensor,
    class_names: Sequence[str],
    top_k: int = 5,
    sources: Sequence[str | None] | None = None,
) -> list[Prediction]:
    """Softmax the logits [B, C] and keep the `top_k` classes (at most C) of each row."""
    check_top_k(top_k)
    probs = logits.float().softmax(dim=1).cpu()
    top = probs.topk(min(top_k, probs.shape[1]), dim=1)
    sources = sources if sources is not None else [None] * len(probs)
    return [
        Prediction(
            classes=[class_names[i] for i in idx.tolist()],
            probabilities=[float(p) for p in val.tolist()],
            indices=idx.tolist(),
            source=src,
        )
        for val, idx, src in zip(top.values, top.indices, sources, strict=True)
    ]


def predict_batch(
    model: VisionTransformer,
    class_names: Sequence[str],
    images: Sequence[imgs.ImageLike],
    top_k: int = 5,
    batch_size: int = 64,
    precision: str = "fp32",
) -> list[Prediction]:
    """Predict in-memory images or files; the first unusable one raises DataError."""
    size = model.config.image_size
    x = imgs.to_channels(imgs.prepare(images, size), model.config.in_chans)
    logits = predict_logits(model, x, batch_size, precision=precision)
    sources = [str(i) if isinstance(i, (str, Path)) else None for i in images]
    return top_k_predictions(logits, class_names, top_k, sources)


def expand_inputs(inputs: Sequence[str | Path]) -> tuple[list[Path], list[Failure]]:
    """Files as given and the image files under directories (sorted, recursive).

    A missing path or a directory with no image file is a Failure; files without an image
    extension inside directories are skipped with a log line naming how many and a few.
    """
    files: list[Path] = []
    failures: list[Failure] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found, others = imgs.list_images(path)
            if others:
                log.warning(
                    "%s: skipped %d file(s) without an image extension (%s)",
                    path,
                    len(others),
                    ", ".join(str(p) for p in others[:3]) + (", ..." if len(others) > 3 else ""),
                )
            if not found:
                failures.append(Failure(str(path), "no image files in this directory"))
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            failures.append(Failure(str(path), "no such file or directory"))
    return files, failures


def iter_predict_files(
    model: VisionTransformer,
    class_names: Sequence[str],
    files: Sequence[Path],
    top_k: int = 5,
    batch_size: int = 64,
    precision: str = "fp32",
) -> Iterator[Prediction | Failure]:
    """Decode and predict `files` a batch at a time, in order; unusable files yield Failure."""
    check_top_k(top_k)
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size} must be a positive integer")
    size = model.config.image_size
    for start in range(0, len(files), batch_size):
        decoded: list[tuple[int, torch.Tensor]] = []
        results: list[Prediction | Failure | None] = []
        for path in files[start : start + batch_size]:
            try:
                decoded.append((len(results), imgs.load_image(path, size)))
                results.append(None)
            except DataError as exc:
                results.append(Failure(str(path), _reason(exc, path)))
        if decoded:
            x = imgs.to_channels(torch.stack([t for _, t in decoded]), model.config.in_chans)
            logits = predict_logits(model, x, batch_size, precision=precision)
            chunk = files[start : start + batch_size]
            srcs = [str(chunk[i]) for i, _ in decoded]
            for (i, _), pred in zip(
                decoded, top_k_predictions(logits, class_names, top_k, srcs), strict=True
            ):
                results[i] = pred
        yield from (r for r in results if r is not None)


def _reason(exc: DataError, path: Path) -> str:
    """The error message without the leading 'PATH: ' (the caller prints the path)."""
    text = str(exc)
    prefix = f"{path}: "
    return text[len(prefix) :] if text.startswith(prefix) else text
