"""Loss, top-1/top-5, per-class accuracy and confusion matrix of a model on a labelled set."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from eanet import checkpoint
from eanet.data import ImageData, load_dataset, train_val_split
from eanet.errors import ConfigError
from eanet.fileio import write_csv, write_json
from eanet.models import VisionTransformer
from eanet.plots import plot_confusion
from eanet.runtime import resolve_device

log = logging.getLogger(__name__)


@dataclass
class Metrics:
    """Mean loss and accuracies over `count` images (fractions, not percent)."""

    loss: float
    top1: float
    top5: float
    count: int


class MetricSums:
    """Running sums on the device; reading them is the only host sync."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.top1 = torch.zeros((), dtype=torch.int64, device=device)
        self.top5 = torch.zeros((), dtype=torch.int64, device=device)
        self.count = 0

    def add(self, logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor) -> None:
        """Add a batch: `loss` is the batch mean."""
        n = labels.numel()
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices  # (B, k)
        hits = topk == labels[:, None]
        self.loss += loss.detach().double() * n
        self.top1 += hits[:, 0].sum()
        self.top5 += hits.any(dim=1).sum()
        self.count += n

    def result(self) -> Metrics:
        n = max(self.count, 1)
        return Metrics(self.loss.item() / n, self.top1.item() / n, self.top5.item() / n, self.count)


@torch.no_grad()
def predict_logits(
    model: VisionTransformer,
    images: torch.Tensor,
    batch_size: int = 500,
    progress: bool = False,
    desc: str = "predict",
) -> torch.Tensor:
    """Logits for uint8 images [N, C, H, W], in batches, on the model's device (eval mode)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, leave=False):
        out.append(model(images[i : i + batch_size].to(device, non_blocking=True)))
    model.train(was_training)
    if not out:
        return torch.empty(0, model.config.num_classes, device=device)
    return torch.cat(out)


@torch.no_grad()
def evaluate_tensors(
    model: VisionTransformer,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 500,
    label_smoothing: float = 0.1,
    progress: bool = False,
    desc: str = "evaluate",
) -> Metrics:
    """Metrics of `model` on uint8 images and int64 labels (the loss as in training)."""
    logits = predict_logits(model, images, batch_size, progress=progress, desc=desc)
    return metrics_from_logits(logits, labels, label_smoothing)


def metrics_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.1
) -> Metrics:
    """Mean label-smoothed loss, top-1 and top-5 of a set's logits (count 0 when empty)."""
    sums = MetricSums(logits.device)
    if len(labels):
        labels = labels.to(logits.device)
        sums.add(logits, labels, F.cross_entropy(logits, labels, label_smoothing=label_smoothing))
    return sums.result()


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[num_classes, num_classes] counts, true class per row."""
    flat = labels.long().cpu() * num_classes + preds.long().cpu()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def evaluate_checkpoint(
    path: str | Path,
    *,
    dataset: str | None = None,
    data_path: str | None = None,
    md5: str | None = None,
    verify: bool | None = None,
    split: str = "test",
    out_dir: str | Path | None = None,
    batch_size: int = 500,
    device: str = "auto",
    progress: bool = True,
    data: ImageData | None = None,
) -> dict:
    """Evaluate a checkpoint on a split of its data set; write per-class CSV and confusion PNG.

    The data set defaults to the one the checkpoint was trained on (from its train config);
    `data` skips loading when the caller already holds it.
    """
    dev = resolve_device(device)
    model, ckpt = checkpoint.load_model(path, dev)
    train_cfg = ckpt.meta.get("train_config", {})
    dataset = dataset or train_cfg.get("dataset", "cifar100")
    if data_path is None and dataset == train_cfg.get("dataset"):
        data_path = train_cfg.get("data_path")
        md5 = md5 or train_cfg.get("md5")
        verify = train_cfg.get("verify", True) if verify is None else verify
    if data is None:
        verify = True if verify is None else verify
        # A folder is resized to the size the model was trained at.
        size = model.config.image_size if dataset == "folder" else None
        data = load_dataset(
            dataset, data_path, md5=md5, verify=verify, progress=progress, image_size=size
        )
    if data.class_names != ckpt.class_names:
        raise ConfigError(
            f"{path} was trained on {len(ckpt.class_names)} classes that are not "
            f"{dataset}'s {data.num_classes}; evaluate it on the data set it was trained on"
        )
    if split == "test":
        images, labels = data.test_images, data.test_labels
    elif split == "val":
        frac = train_cfg.get("val_fraction", 0.2)
        _, _, images, labels = train_val_split(data, frac)
    else:
        raise ConfigError(f"split {split!r} must be 'test' or 'val'")
    logits = predict_logits(model, images, batch_size, progress=progress, desc=f"eval {split}")
    m = metrics_from_logits(logits, labels, train_cfg.get("label_smoothing", 0.1))
    conf = confusion_matrix(logits.argmax(1), labels, data.num_classes)
    support = conf.sum(1)
    per_class = [
        {
            "class": i,
            "name": name,
            "images": int(support[i]),
            "correct": int(conf[i, i]),
            "accuracy": round(float(conf[i, i]) / int(support[i]), 6) if support[i] else "",
        }
        for i, name in enumerate(data.class_names)
    ]
    result = {
        "checkpoint": str(checkpoint.resolve(path)),
        "dataset": dataset,
        "split": split,
        f"{split}_loss": m.loss,
        f"{split}_top1": m.top1,
        f"{split}_top5": m.top5,
        "images": m.count,
    }
    if out_dir is None:
        out_dir = Path(path) if Path(path).is_dir() else Path(path).parent
    out_dir = Path(out_dir)
    write_csv(out_dir / f"per_class_{split}.csv", per_class)
    plot_confusion(
        conf.numpy(),
        data.class_names,
        out_dir / f"confusion_{split}.png",
        title=f"{dataset} {split}: top-1 {m.top1:.2%} ({m.count} images)",
    )
    write_json(out_dir / f"evaluation_{split}.json", result)
    result["files"] = [
        str(out_dir / f"{n}_{split}.{e}")
        for n, e in (("per_class", "csv"), ("confusion", "png"), ("evaluation", "json"))
    ]
    return result
