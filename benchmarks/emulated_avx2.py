"""`eanet bench` as an AVX2-only CPU would run it, on a newer one: one JSON line.

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 \
        python benchmarks/emulated_avx2.py eanet-cifar fp32

torch's AVX2 kernels (ATEN_CPU_CAPABILITY), oneDNN capped at AVX2 (ONEDNN_MAX_CPU_ISA) and
the native kernels built with -march=haswell (into their own cache, EANET_KERNELS, if you
set one): the training step and inference of `eanet bench` (batch 128, median of 5 after
2 warm-up). To compare two versions side by side, run it alternately with
PYTHONPATH=<checkout>/src for each (and a kernel cache per checkout), as docs/speed.md
records for 2026-12-05.
"""

from __future__ import annotations

import argparse
import json

import eanet.accel.native as native
from eanet.bench import bench_model
from eanet.train.config import TrainConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="registered model, e.g. eanet-cifar")
    parser.add_argument("precision", choices=("fp32", "bf16", "auto"))
    args = parser.parse_args()
    native.FLAGS = tuple("-march=haswell" if f == "-march=native" else f for f in native.FLAGS)
    cfg = TrainConfig(model=args.model, precision=args.precision)
    r = bench_model(cfg, warmup=2, steps=5, peak=1.0, peak_bf16=1.0)
    row = {"model": args.model, "precision": r.precision, "train_img_s": r.train_img_s}
    row |= {"infer_img_s": r.infer_img_s, "kernels": r.native_kernels}
    print(json.dumps(row))


if __name__ == "__main__":
    main()
