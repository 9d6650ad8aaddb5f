"""The results tables of README.md and docs/speed.md, rendered from the committed JSON.

Each table sits between two marker comments in a page:

    <!-- results:speed-table begin -->
    ...
    <!-- results:speed-table end -->

and is made from the side-by-side runs against the Keras example that
`benchmarks/compare_reference.py` writes to
benchmarks/results/cpu/<CPU class>/<stamp>-reference.json: per CPU class, each model's
latest run. Variants whose name says what they were run against
(`<stamp>-reference-before-<change>.json`) are not results of the current code and are
skipped; a class with no run is left out, never filled in. The README's fidelity and
accuracy tables come from tools/record_checks.py's records (benchmarks/results/fidelity/,
benchmarks/results/digits/), `eanet compare`'s docs/compare-digits/report.json and the
Fashion-MNIST records; a record not written yet is a "not yet measured" cell.

    python tools/results_tables.py           # rewrite the tables in README.md and docs/speed.md
    python tools/results_tables.py --check   # exit 1 if a page's tables differ from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from fashion_mnist import first_reached  # noqa: E402  (the runner's own rule, for Keras records)

RESULTS = ROOT / "benchmarks" / "results"
PAGES = ("README.md", "docs/speed.md", "docs/fashion-mnist.md")

# compare_reference.machine_class's folders, in this order in the tables.
CLASSES = {
    "avx2": "AVX2 only",
    "avx512": "AVX-512, no avx512_bf16",
    "avx512-bf16": "AVX-512 with avx512_bf16, no AMX",
    "amx-bf16": "AMX (avx512_bf16, amx_bf16)",
}
NATIVE_BF16 = {"avx512-bf16", "amx-bf16"}
MODELS = {"eanet": "EANet", "vit": "ViT"}
PRECISIONS = ("fp32", "bf16", "auto")
DEFAULT_BATCH = 128  # compare_reference.py's --batch-size default

RUN_FILE = re.compile(r"^(?P<date>\d{8})-(?P<time>\d{6})-reference\.json$")
MARKERS = re.compile(
    r"(?P<begin><!-- results:(?P<name>[\w-]+) begin -->\n)(?P<body>.*?)"
    r"(?P<end><!-- results:(?P=name) end -->)",
    re.S,
)


@dataclass(frozen=True)
class Run:
    """One compare_reference.py run: its file and its rows (one per model and precision)."""

    path: Path
    rows: list[dict]

    @property
    def stamp(self) -> str:
        return self.path.name[: len("YYYYmmdd-HHMMSS")]

    @property
    def date(self) -> str:
        s = self.stamp
        return f"{s[:4]}-{s[4:6]}-{s[6:8]}"


@dataclass(frozen=True)
class Latest:
    """A model's rows from the latest run of a class that timed it (eager rows only)."""

    cpu_class: str
    model: str
    run: Run
    by_precision: dict[str, dict]


def load_runs(results: Path) -> dict[str, list[Run]]:
    """Every run under results/cpu/ per known CPU class, oldest first; variants skipped."""
    runs: dict[str, list[Run]] = {}
    for cpu_class in CLASSES:
        folder = results / "cpu" / cpu_class
        files = sorted(p for p in folder.glob("*.json") if RUN_FILE.match(p.name))
        loaded = [Run(p, json.loads(p.read_text(encoding="utf-8"))) for p in files]
        if loaded:
            runs[cpu_class] = loaded
    return runs


def precision(row: dict) -> str:
    """The row's precision (runs from before the --precisions option are fp32)."""
    return row.get("precision", "fp32")


def latest(runs: dict[str, list[Run]]) -> list[Latest]:
    """Per class and model, the rows of the latest run that has that model."""
    found = []
    for cpu_class, class_runs in runs.items():
        for model in MODELS:
            for run in reversed(class_runs):
                rows = [r for r in run.rows if r["model"] == model and not r.get("compile")]
                if rows:
                    found.append(Latest(cpu_class, model, run, {precision(r): r for r in rows}))
                    break
    return found


def command(run: Run) -> str:
    """The compare_reference.py arguments that reproduce the run (Keras's interpreter aside)."""
    first = run.rows[0]["runs"]["eanet"]
    args = [f"--rounds {len(first)}"] if len(first) != 1 else []
    args += [f"--steps {first[0]['steps']}", f"--warmup {first[0]['warmup']}"]
    if first[0]["batch_size"] != DEFAULT_BATCH:
        args.append(f"--batch-size {first[0]['batch_size']}")
    asked = {r.get("asked_precision", precision(r)) for r in run.rows}
    args.append("--precisions " + " ".join(p for p in PRECISIONS if p in asked))
    models = [m for m in MODELS if any(r["model"] == m for r in run.rows)]
    if len(models) != len(MODELS):
        args.append("--models " + " ".join(models))
    if any(r.get("compile") for r in run.rows):
        args.append("--compiled")
    return "compare_reference.py " + " ".join(args)


