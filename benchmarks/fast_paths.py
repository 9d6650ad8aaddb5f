"""Which CPU fast path wins on this machine: each one against torch's own op, side by side.

    python benchmarks/fast_paths.py

Times the training step (batch 128, median of 5 after 2 warm-up) of EANet with the cheap
dropout masks (`models.fused.masked`) against torch's dropout, and of ViT with the explicit
attention + cheap masks against torch's fused attention (SDPA) with its own dropout, in
fp32 and bf16; prints one line per variant and writes benchmarks/results/cpu/<machine
class>/fast_paths.json with the CPU's model and flags. Take it on a quiet machine.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from eanet.data.augment import AugmentConfig
from eanet.models import layers
from eanet.models.layers import SelfAttention
from eanet.models.registry import create_model
from eanet.runtime import environment, tune_cpu_allocator
from eanet.train.config import TrainConfig
from eanet.train.step import make_optimizer, train_step

sys.path.insert(0, str(Path(__file__).parent))
from compare_reference import RESULTS, machine_class  # noqa: E402

VARIANTS = [  # (model, label, torch's dropout?, explicit attention?)
    ("eanet-cifar", "cheap masks", False, True),
    ("eanet-cifar", "torch dropout", True, True),
    ("vit-cifar", "explicit attention + cheap masks", False, True),
    ("vit-cifar", "SDPA + torch dropout", True, False),
]


def images_per_s(name: str, precision: str, native: bool, explicit: bool) -> float:
    real = layers.native_dropout
    layers.native_dropout = (lambda x: True) if native else real
    try:
        torch.manual_seed(0)
        model = create_model(name)
        for module in model.modules():
            if isinstance(module, SelfAttention):
                module.explicit_attention = explicit
        cfg = TrainConfig(model=name, precision=precision, device="cpu")
        optimizer, aug = make_optimizer(model, cfg), AugmentConfig()
        x = torch.randint(0, 256, (128, 3, 32, 32), dtype=torch.uint8)
        y = torch.randint(0, 100, (128,))
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            train_step(model, optimizer, x, y, cfg, aug)
            times.append(time.perf_counter() - t0)
        return 128 / statistics.median(times[2:])
    finally:
        layers.native_dropout = real


def main() -> int:
    tune_cpu_allocator()  # as `eanet train` does
    env = environment()
    rows = []
    for precision in ("fp32", "bf16"):
        for name, label, native, explicit in VARIANTS:
            rate = images_per_s(name, precision, native, explicit)
            rows.append({"model": name, "precision": precision, "variant": label, "img_s": rate})
            print(f"{name:<12} {precision}  {label:<34} {rate:7.1f} img/s", flush=True)
    out = RESULTS / "cpu" / machine_class(env) / "fast_paths.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    date = time.strftime("%Y-%m-%d")
    out.write_text(json.dumps({"date": date, "environment": env, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
