"""Which CPU fast path wins on this machine: each one against torch's own op, side by side.

    python benchmarks/fast_paths.py
    ATEN_CPU_CAPABILITY=avx2 python benchmarks/fast_paths.py --kernel-march haswell

Times the training step (batch 128, median of 5 after 2 warm-up) of EANet with the native
CPU kernels (`models.native`: double normalisation and dropout), with torch's ops and the
cheap dropout masks (`models.fused.keep_mask`), and with torch's dropout; of ViT with the
explicit attention + native masks, + cheap masks, and torch's fused attention (SDPA) with
its own dropout; in fp32 and bf16. Prints one line per variant and writes
benchmarks/results/cpu/<machine class>/fast_paths[-<march>].json with the CPU's model and
flags. `--kernel-march` builds the kernels for another CPU than this one (-march=...), and
torch's ATEN_CPU_CAPABILITY=avx2 makes torch run its AVX2 kernels: together, an AVX2
machine's code on this one. Take it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from eanet.data.augment import AugmentConfig
from eanet.models import layers, native
from eanet.models.layers import SelfAttention
from eanet.models.registry import create_model
from eanet.runtime import environment, tune_cpu_allocator
from eanet.train.config import TrainConfig
from eanet.train.step import make_optimizer, train_step

sys.path.insert(0, str(Path(__file__).parent))
from compare_reference import RESULTS, machine_class  # noqa: E402

VARIANTS = [  # (model, label, torch's dropout?, explicit attention?, native kernels?)
    ("eanet-cifar", "native kernels", False, True, True),
    ("eanet-cifar", "torch ops + cheap masks", False, True, False),
    ("eanet-cifar", "torch ops + torch dropout", True, True, False),
    ("vit-cifar", "explicit attention + native masks", False, True, True),
    ("vit-cifar", "explicit attention + cheap masks", False, True, False),
    ("vit-cifar", "SDPA + torch dropout", True, False, False),
]


def images_per_s(name: str, precision: str, torch_dropout: bool, explicit: bool) -> float:
    real = layers.native_dropout
    layers.native_dropout = (lambda x: True) if torch_dropout else real
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel-march", help="build the native kernels with -march=THIS")
    args = parser.parse_args()
    if args.kernel_march:
        native.FLAGS = tuple(
            f"-march={args.kernel_march}" if f == "-march=native" else f for f in native.FLAGS
        )
    tune_cpu_allocator()  # as `eanet train` does
    env = {**environment(), "kernel_flags": list(native.FLAGS)}
    rows = []
    for precision in ("fp32", "bf16"):
        for name, label, torch_dropout, explicit, kernels in VARIANTS:
            native.ENABLED["native"] = kernels
            rate = images_per_s(name, precision, torch_dropout, explicit)
            rows.append({"model": name, "precision": precision, "variant": label, "img_s": rate})
            print(f"{name:<12} {precision}  {label:<34} {rate:7.1f} img/s", flush=True)
    native.ENABLED["native"] = True
    suffix = f"-{args.kernel_march}" if args.kernel_march else ""
    out = RESULTS / "cpu" / machine_class(env) / f"fast_paths{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    date = time.strftime("%Y-%m-%d")
    record = {"date": date, "environment": env, "rows": rows}
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
