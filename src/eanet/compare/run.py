"""Compare models and augmentation orders under one recipe and the same seeds.

`run_compare` trains every model x augmentation order x seed with `train.fit`, each run in
`OUT/runs/<model>-<augment>-seed<k>/`, then writes `OUT/report.md`, `OUT/report.json` and
the figures (`eanet.compare.plots`). A run is finished when its `metrics.json` exists: a
second call with the same OUT skips it, and resumes an interrupted one from its checkpoint.
Speed comes from `eanet.bench.bench_model` (a few steps, cached in `OUT/bench.json`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path

import torch

from eanet import __version__, checkpoint
from eanet.bench import bench_model, matmul_peak_gflops
from eanet.compare.config import CURVE_FIELDS, CompareConfig, run_name
from eanet.compare.report import (
    CallRecord,
    CompareReport,
    DataSummary,
    Group,
    InputDistribution,
    format_report,
    summarize_group,
    value_stats,
)
from eanet.data.dataset import ImageData
from eanet.data.splits import train_val_split
from eanet.errors import ConfigError, EANetError, preview, printable
from eanet.fileio import read_json, write_json, write_text
from eanet.info import model_info
from eanet.locks import COMPARE_LOCK, directory_lock
from eanet.models.registry import count_parameters
from eanet.options import declared
from eanet.runtime import environment, resolve_device, set_threads
from eanet.train.augmentation import BatchAugment
from eanet.train.config import TrainConfig
from eanet.train.loop import build_for_data, fit, load_data

log = logging.getLogger(__name__)


SPEED_FIELDS = (
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
HIST_IMAGES = 256  # training images whose first-layer inputs are histogrammed


def _check_same_recipe(run_dir: Path, cfg: TrainConfig) -> None:
    """A run kept from an earlier call must have been trained with this call's recipe."""
    saved = read_json(run_dir / "config.json").get("train", {})
    wanted = json.loads(json.dumps(cfg.to_dict()))
    defaults = json.loads(json.dumps(TrainConfig().to_dict()))
    may_differ = {n for n, f in declared(TrainConfig).items() if not f.metadata["results"]}
    for key, value in wanted.items():
        # A field added to TrainConfig after the run was saved matches at its default.
        before = saved.get(key, defaults.get(key))
        if key not in may_differ and before != value:
            raise ConfigError(
                f"{run_dir} was trained with {key}={preview(before)}, not {preview(value)}; "
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
        "steady_train_img_s": steady_images_per_s(history),
        "history": [{k: h.get(k) for k in ("epoch", *CURVE_FIELDS)} for h in history],
        # The best-validation and EMA weights' test figures, where the run has them.
        **{k: v for k, v in metrics.items() if k.startswith(("best_test", "ema_test", "best_ep"))},
    }


def steady_images_per_s(history: list[dict]) -> float:
    """Training images per second once warm: the median over the epochs after the first.

    The first epoch also pays for first use (kernels compiled, caches and allocator warmed),
    which the wall time of a run includes; a one-epoch run has only that epoch.
    """
    speeds = sorted(h["train_images_per_s"] for h in history[1:] or history)
    mid = len(speeds) // 2
    return speeds[mid] if len(speeds) % 2 else (speeds[mid - 1] + speeds[mid]) / 2


def model_cost(cfg: CompareConfig, model: str, data: ImageData) -> dict:
    """Trainable parameters and forward multiply-adds per image of `model` sized for `data`."""
    net = build_for_data(cfg.train_config(model, "fixed", 0), data)
    return {
        "params": count_parameters(net),
        # Counted from the layers' shapes, no forward pass (tests/test_info.py checks the
        # count against FlopCounterMode's, which `bench.macs_per_image` runs).
        "macs_per_image": model_info(net)["macs_per_image"],
        "model_config": net.config.to_dict(),
    }


