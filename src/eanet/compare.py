"""Compare models and augmentation orders under one recipe and the same seeds.

`run_compare` trains every model x augmentation order x seed with `train.fit`, each run in
`OUT/runs/<model>-<augment>-seed<k>/`, then writes `OUT/report.md`, `OUT/report.json` and
the figures (`eanet.compare_plots`). A run is finished when its `metrics.json` exists: a
second call with the same OUT skips it, and resumes an interrupted one from its checkpoint.
Speed comes from `eanet.bench.bench_model` (a few steps, cached in `OUT/bench.json`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shlex
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from eanet import __version__, checkpoint
from eanet.augment import AugmentConfig
from eanet.bench import bench_model, macs_per_image, matmul_peak_gflops
from eanet.data import ImageData, train_val_split
from eanet.errors import ConfigError, EANetError
from eanet.fileio import read_json, write_json, write_text
from eanet.models import MODELS, count_parameters
from eanet.runtime import environment, resolve_device, set_threads
from eanet.train import (
    AUGMENT_MODES,
    TrainConfig,
    build_for_data,
    fit,
    forward_train,
    load_data,
)

log = logging.getLogger(__name__)

# TrainConfig fields that may differ between calls without changing a run's results.
_NOT_RESULTS = ("data_path", "md5", "verify", "device", "threads")
# Per-seed figures summarised as mean +- std (fractions, except losses and seconds).
SEED_FIELDS = (
    "best_val_top1",
    "final_val_top1",
    "best_val_top5",
    "final_val_top5",
    "test_top1",
    "test_top5",
    "test_loss",
    "final_train_loss",
    "final_train_top1",
    "first_val_loss",
    "min_val_loss",
    "final_val_loss",
    "train_seconds",
)
CURVE_FIELDS = ("train_loss", "val_loss", "train_top1", "val_top1")
HIST_IMAGES = 256  # training images whose first-layer inputs are histogrammed


@dataclass
class CompareConfig:
    """What to compare and the one recipe all runs share (TrainConfig's defaults otherwise)."""

    models: list[str] = field(default_factory=lambda: ["eanet-cifar", "vit-cifar"])
    dataset: str = "cifar100"
    data_path: str | None = None
    md5: str | None = None
    verify: bool = True
    epochs: int = 50
    seeds: int = 1  # runs per model and order, seeds 0..seeds-1
    model_args: dict = field(default_factory=dict)  # overrides applied to every model
    augment_orders: list[str] = field(default_factory=lambda: ["fixed"])
    batch_size: int = 128
    lr: float = 1e-3
    val_fraction: float = 0.2
    image_size: int | None = None
    bench_steps: int = 3  # timed steps per model for img/s; 0 skips the speed measurement
    device: str = "auto"
    threads: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first impossible option."""
        if not self.models:
            raise ConfigError("--models is empty; name at least one model, e.g. eanet-cifar")
        for name in self.models:
            if name not in MODELS:
                raise ConfigError(f"--models {name!r} is unknown; choose from {', '.join(MODELS)}")
        _no_duplicates("--models", self.models)
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
            raise ConfigError(f"--seeds {self.seeds!r} must be a positive integer (runs per model)")
        if not self.augment_orders:
            raise ConfigError("--augment-orders is empty; name at least one, e.g. fixed")
        for order in self.augment_orders:
            if order not in AUGMENT_MODES:
                raise ConfigError(
                    f"--augment-orders {order!r} is unknown; choose from {', '.join(AUGMENT_MODES)}"
                )
        _no_duplicates("--augment-orders", self.augment_orders)
        if not isinstance(self.bench_steps, int) or self.bench_steps < 0:
            raise ConfigError(f"--bench-steps {self.bench_steps!r} must be >= 0 (0: no timing)")
        self.train_config(self.models[0], self.augment_orders[0], 0)  # the recipe's own checks

    def train_config(self, model: str, augment: str, seed: int) -> TrainConfig:
        """The TrainConfig of one run: the shared recipe with this model, order and seed."""
        return TrainConfig(
            model=model,
            model_args=dict(self.model_args),
            dataset=self.dataset,
            data_path=self.data_path,
            md5=self.md5,
            verify=self.verify,
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            val_fraction=self.val_fraction,
            augment=augment,
            seed=seed,
            device=self.device,
            threads=self.threads,
            image_size=self.image_size,
        )

    def runs(self) -> list[tuple[str, str, int]]:
        """(model, augment order, seed) of every run, in the order they are trained."""
        return [
            (m, a, s) for m in self.models for a in self.augment_orders for s in range(self.seeds)
        ]

    def command(self, out: str | Path) -> str:
        """The `eanet compare` command line that reproduces this comparison."""
        parts = ["eanet", "compare", "--models", *self.models, "--dataset", self.dataset]
        if self.data_path:
            parts += ["--data-path", str(self.data_path)]
        if self.md5:
            parts += ["--md5", self.md5]
        if not self.verify:
            parts.append("--no-verify")
        parts += ["--epochs", str(self.epochs), "--seeds", str(self.seeds)]
        for key, value in self.model_args.items():
            text = value if isinstance(value, str) else json.dumps(value)
            parts += ["--model-arg", f"{key}={text}"]
        parts += ["--augment-orders", *self.augment_orders]
        parts += ["--batch-size", str(self.batch_size), "--lr", str(self.lr)]
        parts += ["--val-fraction", str(self.val_fraction)]
        if self.image_size is not None:
            parts += ["--image-size", str(self.image_size)]
        parts += ["--bench-steps", str(self.bench_steps)]
        if self.device != "auto":
            parts += ["--device", self.device]
        if self.threads is not None:
            parts += ["--threads", str(self.threads)]
        parts += ["--out", str(out)]
        return shlex.join(parts)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _no_duplicates(option: str, values: list[str]) -> None:
    seen = set()
    for v in values:
        if v in seen:
            raise ConfigError(f"{option} lists {v!r} twice; name each once")
        seen.add(v)


def run_name(model: str, augment: str, seed: int) -> str:
    """The directory name of one run under OUT/runs/."""
    return f"{model}-{augment}-seed{seed}"


# --------------------------------------------------------------------------- runs


def _check_same_recipe(run_dir: Path, cfg: TrainConfig) -> None:
    """A run kept from an earlier call must have been trained with this call's recipe."""
    saved = read_json(run_dir / "config.json").get("train", {})
    wanted = json.loads(json.dumps(cfg.to_dict()))
    defaults = json.loads(json.dumps(TrainConfig().to_dict()))
    for key, value in wanted.items():
        # A field added to TrainConfig after the run was saved matches at its default.
        before = saved.get(key, defaults.get(key))
        if key not in _NOT_RESULTS and before != value:
            raise ConfigError(
                f"{run_dir} was trained with {key}={before!r}, not {value!r}; "
                "repeat the earlier options or choose another --out"
            )


def train_run(cfg: TrainConfig, run_dir: Path, data: ImageData, progress: bool = True) -> str:
    """Train, resume or skip one run; returns 'skipped', 'resumed' or 'trained'."""
    if (run_dir / "metrics.json").is_file():
        _check_same_recipe(run_dir, cfg)
        log.info("%s: finished earlier, skipped", run_dir)
        return "skipped"
    resume = (run_dir / checkpoint.CHECKPOINT_NAME).is_file()
    if resume:
        _check_same_recipe(run_dir, cfg)
        log.info("%s: interrupted earlier, resuming", run_dir)
    else:
        log.info("%s: training", run_dir)
    # Without a checkpoint nothing of an earlier attempt is worth keeping: overwrite it.
    fit(cfg, run_dir, data=data, resume=resume, overwrite=not resume, progress=progress)
    return "resumed" if resume else "trained"


def run_result(run_dir: Path) -> dict:
    """Per-seed figures of a finished run, from its metrics.json and history.json."""
    metrics = read_json(run_dir / "metrics.json")
    history = json.loads((run_dir / "history.json").read_text(encoding="utf-8"))
    val = [h for h in history if h.get("val_top1") is not None]
    if not val:
        raise EANetError(f"{run_dir}: the run has no validation figures; it cannot be compared")
    val_loss = [h["val_loss"] for h in val]
    return {
        "run": run_dir.name,
        "epochs": len(history),
        "best_val_top1": max(h["val_top1"] for h in val),
        "final_val_top1": val[-1]["val_top1"],
        "best_val_top5": max(h["val_top5"] for h in val),
        "final_val_top5": val[-1]["val_top5"],
        "test_top1": metrics["test_top1"],
        "test_top5": metrics["test_top5"],
        "test_loss": metrics["test_loss"],
        "final_train_loss": history[-1]["train_loss"],
        "final_train_top1": history[-1]["train_top1"],
        "first_val_loss": val_loss[0],
        "min_val_loss": min(val_loss),
        "min_val_loss_epoch": val[val_loss.index(min(val_loss))]["epoch"],
        "final_val_loss": val_loss[-1],
        "train_seconds": sum(h["epoch_seconds"] for h in history),
        "history": [{k: h.get(k) for k in ("epoch", *CURVE_FIELDS)} for h in history],
    }


def _pid_alive(lock: Path) -> bool:
    """Whether the process whose id the lock file holds still runs."""
    try:
        pid = int(lock.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


@contextlib.contextmanager
def directory_lock(out: Path) -> Iterator[None]:
    """Hold OUT/.compare.lock (with this pid) so that two compares never share a directory."""
    out.mkdir(parents=True, exist_ok=True)
    lock = out / ".compare.lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            if not _pid_alive(lock):
                lock.unlink(missing_ok=True)  # left by a compare that was killed
                continue
            raise EANetError(
                f"{out} is in use by another eanet compare ({lock}); wait for it to "
                "finish or choose another --out"
            ) from None
    else:
        raise EANetError(f"{out}: cannot take {lock}; delete it if no compare is running")
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        yield
    finally:
        lock.unlink(missing_ok=True)


# --------------------------------------------------------------------------- measurements


def model_cost(cfg: CompareConfig, model: str, data: ImageData) -> dict:
    """Trainable parameters and forward multiply-adds per image of `model` sized for `data`."""
    net = build_for_data(cfg.train_config(model, "fixed", 0), data)
    return {
        "params": count_parameters(net),
        "macs_per_image": macs_per_image(net, torch.device("cpu")),
        "model_config": net.config.to_dict(),
    }


def measure_speed(cfg: CompareConfig, out: Path, data: ImageData) -> dict[str, dict]:
    """Train and inference img/s of every model (bench_model), cached in OUT/bench.json."""
    if cfg.bench_steps == 0:
        return {}
    path = out / "bench.json"
    cache = read_json(path) if path.is_file() else {}
    _, c, h, _ = data.train_images.shape
    dev = resolve_device(cfg.device)
    peak = None
    results = {}
    for model in cfg.models:
        args = {"num_classes": data.num_classes, "image_size": h, "in_chans": c}
        args.update(cfg.model_args)
        key = json.dumps(
            [model, args, cfg.batch_size, cfg.bench_steps, str(dev), cfg.threads], sort_keys=True
        )
        if key not in cache:
            if peak is None:  # bench_model reports it; a small matmul is enough, not shown here
                peak = matmul_peak_gflops(dev, n=1024, repeats=3)
            log.info("timing %s: %d steps of batch %d", model, cfg.bench_steps, cfg.batch_size)
            r = bench_model(
                model,
                batch_size=cfg.batch_size,
                device=cfg.device,
                warmup=1,
                steps=cfg.bench_steps,
                threads=cfg.threads,
                model_args=args,
                peak=peak,
            )
            cache[key] = {
                k: r[k]
                for k in (
                    "model",
                    "batch_size",
                    "device",
                    "steps",
                    "warmup",
                    "train_img_s",
                    "infer_img_s",
                    "train_step_s",
                    "infer_step_s",
                )
            }
            write_json(path, cache)
        results[model] = cache[key]
    return results


def first_layer_inputs(cfg: CompareConfig, data: ImageData) -> dict[str, torch.Tensor]:
    """What `patch_embed` receives: in training under each order, and at inference."""
    torch.manual_seed(0)
    model = build_for_data(cfg.train_config(cfg.models[0], "fixed", 0), data)
    train_x = train_val_split(data, cfg.val_fraction)[0][:HIST_IMAGES]
    seen: list[torch.Tensor] = []
    hook = model.patch_embed.register_forward_hook(lambda m, i, o: seen.append(i[0].flatten()))
    out = {}
    try:
        with torch.no_grad():
            model.train()
            for order in ("fixed", "reference-bug"):
                torch.manual_seed(0)  # the same augmentation draws for both orders
                forward_train(model, train_x, order, AugmentConfig())
                out[f"{order} / training"] = seen.pop()
            model.eval()
            model(train_x)
            out["inference (both orders)"] = seen.pop()
    finally:
        hook.remove()
    return out


def value_stats(values: torch.Tensor) -> dict:
    """min, max, mean, std and the fractions of negative and exactly-zero values."""
    v = values.double()
    return {
        "min": v.min().item(),
        "max": v.max().item(),
        "mean": v.mean().item(),
        "std": v.std().item(),
        "negative": (v < 0).double().mean().item(),
        "zero": (v == 0).double().mean().item(),
    }


# --------------------------------------------------------------------------- aggregation


def mean_std(values: list[float]) -> dict:
    """Mean, sample standard deviation (None for one value) and count."""
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def summarize_group(results: list[dict]) -> dict:
    """Mean +- std over seeds of every per-seed figure, and of every curve per epoch."""
    summary = {k: mean_std([r[k] for r in results]) for k in SEED_FIELDS}
    n_epochs = min(len(r["history"]) for r in results)
    curves: dict[str, list] = {"epoch": list(range(1, n_epochs + 1))}
    for key in CURVE_FIELDS:
        per_epoch = [[r["history"][e][key] for r in results] for e in range(n_epochs)]
        if any(v is None for vals in per_epoch for v in vals):
            continue
        stats = [mean_std(vals) for vals in per_epoch]
        curves[key] = [s["mean"] for s in stats]
        curves[f"{key}_std"] = [s["std"] or 0.0 for s in stats]
    return {"summary": summary, "curves": curves}


# --------------------------------------------------------------------------- entry point


def run_compare(
    cfg: CompareConfig,
    out: str | Path,
    *,
    data: ImageData | None = None,
    progress: bool = True,
) -> dict:
    """Train (or skip finished) runs, measure cost and speed, write report.md/json and PNGs."""
    out = Path(out)
    cfg.validate()
    t_start = time.perf_counter()
    set_threads(cfg.threads)  # as fit does; also when every run is skipped
    if data is None:
        data = load_data(cfg.train_config(cfg.models[0], "fixed", 0), progress)
    train_x, _, val_x, _ = train_val_split(data, cfg.val_fraction)
    if len(val_x) == 0:
        raise ConfigError(
            f"--val-fraction {cfg.val_fraction} leaves no validation images; "
            "compare needs them (e.g. --val-fraction 0.2)"
        )
    with directory_lock(out):
        return _compare(cfg, out, data, progress, t_start)


def _compare(cfg: CompareConfig, out: Path, data: ImageData, progress: bool, t_start: float):
    """run_compare's work, holding the directory lock."""
    from eanet.compare_plots import (
        plot_accuracy_vs_params,
        plot_input_distribution,
        plot_loss_curves,
        plot_val_top1,
    )

    train_x, _, val_x, _ = train_val_split(data, cfg.val_fraction)
    status = {}
    for model, augment, seed in cfg.runs():
        name = run_name(model, augment, seed)
        tcfg = cfg.train_config(model, augment, seed)
        status[name] = train_run(tcfg, out / "runs" / name, data, progress)

    groups = []
    for model in cfg.models:
        cost = model_cost(cfg, model, data)
        for augment in cfg.augment_orders:
            results = [
                run_result(out / "runs" / run_name(model, augment, s)) for s in range(cfg.seeds)
            ]
            groups.append(
                {
                    "model": model,
                    "augment": augment,
                    "params": cost["params"],
                    "macs_per_image": cost["macs_per_image"],
                    "model_config": cost["model_config"],
                    "runs": results,
                    **summarize_group(results),
                }
            )
    speed = measure_speed(cfg, out, data)
    for g in groups:
        g["speed"] = speed.get(g["model"])
    inputs = first_layer_inputs(cfg, data)
    input_stats = {k: value_stats(v) for k, v in inputs.items()}

    figures = {
        "val_top1": "val_top1.png",
        "loss": "loss_curves.png",
        "accuracy_vs_params": "accuracy_vs_params.png",
        "input_distribution": "input_distribution.png",
    }
    title = f"{data.name}, {cfg.epochs} epochs, {cfg.seeds} seed(s)"
    plot_val_top1(groups, out / figures["val_top1"], title)
    plot_loss_curves(groups, out / figures["loss"], title)
    plot_accuracy_vs_params(groups, out / figures["accuracy_vs_params"], title)
    plot_input_distribution(
        {k: v.numpy() for k, v in inputs.items()},
        input_stats,
        out / figures["input_distribution"],
        f"what the first layer sees: {min(HIST_IMAGES, len(train_x))} {data.name} training "
        "images, all pixels and channels",
    )

    report = {
        "command": cfg.command(out),
        "config": cfg.to_dict(),
        "created": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "eanet_version": __version__,
        "environment": environment(),
        "data": {
            "name": data.name,
            "classes": data.num_classes,
            "train_images": len(train_x),
            "val_images": len(val_x),
            "test_images": len(data.test_images),
        },
        "runs": status,
        "invocation_seconds": round(time.perf_counter() - t_start, 1),
        "calls": [],
        "groups": groups,
        "input_distribution": {
            "images": min(HIST_IMAGES, len(train_x)),
            "model": cfg.models[0],
            "stats": input_stats,
        },
        "figures": figures,
    }
    report["calls"] = earlier_calls(out) + [call_record(report)]
    write_json(out / "report.json", report)
    write_text(out / "report.md", format_report(report))
    log.info("wrote %s and %s", out / "report.md", out / "report.json")
    return report


def call_record(report: dict) -> dict:
    """One line of the directory's history: when, what each run did, how long it took."""
    counts = Counter(report["runs"].values())
    return {
        "created": report["created"],
        "seconds": report["invocation_seconds"],
        **{k: counts.get(k, 0) for k in ("trained", "resumed", "skipped")},
    }


def earlier_calls(out: Path) -> list[dict]:
    """The calls recorded in an earlier report.json of OUT (none if it is missing or unreadable)."""
    path = out / "report.json"
    try:
        old = read_json(path) if path.is_file() else {}
    except EANetError:
        log.warning("%s is unreadable; the history of earlier calls starts afresh", path)
        return []
    if "calls" in old:
        return list(old["calls"])
    return [call_record(old)] if "runs" in old and "created" in old else []


# --------------------------------------------------------------------------- report.md


def _pct(s: dict) -> str:
    """A mean +- std of fractions as percent."""
    if s["std"] is None:
        return f"{100 * s['mean']:.1f}"
    return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"


def _num(s: dict, digits: int = 3) -> str:
    if s["std"] is None:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def _speed(g: dict, key: str) -> str:
    return f"{g['speed'][key]:,.0f}" if g.get("speed") else "not measured"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _val_loss_path(g: dict) -> str:
    """Mean validation loss: epoch 1, lowest (at which epoch), last; and whether it rose."""
    curve = g["curves"].get("val_loss")
    if not curve:
        return "-"
    low = min(range(len(curve)), key=curve.__getitem__)
    rise = curve[-1] - curve[low]
    trend = f"rose {rise:+.3f} after epoch {low + 1}" if low < len(curve) - 1 else "still falling"
    return f"{curve[0]:.3f} → {curve[low]:.3f} (epoch {low + 1}) → {curve[-1]:.3f}; {trend}"


def format_report(report: dict) -> str:
    """The report as Markdown: provenance, tables, figures."""
    cfg, env, data = report["config"], report["environment"], report["data"]
    machine = env.get("cuda") or env.get("cpu_model") or env.get("processor")
    n_seeds = cfg["seeds"]
    lines = [
        f"# {' vs '.join(cfg['models'])} on {data['name']}",
        "",
        f"Made by `{report['command']}`",
        "",
        f"- machine: {machine}, {env['cpu_count']} CPU cores, torch {env['torch']}, "
        f"torch threads: {env['torch_threads']}, eanet {report['eanet_version']}, "
        f"{report['created']}",
        "- calls of this command on this directory: "
        + "; ".join(
            f"{c['created']}: {c['trained']} runs trained, {c['resumed']} resumed, "
            f"{c['skipped']} kept, {c['seconds']:.0f} s"
            for c in report["calls"]
        ),
        f"- data: {data['name']}, {data['train_images']:,} training, {data['val_images']:,} "
        f"validation, {data['test_images']:,} test images, {data['classes']} classes",
        f"- recipe: the reference's (AdamW, weight decay 1e-4, label smoothing 0.1) with "
        f"lr {cfg['lr']}, batch {cfg['batch_size']}, {cfg['epochs']} epochs, seeds "
        f"0..{n_seeds - 1}; model overrides: "
        + (", ".join(f"{k}={v}" for k, v in cfg["model_args"].items()) or "none"),
        "- figures are mean ± sample standard deviation over the seeds"
        + (" (one seed: no spread)" if n_seeds == 1 else ""),
        "- img/s: `eanet.bench.bench_model`, median of "
        f"{cfg['bench_steps']} steps of batch {cfg['batch_size']} after 1 warm-up step, on this "
        "machine; other jobs may share it, so speeds are indicative, compare them only "
        "side by side within this report",
        "- multiply-adds per image: a forward pass of the reference formulation "
        "(`eanet.bench.macs_per_image`, torch's FlopCounterMode, matrix products only)",
        "",
        "## Results",
        "",
    ]
    header = [
        "model",
        "augment",
        "parameters",
        "M mult-adds / image",
        "train img/s",
        "inference img/s",
        "best val top-1 %",
        "final val top-1 %",
        "best val top-5 %",
        "final val top-5 %",
        "test top-1 %",
        "test top-5 %",
        "training s / run",
    ]
    rows = []
    for g in report["groups"]:
        s = g["summary"]
        rows.append(
            [
                f"`{g['model']}`",
                g["augment"],
                f"{g['params']:,}",
                f"{g['macs_per_image'] / 1e6:.1f}",
                _speed(g, "train_img_s"),
                _speed(g, "infer_img_s"),
                _pct(s["best_val_top1"]),
                _pct(s["final_val_top1"]),
                _pct(s["best_val_top5"]),
                _pct(s["final_val_top5"]),
                _pct(s["test_top1"]),
                _pct(s["test_top5"]),
                _num(s["train_seconds"], 0),
            ]
        )
    lines += _table(header, rows)
    lines += [
        "",
        "## Train/validation gap (last epoch)",
        "",
        "Training figures are measured while training (augmentation and dropout on), as the "
        "reference's log shows them.",
        "",
    ]
    header = [
        "model",
        "augment",
        "train loss",
        "val loss",
        "train top-1 %",
        "val top-1 %",
        "mean val loss: epoch 1 → lowest → last",
    ]
    rows = [
        [
            f"`{g['model']}`",
            g["augment"],
            _num(g["summary"]["final_train_loss"]),
            _num(g["summary"]["final_val_loss"]),
            _pct(g["summary"]["final_train_top1"]),
            _pct(g["summary"]["final_val_top1"]),
            _val_loss_path(g),
        ]
        for g in report["groups"]
    ]
    lines += _table(header, rows)
    dist = report["input_distribution"]
    lines += [
        "",
        "## What the first layer sees",
        "",
        f"Inputs of `patch_embed` for the first {dist['images']} training images "
        f"(`{dist['model']}`, the same augmentation draws for both orders).",
        "",
    ]
    header = ["where", "min", "max", "mean", "std", "negative %", "exactly 0 %"]
    rows = [
        [
            name,
            f"{s['min']:.2f}",
            f"{s['max']:.2f}",
            f"{s['mean']:.2f}",
            f"{s['std']:.2f}",
            f"{100 * s['negative']:.1f}",
            f"{100 * s['zero']:.1f}",
        ]
        for name, s in dist["stats"].items()
    ]
    lines += _table(header, rows)
    lines += ["", "## Figures", ""]
    captions = {
        "val_top1": "Validation top-1 per epoch (mean, band ± std; dotted: training top-1)",
        "loss": "Training and validation loss per epoch",
        "accuracy_vs_params": "Test top-1 against trainable parameters",
        "input_distribution": "Values the first layer sees, training vs inference",
    }
    for key, file in report["figures"].items():
        lines += [f"![{captions[key]}]({file})", "", f"*{captions[key]}.*", ""]
    lines += ["## Runs", ""]
    header = ["run", "epochs", "best val top-1 %", "test top-1 %", "test top-5 %", "training s"]
    rows = []
    for g in report["groups"]:
        for r in g["runs"]:
            rows.append(
                [
                    r["run"],
                    str(r["epochs"]),
                    f"{100 * r['best_val_top1']:.1f}",
                    f"{100 * r['test_top1']:.1f}",
                    f"{100 * r['test_top5']:.1f}",
                    f"{r['train_seconds']:.0f}",
                ]
            )
    lines += _table(header, rows)
    lines.append("")
    return "\n".join(lines)
