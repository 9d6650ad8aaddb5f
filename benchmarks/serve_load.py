"""A bounded load test of `eanet serve`, with dynamic batching and without it.

Starts the server itself on 127.0.0.1 (a free port) as a subprocess, sends a fixed number of
POST /predict requests from N concurrent asyncio + httpx clients (a duration cap stops it
early), stops the server, and does the same again with `--max-batch 1` (every request its
own forward pass). Reports requests/s, images/s, p50/p95/p99 latency, errors and forward
passes; writes benchmarks/results/serve_load.json and serve_load.md:

    python benchmarks/serve_load.py                       # the reference EANet, random weights
    python benchmarks/serve_load.py --checkpoint runs/demo --requests 600 --concurrency 32
    python benchmarks/serve_load.py --precisions fp32 bf16 --compiled --out DIR

`--precisions` repeats the pair for each server `--precision`; `--compiled` adds a dynamic
batching run of each under `eanet serve --compile`.

The images are real CIFAR-100 test images (the slice shipped in the package) as PNG files.
The load generator runs on the same machine as the server and takes CPU from it.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from PIL import Image

from eanet import __version__, checkpoint
from eanet.data.cifar import SAMPLE_ARCHIVE, SAMPLE_MD5
from eanet.data.load import load_dataset
from eanet.fileio import write_json, write_text
from eanet.models.registry import create_model
from eanet.runtime import environment

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the real-server helper the tests use
from serve_helpers import server_process  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--checkpoint",
        help="run directory or checkpoint (default: reference EANet, "
        "random weights, CIFAR-100 classes)",
    )
    p.add_argument("--requests", type=int, default=400, help="timed requests per configuration")
    p.add_argument("--concurrency", type=int, default=16, help="concurrent clients")
    p.add_argument("--duration", type=float, default=60.0, help="cap in seconds per configuration")
    p.add_argument("--images-per-request", type=int, default=1)
    p.add_argument("--warmup", type=int, default=20, help="untimed requests first")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--threads", type=int, help="server torch threads (default: one per core)")
    p.add_argument(
        "--precisions",
        nargs="+",
        choices=["fp32", "bf16", "auto"],
        default=["fp32"],
        help="the server's --precision, one configuration pair each (default: fp32)",
    )
    p.add_argument(
        "--compiled",
        action="store_true",
        help="also each precision with `eanet serve --compile` (dynamic batching only)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return p.parse_args()


def sample_pngs(n: int = 64) -> list[bytes]:
    data = load_dataset("cifar100", SAMPLE_ARCHIVE, md5=SAMPLE_MD5, progress=False)
    out = []
    for img in data.test_images[:n]:
        buf = io.BytesIO()
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def reference_checkpoint(folder: Path) -> Path:
    """The reference eanet-cifar (361,380 parameters), random weights, CIFAR-100 names."""
    data = load_dataset("cifar100", SAMPLE_ARCHIVE, md5=SAMPLE_MD5, progress=False)
    torch.manual_seed(0)
    model = create_model("eanet-cifar")
    path = folder / "eanet-cifar-random.safetensors"
    checkpoint.save(path, model, {"class_names": data.class_names, "model_name": "eanet-cifar"})
    return path


async def load(url: str, pngs: list[bytes], args: argparse.Namespace, count: int) -> dict:
    """`count` requests from `args.concurrency` clients; latencies, errors, wall time."""
    limits = httpx.Limits(max_connections=args.concurrency)
    latencies: list[float] = []
    errors: list[str] = []
    issued = 0
    k = args.images_per_request
    t0 = time.perf_counter()
    deadline = t0 + args.duration

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal issued
        while issued < count and time.perf_counter() < deadline:
            i = issued
            issued += 1
            files = [
                ("file", (f"{j}.png", pngs[(i * k + j) % len(pngs)], "image/png")) for j in range(k)
            ]
            start = time.perf_counter()
            try:
                r = await c.post("/predict", files=files)
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:100]}")
                    continue
            except httpx.HTTPError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            latencies.append(time.perf_counter() - start)

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as c:
        await asyncio.gather(*(client(c) for _ in range(args.concurrency)))
    return {
        "latencies": latencies,
        "errors": errors,
        "seconds": time.perf_counter() - t0,
        "capped": issued < count,
    }


def measure(
    ckpt: Path,
    pngs: list[bytes],
    args: argparse.Namespace,
    max_batch: int,
    precision: str = "fp32",
    compiled: bool = False,
) -> dict:
    opts = ["--max-batch", str(max_batch), "--max-wait-ms", str(args.max_wait_ms)]
    opts += ["--precision", precision] + (["--compile"] if compiled else [])
    opts += ["--device", "cpu", "--max-images", str(max(64, args.images_per_request))]
    # every client connects from 127.0.0.1: the per-address limit must admit them all
    opts += ["--max-connections-per-ip", str(max(20, 2 * args.concurrency))]
    if args.threads:
        opts += ["--threads", str(args.threads)]
    with server_process(ckpt, *opts, timeout=600.0 if compiled else 120.0) as url:
        asyncio.run(load(url, pngs, args, args.warmup))
        before = httpx.get(f"{url}/health").json()
        r = asyncio.run(load(url, pngs, args, args.requests))
        after = httpx.get(f"{url}/health").json()
        info = httpx.get(f"{url}/info").json()
    threads = info["server"]["torch_threads"]
    lat = sorted(r["latencies"])
    q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else [0.0] * 99
    ok = len(lat)
    passes = after["batches_run"] - before["batches_run"]
    images = after["images_served"] - before["images_served"]
    return {
        "max_batch": max_batch,
        "requested_precision": precision,
        "precision": info["precision"],
        "bf16_from_images": info.get("bf16_from_images"),
        "compiled": info["compiled"],
        "max_wait_ms": args.max_wait_ms,
        "server_torch_threads": threads,
        "requests_ok": ok,
        "errors": len(r["errors"]),
        "error_samples": r["errors"][:5],
        "capped_by_duration": r["capped"],
        "seconds": round(r["seconds"], 2),
        "requests_per_s": round(ok / r["seconds"], 1),
        "images_per_s": round(ok * args.images_per_request / r["seconds"], 1),
        "p50_ms": round(q[49] * 1000, 1),
        "p95_ms": round(q[94] * 1000, 1),
        "p99_ms": round(q[98] * 1000, 1),
        "forward_passes": passes,
        "images_per_pass": round(images / passes, 1) if passes else 0.0,
    }


def _precision_cell(r: dict) -> str:
    """'bf16', 'auto: bf16 from 4 images, fp32 below', 'auto: fp32', ' + compile'."""
    cell = r.get("precision", "fp32")
    if r.get("requested_precision") == "auto":
        start = r.get("bf16_from_images")
        cell = f"auto: bf16 from {start} images, fp32 below" if start else f"auto: {cell}"
    return cell + (" + compile" if r.get("compiled") else "")


def table(rows: list[dict], args: argparse.Namespace, env: dict, model: str) -> str:
    lines = [
        f"`eanet serve` load test: {args.requests} requests x {args.images_per_request} "
        f"image(s), {args.concurrency} concurrent clients, --max-wait-ms {args.max_wait_ms}, "
        f"{rows[0]['server_torch_threads']} server torch thread(s); {model}; "
        f"{env.get('cpu_model', env['processor'])}, {env['cpu_count']} cores, "
        f"torch {env['torch']} CPU, eanet {__version__}; client and server on the same machine.",
        "",
        "| --precision | --max-batch | requests/s | images/s | p50 ms | p95 ms | p99 ms | errors "
        "| forward passes | images/pass |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {_precision_cell(r)} | {r['max_batch']} "
            f"| {r['requests_per_s']} | {r['images_per_s']} | {r['p50_ms']} | {r['p95_ms']} "
            f"| {r['p99_ms']} | {r['errors']} | {r['forward_passes']} | {r['images_per_pass']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    args = parse_args()
    pngs = sample_pngs()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.checkpoint) if args.checkpoint else reference_checkpoint(Path(tmp))
        model = str(args.checkpoint or "eanet-cifar (reference, random weights)")
        rows = []
        configs = [(p, b, False) for p in args.precisions for b in (args.max_batch, 1)]
        configs += [(p, args.max_batch, True) for p in args.precisions] if args.compiled else []
        for precision, max_batch, compiled in configs:
            name = f"--precision {precision}{' --compile' if compiled else ''}"
            print(f"{name} --max-batch {max_batch}: {args.requests} requests", file=sys.stderr)
            rows.append(measure(ckpt, pngs, args, max_batch, precision, compiled))
            print(json.dumps(rows[-1]), file=sys.stderr)
    env = environment()
    md = table(rows, args, env, model)
    result = {
        "settings": vars(args) | {"out": str(args.out)},
        "model": model,
        "rows": rows,
        "environment": env,
        "eanet_version": __version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    write_json(args.out / "serve_load.json", result)
    write_text(args.out / "serve_load.md", md)
    print(md)
    print(f"wrote {args.out / 'serve_load.json'} and serve_load.md")
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
