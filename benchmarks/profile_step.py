"""Where a training or inference step spends its time: torch.profiler, by operator.

    python benchmarks/profile_step.py --model eanet-cifar --precision bf16 --batch-size 128
    python benchmarks/profile_step.py --precision bf16 --timer dispatch   # by op and shapes

Runs the step `eanet train` / `eanet bench` run with the same options (train.step.train_step,
inference under inference mode and `runtime.autocast`), warm-up excluded, and prints the
operators by self CPU time; `--out FILE.json` also saves the table with the machine's
description (CPU model and flags). `--timer dispatch` instead times each operator call's
wall time from Python (a TorchDispatchMode), grouped by operator and its inputs' shapes and
dtypes: on the 2-core machines the profiler's self times of a training step added up to
about 1.6x the step's own wall time, these to about the step's time. Take profiles on a
quiet machine.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from eanet import accel
from eanet.data.augment import AugmentConfig
from eanet.errors import EANetError
from eanet.models.registry import create_model
from eanet.runtime import (
    autocast,
    environment,
    resolve_precision,
    set_threads,
    tune_cpu_allocator,
)
from eanet.train.config import TrainConfig
from eanet.train.step import make_optimizer, train_step


def make_step(cfg: TrainConfig, phase: str):
    """The training step or the inference pass of `eanet train` / `eanet bench`, on one batch."""
    set_threads(cfg.threads)
    tune_cpu_allocator()  # as `eanet train` and `eanet bench` do
    torch.manual_seed(0)
    dev = torch.device("cpu")
    model = create_model(cfg.model, **cfg.model_args)
    if cfg.accel:  # as `eanet train` and `eanet bench` do (--no-accel: the plain model)
        accel.apply(model, dev, cfg.precision)
    x = torch.randint(0, 256, (cfg.batch_size, *model.input_shape), dtype=torch.uint8)
    y = torch.randint(0, model.config.num_classes, (cfg.batch_size,))
    optimizer, aug = make_optimizer(model, cfg), AugmentConfig()
    precision = resolve_precision(cfg.precision, dev)

    def step() -> None:
        if phase == "train":
            train_step(model, optimizer, x, y, cfg, aug)
        else:
            with torch.inference_mode(), autocast(precision, dev):
                model.eval()(x)

    return step


def profile_step(step, steps: int) -> list[dict]:
    """Operator table (name, calls, self CPU ms per step, share) of `steps` profiled steps."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return _table(
        [(e.key, e.count, e.self_cpu_time_total / 1e6) for e in prof.key_averages()], steps
    )


def _table(entries: list[tuple[str, int, float]], steps: int) -> list[dict]:
    """Rows of (operator, calls, seconds) over `steps` steps, per step, largest share first."""
    total = sum(seconds for _, _, seconds in entries) or 1.0
    rows = [
        {
            "op": op,
            "calls_per_step": calls / steps,
            "self_ms_per_step": seconds * 1e3 / steps,
            "share": seconds / total,
        }
        for op, calls, seconds in entries
    ]
    return sorted(rows, key=lambda r: -r["share"])


def _describe(args) -> str:
    """The tensor arguments' shapes and dtypes, "nc" marking a non-contiguous one."""
    return " ".join(
        f"{tuple(a.shape)}{str(a.dtype).removeprefix('torch.')}{'' if a.is_contiguous() else ' nc'}"
        for a in args
        if isinstance(a, torch.Tensor)
    )


class _OpTimer(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.totals = collections.defaultdict(lambda: [0, 0.0])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        entry = self.totals[(str(func), _describe(args))]
        entry[0] += 1
        entry[1] += time.perf_counter() - t0
        return out


def time_ops(step, steps: int) -> list[dict]:
    """Operator table by operator and input shapes: calls and wall ms per step, share."""
    timer = _OpTimer()
    with timer:
        for _ in range(steps):
            step()
    entries = [(f"{op} {shapes}", calls, t) for (op, shapes), (calls, t) in timer.totals.items()]
    return _table(entries, steps)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="eanet-cifar")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--phase", choices=["train", "infer"], default="train")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int)
    p.add_argument("--top", type=int, default=25, help="operators to print")
    p.add_argument(
        "--timer",
        choices=["profiler", "dispatch"],
        default="profiler",
        help="torch.profiler's self times, or each call's wall time by operator and shapes",
    )
    p.add_argument("--out", type=Path, help="also write the table as JSON")
    args = p.parse_args()
    cfg = TrainConfig(
        model=args.model,
        batch_size=args.batch_size,
        precision=args.precision,
        threads=args.threads,
        device="cpu",
    )
    try:
        step = make_step(cfg, args.phase)
    except EANetError as exc:  # an unknown model or option: one line, exit 2
        p.error(str(exc))
    for _ in range(args.warmup):
        step()
    rows = (time_ops if args.timer == "dispatch" else profile_step)(step, args.steps)
    env = environment()
    print(
        f"{args.model} {args.phase} step, batch {args.batch_size}, {args.precision}, on "
        f"{env.get('cpu_model')} (flags: {' '.join(env['cpu_flags'])})"
    )
    width = 110 if args.timer == "dispatch" else 48
    print(f"{'operator':<{width}} {'calls':>6} {'ms/step':>9} {'share':>6}")
    for r in rows[: args.top]:
        print(
            f"{r['op'][:width]:<{width}} {r['calls_per_step']:>6.0f} "
            f"{r['self_ms_per_step']:>9.2f} {r['share']:>6.1%}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {"args": vars(args) | {"out": str(args.out)}, "environment": env, "ops": rows}
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
