"""`eanet evaluate`: loss, top-1/top-5, per-class accuracy and confusion matrix of a checkpoint.

Three steps: `resolve_data` (which data set and split: the checkpoint's own unless the
request names others), `score` (the inference runtime, then metrics and the confusion
matrix) and `write_reports` (per-class CSV, confusion PNG, evaluation JSON).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from eanet import checkpoint
from eanet.data.dataset import ImageData
from eanet.data.load import load_dataset
from eanet.data.splits import train_val_split
from eanet.errors import ConfigError
from eanet.fileio import write_csv, write_json
from eanet.inference import Runtime, predict_logits
from eanet.metrics import Metrics, confusion_matrix, metrics_from_logits
from eanet.models.transformer import VisionTransformer
from eanet.plots import plot_confusion

log = logging.getLogger(__name__)

REPORT_FILES = (("per_class", "csv"), ("confusion", "png"), ("evaluation", "json"))


@dataclass(frozen=True)
class EvalRequest:
    """What to evaluate: a checkpoint's weights, on which data, how, and where to write.

    `dataset`, `data_path`, `md5` and `verify` default to the checkpoint's train config.
    `weights`: a run's last, best or EMA weights (`checkpoint.load_model`). `compile`: the
    forward pass under torch.compile; `accel`: the faster equivalents of the model's
    layers (`eanet.accel.apply`). `out_dir`: the run directory (the checkpoint's folder).
    """

    path: str | Path
    dataset: str | None = None
    data_path: str | None = None
    md5: str | None = None
    verify: bool | None = None
    split: str = "test"
    out_dir: str | Path | None = None
    batch_size: int = 500
    device: str = "auto"
    progress: bool = True
    precision: str = "fp32"
    weights: str = "last"
    compile: bool = False
    accel: bool = True

    @property
    def tag(self) -> str:
        """The files' suffix: the split, and the weights unless the last (names as before)."""
        return self.split if self.weights == "last" else f"{self.split}_{self.weights}"

    @property
    def report_dir(self) -> Path:
        """Where the reports go: `out_dir`, else the run directory of the checkpoint."""
        if self.out_dir is not None:
            return Path(self.out_dir)
        path = Path(self.path)
        return path if path.is_dir() else path.parent


@dataclass(frozen=True)
class EvalData:
    """The images a request scores: the data set's name and classes, the split's tensors."""

    dataset: str
    class_names: list[str]
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]


@dataclass(frozen=True)
class Scores:
    """The checkpoint's figures on the images: metrics and the confusion matrix."""

    metrics: Metrics
    confusion: torch.Tensor  # [classes, classes], rows the true class


def evaluate_checkpoint(path: str | Path, *, data: ImageData | None = None, **options) -> dict:
    """Evaluate a checkpoint on a split of its data set; write per-class CSV and confusion PNG.

    `options` are `EvalRequest`'s fields; `data` skips loading when the caller holds it.
    """
    request = EvalRequest(path, **options)
    rt = Runtime.resolve(request.device, request.precision, request.accel, request.compile)
    model, ckpt = checkpoint.load_model(request.path, rt.device, request.weights)
    train_cfg = ckpt.meta.train_config or {}
    images = resolve_data(request, ckpt, model, data)
    scores = score(request, rt, model, images, train_cfg.get("label_smoothing", 0.1))
    return write_reports(request, images, scores)


def resolve_data(
    request: EvalRequest,
    ckpt: checkpoint.Checkpoint,
    model: VisionTransformer,
    data: ImageData | None = None,
) -> EvalData:
    """The split to score: of the checkpoint's data set, or the one the request names."""
    train_cfg = ckpt.meta.train_config or {}
    dataset = request.dataset or train_cfg.get("dataset", "cifar100")
    if data is None:
        data = _load(request, train_cfg, dataset, model)
    if data.class_names != ckpt.class_names:
        raise ConfigError(
            f"{request.path} was trained on {len(ckpt.class_names)} classes that are not "
            f"{dataset}'s {data.num_classes}; evaluate it on the data set it was trained on"
        )
    if request.split == "test":
        images, labels = data.test_images, data.test_labels
    elif request.split == "val":
        _, _, images, labels = train_val_split(data, train_cfg.get("val_fraction", 0.2))
    else:
        raise ConfigError(f"split {request.split!r} must be 'test' or 'val'")
    return EvalData(dataset, data.class_names, images, labels)


def _load(
    request: EvalRequest, train_cfg: dict, dataset: str, model: VisionTransformer
) -> ImageData:
    """The data set, found as the checkpoint was trained on it unless the request says where."""
    data_path, md5, verify = request.data_path, request.md5, request.verify
    if data_path is None and dataset == train_cfg.get("dataset"):
        data_path = train_cfg.get("data_path")
        md5 = md5 or train_cfg.get("md5")
        verify = train_cfg.get("verify", True) if verify is None else verify
    # A folder is resized to the size the model was trained at; fashion-mnist comes as the
    # model's channels (grey 28x28, or padded to RGB 32x32).
    size = model.config.image_size if dataset == "folder" else None
    shape = {"image_size": size, "channels": model.config.in_chans}
    verify = True if verify is None else verify
    return load_dataset(
        dataset, data_path, md5=md5, verify=verify, progress=request.progress, **shape
    )


def score(
    request: EvalRequest,
    rt: Runtime,
    model: VisionTransformer,
    data: EvalData,
    label_smoothing: float,
) -> Scores:
    """The model, prepared by the runtime, on the split: metrics and confusion matrix."""
    runner = rt.prepare(model).runner
    desc = f"eval {request.split}"
    logits = predict_logits(
        runner, data.images, request.batch_size, request.progress, desc, rt.precision
    )
    m = metrics_from_logits(logits, data.labels, label_smoothing)
    conf = confusion_matrix(logits.argmax(1), data.labels, len(data.class_names))
    return Scores(m, conf)


def write_reports(request: EvalRequest, data: EvalData, scores: Scores) -> dict:
    """per_class_TAG.csv, confusion_TAG.png and evaluation_TAG.json; the result, with `files`."""
    m, split, tag = scores.metrics, request.split, request.tag
    out_dir = request.report_dir
    result = {
        "checkpoint": str(
            checkpoint.resolve(request.path, "best" if request.weights == "best" else "last")
        ),
        "weights": request.weights,
        "dataset": data.dataset,
        "split": split,
        f"{split}_loss": m.loss,
        f"{split}_top1": m.top1,
        f"{split}_top5": m.top5,
        "images": m.count,
    }
    write_csv(out_dir / f"per_class_{tag}.csv", per_class_rows(data.class_names, scores.confusion))
    plot_confusion(
        scores.confusion.numpy(),
        data.class_names,
        out_dir / f"confusion_{tag}.png",
        title=f"{data.dataset} {tag}: top-1 {m.top1:.2%} ({m.count} images)",
    )
    write_json(out_dir / f"evaluation_{tag}.json", result)
    result["files"] = [str(out_dir / f"{n}_{tag}.{e}") for n, e in REPORT_FILES]
    return result


def per_class_rows(class_names: list[str], conf: torch.Tensor) -> list[dict]:
    """One row per class: its test images, how many were right and the accuracy ('' if none)."""
    support = conf.sum(1)
    return [
        {
            "class": i,
            "name": name,
            "images": int(support[i]),
            "correct": int(conf[i, i]),
            "accuracy": round(float(conf[i, i]) / int(support[i]), 6) if support[i] else "",
        }
        for i, name in enumerate(class_names)
    ]