def measure_speed(cfg: CompareConfig, out: Path, data: ImageData) -> dict[str, dict]:
    """Train and inference img/s of every model (bench_model), cached in OUT/bench.json."""
    if cfg.bench_steps == 0:
        return {}
    path = out / "bench.json"
    cache = read_json(path) if path.is_file() else {}
    _, c, h, _ = data.train_images.shape
    dev = resolve_device(cfg.train.device)
    peak = None
    results = {}
    for model in cfg.models:
        args = {"num_classes": data.num_classes, "image_size": h, "in_chans": c}
        args.update(cfg.train.model_args)
        tcfg = dataclasses.replace(cfg.train_config(model, "fixed", 0), model_args=args)
        key = json.dumps(
            [model, args, tcfg.batch_size, cfg.bench_steps, str(dev), tcfg.threads]
            + ([tcfg.precision] if tcfg.precision != "fp32" else []),
            sort_keys=True,
        )
        if key not in cache:
            if peak is None:  # bench_model reports it; a small matmul is enough, not shown here
                peak = matmul_peak_gflops(dev, n=1024, repeats=3)
            log.info("timing %s: %d steps of batch %d", model, cfg.bench_steps, tcfg.batch_size)
            r = bench_model(tcfg, warmup=1, steps=cfg.bench_steps, peak=peak).to_dict()
            cache[key] = {k: r[k] for k in SPEED_FIELDS}
            write_json(path, cache)
        results[model] = cache[key]
    return results


class _Seen(Exception):
    """Raised by the hook on `patch_embed`: what it receives is all that is wanted."""


def first_layer_inputs(cfg: CompareConfig, data: ImageData) -> dict[str, torch.Tensor]:
    """What `patch_embed` receives: in training under each order, and at inference.

    Each forward pass stops at `patch_embed` (its hook raises): the blocks' work, most of a
    pass, would be thrown away, and it made a re-run on finished runs take most of a minute.
    """
    torch.manual_seed(0)
    model = build_for_data(cfg.train_config(cfg.models[0], "fixed", 0), data)
    train_x, train_y = (t[:HIST_IMAGES] for t in train_val_split(data, cfg.train.val_fraction)[:2])
    seen: list[torch.Tensor] = []

    def stop(module, inputs, *_):
        seen.append(inputs[0].flatten())
        raise _Seen

    def first_layer(forward, *args) -> torch.Tensor:
        with contextlib.suppress(_Seen):
            forward(*args)
        return seen.pop()

    hook = model.patch_embed.register_forward_pre_hook(stop)
    out = {}
    try:
        with torch.no_grad():
            model.train()
            for order in ("fixed", "reference-bug"):
                torch.manual_seed(0)  # the same augmentation draws for both orders
                x = first_layer(BatchAugment(order), model, train_x, train_y)
                out[f"{order} / training"] = x
            model.eval()
            out["inference (both orders)"] = first_layer(model, train_x)
    finally:
        hook.remove()
    return out


def run_compare(
    cfg: CompareConfig,
    out: str | Path,
    *,
    data: ImageData | None = None,
    progress: bool = True,
) -> dict:
    """Train (or skip finished) runs, measure cost and speed, write report.md/json and PNGs.

    Returns report.json's content (`CompareReport.to_dict`).
    """
    out = Path(out)
    cfg.validate()
    t_start = time.perf_counter()
    set_threads(cfg.train.threads)  # as fit does; also when every run is skipped
    if data is None:
        data = load_data(cfg.train_config(cfg.models[0], "fixed", 0), progress)
    train_x, _, val_x, _ = train_val_split(data, cfg.train.val_fraction)
    if len(val_x) == 0:
        raise ConfigError(
            f"--val-fraction {cfg.train.val_fraction} leaves no validation images; "
            "compare needs them (e.g. --val-fraction 0.2)"
        )
    with directory_lock(out, COMPARE_LOCK, "compare directory"):
        return _compare(cfg, out, data, progress, t_start)


def _compare(
    cfg: CompareConfig, out: Path, data: ImageData, progress: bool, t_start: float
) -> dict:
    """run_compare's work, holding the directory lock."""
    train_x, _, val_x, _ = train_val_split(data, cfg.train.val_fraction)
    status = {}
    for model, augment, seed in cfg.runs():
        name = run_name(model, augment, seed)
        tcfg = cfg.train_config(model, augment, seed)
        status[name] = train_run(tcfg, out / "runs" / name, data, progress)
    groups = compare_groups(cfg, out, data)
    inputs = first_layer_inputs(cfg, data)
    input_stats = {k: value_stats(v) for k, v in inputs.items()}
    shown = InputDistribution(min(HIST_IMAGES, len(train_x)), cfg.models[0], input_stats)
    figures = _plot(cfg, out, data, groups, inputs, shown)
    created = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    seconds = round(time.perf_counter() - t_start, 1)
    report = CompareReport(
        command=cfg.command(out),
        config=cfg.to_dict(),
        created=created,
        eanet_version=__version__,
        environment=environment(),
        data=DataSummary(
            data.name, data.num_classes, len(train_x), len(val_x), len(data.test_images)
        ),
        runs=status,
        invocation_seconds=seconds,
        calls=[
            *(CallRecord.from_dict(c) for c in earlier_calls(out)),
            CallRecord.of(status, created, seconds),
        ],
        groups=groups,
        input_distribution=shown,
        figures=figures,
    )
    saved = report.to_dict()
    write_json(out / "report.json", saved)
    write_text(out / "report.md", format_report(report))
    log.info("wrote %s and %s", out / "report.md", out / "report.json")
    return saved


