"""Which CPU fast path wins on this machine: each one against torch's own op, side by side.

    python benchmarks/fast_paths.py
    ATEN_CPU_CAPABILITY=avx2 python benchmarks/fast_paths.py --kernel-march haswell

Times the training step (batch 128, median of 5 after 2 warm-up) and inference (median of 10
after 2) of EANet and ViT: the plain model (`--no-accel`), and with `eanet.accel` applied:
with the native CPU kernels (`accel.native`: double normalisation, GELU, LayerNorm with
the residual add, dropout), with them but torch's LayerNorm and adds, with torch's ops and
the cheap dropout masks (`accel.fused.keep_mask`), and with torch's dropout (for ViT:
torch's fused attention, SDPA, with its own dropout); in fp32 and bf16 (the LayerNorm
kernel runs in bf16 only). Prints one line per variant and writes
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
from torch import nn

from eanet import accel
from eanet.accel import modules, native
from eanet.data.augment import AugmentConfig
from eanet.errors import one_line
from eanet.models.registry import create_model
from eanet.runtime import autocast, environment, tune_cpu_allocator
from eanet.train.config import TrainConfig
from eanet.train.step import make_optimizer, train_step

sys.path.insert(0, str(Path(__file__).parent))
from compare_reference import RESULTS, machine_class  # noqa: E402

# (model, label, accel applied?, torch's dropout?, native kernels?, LayerNorm kernel?)
VARIANTS = [
    ("eanet-cifar", "accel: native kernels", True, False, True, True),
    ("eanet-cifar", "accel: native, torch's LayerNorm", True, False, True, False),
    ("eanet-cifar", "accel: torch ops + cheap masks", True, False, False, False),
    ("eanet-cifar", "accel: torch ops + torch dropout", True, True, False, False),
    ("eanet-cifar", "plain model (--no-accel)", False, False, False, False),
    ("vit-cifar", "accel: explicit attn + native kernels", True, False, True, True),
    ("vit-cifar", "accel: explicit attn + native, torch LN", True, False, True, False),
    ("vit-cifar", "accel: explicit attn + cheap masks", True, False, False, False),
    ("vit-cifar", "accel: SDPA + torch dropout", True, True, False, False),
    ("vit-cifar", "plain model (--no-accel)", False, False, False, False),
]


def median_s(fn, runs: int, warmup: int = 2) -> float:
    times = []
    for _ in range(warmup + runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[warmup:])


def images_per_s(
    name: str, precision: str, applied: bool, torch_dropout: bool, fused_norm: bool
) -> tuple[float, float]:
    """(training step, inference) images/s of one variant."""
    real = modules.torch_dropout
    modules.torch_dropout = (lambda x: True) if torch_dropout else real
    try:
        torch.manual_seed(0)
        model = create_model(name)
        if applied:
            accel.apply(model, "cpu", precision)
        if not fused_norm and isinstance(model.blocks, modules.FusedBlocks):
            model.blocks.__class__ = nn.Sequential  # each add and LayerNorm by torch
        cfg = TrainConfig(model=name, precision=precision, device="cpu", accel=applied)
        optimizer, aug = make_optimizer(model, cfg), AugmentConfig()
        x = torch.randint(0, 256, (128, 3, 32, 32), dtype=torch.uint8)
        y = torch.randint(0, 100, (128,))
        train = median_s(lambda: train_step(model, optimizer, x, y, cfg, aug), 5)

        @torch.inference_mode()
        def infer() -> None:
            with autocast(precision, x.device):
                model(x)

        model.eval()
        return 128 / train, 128 / median_s(infer, 10)
    finally:
        modules.torch_dropout = real


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
        for name, label, applied, torch_dropout, kernels, fused_norm in VARIANTS:
            native.ENABLED["native"] = kernels
            row = {"model": name, "precision": precision, "variant": label}
            try:
                rate, infer = images_per_s(name, precision, applied, torch_dropout, fused_norm)
            except RuntimeError as exc:  # e.g. torch's bf16 ViT under ATEN_CPU_CAPABILITY=avx2
                rows.append({**row, "error": one_line(exc)})
                print(f"{name:<12} {precision}  {label:<36} failed: {one_line(exc)}", flush=True)
                continue
            rows.append({**row, "img_s": rate, "infer_img_s": infer})
            print(
                f"{name:<12} {precision}  {label:<36} train {rate:7.1f}  infer {infer:7.1f} img/s",
                flush=True,
            )
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
