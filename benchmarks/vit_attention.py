"""ViT bf16 inference on the CPU: written-out attention in chunks of images against SDPA.

    python benchmarks/vit_attention.py

Times the applied ViT (batch 128, bf16 autocast, inference mode; median of 5 after one
warm-up) with `accel.modules.attention_in_chunks` at several chunk sizes, with torch's
SDPA in its place, and the plain model, in two alternating rounds in one process, and
prints images per second and the largest difference from the plain model's logits.
Take it on a quiet machine.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
import torch.nn.functional as F

from eanet import accel
from eanet.accel import modules
from eanet.models import create_model

CHUNKS = (1 << 19, 1 << 21, 1 << 23, 1 << 30)  # bytes of attention weights per chunk


def images_per_s(model: torch.nn.Module, x: torch.Tensor, runs: int = 5) -> float:
    def run() -> None:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)

    run()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return len(x) / statistics.median(times)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, scale=1.0)  # q is scaled already


def main() -> None:
    torch.manual_seed(0)
    x = torch.randint(0, 256, (128, 3, 32, 32), dtype=torch.uint8)
    model = create_model("vit-cifar").eval()
    accel.apply(model, "cpu", "bf16")  # also tunes the allocator, for both models
    plain = accel.restore(copy.deepcopy(model))
    chunked = modules.attention_in_chunks
    for _ in range(2):
        for size in CHUNKS:
            modules.CHUNK_BYTES = size
            print(f"chunks of {size >> 10} KB: {images_per_s(model, x):7.1f} img/s", flush=True)
        modules.attention_in_chunks = sdpa
        print(f"SDPA:  {images_per_s(model, x):7.1f} img/s", flush=True)
        modules.attention_in_chunks = chunked
        print(f"plain: {images_per_s(plain, x):7.1f} img/s", flush=True)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        diff = (model(x).float() - plain(x).float()).abs().max().item()
    print(f"largest logit difference from the plain model: {diff:.3g}")


if __name__ == "__main__":
    main()
