"""The Fashion-MNIST results: named training runs on the full 60,000/10,000, resumable.

Each experiment is one `eanet train --dataset fashion-mnist ...` run in RUNS/NAME. After
every call its record, benchmarks/results/fashion-mnist/NAME.json, is rewritten from the run
directory: the command, the history (validation top-1/top-5 and seconds per epoch), the
test figures, minutes until validation top-1 first reached 90% and 92%, and on which
machine (CPU class, threads) which epochs ran.

    python benchmarks/fashion_mnist.py --list
    python benchmarks/fashion_mnist.py reference eanet-s0 vit-s0   # run (or go on with) these
    python benchmarks/fashion_mnist.py --record-only reference     # rewrite the JSON only
    python benchmarks/fashion_mnist.py --idle eanet-fast           # nothing else running

Killed at any point, the same command goes on from the last complete epoch
(`--auto-resume`). A `curve` experiment (constant learning rate only, where extending a run
is the same run) trains one epoch per call, so that the test top-1 and top-5 of every
epoch's weights are recorded too.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from compare_reference import machine_class  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "fashion-mnist"
THRESHOLDS = (0.90, 0.92)


@dataclass(frozen=True)
class Experiment:
    what: str
    args: str  # `eanet train` options beside --dataset, --epochs and --out
    epochs: int
    curve: bool = False  # one call per epoch, test figures of every epoch


def _seeds(name: str, what: str, args: str, epochs: int = 10, curve: bool = True) -> dict:
    return {
        f"{name}-s{s}": Experiment(f"{what}, seed {s}", f"{args} --seed {s}", epochs, curve)
        for s in (0, 1)
    }


NO_DROPOUT = "--model-arg attn_drop=0 --model-arg proj_drop=0 --model-arg mlp_drop=0"
FAST_WHAT = "eanet-fashion without dropout or augmentation, lr 3e-3 warm-up + cosine: time to 90%"
FAST = (
    f"--model eanet-fashion {NO_DROPOUT} --augment none --lr 3e-3 --lr-schedule cosine"
    " --warmup-fraction 0.05"
)
EXPERIMENTS: dict[str, Experiment] = {
    "reference": Experiment(
        "the reference model and recipe unchanged (eanet-cifar on padded 32x32 RGB)",
        "--model eanet-cifar",
        10,
        curve=True,
    ),
    **_seeds("eanet", "eanet-fashion, reference recipe", "--model eanet-fashion"),
    **_seeds("vit", "vit-fashion, reference recipe", "--model vit-fashion"),
    **_seeds(
        "eanet-bug",
        "eanet-fashion, reference recipe with the reference's augmentation order",
        "--model eanet-fashion --augment reference-bug",
    ),
    "eanet-modern": Experiment(
        "eanet-fashion, the modern recipe (cosine over the run's epochs)",
        "--model eanet-fashion --recipe modern",
        10,
    ),
    "eanet-fast": Experiment(FAST_WHAT, FAST, 5),
    "eanet-fast-s1": Experiment(f"{FAST_WHAT}, seed 1", f"{FAST} --seed 1", 5),
    "eanet-best": Experiment(
        "eanet-fashion without dropout, crop-flip, lr 3e-3 warm-up + cosine, weight decay 0.05",
        f"--model eanet-fashion {NO_DROPOUT} --augment crop-flip --lr 3e-3 --lr-schedule cosine"
        " --warmup-fraction 0.05 --weight-decay 0.05 --weight-decay-params matrices",
        20,
    ),
}


def machine() -> dict:
    """CPU class and model of this machine (the classes of benchmarks/compare_reference.py)."""
    from eanet.runtime import environment

    env = environment()
    return {
        "class": machine_class(env),
        "cpu_model": env.get("cpu_model"),
        "cpu_count": env["cpu_count"],
        "torch": env["torch"],
    }


def train_command(exp: Experiment, out: Path, epochs: int, threads: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "eanet", "train", "--dataset", "fashion-mnist"]
    cmd += shlex.split(exp.args)
    cmd += ["--epochs", str(epochs), "--out", str(out), "--auto-resume", "--no-progress"]
    return cmd + (["--threads", str(threads)] if threads else [])


def _read(path: Path, default: object) -> object:
    return json.loads(path.read_text()) if path.exists() else default


def epochs_done(out: Path) -> int:
    return len(_read(out / "history.json", []))


def first_reached(history: list[dict], threshold: float) -> dict | None:
    """Epoch and cumulative minutes (training + validation) when val top-1 first >= threshold."""
    seconds = 0.0
    for row in history:
        seconds += row["epoch_seconds"]
        if (row.get("val_top1") or 0.0) >= threshold:
            return {"epoch": row["epoch"], "minutes": round(seconds / 60, 2)}
    return None


def record(name: str, exp: Experiment, out: Path, segments: list[dict]) -> dict:
    """The experiment's JSON, from its run directory and the calls made so far."""
    history = _read(out / "history.json", [])
    rec = {
        "experiment": name,
        "what": exp.what,
        "command": "python benchmarks/fashion_mnist.py " + name,
        "train_args": exp.args,
        "epochs_planned": exp.epochs,
        "epochs_done": len(history),
        "history": history,
        "test": _read(out / "metrics.json", None),
        "reached": {f"{t:.2f}": first_reached(history, t) for t in THRESHOLDS},
        "segments": segments,
    }
    if exp.curve:
        rec["test_per_epoch"] = _read(out / "test_per_epoch.json", [])
    return rec


