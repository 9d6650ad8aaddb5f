"""`eanet evaluate`: loss, top-1/top-5, per-class accuracy and confusion matrix of a checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

from eanet import checkpoint
from eanet.data.dataset import ImageData
from eanet.data.load import load_dataset
from eanet.data.splits import train_val_split
from eanet.errors import ConfigError
from eanet.fileio import write_csv, write_json
from eanet.inference import Runtime, predict_logits
from eanet.metrics import confusion_matrix, metrics_from_logits
from eanet.plots import plot_confusion

log = logging.getLogger(__name__)


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
    precision: str = "fp32",
    weights: str = "last",
    compile: bool = False,
    accel: bool = True,
) -> dict:
    """Evaluate a checkpoint on a split of its data set; write per-class CSV and confusion PNG.

    The data set defaults to the one the checkpoint was trained on (from its train config);
    `data` skips loading when the caller already holds it. `weights`: a run's last, best or
    EMA weights (`checkpoint.load_model`); the files of best/EMA are named with a suffix.
    `compile`: the forward pass under torch.compile (`inference.compiled_forward`).
    `accel`: the faster equivalents of the model's layers (`eanet.accel.apply`).
    """
    rt = Runtime.resolve(device, precision, accel, compile)
    model, ckpt = checkpoint.load_model(path, rt.device, weights)
    train_cfg = ckpt.meta.train_config or {}
    dataset = dataset or train_cfg.get("dataset", "cifar100")
    if data_path is None and dataset == train_cfg.get("dataset"):
        data_path = train_cfg.get("data_path")
        md5 = md5 or train_cfg.get("md5")
        verify = train_cfg.get("verify", True) if verify is None else verify
    if data is None:
        verify = True if verify is None else verify
        # A folder is resized to the size the model was trained at; fashion-mnist comes as
        # the model's channels (grey 28x28, or padded to RGB 32x32).
        size = model.config.image_size if dataset == "folder" else None
        shape = {"image_size": size, "channels": model.config.in_chans}
        data = load_dataset(dataset, data_path, md5=md5, verify=verify, progress=progress, **shape)
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
    runner = rt.prepare(model).runner
    logits = predict_logits(runner, images, batch_size, progress, f"eval {split}", rt.precision)
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
        "checkpoint": str(checkpoint.resolve(path, "best" if weights == "best" else "last")),
        "weights": weights,
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
    tag = split if weights == "last" else f"{split}_{weights}"  # last: the names as before
    write_csv(out_dir / f"per_class_{tag}.csv", per_class)
    plot_confusion(
        conf.numpy(),
        data.class_names,
        out_dir / f"confusion_{tag}.png",
        title=f"{dataset} {tag}: top-1 {m.top1:.2%} ({m.count} images)",
    )
    write_json(out_dir / f"evaluation_{tag}.json", result)
    result["files"] = [
        str(out_dir / f"{n}_{tag}.{e}")
        for n, e in (("per_class", "csv"), ("confusion", "png"), ("evaluation", "json"))
    ]
    return result
