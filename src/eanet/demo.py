"""The offline demo: the whole pipeline on the real CIFAR-100 slice shipped in the package."""

from __future__ import annotations

from pathlib import Path

import torch

from eanet import checkpoint
from eanet.data.cifar import SAMPLE_ARCHIVE, SAMPLE_MD5
from eanet.data.load import load_dataset
from eanet.evaluate import evaluate_checkpoint
from eanet.inference import predict_logits
from eanet.runtime import resolve_device
from eanet.train.config import TrainConfig
from eanet.train.loop import fit

DEMO_EPOCHS = 4


def run_demo(
    out: str | Path,
    epochs: int = DEMO_EPOCHS,
    show: int = 8,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
) -> dict:
    """Train the reference EANet on the slice, evaluate it, and predict `show` test images.

    Returns the test metrics, the evaluation files and the predictions (with real names).
    """
    out = Path(out)
    cfg = TrainConfig(
        dataset="cifar100",
        data_path=str(SAMPLE_ARCHIVE),
        md5=SAMPLE_MD5,
        epochs=epochs,
        seed=seed,
        device=device,
    )
    data = load_dataset("cifar100", SAMPLE_ARCHIVE, md5=SAMPLE_MD5, progress=progress)
    metrics = fit(cfg, out, data=data, overwrite=True, progress=progress)
    evaluation = evaluate_checkpoint(out, device=device, progress=progress, data=data)
    model, ckpt = checkpoint.load_model(out, resolve_device(device))
    probs = predict_logits(model, data.test_images[:show]).softmax(dim=1)
    top = probs.topk(3, dim=1)
    names = ckpt.class_names
    predictions = [
        {
            "test_index": i,
            "true": names[int(data.test_labels[i])],
            "top3": [
                (names[int(c)], float(p))
                for p, c in zip(top.values[i], top.indices[i], strict=True)
            ],
        }
        for i in range(len(probs))
    ]
    return {
        "run_dir": str(out),
        "metrics": metrics,
        "evaluation": evaluation,
        "predictions": predictions,
        "chance_top1": 1 / len(names),
        "train_images": int(len(data.train_images)),
        "torch_threads": torch.get_num_threads(),
    }
