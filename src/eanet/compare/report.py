"""The comparison report: its typed structure (report.json), summaries over seeds, report.md."""

from __future__ import annotations

import dataclasses
import statistics
from collections import Counter
from dataclasses import dataclass, field

import torch

from eanet.compare.config import CURVE_FIELDS, SEED_FIELDS

RUN_OUTCOMES = ("trained", "resumed", "skipped")


def _plain(value: object) -> object:
    """A field's JSON value: a nested record as its dict, lists of them item by item."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    to_dict = getattr(value, "to_dict", None)
    return to_dict() if callable(to_dict) else value


class _Record:
    """`to_dict`: the fields in their declared order, as report.json has always held them."""

    def to_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


@dataclass
class DataSummary(_Record):
    """The data set every run was trained on, and its split."""

    name: str
    classes: int
    train_images: int
    val_images: int
    test_images: int


@dataclass
class CallRecord(_Record):
    """One call of `eanet compare` on the directory: when, how long, what each run did."""

    created: str
    seconds: float
    trained: int
    resumed: int
    skipped: int
    extra: dict = field(default_factory=dict)  # keys of an older file, written back as read

    @classmethod
    def of(cls, runs: dict[str, str], created: str, seconds: float) -> CallRecord:
        """The record of a call whose runs ended as `runs` says (run name -> outcome)."""
        counts = Counter(runs.values())
        return cls(created, seconds, *(counts.get(k, 0) for k in RUN_OUTCOMES))

    @classmethod
    def from_dict(cls, data: dict) -> CallRecord:
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(**{k: v for k, v in data.items() if k in known}, extra=extra)

    def to_dict(self) -> dict:
        out = super().to_dict()
        extra = out.pop("extra")
        return {**out, **extra}


@dataclass
class Group(_Record):
    """One model under one augmentation order: its cost, runs (one per seed) and summary."""

    model: str
    augment: str
    params: int
    macs_per_image: float
    model_config: dict
    runs: list[dict]  # `compare.run.run_result` of each seed
    summary: dict[str, dict]  # SEED_FIELDS' mean_std over the seeds
    curves: dict[str, list]  # CURVE_FIELDS per epoch: mean and KEY_std
    speed: dict | None = None  # `bench_model`'s figures (None: not measured)

    @classmethod
    def from_dict(cls, data: dict) -> Group:
        return cls(**data)


@dataclass
class InputDistribution(_Record):
    """`value_stats` of what the first layer sees, per augmentation order and at inference."""

    images: int
    model: str
    stats: dict[str, dict]


@dataclass
class CompareReport(_Record):
    """report.json: how the comparison was made, and every group's figures."""

    command: str
    config: dict  # CompareConfig.to_dict()
    created: str
    eanet_version: str
    environment: dict
    data: DataSummary
    runs: dict[str, str]  # run name -> "trained", "resumed" or "skipped" by this call
    invocation_seconds: float
    calls: list[CallRecord]  # every call on the directory, this one last
    groups: list[Group]
    input_distribution: InputDistribution
    figures: dict[str, str]  # FIGURE_CAPTIONS' keys -> file names

    @classmethod
    def from_dict(cls, data: dict) -> CompareReport:
        """The report of a report.json (as `to_dict` wrote it)."""
        return cls(
            **{
                **data,
                "data": DataSummary(**data["data"]),
                "calls": [CallRecord.from_dict(c) for c in data["calls"]],
                "groups": [Group.from_dict(g) for g in data["groups"]],
                "input_distribution": InputDistribution(**data["input_distribution"]),
            }
        )


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


def _pct(s: dict) -> str:
    """A mean +- std of fractions as percent."""
    if s["std"] is None:
        return f"{100 * s['mean']:.1f}"
    return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"


def _num(s: dict, digits: int = 3) -> str:
    if s["std"] is None:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def _speed(g: Group, key: str) -> str:
    return f"{g.speed[key]:,.0f}" if g.speed else "not measured"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _val_loss_path(g: Group) -> str:
    """Mean validation loss: epoch 1, lowest (at which epoch), last; and whether it rose."""
    curve = g.curves.get("val_loss")
    if not curve:
        return "-"
    low = min(range(len(curve)), key=curve.__getitem__)
    rise = curve[-1] - curve[low]
    trend = f"rose {rise:+.3f} after epoch {low + 1}" if low < len(curve) - 1 else "still falling"
    return f"{curve[0]:.3f} → {curve[low]:.3f} (epoch {low + 1}) → {curve[-1]:.3f}; {trend}"


def _recipe_words(rec: dict) -> str:
    """Which recipe the runs shared, in words (`--recipe`; older reports: the reference)."""
    name = rec.get("recipe", "reference")
    if name == "reference":
        return (
            f"`--recipe reference`, the Keras example's (AdamW, weight decay "
            f"{rec['weight_decay']}, label smoothing {rec['label_smoothing']})"
        )
    return (
        f"`--recipe {name}` (see `eanet recipes -v`: AdamW, weight decay "
        f"{rec['weight_decay']} on {rec.get('weight_decay_params', 'all')}, "
        f"{rec.get('lr_schedule', 'constant')} schedule, label smoothing "
        f"{rec['label_smoothing']}, augment {rec['augment']})"
    )


def format_report(report: CompareReport) -> str:
    """The report as Markdown: provenance, tables, figures."""
    groups = report.groups
    lines = _provenance(report)
    lines += _results_section(groups)
    lines += _gap_section(groups)
    lines += _input_section(report.input_distribution)
    lines += _figures_section(report.figures)
    lines += _runs_section(groups)
    lines.append("")
    return "\n".join(lines)