def class_label(cpu_class: str, row: dict) -> str:
    """'AMD EPYC, AVX2 only, 2 cores': the CPU's name as it gives it, its class, its cores."""
    env = row["environment"]
    name = re.sub(r"\((R|TM)\)", "", env.get("cpu_model") or env.get("processor", "CPU"))
    name = " ".join(name.removesuffix(" Processor").split())
    return f"{name}, {CLASSES[cpu_class]}, {env['cpu_count']} cores"


def link(path: Path, page_dir: Path) -> str:
    return Path(os.path.relpath(path, page_dir)).as_posix()


def _ratios(row: dict | None) -> str:
    return f"{row['train_ratio']:.2f}x, {row['infer_ratio']:.2f}x" if row else ""


def speed_table(runs: dict[str, list[Run]], page_dir: Path) -> str:
    """eanet's speed as a multiple of the Keras example's fp32, per CPU class and model."""
    lines = [
        "| CPU class | date, command | model | fp32 / Keras: train, inference "
        "| bf16 / Keras: train, inference |",
        "|---|---|---|---|---|",
    ]
    shown_class, shown_run = None, None
    for item in latest(runs):
        fp32, bf16 = item.by_precision.get("fp32"), item.by_precision.get("bf16")
        if bf16 is None:
            bf16_cell = "not run"
            if item.cpu_class not in NATIVE_BF16:
                bf16_cell += " (bf16 is emulated there; `auto` picks fp32)"
        else:
            bf16_cell = _ratios(bf16)
        any_row = fp32 or bf16
        cls = class_label(item.cpu_class, any_row) if item.cpu_class != shown_class else ""
        when = ""
        if item.run is not shown_run or cls:
            when = f"[{item.run.date}]({link(item.run.path, page_dir)}), `{command(item.run)}`"
        lines.append(f"| {cls} | {when} | {MODELS[item.model]} | {_ratios(fp32)} | {bf16_cell} |")
        shown_class, shown_run = item.cpu_class, item.run
    return "\n".join(lines) + "\n"


def speed_rates(runs: dict[str, list[Run]], page_dir: Path) -> str:
    """The images per second behind the ratios, and eanet's share of the matmul peak."""
    lines = [
        "| CPU class | model | precision | training step: eanet / Keras fp32 img/s "
        "| inference: eanet / Keras fp32 img/s | share of the matmul peak: train, inference |",
        "|---|---|---|---|---|---|",
    ]
    shown_class = None
    for item in latest(runs):
        for name in PRECISIONS:
            row = item.by_precision.get(name)
            if row is None:
                continue
            cls = "" if item.cpu_class == shown_class else class_label(item.cpu_class, row)
            shown_class = item.cpu_class
            peak = row.get("matmul_peak_bf16_gflops") if name == "bf16" else None
            peak = peak or row["matmul_peak_gflops"]
            lines.append(
                f"| {cls} | {MODELS[item.model]} | {name} "
                f"| {row['eanet_train_img_s']:.1f} / {row['keras_train_img_s']:.1f} "
                f"| {row['eanet_infer_img_s']:.1f} / {row['keras_infer_img_s']:.1f} "
                f"| {row['eanet_train_fraction_of_peak']:.0%}, "
                f"{row['eanet_infer_fraction_of_peak']:.0%} of {peak:.0f} GFLOP/s |"
            )
    return "\n".join(lines) + "\n"


def load_serving(results: Path) -> dict[str, tuple[Path, dict]]:
    """Per known CPU class, the serve_load.py result under results/serve/<class>/."""
    found = {}
    for cpu_class in CLASSES:
        path = results / "serve" / cpu_class / "serve_load.json"
        if path.is_file():
            found[cpu_class] = (path, json.loads(path.read_text(encoding="utf-8")))
    return found


def serve_command(settings: dict) -> str:
    """The serve_load.py arguments of a result (its --out aside)."""
    args = [f"--precisions {' '.join(settings['precisions'])}"]
    args += [f"--requests {settings['requests']}", f"--concurrency {settings['concurrency']}"]
    if settings.get("images_per_request", 1) != 1:
        args.append(f"--images-per-request {settings['images_per_request']}")
    if settings.get("compiled"):
        args.append("--compiled")
    return "serve_load.py " + " ".join(args)


def _served_precision(row: dict) -> str:
    name = row["requested_precision"]
    if name == "auto":
        n = row.get("bf16_from_images")
        name += f" (bf16 from {n} images, fp32 below)" if n else f" ({row['precision']})"
    return name + (" + compile" if row.get("compiled") else "")