def compare_groups(cfg: CompareConfig, out: Path, data: ImageData) -> list[Group]:
    """One group per model and augmentation order: its cost, runs, summary and speed."""
    costs = {model: model_cost(cfg, model, data) for model in cfg.models}
    results = {
        (model, augment): [
            run_result(out / "runs" / run_name(model, augment, s)) for s in range(cfg.seeds)
        ]
        for model in cfg.models
        for augment in cfg.augment_orders
    }
    speed = measure_speed(cfg, out, data)
    return [
        Group(
            model=model,
            augment=augment,
            **costs[model],
            runs=runs,
            **summarize_group(runs),
            speed=speed.get(model),
        )
        for (model, augment), runs in results.items()
    ]


def _plot(
    cfg: CompareConfig,
    out: Path,
    data: ImageData,
    groups: list[Group],
    inputs: dict[str, torch.Tensor],
    shown: InputDistribution,
) -> dict[str, str]:
    """The report's figures, written into OUT; returns their file names by key."""
    from eanet.compare.plots import (
        plot_accuracy_vs_params,
        plot_input_distribution,
        plot_loss_curves,
        plot_val_top1,
    )

    figures = {
        "val_top1": "val_top1.png",
        "loss": "loss_curves.png",
        "accuracy_vs_params": "accuracy_vs_params.png",
        "input_distribution": "input_distribution.png",
    }
    title = f"{data.name}, {cfg.train.epochs} epochs, {cfg.seeds} seed(s)"
    plot_val_top1(groups, out / figures["val_top1"], title)
    plot_loss_curves(groups, out / figures["loss"], title)
    plot_accuracy_vs_params(groups, out / figures["accuracy_vs_params"], title)
    plot_input_distribution(
        {k: v.numpy() for k, v in inputs.items()},
        shown.stats,
        out / figures["input_distribution"],
        f"what the first layer sees: {shown.images} {data.name} training "
        "images, all pixels and channels",
    )
    return figures


def earlier_calls(out: Path) -> list[dict]:
    """The calls recorded in an earlier report.json of OUT (none if it is missing or unreadable;
    a damaged entry is dropped, and its text escaped for the report: it came from a file)."""
    path = out / "report.json"
    try:
        old = read_json(path) if path.is_file() else {}
    except EANetError:
        log.warning("%s is unreadable; the history of earlier calls starts afresh", path)
        return []
    if "calls" in old:
        calls = old["calls"] if isinstance(old["calls"], list) else []
    else:
        old_runs = isinstance(old.get("runs"), dict) and "created" in old
        calls = [_call_of(old)] if old_runs else []
    kept = [_checked_call(c) for c in calls]
    if None in kept:
        log.warning("%s: dropped damaged entries of the history of earlier calls", path)
    return [c for c in kept if c is not None]


def _call_of(old: dict) -> dict | None:
    """The call record of a report.json written before reports kept their calls (None, a
    damaged entry, where it lacks the call's seconds)."""
    seconds = old.get("invocation_seconds")
    if not isinstance(seconds, (int, float)):
        return None
    return CallRecord.of(old["runs"], old["created"], seconds).to_dict()


def _checked_call(call: object) -> dict | None:
    """An earlier call's record with the types the report formats, or None."""
    counts = ("trained", "resumed", "skipped")
    if not (
        isinstance(call, dict)
        and isinstance(call.get("created"), str)
        and isinstance(call.get("seconds"), (int, float))
        and all(isinstance(call.get(k), int) for k in counts)
    ):
        return None
    return {**call, "created": printable(call["created"])[:40]}
