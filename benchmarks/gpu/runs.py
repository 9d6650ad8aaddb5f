"""Run `eanet train` / `eanet bench` configurations in this process and record them as JSON.

Used by benchmarks/gpu/run.sh. Each `--run` is one configuration; the options after `--`
are shared by all of them. Every finished (or failed) configuration is appended to the
JSON list at once, so a step killed by its time limit keeps what it had measured.

    python benchmarks/gpu/runs.py recipe --json OUT/recipe.json --runs OUT/runs \\
        --run eanet-cifar,bf16,max-autotune --run eanet-cifar,fp32-tf32,none \\
        -- --dataset synthetic --device cuda
    python benchmarks/gpu/runs.py bench --json OUT/bench.json \\
        --run eanet-cifar,bf16,128,none -- --device cuda --steps 20 --warmup 5
    python benchmarks/gpu/runs.py best-mode OUT/compile_modes.json

A run's precision is `fp32`, `bf16` or `fp32-tf32` (fp32 with TF32 matmuls and
convolutions allowed, which `eanet` itself never turns on in fp32); its compile mode is
`none` (eager) or one of torch.compile's modes (`--compile --compile-mode MODE`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shlex
import statistics
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve()


def _append(path: Path, record: dict) -> None:
    rows = json.loads(path.read_text()) if path.exists() else []
    rows.append(record)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=2) + "\n")
    tmp.replace(path)


@contextlib.contextmanager
def _tf32(enabled: bool):
    """fp32-tf32 runs: TF32 matmuls/convolutions on CUDA for the duration of one run."""
    import torch

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if enabled:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@contextlib.contextmanager
def _fresh_compile_caches(where: Path):
    """A cold compile per run: its own inductor/Triton cache directories, dynamo reset."""
    import torch

    saved = {k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(where / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(where / "triton")
    torch._dynamo.reset()
    try:
        yield
    finally:
        torch._dynamo.reset()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _model_flags(model: str, precision: str, mode: str) -> list[str]:
    flags = ["--model", model, "--precision", "fp32" if precision == "fp32-tf32" else precision]
    if mode != "none":
        flags += ["--compile", "--compile-mode", mode]
    return flags


def _device_name(device: str) -> str:
    import torch

    from eanet.runtime import cpu_info

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return cpu_info()[0] or "cpu"


def _this_command(kind: str, json_path: Path, run: str, common: list[str], extra: list) -> str:
    argv = [sys.executable, str(HERE), kind, "--json", str(json_path), *extra, "--run", run]
    return shlex.join([*argv, "--", *common])


def _option(argv: list[str], name: str, default: str) -> str:
    return argv[argv.index(name) + 1] if name in argv else default


def recipe(args: argparse.Namespace) -> int:
    """Time `eanet train` end to end per run: wall seconds, per-epoch img/s from its history."""
    import torch

    from eanet.cli.main import main

    failures = 0
    for run in args.run:
        model, precision, mode = run.split(",")
        label = f"{model}-{precision}-{mode}"
        out = args.runs / label
        argv = ["train", *args.common, *_model_flags(model, precision, mode)]
        argv += ["--out", str(out), "--overwrite", "--no-progress"]
        record = {"model": model, "precision": precision, "compile_mode": mode}
        t0 = time.perf_counter()
        with _fresh_compile_caches(args.runs / f"{label}-caches"), _tf32(precision == "fp32-tf32"):
            rc = _call(main, argv, record)
        record["seconds"] = round(time.perf_counter() - t0, 3)
        record.update(_history_figures(out))
        record.update(
            rc=rc,
            device=args.common_device,
            device_name=_device_name(args.common_device),
            torch_version=torch.__version__,
            tf32=args.common_device.startswith("cuda") and precision in ("bf16", "fp32-tf32"),
            eanet_command=shlex.join(["eanet", *argv]),
            command=_this_command(
                "recipe", args.json, run, args.common, ["--runs", str(args.runs)]
            ),
        )
        _append(args.json, record)
        print(f"recipe {label}: rc {rc}, {record['seconds']:.1f} s", flush=True)
        failures += rc != 0
    return 1 if failures else 0


def _call(main, argv: list[str], record: dict) -> int:
    """`eanet ARGV` in this process; an exception becomes rc 1 and its text in `record`."""
    try:
        rc = main(argv)
    except BaseException as exc:  # noqa: BLE001 - recorded, then the next run goes on
        if isinstance(exc, KeyboardInterrupt):
            raise
        record["error"] = "".join(traceback.format_exception_only(exc)).strip()[-2000:]
        return 1
    return rc


def _history_figures(out: Path) -> dict:
    """Epochs done and train img/s (median over epochs after the first, which compiles)."""
    path = out / "history.json"
    if not path.exists():
        return {"epochs": 0}
    rows = json.loads(path.read_text())
    rates = [r["train_images_per_s"] for r in rows]
    steady = rates[1:] or rates
    return {
        "epochs": len(rows),
        "train_img_s": statistics.median(steady) if steady else None,
        "first_epoch_seconds": rows[0]["epoch_seconds"] if rows else None,
        "train_seconds": round(sum(r["train_seconds"] for r in rows), 3),
        "epoch_seconds_median": statistics.median(r["epoch_seconds"] for r in rows[1:] or rows),
        "final_val_top1": rows[-1]["val_top1"] if rows else None,
    }


def bench(args: argparse.Namespace) -> int:
    """`eanet bench --json` per run; records the command, its compile mode and the result."""
    from eanet.cli.main import main

    failures = 0
    for run in args.run:
        model, precision, batch, mode = run.split(",")
        argv = ["bench", *_model_flags(model, precision, mode), "--batch-size", batch]
        argv += [*args.common, "--json"]
        record: dict = {"model": model, "precision": precision, "batch_size": int(batch)}
        record["compile_mode"] = mode
        stdout = io.StringIO()
        with (
            _fresh_compile_caches(args.json.parent / "bench-caches"),
            _tf32(precision == "fp32-tf32"),
            contextlib.redirect_stdout(stdout),
        ):
            rc = _call(main, argv, record)
        record["rc"] = rc
        if rc == 0:
            record["result"] = json.loads(stdout.getvalue())
        record["eanet_command"] = shlex.join(["eanet", *argv])
        record["command"] = _this_command("bench", args.json, run, args.common, [])
        _append(args.json, record)
        img_s = record.get("result", {}).get("train_img_s")
        print(f"bench {run}: rc {rc}, train {img_s} img/s", flush=True)
        failures += rc != 0
    return 1 if failures else 0


def best_mode(path: Path) -> str:
    """The compile mode of the fastest successful training step in a bench JSON, or 'default'."""
    rows = json.loads(path.read_text()) if path.exists() else []
    done = [r for r in rows if r.get("rc") == 0 and r.get("compile_mode") != "none"]
    if not done:
        return "default"
    return max(done, key=lambda r: r["result"]["train_img_s"])["compile_mode"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    common: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, common = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="kind", required=True)
    r = sub.add_parser("recipe")
    r.add_argument("--json", type=Path, required=True)
    r.add_argument("--runs", type=Path, required=True, help="run directories go here")
    r.add_argument("--run", action="append", required=True, help="MODEL,PRECISION,MODE")
    b = sub.add_parser("bench")
    b.add_argument("--json", type=Path, required=True)
    b.add_argument("--run", action="append", required=True, help="MODEL,PRECISION,BATCH,MODE")
    m = sub.add_parser("best-mode")
    m.add_argument("path", type=Path)
    args = p.parse_args(argv)
    args.common = common
    args.common_device = _option(common, "--device", "auto")
    if args.kind == "best-mode":
        print(best_mode(args.path))
        return 0
    args.json.parent.mkdir(parents=True, exist_ok=True)
    return recipe(args) if args.kind == "recipe" else bench(args)


if __name__ == "__main__":
    sys.exit(main())