def serve_table(serving: dict[str, tuple[Path, dict]], page_dir: Path) -> str:
    """`eanet serve` under load: requests/s and p99 per precision, with and without batching."""
    lines = [
        "| CPU class | date, command | --precision | --max-batch | requests/s | p99 ms "
        "| images/pass |",
        "|---|---|---|---|---|---|---|",
    ]
    for cpu_class, (path, result) in serving.items():
        for i, row in enumerate(result["rows"]):
            cls = when = ""
            if i == 0:
                cls = class_label(cpu_class, result)
                date = result["date"][:10]
                when = f"[{date}]({link(path, page_dir)}), `{serve_command(result['settings'])}`"
            lines.append(
                f"| {cls} | {when} | {_served_precision(row)} | {row['max_batch']} "
                f"| {row['requests_per_s']:.1f} | {row['p99_ms']:.1f} "
                f"| {row['images_per_pass']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def load_fashion(results: Path) -> dict[str, tuple[Path, dict]]:
    """The Fashion-MNIST records (benchmarks/fashion_mnist.py, tools/keras_fashion.py)."""
    folder = results / "fashion-mnist"
    return {
        p.stem: (p, json.loads(p.read_text(encoding="utf-8")))
        for p in sorted(folder.glob("*.json"))
    }


SEED = re.compile(r"-s(\d+)$")  # eanet-s1: seed 1 of the group eanet; a name without it: seed 0


def _seed_group(name: str) -> str:
    return SEED.sub("", name)


def _spread(values: list[float]) -> str:
    """'91.2%' for one value, 'mean +- half the range' (percent) for several."""
    if len(values) == 1:
        return f"{values[0]:.1%}"
    mean = sum(values) / len(values)
    return f"{mean:.1%} ± {(max(values) - min(values)) / 2:.1%}"


def _where(seg: dict, idle: bool = False) -> str:
    """'AVX2 only, 2 threads' of a stretch of epochs; with `idle`, ', idle' where it was."""
    threads = seg.get("threads") or seg.get("cpu_count")
    label = f"{CLASSES.get(seg.get('class'), seg.get('class'))}, {threads} threads"
    return label + (", idle" if idle and seg.get("idle") else "")


def _machines(rec: dict) -> str:
    """Where its epochs ran: CPU classes and threads, 'idle' where the run said so."""
    seen = []
    for seg in rec.get("segments", []):
        label = _where(seg, idle=True)
        if label not in seen:
            seen.append(label)
    if "machine_class" in rec:  # a Keras record
        seen.append(f"{CLASSES.get(rec['machine_class'])}, {rec['cpu_count']} cores")
    return "; ".join(seen)


def _test_top1(rec: dict) -> float | None:
    if rec.get("test"):
        return rec["test"]["test_top1"]
    rows = rec.get("history", [])
    return rows[-1].get("test_top1") if rows else None


def _reached(rec: dict, key: str) -> str:
    if "reached" in rec:
        hit = rec["reached"].get(key)
    else:
        hit = first_reached(rec.get("history", []), float(key))
    return f"epoch {hit['epoch']}, {hit['minutes']:.1f} min" if hit else "not reached"


def fashion_table(records: dict[str, tuple[Path, dict]], page_dir: Path) -> str:
    """One row per experiment (seeds together): epochs, test top-1, time to 90%/92%."""
    groups: dict[str, list[tuple[Path, dict]]] = {}
    for name, item in records.items():
        groups.setdefault(_seed_group(name), []).append(item)
    lines = [
        "| experiment | what | epochs | test top-1 (last weights) | best val top-1 "
        "| val top-1 >= 90% / 92% first | min per epoch | machine | records |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for group, items in groups.items():
        recs = [r for _, r in items]
        most = max(len(r["history"]) for r in recs)
        level = [r for r in recs if len(r["history"]) == most]  # seeds behind are not averaged
        tests = [t for t in map(_test_top1, level) if t is not None]
        vals = [max(h["val_top1"] for h in r["history"]) for r in level if r["history"]]
        part = f" ({len(level)} of {len(recs)} seeds)" if len(level) < len(recs) else ""
        epochs = sorted({len(r["history"]) for r in recs})
        per_epoch = [h["epoch_seconds"] / 60 for r in recs for h in r["history"]]
        minutes = f"{sorted(per_epoch)[len(per_epoch) // 2]:.1f}" if per_epoch else ""
        reached = (
            " / ".join(_reached(recs[0], k) for k in ("0.90", "0.92")) if len(recs) == 1 else ""
        )
        what = re.sub(r", seed \d+$", "", recs[0]["what"])
        seeds = f" ({len(recs)} seeds)" if len(recs) > 1 else ""
        links = ", ".join(f"[{p.stem}]({link(p, page_dir)})" for p, _ in items)
        lines.append(
            f"| {group}{seeds} | {what} | {'/'.join(map(str, epochs))} "
            f"| {_spread(tests) + part if tests else 'not yet'} | {_spread(vals) if vals else ''} "
            f"| {reached} | {minutes} | {_machines(recs[0])} | {links} |"
        )
    return "\n".join(lines) + "\n"


def fashion_curves(records: dict[str, tuple[Path, dict]], page_dir: Path) -> str:
    """Test top-1 after every epoch, side by side, for the runs that record it."""
    curves = {name: _curve(rec) for name, (_, rec) in records.items() if _curve(rec)}
    if not curves:
        return "No run has recorded its test figures per epoch yet.\n"
    epochs = sorted({e for c in curves.values() for e in c})
    lines = ["| epoch | " + " | ".join(curves) + " |", "|---" * (len(curves) + 1) + "|"]
    for e in epochs:
        cells = [f"{c[e]:.1%}" if e in c else "" for c in curves.values()]
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _curve(rec: dict) -> dict[int, float]:
    """Test top-1 by epoch, for a run that records it after every epoch."""
    rows = rec.get("test_per_epoch") or [h for h in rec.get("history", []) if "test_top1" in h]
    return {r["epoch"]: r["test_top1"] for r in rows}


def _finished(rec: dict) -> bool:
    history = rec.get("history", [])
    return bool(history) and len(history) >= rec.get("epochs_planned", len(history))


def _seeded(records: dict[str, tuple[Path, dict]], group: str) -> list[tuple[int, dict]]:
    """The group's records with their seeds (a name without -sN is seed 0)."""
    found = [(name, rec) for name, (_, rec) in records.items() if _seed_group(name) == group]
    seeds = [int(m.group(1)) if (m := SEED.search(n)) else 0 for n, _ in found]
    return sorted(zip(seeds, [r for _, r in found], strict=True), key=lambda item: item[0])


def _group(records: dict[str, tuple[Path, dict]], group: str) -> list[dict]:
    return [rec for name, (_, rec) in records.items() if _seed_group(name) == group]


def _range(values: list[float]) -> float:
    return max(values) - min(values) if len(values) > 1 else 0.0


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _final(recs: list[dict]) -> str:
    """'91.2% ± 0.3% (2 seeds)' of the finished runs, and how far the others have come."""
    if not recs:
        return NOT_YET
    tests = {id(r): _test_top1(r) for r in recs if _finished(r)}
    done = [t for t in tests.values() if t is not None]
    rest = [r for r in recs if tests.get(id(r)) is None]
    if not rest:
        return _spread(done) + (f" ({len(done)} seeds)" if len(done) > 1 else "")
    trained = ", ".join(f"{len(r['history'])}/{r.get('epochs_planned', '?')}" for r in rest)
    if not done:
        return f"{NOT_YET} (epochs trained: {trained})"
    return (
        f"{_spread(done)} ({len(done)} of {len(recs)} seeds; epochs trained by the rest: {trained})"
    )


def _versus(a: list[dict], b: list[dict], a_name: str, b_name: str) -> str:
    """Who is ahead at the end, against the larger spread between seeds of either side."""
    ta = [_test_top1(r) for r in a if _finished(r)]
    tb = [_test_top1(r) for r in b if _finished(r)]
    if not a or not b or len(ta) < len(a) or len(tb) < len(b) or None in ta + tb:
        return "not yet: a run is unfinished"
    diff, noise = _mean(ta) - _mean(tb), max(_range(ta), _range(tb))
    if abs(diff) <= noise:
        return f"equal within the seed spread ({diff * 100:+.1f} points; spread {noise * 100:.1f})"
    ahead = a_name if diff > 0 else b_name
    return f"{ahead} ahead by {abs(diff) * 100:.1f} points (seed spread {noise * 100:.1f})"


def _per_epoch(ours: list[dict], keras: list[dict]) -> str:
    """Whether eanet's test top-1 is at least the Keras code's at every epoch, within the
    larger spread between seeds of either side (the Keras mean above eanet's by more than
    it: behind). An epoch is judged once every eanet seed and a Keras run have measured it:
    without two seeds there is no spread to judge by."""
    mine, theirs = [_curve(r) for r in ours], [_curve(r) for r in keras]
    if len(mine) < 2 or not theirs:
        return "not yet: it needs two eanet seeds and a Keras run"
    epochs = sorted(set.intersection(*map(set, mine)) & set().union(*theirs))
    if not epochs:
        return "not yet: no epoch measured by every eanet seed and the Keras code"
    behind = {}
    for e in epochs:
        ea, ka = [c[e] for c in mine], [c[e] for c in theirs if e in c]
        if _mean(ka) - _mean(ea) > max(_range(ea), _range(ka)):
            behind[e] = _mean(ka) - _mean(ea)
    judged = f"epoch {epochs[0]} to {epochs[-1]}" if len(epochs) > 1 else f"epoch {epochs[0]}"
    if not behind:
        return f"holds at every epoch judged ({judged})"
    worst = max(behind.values()) * 100
    return (
        f"Keras ahead at epoch {', '.join(map(str, behind))} of those judged ({judged}), "
        f"by up to {worst:.1f} points"
    )


CLAIMS = (  # (question, eanet's group, the other group, how they are compared)
    ("EANet against ViT, the reference recipe, 10 epochs", "eanet", "vit", "final"),
    ("the fixed augmentation order against the reference's (EANet)", "eanet", "eanet-bug", "final"),
    (
        "`--recipe modern` against the reference recipe, 10 epochs (EANet)",
        "eanet-modern",
        "eanet",
        "final",
    ),
    ("eanet against the Keras example's code, fixed order", "eanet", "keras-fixed", "epochs"),
    (
        "eanet against the Keras example's code, the reference's order",
        "eanet-bug",
        "keras-reference",
        "epochs",
    ),
)


def fashion_reference(records: dict[str, tuple[Path, dict]], page_dir: Path) -> str:
    """The reference model and recipe unchanged: every epoch's test and validation figures,
    minutes and machine."""
    item = records.get("reference")
    if item is None:
        return f"{NOT_YET}: `python benchmarks/fashion_mnist.py reference`.\n"
    path, rec = item
    tests = {r["epoch"]: r for r in rec.get("test_per_epoch", [])}
    lines = [
        "| epoch | test top-1 | test top-5 | val top-1 | val top-5 | minutes | machine |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rec["history"]:
        t, seg = tests.get(row["epoch"], {}), _segment_of(rec, row) or {}
        cells = [f"{t[k]:.1%}" if k in t else "" for k in ("test_top1", "test_top5")]
        cells += [f"{row['val_top1']:.1%}", f"{row['val_top5']:.1%}"]
        cells.append(f"{row['epoch_seconds'] / 60:.1f}")
        cells.append(_where(seg, idle=True))
        lines.append(f"| {row['epoch']} | " + " | ".join(cells) + " |")
    lines.append(
        f"\n{len(rec['history'])} of {rec['epochs_planned']} epochs; record: "
        f"[{path.name}]({link(path, page_dir)})."
    )
    return "\n".join(lines) + "\n"


def claim_rows(records: dict[str, tuple[Path, dict]]) -> list[tuple[str, str, str, str]]:
    """(question, first side, second side, verdict) of each claim, from the records."""
    rows = []
    for question, a, b, how in CLAIMS:
        ra, rb = _group(records, a), _group(records, b)
        verdict = _versus(ra, rb, a, b) if how == "final" else _per_epoch(ra, rb)
        rows.append((question, f"{a}: {_final(ra)}", f"{b}: {_final(rb)}", verdict))
    return rows


def fashion_claims(records: dict[str, tuple[Path, dict]], page_dir: Path) -> str:
    """The project's claims, each checked on the Fashion-MNIST records that bear on it."""
    lines = ["| question | first | second | verdict |", "|---|---|---|---|"]
    lines += [f"| {q} | {a} | {b} | {verdict} |" for q, a, b, verdict in claim_rows(records)]
    return "\n".join(lines) + "\n"


SAME_COST = {  # a group without an idle epoch of its own takes one of a run that costs the same
    "eanet-bug": "eanet",  # the same model; the augmentation in the other order
    "keras-fixed": "keras-reference",  # the same code; the Normalization layer moved
    "eanet-best": "eanet-fast",  # the same model; crops and flips of 28x28 photos added
}


def _idle_epoch_minutes(recs: list[dict]) -> tuple[float, str] | None:
    """Median minutes of the epochs that ran idle (training + validation), and their machine."""
    minutes, where = [], ""
    for rec in recs:
        for row in rec.get("history", []):
            seg = _segment_of(rec, row)
            if seg is not None and seg.get("idle"):
                minutes.append(row["epoch_seconds"] / 60)
                where = _where(seg)
    if not minutes:
        return None
    return sorted(minutes)[len(minutes) // 2], where


def _segment_of(rec: dict, row: dict) -> dict | None:
    """The stretch of calls an epoch ran in (a Keras record keeps it on the epoch's row)."""
    if "idle" in row:
        return {"idle": row["idle"], "threads": row.get("threads"), "class": rec["machine_class"]}
    for seg in rec.get("segments", []):
        if seg["epochs"][0] <= row["epoch"] <= seg["epochs"][1]:
            return seg
    return None


def _epochs(n: int) -> str:
    return f"{n} epoch" + ("s" if n != 1 else "")


def _minutes_to(rec: dict, hit: dict, per_epoch: float | None) -> float | None:
    """The run's own minutes where every epoch up to the hit ran idle, else epochs x idle."""
    rows = [r for r in rec["history"] if r["epoch"] <= hit["epoch"]]
    if all((_segment_of(rec, r) or {}).get("idle") for r in rows):
        return hit["minutes"]
    return hit["epoch"] * per_epoch if per_epoch else None


def _to_reach(recs: list[dict], key: str, per_epoch: float | None) -> str:
    recs = [r for r in recs if r.get("history")]
    hits = [first_reached(r["history"], float(key)) for r in recs]
    if not hits:
        return ""
    if None in hits:
        most = max(len(r["history"]) for r in recs)
        low = f" (more than {most * per_epoch:.0f} min)" if per_epoch else ""
        return f"not reached in {_epochs(most)}" + low
    minutes = [_minutes_to(r, h, per_epoch) for r, h in zip(recs, hits, strict=True)]
    cell = "epoch " + " / ".join(str(h["epoch"]) for h in hits)
    return cell + (f": {_mean(minutes):.1f} min" if None not in minutes else "")


def fashion_time(records: dict[str, tuple[Path, dict]], page_dir: Path) -> str:
    """Minutes until validation top-1 first reaches 90% / 92%: each run's epochs to get there
    times the minutes of an epoch measured idle (its own, or one of the same cost)."""
    lines = [
        "| experiment | idle minutes per epoch | val top-1 >= 90% first | val top-1 >= 92% first |",
        "|---|---|---|---|",
    ]
    groups: dict[str, list[dict]] = {}
    for name, (_, rec) in records.items():
        groups.setdefault(_seed_group(name), []).append(rec)
    for group, recs in groups.items():
        idle = _idle_epoch_minutes(recs)
        source = ""
        if idle is None and group in SAME_COST:
            idle = _idle_epoch_minutes(groups.get(SAME_COST[group], []))
            source = f" (of {SAME_COST[group]})"
        per_epoch = idle[0] if idle else None
        cost = f"{idle[0]:.1f}{source} on {idle[1]}" if idle else "no idle epoch yet"
        cells = [_to_reach(recs, k, per_epoch) for k in ("0.90", "0.92")]
        lines.append(f"| {group} | {cost} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


FIDELITY = Path("fidelity") / "fidelity.json"  # tools/record_checks.py fidelity
LEARNING_CHECK = Path("digits") / "learning_check.json"  # tools/record_checks.py learning-check
COMPARE_DIGITS = ROOT / "docs" / "compare-digits" / "report.json"  # eanet compare's report
NOT_YET = "not yet measured"


def load_record(path: Path) -> tuple[Path, dict] | None:
    """A JSON record and its path, or None where it has not been written yet."""
    return (path, json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else None


def _doc(page: str, page_dir: Path, anchor: str = "") -> str:
    """A link to one of the repository's pages, from the page the table is in."""
    return f"[{page}]({link(ROOT / page, page_dir)}{anchor})"


def _recorded(item: tuple[Path, dict], page_dir: Path, full: bool = True) -> str:
    """'[date](json)', then machine, torch and `command` of a tools/record_checks.py record."""
    path, rec = item
    cell = f"[{rec['date'][:10]}]({link(path, page_dir)})"
    if full:
        cell += f", {class_label(rec['machine_class'], rec)}, torch {rec['environment']['torch']}"
        cell += f", `{rec['command']}`"
    return cell


def _parameters(part: dict) -> str:
    """'EANet 361,387 = 361,387; ViT ... (... trainable + 7 normalization statistics)'."""
    totals, trainable, stats = [], [], set()
    for name, m in part["models"].items():
        ours, keras = m["eanet"], m["keras_file"]
        total = ours["trainable"] + ours["statistics"]
        same = total == m["keras_summary_total"] and ours == keras
        totals.append(
            f"{MODELS[name.split('-')[0]]} {total:,} {'=' if same else '≠'} "
            f"{m['keras_summary_total']:,}"
        )
        trainable.append(
            f"{ours['trainable']:,}" + ("" if same else f" (Keras {keras['trainable']:,})")
        )
        stats.add(ours["statistics"])
    counts = " / ".join(trainable) + f" trainable + {'/'.join(map(str, sorted(stats)))}"
    return "; ".join(totals) + f" ({counts} normalization statistics)"


def _sci(value: float, digits: int = 1) -> str:
    """8.9e-7, 2e-5: scientific notation without the exponent's leading zero."""
    mantissa, exponent = f"{value:.{digits}e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _per_model(files: dict, key: str) -> str:
    """'EANet 8.9e-7, ViT 1.0e-6': the largest figure over each model's fixture files."""
    worst: dict[str, float] = {}
    for row in files.values():
        worst[row["model"]] = max(worst.get(row["model"], 0.0), row[key])
    return ", ".join(f"{model} {_sci(value)}" for model, value in worst.items())


def fidelity_table(item: tuple[Path, dict] | None, page_dir: Path) -> str:
    """Parameters, forward pass and 10 training steps against the Keras example's own."""
    lines = ["| what | result | test tolerance | checked by | recorded |", "|---|---|---|---|---|"]
    if item is None:
        return "\n".join(lines) + f"\n| the fidelity figures | {NOT_YET} | | | |\n"
    rec = item[1]
    fwd, train = rec["forward"], rec["training"]
    keras, torch_rule = train["keras_rule"]["weights"], train["torch_rule"]
    steps = str(train["steps"])
    rows = [
        (
            "parameters vs Keras `model.summary()` and the Keras files' weights",
            _parameters(rec["parameters"]),
            "equal",
            f"`{rec['parameters']['checked_by']}`",
        ),
        (
            f"forward: Keras weights imported, max abs. difference of the output probabilities "
            f"from Keras's own, {fwd['images']} real CIFAR-100 images",
            f"{_per_model(fwd['files'], 'plain')} (with `eanet.accel`: "
            f"{_per_model(fwd['files'], 'accel')}; a wrong (erf) GELU moves them "
            f"{_per_model(fwd['files'], 'erf_gelu')})",
            f"{_sci(fwd['tolerance'], 0)}",
            f"`{fwd['checked_by']}` ({_doc('docs/interop.md', page_dir)})",
        ),
        (
            f"training: {steps} steps of the example's compile from the same weights on the same "
            "real images, max abs. weight difference from Keras's own trajectory",
            f"{_sci(keras[steps]['max_abs_diff'])} after {steps} steps "
            f"(after step 1: {_sci(keras['1']['max_abs_diff'])}); torch's AdamW epsilon rule ends "
            f"{_sci(torch_rule['weights'][steps]['max_abs_diff'])} away (it must exceed "
            f"{_sci(torch_rule['must_exceed'], 0)})",
            f"{_sci(train['tolerance'], 0)}",
            f"`{train['checked_by']}` "
            f"({_doc('docs/reference.md', page_dir, '#2-the-training-recipe')})",
        ),
    ]
    for i, (what, result, tolerance, checked) in enumerate(rows):
        recorded = _recorded(item, page_dir, full=i == 0)
        lines.append(f"| {what} | {result} | {tolerance} | {checked} | {recorded} |")
    return "\n".join(lines) + "\n"


def _learning_check(item: tuple[Path, dict] | None, page_dir: Path) -> tuple[str, ...]:
    what = "held-out top-1 on the real digits, 2-block EANet (the learning check)"
    checked = "`tests/test_train.py` (CI)"
    if item is None:
        return what, NOT_YET, checked
    rec = item[1]["learning_check"]
    m, recipe = rec["metrics"], rec["recipe"]
    what = (
        f"held-out top-1 on {m['test_images']} real digits, {recipe['model_args']['depth']}-block "
        f"EANet, {recipe['epochs']} epochs (the learning check; CI requires at least "
        f"{rec['threshold']:.0%})"
    )
    return what, f"{m['test_top1']:.1%}", f"{_recorded(item, page_dir)}; {checked}"


def _compare(report: tuple[Path, dict] | None, page_dir: Path) -> tuple[str, ...]:
    """EANet vs ViT per augmentation order: test top-1, mean ± std over the seeds."""
    doc = _doc("docs/eanet-vs-vit.md", page_dir)
    if report is None:
        return "EANet vs ViT, `eanet compare`", NOT_YET, doc
    path, rep = report
    cfg = rep["config"]
    orders = {"fixed": "fixed order", "reference-bug": "the reference's order"}
    cells = []
    for order in cfg["augment_orders"]:
        scores = [
            f"{MODELS.get(g['model'].split('-')[0], g['model'])} "
            f"{g['summary']['test_top1']['mean']:.1%} ± {g['summary']['test_top1']['std']:.1%}"
            for g in rep["groups"]
            if g["augment"] == order
        ]
        cells.append(f"{orders.get(order, order)}: {', '.join(scores)}")
    depth = cfg["model_args"].get("depth")
    what = (
        f"EANet vs ViT on {cfg['dataset']}"
        + (f", {depth} blocks" if depth else "")
        + f", {cfg['epochs']} epochs, {cfg['seeds']} seeds, test top-1 (mean ± std)"
    )
    env = rep["environment"]
    measured = (
        f"`eanet compare` ([{rep['created'][:10]}]({link(path, page_dir)}), "
        f"{env.get('cpu_model', env['processor'])}, {env['cpu_count']} cores; {doc})"
    )
    return what, "; ".join(cells), measured


def _fashion_best(rec: dict | None) -> str:
    if rec is None:
        return NOT_YET
    test = _test_top1(rec)
    if test is None:
        return f"{NOT_YET} ({len(rec['history'])} of {rec['epochs_planned']} epochs trained)"
    epochs = (rec.get("test") or {}).get("epochs", len(rec["history"]))
    return f"{test:.1%} after {epochs} epochs"


def _fashion_reference(rec: dict | None) -> str:
    """Its test top-1 after its epochs, and the minutes of an idle epoch where it has one."""
    idle = _idle_epoch_minutes([rec]) if rec else None
    return _fashion_best(rec) + (f"; {idle[0]:.1f} min an idle epoch on {idle[1]}" if idle else "")


def _fashion_fast(seeded: list[tuple[int, dict]]) -> str:
    """Each seed's minutes until validation top-1 first reached 90%, and its machine."""
    if not seeded:
        return NOT_YET
    return "; ".join(_fast_seed(rec, f"seed {s}: " if len(seeded) > 1 else "") for s, rec in seeded)


def _fast_seed(rec: dict, seed: str) -> str:
    hit = rec.get("reached", {}).get("0.90")
    if hit is None:
        return f"{seed}not reached in {len(rec['history'])} epochs"
    cell = f"{seed}{hit['minutes']:.1f} min (epoch {hit['epoch']}) on {_machines(rec)}"
    if not all(seg.get("idle") for seg in rec.get("segments", [])):
        cell += "; other work ran beside it: not a timing"
    return cell


def _claims_in_brief(fashion: dict[str, tuple[Path, dict]], doc: str) -> list[tuple]:
    """A row per judged Fashion-MNIST claim; those not judged yet together in one row."""
    rows, waiting = [], []
    for q, a, b, verdict in claim_rows(fashion):
        if verdict.startswith("not yet"):
            waiting.append(q)
        else:
            rows.append((f"Fashion-MNIST: {q}", f"{verdict}; {a}, {b}", f"the records in {doc}"))
    if waiting:
        rows.append(("Fashion-MNIST, not judged yet (runs unfinished)", "; ".join(waiting), doc))
    return rows


def accuracy_table(
    learning: tuple[Path, dict] | None,
    compare: tuple[Path, dict] | None,
    fashion: dict[str, tuple[Path, dict]],
    page_dir: Path,
) -> str:
    """Top-1 on real data: the digits learning check, EANet vs ViT, Fashion-MNIST, CIFAR-100."""
    fashion_doc = _doc("docs/fashion-mnist.md", page_dir)

    def by(name: str) -> str:
        item = fashion.get(name)
        return f"[{name}.json]({link(item[0], page_dir)}), " if item else ""

    best = fashion.get("eanet-best", (None, None))[1]
    fast = _seeded(fashion, "eanet-fast")
    rows = [
        _learning_check(learning, page_dir),
        _compare(compare, page_dir),
        (
            "Fashion-MNIST, `eanet-best` (the best recipe found): test top-1 of the last weights",
            _fashion_best(best),
            f"`benchmarks/fashion_mnist.py eanet-best` ({by('eanet-best')}{fashion_doc})",
        ),
        (
            "Fashion-MNIST, `eanet-fast`: minutes (training + validation) until validation "
            "top-1 first reached 90%",
            _fashion_fast(fast),
            "`benchmarks/fashion_mnist.py --idle eanet-fast eanet-fast-s1` "
            f"({by('eanet-fast')}{by('eanet-fast-s1')}{fashion_doc})",
        ),
        (
            "Fashion-MNIST, `reference`: the reference model and recipe unchanged (eanet-cifar on"
            " padded photos), test top-1 of the last weights",
            _fashion_reference(fashion.get("reference", (None, None))[1]),
            f"`benchmarks/fashion_mnist.py --idle reference` ({by('reference')}{fashion_doc})",
        ),
        *_claims_in_brief(fashion, fashion_doc),
        (
            "CIFAR-100",
            "not measured: this project's machines cannot download the archive",
            "`eanet train --model eanet-cifar --dataset cifar100` (the main job)",
        ),
    ]
    lines = ["| what | result | measured by |", "|---|---|---|"]
    lines += [f"| {what} | {result} | {by_what} |" for what, result, by_what in rows]
    return "\n".join(lines) + "\n"


TABLES: dict[str, Callable[[Path, Path], str]] = {
    "fashion-table": lambda results, page_dir: fashion_table(load_fashion(results), page_dir),
    "fashion-curves": lambda results, page_dir: fashion_curves(load_fashion(results), page_dir),
    "fashion-claims": lambda results, page_dir: fashion_claims(load_fashion(results), page_dir),
    "fashion-reference": lambda results, page_dir: fashion_reference(
        load_fashion(results), page_dir
    ),
    "fashion-time": lambda results, page_dir: fashion_time(load_fashion(results), page_dir),
    "speed-table": lambda results, page_dir: speed_table(load_runs(results), page_dir),
    "speed-rates": lambda results, page_dir: speed_rates(load_runs(results), page_dir),
    "serve-table": lambda results, page_dir: serve_table(load_serving(results), page_dir),
    "fidelity-table": lambda results, page_dir: fidelity_table(
        load_record(results / FIDELITY), page_dir
    ),
    "accuracy-table": lambda results, page_dir: accuracy_table(
        load_record(results / LEARNING_CHECK),
        load_record(COMPARE_DIGITS),
        load_fashion(results),
        page_dir,
    ),
}


def render_page(text: str, results: Path, page_dir: Path) -> str:
    """The page with every marked table replaced by what the results under `results` give."""

    def replace(match: re.Match) -> str:
        name = match["name"]
        if name not in TABLES:
            raise ValueError(f"unknown results table {name!r} (known: {', '.join(TABLES)})")
        return match["begin"] + TABLES[name](results, page_dir) + match["end"]

    return MARKERS.sub(replace, text)


def table_names(text: str) -> list[str]:
    return [m["name"] for m in MARKERS.finditer(text)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="change nothing; exit 1 if a table is out of date"
    )
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help="the folder holding cpu/ and serve/"
    )
    parser.add_argument(
        "pages", nargs="*", type=Path, default=[ROOT / p for p in PAGES], help="pages to render"
    )
    args = parser.parse_args(argv)
    stale = []
    for page in args.pages:
        text = page.read_text(encoding="utf-8")
        new = render_page(text, args.results, page.resolve().parent)
        if new == text:
            continue
        stale.append(page)
        if not args.check:
            page.write_text(new, encoding="utf-8")
            print(f"updated {page}")
    if args.check and stale:
        for page in stale:
            print(
                f"{page}: its results tables differ from {args.results} "
                "(run python tools/results_tables.py)",
                file=sys.stderr,
            )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