def _provenance(report: CompareReport) -> list[str]:
    """Title, the command, the machine, the data, the recipe and how figures were measured."""
    cfg, env, data = report.config, report.environment, report.data
    rec = cfg["train"]  # the recipe every run shared
    machine = env.get("cuda") or env.get("cpu_model") or env.get("processor")
    n_seeds = cfg["seeds"]
    return [
        f"# {' vs '.join(cfg['models'])} on {data.name}",
        "",
        f"Made by `{report.command}`",
        "",
        f"- machine: {machine}, {env['cpu_count']} CPU cores, torch {env['torch']}, "
        f"torch threads: {env['torch_threads']}, eanet {report.eanet_version}, "
        f"{report.created}",
        "- calls of this command on this directory: "
        + "; ".join(
            f"{c.created}: {c.trained} runs trained, {c.resumed} resumed, "
            f"{c.skipped} kept, {c.seconds:.0f} s"
            for c in report.calls
        ),
        f"- data: {data.name}, {data.train_images:,} training, {data.val_images:,} "
        f"validation, {data.test_images:,} test images, {data.classes} classes",
        f"- recipe: {_recipe_words(rec)} with "
        f"lr {rec['lr']}, batch {rec['batch_size']}, {rec['epochs']} epochs, seeds "
        f"0..{n_seeds - 1}; model overrides: "
        + (", ".join(f"{k}={v}" for k, v in rec["model_args"].items()) or "none"),
        "- figures are mean ± sample standard deviation over the seeds"
        + (" (one seed: no spread)" if n_seeds == 1 else ""),
        "- img/s: `eanet.bench.bench_model`, median of "
        f"{cfg['bench_steps']} steps of batch {rec['batch_size']} after 1 warm-up step, on this "
        "machine; other jobs may share it, so speeds are indicative, compare them only "
        "side by side within this report",
        "- training s / run: the wall time of all epochs, first-use kernel compiling and "
        "warm-up included; training img/s, epochs 2+: the median of the epochs after the "
        "first (`eanet.compare.run.steady_images_per_s`), the speed once warm",
        "- multiply-adds per image: a forward pass of the reference formulation "
        "(`eanet.bench.macs_per_image`, torch's FlopCounterMode, matrix products only)",
        "",
    ]


def _results_section(groups: list[Group]) -> list[str]:
    """One row per model x augmentation: size, cost, speed, accuracies, training time."""
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
        "training img/s, epochs 2+",
    ]
    rows = []
    for g in groups:
        s = g.summary
        rows.append(
            [
                f"`{g.model}`",
                g.augment,
                f"{g.params:,}",
                f"{g.macs_per_image / 1e6:.1f}",
                _speed(g, "train_img_s"),
                _speed(g, "infer_img_s"),
                _pct(s["best_val_top1"]),
                _pct(s["final_val_top1"]),
                _pct(s["best_val_top5"]),
                _pct(s["final_val_top5"]),
                _pct(s["test_top1"]),
                _pct(s["test_top5"]),
                _num(s["train_seconds"], 0),
                _num(s["steady_train_img_s"], 0),
            ]
        )
    return ["## Results", "", *_table(header, rows)]


def _gap_section(groups: list[Group]) -> list[str]:
    """Last-epoch training against validation figures, and the validation loss's path."""
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
            f"`{g.model}`",
            g.augment,
            _num(g.summary["final_train_loss"]),
            _num(g.summary["final_val_loss"]),
            _pct(g.summary["final_train_top1"]),
            _pct(g.summary["final_val_top1"]),
            _val_loss_path(g),
        ]
        for g in groups
    ]
    return [
        "",
        "## Train/validation gap (last epoch)",
        "",
        "Training figures are measured while training (augmentation and dropout on), as the "
        "reference's log shows them.",
        "",
        *_table(header, rows),
    ]


def _input_section(dist: InputDistribution) -> list[str]:
    """Statistics of what the first layer sees, per augmentation order and at inference."""
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
        for name, s in dist.stats.items()
    ]
    return [
        "",
        "## What the first layer sees",
        "",
        f"Inputs of `patch_embed` for the first {dist.images} training images "
        f"(`{dist.model}`, the same augmentation draws for both orders).",
        "",
        *_table(header, rows),
    ]


FIGURE_CAPTIONS = {
    "val_top1": "Validation top-1 per epoch (mean, band ± std; dotted: training top-1)",
    "loss": "Training and validation loss per epoch",
    "accuracy_vs_params": "Test top-1 against trainable parameters",
    "input_distribution": "Values the first layer sees, training vs inference",
}


def _figures_section(figures: dict[str, str]) -> list[str]:
    """Each figure file with its caption."""
    lines = ["", "## Figures", ""]
    for key, file in figures.items():
        caption = FIGURE_CAPTIONS[key]
        lines += [f"![{caption}]({file})", "", f"*{caption}.*", ""]
    return lines


def _runs_section(groups: list[Group]) -> list[str]:
    """One row per trained run (every seed of every group)."""
    header = [
        "run",
        "epochs",
        "best val top-1 %",
        "test top-1 %",
        "test top-5 %",
        "training s",
        "training img/s, epochs 2+",
    ]
    rows = [
        [
            r["run"],
            str(r["epochs"]),
            f"{100 * r['best_val_top1']:.1f}",
            f"{100 * r['test_top1']:.1f}",
            f"{100 * r['test_top5']:.1f}",
            f"{r['train_seconds']:.0f}",
            f"{r['steady_train_img_s']:.0f}",
        ]
        for g in groups
        for r in g.runs
    ]
    return ["## Runs", "", *_table(header, rows)]