def run(name: str, args: argparse.Namespace, mach: dict) -> None:
    exp = EXPERIMENTS[name]
    out = Path(args.runs) / name
    path = RESULTS / f"{name}.json"
    segments = _fresh_segments(name, _read(path, {}).get("segments", []), out)
    segments += _unrecorded(out, segments)
    if exp.curve and epochs_done(out) and not args.record_only:
        _append_test(out)  # a call killed between its last epoch and its test
    target = args.epochs or exp.epochs
    steps = range(epochs_done(out) + 1, target + 1) if exp.curve else [target]
    for epochs in [] if args.record_only else steps:
        before, t0 = epochs_done(out), time.time()
        cmd = train_command(exp, out, epochs, args.threads)
        print(f"[{name}] {' '.join(cmd[2:])}", flush=True)
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            sys.exit(f"[{name}] training failed; the same command goes on from the last epoch")
        if exp.curve:
            _append_test(out)
        segments.append(
            {
                "epochs": [before + 1, epochs_done(out)],
                "wall_seconds": round(time.time() - t0, 1),
                "threads": args.threads,
                "idle": args.idle,
                "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                **mach,
            }
        )
        _write(path, record(name, exp, out, segments))
    _write(path, record(name, exp, out, segments))


def _covered(segments: list[dict]) -> int:
    """The last epoch the recorded calls account for."""
    return max((seg["epochs"][1] for seg in segments), default=0)


def _fresh_segments(name: str, segments: list[dict], out: Path) -> list[dict]:
    """The record's calls, unless they cover epochs the run directory no longer holds (the
    directory was deleted or the record came from another machine): the run starts over."""
    covered, done = _covered(segments), epochs_done(out)
    if covered <= done:
        return segments
    print(
        f"[{name}] the record covers {covered} epochs, {out} holds {done}:"
        " the run starts over and its record is rewritten",
        flush=True,
    )
    return []


def _unrecorded(out: Path, segments: list[dict]) -> list[dict]:
    """Epochs of a call killed before its record: their machine, from the run's config.json
    (rewritten by every `eanet train` that starts or resumes the run)."""
    covered = _covered(segments)
    if epochs_done(out) <= covered:
        return []
    env = _read(out / "config.json", {}).get("environment", {})
    return [
        {
            "epochs": [covered + 1, epochs_done(out)],
            "threads": env.get("torch_threads"),
            "idle": False,
            "class": machine_class(env),
            "cpu_model": env.get("cpu_model"),
            "cpu_count": env.get("cpu_count"),
            "torch": env.get("torch"),
            "from": "config.json: the call was killed before it recorded them",
        }
    ]


def _append_test(out: Path) -> None:
    """Record the test figures of the last epoch's weights, unless they are: from the run's
    metrics.json when it tested that epoch, else from `eanet evaluate` of the run."""
    done, saved = epochs_done(out), _read(out / "test_per_epoch.json", [])
    if any(r["epoch"] == done for r in saved):
        return
    metrics = _read(out / "metrics.json", {})
    if metrics.get("epochs") != done:  # the call was killed between the epoch and its test
        cmd = [sys.executable, "-m", "eanet", "evaluate", str(out), "--json", "--no-progress"]
        metrics = json.loads(subprocess.run(cmd, cwd=ROOT, capture_output=True, check=True).stdout)
    rows = [r for r in saved if r["epoch"] < done]
    rows.append({"epoch": done, **{k: metrics[k] for k in ("test_top1", "test_top5")}})
    (out / "test_per_epoch.json").write_text(json.dumps(rows, indent=1))


def _write(path: Path, rec: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=1) + "\n")
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="experiments to run, in order (see --list)")
    parser.add_argument("--list", action="store_true", help="list the experiments")
    parser.add_argument("--runs", default="runs/fashion-mnist", help="run directories' parent")
    parser.add_argument("--epochs", type=int, help="epochs (default: the experiment's)")
    parser.add_argument("--threads", type=int, help="torch threads (default: one per core)")
    parser.add_argument("--record-only", action="store_true", help="only rewrite the JSON")
    parser.add_argument(
        "--idle",
        action="store_true",
        help="record that nothing else ran on the machine (its minutes are timings)",
    )
    args = parser.parse_args()
    unknown = [n for n in args.names if n not in EXPERIMENTS]
    if args.list or not args.names or unknown:
        for name, exp in EXPERIMENTS.items():
            print(f"{name:14s} {exp.epochs:3d} epochs  {exp.what}")
        sys.exit(f"unknown experiment(s): {', '.join(unknown)}" if unknown else 0)
    mach = machine()
    for name in args.names:
        run(name, args, mach)


if __name__ == "__main__":
    main()
