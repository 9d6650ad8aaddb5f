"""The results tables of README.md and docs/speed.md are what the committed JSON gives.

`tools/results_tables.py --check` fails when a page's tables differ from the runs under
benchmarks/results/cpu/; the renderer is checked on a tiny run of its own: the latest run of
a class wins, variant files are skipped, a class without runs is left out, and a missing
bf16 run says so. The fidelity and accuracy tables (README.md) are checked on tiny records
of tools/record_checks.py's, benchmarks/fashion_mnist.py's and `eanet compare`'s shapes, and
say "not yet measured" where a record is absent.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "results_tables.py"


@pytest.fixture(scope="module")
def tables():
    spec = importlib.util.spec_from_file_location("results_tables", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_the_pages_tables_match_the_committed_json():
    run = subprocess.run(
        [sys.executable, str(TOOL), "--check"], capture_output=True, text=True, cwd=ROOT
    )
    assert run.returncode == 0, run.stderr


def test_the_pages_carry_their_tables(tables):
    for page in ("README.md", "docs/speed.md"):
        assert "speed-table" in tables.table_names((ROOT / page).read_text("utf-8")), page
    readme = tables.table_names((ROOT / "README.md").read_text("utf-8"))
    assert {"fidelity-table", "accuracy-table"} <= set(readme)
    fashion = tables.table_names((ROOT / "docs/fashion-mnist.md").read_text("utf-8"))
    assert fashion == [
        "fashion-table",
        "fashion-reference",
        "fashion-curves",
        "fashion-claims",
        "fashion-time",
    ]


def _fashion(name: str, what: str, vals: list[float], test: float | None, **extra) -> dict:
    history = [{"epoch": i + 1, "epoch_seconds": 120.0, "val_top1": v} for i, v in enumerate(vals)]
    rec = {"experiment": name, "what": what, "history": history, **extra}
    rec["test"] = {"test_top1": test} if test is not None else None
    rec["segments"] = [{"class": "avx2", "threads": 2, "idle": name == "fast"}]
    return rec


def test_the_fashion_table_puts_seeds_together_and_says_what_is_missing(tables, tmp_path):
    folder = tmp_path / "fashion-mnist"
    for seed, test in ((0, 0.90), (1, 0.92)):
        rec = _fashion(f"eanet-s{seed}", f"EANet, seed {seed}", [0.85, 0.91], test)
        _write(folder, f"eanet-s{seed}.json", rec)
    reached = {"0.90": {"epoch": 2, "minutes": 4.0}, "0.92": None}
    _write(folder, "fast.json", _fashion("fast", "fast one", [0.88, 0.905], None, reached=reached))
    behind = _fashion("vit-s0", "ViT, seed 0", [0.80, 0.86], 0.87)
    _write(folder, "vit-s0.json", behind)
    _write(folder, "vit-s1.json", _fashion("vit-s1", "ViT, seed 1", [0.60], 0.61))
    rows = tables.fashion_table(tables.load_fashion(tmp_path), tmp_path).splitlines()[2:]
    assert len(rows) == 3
    vit = next(r for r in rows if r.startswith("| vit (2 seeds) |"))
    assert "| 1/2 | 87.0% (1 of 2 seeds) | 86.0% |" in vit  # a seed behind is not averaged in
    eanet = next(r for r in rows if r.startswith("| eanet (2 seeds) | EANet |"))
    assert "| 91.0% ± 1.0% | 91.0% ± 0.0% |" in eanet and "AVX2 only, 2 threads |" in eanet
    fast = next(r for r in rows if r.startswith("| fast |"))
    assert "| not yet |" in fast and "epoch 2, 4.0 min / not reached" in fast
    assert "2 threads, idle" in fast


def test_the_fashion_curves_put_each_runs_epochs_side_by_side(tables, tmp_path):
    folder = tmp_path / "fashion-mnist"
    ref = {"history": [], "test_per_epoch": [{"epoch": 1, "test_top1": 0.5}]}
    keras = {"history": [{"epoch": 1, "test_top1": 0.4}, {"epoch": 2, "test_top1": 0.6}]}
    _write(folder, "reference.json", ref)
    _write(folder, "keras-fixed-s0.json", keras)
    table = tables.fashion_curves(tables.load_fashion(tmp_path), tmp_path).splitlines()
    assert table[0] == "| epoch | keras-fixed-s0 | reference |"
    assert table[2:] == ["| 1 | 40.0% | 50.0% |", "| 2 | 60.0% |  |"]


def _curve_run(tests: list[float], planned: int = 2) -> dict:
    rows = [{"epoch": i + 1, "test_top1": t} for i, t in enumerate(tests)]
    return {"history": rows, "epochs_planned": planned, "test": {"test_top1": tests[-1]}}


def test_the_claims_compare_finished_seeds_and_keras_epoch_by_epoch(tables, tmp_path):
    folder = tmp_path / "fashion-mnist"
    _write(folder, "eanet-s0.json", _curve_run([0.80, 0.90]))
    _write(folder, "eanet-s1.json", _curve_run([0.82, 0.88]))
    _write(folder, "vit-s0.json", _curve_run([0.70, 0.85]))
    _write(folder, "vit-s1.json", _curve_run([0.71, 0.86]))
    _write(folder, "eanet-bug-s0.json", _curve_run([0.80, 0.895]))
    _write(folder, "eanet-bug-s1.json", _curve_run([0.80]))  # 1 of 2 epochs
    keras = _curve_run([0.805, 0.93])  # within the seeds' range at 1, ahead at 2
    del keras["test"]
    _write(folder, "keras-fixed-s0.json", keras)
    rows = tables.fashion_claims(tables.load_fashion(tmp_path), tmp_path).splitlines()[2:]
    vit, bug, modern, fixed, ref = rows
    assert "| eanet: 89.0% ± 1.0% (2 seeds) | vit: 85.5% ± 0.5% (2 seeds) |" in vit
    assert vit.endswith("| eanet ahead by 3.5 points (seed spread 2.0) |")
    assert "eanet-bug: 89.5% (1 of 2 seeds; epochs trained by the rest: 1/2)" in bug
    assert bug.endswith("| not yet: a run is unfinished |")
    assert "eanet-modern: not yet measured |" in modern
    assert fixed.endswith(
        "| Keras ahead at epoch 2 of those judged (epoch 1 to 2), by up to 4.0 points |"
    )
    assert ref.endswith("| not yet: it needs two eanet seeds and a Keras run |")
    brief = tables._claims_in_brief(tables.load_fashion(tmp_path), "DOC")
    assert [what for what, _, _ in brief] == [
        "Fashion-MNIST: EANet against ViT, the reference recipe, 10 epochs",
        "Fashion-MNIST: eanet against the Keras example's code, fixed order",
        "Fashion-MNIST, not judged yet (runs unfinished)",
    ]
    assert brief[0][1].startswith("eanet ahead by 3.5 points (seed spread 2.0); eanet: 89.0%")
    assert brief[2][1].count(";") == 2


def test_equal_within_the_seed_spread_is_said_so(tables):
    a = [_curve_run([0.90], planned=1), _curve_run([0.92], planned=1)]
    b = [_curve_run([0.905], planned=1)]
    assert tables._versus(a, b, "a", "b").startswith("equal within the seed spread (+0.5 points")
    assert tables._per_epoch(a, b) == "holds at every epoch judged (epoch 1)"
    a[1]["history"] = []  # one eanet seed has not measured epoch 1 yet: no spread to judge by
    assert tables._per_epoch(a, b).startswith("not yet: no epoch measured by every eanet seed")


def test_time_to_accuracy_takes_idle_epochs_and_those_of_the_same_cost(tables, tmp_path):
    folder = tmp_path / "fashion-mnist"
    ours = _fashion("eanet-s0", "EANet", [0.85, 0.89, 0.905, 0.91], None)
    ours["history"][0]["epoch_seconds"] = 60.0  # the idle epoch
    ours["segments"] = [
        {"epochs": [1, 1], "class": "avx2", "threads": 2, "idle": True},
        {"epochs": [2, 4], "class": "avx2", "threads": 1, "idle": False},
    ]
    bug = _fashion("eanet-bug-s0", "bug", [0.5, 0.6], None)
    bug["segments"][0]["epochs"] = [1, 2]
    keras = {
        "machine_class": "avx2",
        "history": [
            {"epoch": 1, "val_top1": 0.91, "epoch_seconds": 180.0, "idle": True, "threads": 2},
            {"epoch": 2, "val_top1": 0.93, "epoch_seconds": 400.0, "idle": False, "threads": 1},
        ],
    }
    for name, rec in (("eanet-s0", ours), ("eanet-bug-s0", bug), ("keras-reference-s0", keras)):
        _write(folder, f"{name}.json", rec)
    _write(folder, "keras-fixed-s0.json", {"history": keras["history"][1:], "machine_class": "x"})
    rows = tables.fashion_time(tables.load_fashion(tmp_path), tmp_path).splitlines()[2:]
    bug_row, eanet_row, fixed_row, ref_row = rows
    assert (
        eanet_row == "| eanet | 1.0 on AVX2 only, 2 threads | epoch 3: 3.0 min "
        "| not reached in 4 epochs (more than 4 min) |"
    )
    assert bug_row.startswith(
        "| eanet-bug | 1.0 (of eanet) on AVX2 only, 2 threads | not reached in 2"
    )
    assert (
        ref_row
        == "| keras-reference | 3.0 on AVX2 only, 2 threads | epoch 1: 3.0 min | epoch 2: 6.0 min |"
    )
    assert fixed_row.startswith("| keras-fixed | 3.0 (of keras-reference) on AVX2 only")


def test_the_best_recipe_is_timed_by_the_idle_epochs_of_the_same_model(tables, tmp_path):
    folder = tmp_path / "fashion-mnist"
    fast = _fashion("eanet-fast", "fast", [0.88, 0.905], None)
    fast["segments"][0].update(epochs=[1, 2], idle=True)
    _write(folder, "eanet-fast.json", fast)
    best = _fashion("eanet-best", "best", [0.87, 0.89, 0.91], None)
    best["segments"][0]["epochs"] = [1, 3]  # ran beside other work: no idle epoch of its own
    _write(folder, "eanet-best.json", best)
    rows = tables.fashion_time(tables.load_fashion(tmp_path), tmp_path).splitlines()[2:]
    row = next(r for r in rows if r.startswith("| eanet-best |"))
    assert row.startswith(
        "| eanet-best | 2.0 (of eanet-fast) on AVX2 only, 2 threads | epoch 3: 6.0 min |"
    )


def test_the_reference_table_has_every_epochs_figures_and_machine(tables, tmp_path):
    folder = tmp_path / "fashion-mnist"
    assert tables.fashion_reference({}, tmp_path).startswith("not yet measured")
    rec = _fashion("reference", "the reference", [0.55, 0.7], None, epochs_planned=10)
    for row in rec["history"]:
        row["val_top5"] = 0.96
    rec["segments"] = [
        {"epochs": [1, 1], "class": "avx2", "threads": 2, "idle": True},
        {"epochs": [2, 2], "class": "amx-bf16", "threads": 1, "idle": False},
    ]
    rec["test_per_epoch"] = [{"epoch": 1, "test_top1": 0.546, "test_top5": 0.965}]
    _write(folder, "reference.json", rec)
    table = tables.fashion_reference(tables.load_fashion(tmp_path), tmp_path).splitlines()
    assert table[2] == "| 1 | 54.6% | 96.5% | 55.0% | 96.0% | 2.0 | AVX2 only, 2 threads, idle |"
    assert table[3] == "| 2 |  |  | 70.0% | 96.0% | 2.0 | AMX (avx512_bf16, amx_bf16), 1 threads |"
    assert table[5].startswith("2 of 10 epochs; record: [reference.json](fashion-mnist/")
    assert tables._fashion_reference(rec) == (
        "not yet measured (2 of 10 epochs trained); 2.0 min an idle epoch on AVX2 only, 2 threads"
    )
    rec["test"] = {"test_top1": 0.7, "epochs": 2}
    assert tables._fashion_reference(rec).startswith("70.0% after 2 epochs; 2.0 min an idle")


def _row(model: str, precision: str | None, train: float, infer: float, steps: int = 5) -> dict:
    run = {"steps": steps, "warmup": 2, "batch_size": 128}
    row = {
        "model": model,
        "eanet_train_img_s": 100.0 * train,
        "eanet_infer_img_s": 300.0 * infer,
        "keras_train_img_s": 100.0,
        "keras_infer_img_s": 300.0,
        "train_ratio": train,
        "infer_ratio": infer,
        "matmul_peak_gflops": 150.0,
        "eanet_train_fraction_of_peak": 0.5,
        "eanet_infer_fraction_of_peak": 0.6,
        "environment": {"cpu_model": "Test(R) CPU(TM) Processor", "cpu_count": 2},
        "runs": {"eanet": [run, run], "keras": [run, run]},
    }
    if precision:  # runs from before --precisions have no precision field: fp32
        row |= {"precision": precision, "asked_precision": precision, "compile": False}
    return row


def _write(folder: Path, name: str, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(rows))


@pytest.fixture
def results(tmp_path) -> Path:
    cpu = tmp_path / "cpu"
    _write(cpu / "avx2", "20260101-000000-reference.json", [_row("eanet", None, 4.0, 3.0)])
    _write(cpu / "amx-bf16", "20260102-000000-reference.json", [_row("eanet", "fp32", 1.0, 1.0)])
    newer = [_row("eanet", "fp32", 2.5, 2.25), _row("eanet", "bf16", 5.0, 4.5)]
    newer.append(_row("eanet", "bf16", 9.0, 9.0) | {"compile": True})  # not the eager row
    _write(cpu / "amx-bf16", "20260103-120000-reference.json", newer)
    # a run on the code before a change, kept for the record: never the latest result
    bad = [_row("eanet", "fp32", 0.1, 0.1), _row("eanet", "bf16", 0.1, 0.1)]
    _write(cpu / "amx-bf16", "20260104-000000-reference-before-change.json", bad)
    return tmp_path


def test_the_latest_run_per_class_and_only_classes_that_ran(tables, results, tmp_path):
    table = tables.speed_table(tables.load_runs(results), tmp_path)
    lines = table.splitlines()
    assert len(lines) == 2 + 2  # header, rule, one row per class that has a run
    avx2, amx = lines[2], lines[3]
    assert avx2.startswith("| Test CPU, AVX2 only, 2 cores | [2026-01-01](cpu/avx2/")
    args = "--rounds 2 --steps 5 --warmup 2 --precisions fp32 --models eanet"
    assert f"`compare_reference.py {args}`" in avx2
    assert "| EANet | 4.00x, 3.00x | not run (bf16 is emulated there" in avx2
    assert "| Test CPU, AMX (avx512_bf16, amx_bf16), 2 cores | [2026-01-03](" in amx
    assert "20260103-120000-reference.json" in amx
    assert amx.endswith("| EANet | 2.50x, 2.25x | 5.00x, 4.50x |")
    assert "--precisions fp32 bf16 --models eanet --compiled" in amx
    # classes without a run (avx512, avx512-bf16) and models without one (ViT) are left out
    assert "AVX-512" not in table and "ViT" not in table and "0.10x" not in table


def test_a_class_with_native_bf16_but_no_bf16_run_says_not_run(tables, tmp_path):
    cpu = tmp_path / "cpu"
    _write(cpu / "avx512-bf16", "20260101-000000-reference.json", [_row("vit", "fp32", 1, 1)])
    (row,) = tables.speed_table(tables.load_runs(tmp_path), tmp_path).splitlines()[2:]
    assert row.endswith("| ViT | 1.00x, 1.00x | not run |")
    assert "--models vit" in row


def test_no_runs_no_rows(tables, tmp_path):
    assert tables.speed_table({}, tmp_path).count("\n") == 2
    assert tables.speed_rates({}, tmp_path).count("\n") == 2
    assert tables.serve_table({}, tmp_path).count("\n") == 2


def test_pages_are_rewritten_between_their_markers_and_checked(tables, results, tmp_path):
    page = tmp_path / "page.md"
    begin, end = "<!-- results:speed-table begin -->", "<!-- results:speed-table end -->"
    text = f"before\n{begin}\nstale\n{end}\nafter\n"
    page.write_text(text)
    argv = ["--results", str(results), str(page)]
    assert tables.main(["--check", *argv]) == 1
    assert page.read_text() == text  # --check changes nothing
    assert tables.main(argv) == 0
    new = page.read_text()
    assert new.startswith("before\n<!-- results:speed-table begin -->\n| CPU class |")
    assert new.endswith("|\n<!-- results:speed-table end -->\nafter\n") and "stale" not in new
    assert tables.main(["--check", *argv]) == 0


def test_an_unknown_table_name_is_an_error(tables, tmp_path):
    text = "<!-- results:nope begin -->\n<!-- results:nope end -->\n"
    with pytest.raises(ValueError, match="nope"):
        tables.render_page(text, tmp_path, tmp_path)


def test_the_serving_table_names_each_class_once_and_what_auto_chose(tables, tmp_path):
    settings = {"precisions": ["fp32", "auto"], "requests": 300, "concurrency": 8}
    rows = [
        {"requested_precision": "fp32", "precision": "fp32", "max_batch": 64},
        {"requested_precision": "auto", "precision": "bf16", "max_batch": 64}
        | {"bf16_from_images": 2},
        {"requested_precision": "auto", "precision": "fp32", "max_batch": 1},
    ]
    for row in rows:
        row |= {"requests_per_s": 200.0, "p99_ms": 40.0, "images_per_pass": 6.0}
    env = {"cpu_model": "Test CPU", "cpu_count": 2}
    result = {"settings": settings, "rows": rows, "environment": env, "date": "2026-01-02 10:00"}
    _write(tmp_path / "serve" / "amx-bf16", "serve_load.json", result)
    table = tables.serve_table(tables.load_serving(tmp_path), tmp_path).splitlines()
    assert len(table) == 2 + 3 and "Test CPU, AMX" in table[2] and "Test CPU" not in table[3]
    assert "[2026-01-02](serve/amx-bf16/serve_load.json)" in table[2]
    assert "`serve_load.py --precisions fp32 auto --requests 300 --concurrency 8`" in table[2]
    assert "| auto (bf16 from 2 images, fp32 below) | 64 | 200.0 | 40.0 | 6.0 |" in table[3]
    assert "| auto (fp32) | 1 |" in table[4]


ENV = {"cpu_model": "Test CPU", "cpu_count": 2, "torch": "2.13.0+cpu"}


def _record(command: str, **parts) -> dict:
    """A tools/record_checks.py record holding `parts`."""
    head = {"command": f"python tools/record_checks.py {command}", "date": "2026-01-02 10:00 UTC"}
    return head | {"machine_class": "avx2", "environment": ENV, **parts}


def _fidelity() -> dict:
    counts = {"trainable": 361_380, "statistics": 7}
    vit = {"trainable": 623_268, "statistics": 7}
    models = {
        "eanet-cifar": {"eanet": counts, "keras_file": counts, "keras_summary_total": 361_387},
        "vit-cifar": {"eanet": vit, "keras_file": vit | {"trainable": 1}, "keras_summary_total": 9},
    }
    files = {
        "eanet.weights.h5": {"model": "EANet", "plain": 8.9e-7, "accel": 1e-6, "erf_gelu": 5e-4},
        "eanet.keras": {"model": "EANet", "plain": 9.1e-7, "accel": 1e-6, "erf_gelu": 5e-4},
        "vit.weights.h5": {"model": "ViT", "plain": 1.04e-6, "accel": 2e-6, "erf_gelu": 6e-4},
    }
    worst = {str(s): {"max_abs_diff": d, "tensor": "x"} for s, d in ((1, 3e-7), (10, 1.8e-6))}
    training = {
        "checked_by": "tests/test_keras_training.py",
        "steps": 10,
        "tolerance": 2e-5,
        "keras_rule": {"weights": worst},
        "torch_rule": {"weights": {"10": {"max_abs_diff": 1.2e-3}}, "must_exceed": 4e-4},
    }
    return _record(
        "fidelity",
        parameters={"checked_by": "tests/test_models.py", "models": models},
        forward={"checked_by": "t.py", "tolerance": 1e-4, "images": 8, "files": files},
        training=training,
    )


def test_the_fidelity_table_says_each_figure_and_where_it_was_recorded(tables, tmp_path):
    _write(tmp_path / "fidelity", "fidelity.json", _fidelity())
    item = tables.load_record(tmp_path / tables.FIDELITY)
    params, forward, training = tables.fidelity_table(item, tmp_path).splitlines()[2:]
    assert "| EANet 361,387 = 361,387; ViT 623,275 ≠ 9 (361,380 / 623,268 (Keras 1)" in params
    assert "trainable + 7 normalization statistics) | equal | `tests/test_models.py` |" in params
    assert "| [2026-01-02](fidelity/fidelity.json), Test CPU, AVX2 only, 2 cores" in params
    assert params.endswith(", torch 2.13.0+cpu, `python tools/record_checks.py fidelity` |")
    assert "8 real CIFAR-100 images | EANet 9.1e-7, ViT 1.0e-6 (with `eanet.accel`:" in forward
    assert "a wrong (erf) GELU moves them EANet 5.0e-4, ViT 6.0e-4) | 1e-4 | `t.py`" in forward
    assert forward.endswith("| [2026-01-02](fidelity/fidelity.json) |")
    assert "| 1.8e-6 after 10 steps (after step 1: 3.0e-7); torch's AdamW" in training
    assert "ends 1.2e-3 away (it must exceed 4e-4) | 2e-5 |" in training
    (row,) = tables.fidelity_table(None, tmp_path).splitlines()[2:]
    assert "| not yet measured |" in row


def _compare_report() -> dict:
    config = {"dataset": "digits", "epochs": 12, "seeds": 2, "model_args": {"depth": 2}}
    config["augment_orders"] = ["fixed", "reference-bug"]
    groups = [
        {"model": m, "augment": a, "summary": {"test_top1": {"mean": mean, "std": 0.05}}}
        for m, a, mean in (
            ("eanet-cifar", "fixed", 0.673),
            ("vit-cifar", "fixed", 0.723),
            ("eanet-cifar", "reference-bug", 0.139),
            ("vit-cifar", "reference-bug", 0.193),
        )
    ]
    env = {"cpu_model": "Test CPU", "processor": "x86_64", "cpu_count": 2}
    return {"config": config, "created": "2026-01-01 03:00 UTC", "environment": env} | {
        "groups": groups
    }


def test_the_accuracy_table_names_its_records_and_what_is_not_yet_measured(tables, tmp_path):
    metrics = {"test_top1": 0.976, "test_images": 449}
    recipe = {"model_args": {"depth": 2}, "epochs": 8}
    check = {"metrics": metrics, "recipe": recipe, "threshold": 0.9}
    _write(
        tmp_path / "digits", "learning_check.json", _record("learning-check", learning_check=check)
    )
    _write(tmp_path / "compare", "report.json", _compare_report())
    best = _fashion("eanet-best", "best", [0.9, 0.93], 0.931, epochs_planned=20)
    best["test"]["epochs"] = 20
    _write(tmp_path / "fashion-mnist", "eanet-best.json", best)
    table = tables.accuracy_table(
        tables.load_record(tmp_path / tables.LEARNING_CHECK),
        tables.load_record(tmp_path / "compare" / "report.json"),
        tables.load_fashion(tmp_path),
        tmp_path,
    )
    digits, compare, best_row, fast_row, reference, *claims, cifar = table.splitlines()[2:]
    assert digits.startswith("| held-out top-1 on 449 real digits, 2-block EANet, 8 epochs")
    assert "(the learning check; CI requires at least 90%) | 97.6% | [2026-01-02](digits/" in digits
    assert digits.endswith(
        "`python tools/record_checks.py learning-check`; `tests/test_train.py` (CI) |"
    )
    assert compare.startswith("| EANet vs ViT on digits, 2 blocks, 12 epochs, 2 seeds, test top-1")
    assert "| fixed order: EANet 67.3% ± 5.0%, ViT 72.3% ± 5.0%; the reference's order: " in compare
    assert "[2026-01-01](compare/report.json), Test CPU, 2 cores" in compare
    assert "| 93.1% after 20 epochs | `benchmarks/fashion_mnist.py eanet-best` (" in best_row
    assert "[eanet-best.json](fashion-mnist/eanet-best.json), [docs/fashion-mnist.md](" in best_row
    assert "| not yet measured |" in fast_row and ".json" not in fast_row
    assert "| not yet measured |" in reference and reference.startswith("| Fashion-MNIST, `refer")
    (waiting,) = claims  # no claim can be judged without its runs: one row names them all
    assert waiting.startswith("| Fashion-MNIST, not judged yet (runs unfinished) | EANet against")
    assert waiting.count(";") == len(tables.CLAIMS) - 1
    assert "| not measured: this project's machines cannot download the archive |" in cifar


def test_the_accuracy_table_renders_before_any_record_exists(tables, tmp_path):
    fast = _fashion("eanet-fast", "fast", [0.88, 0.91], None)
    fast["reached"] = {"0.90": {"epoch": 2, "minutes": 8.31}}
    fast["segments"][0]["idle"] = False
    _write(tmp_path / "fashion-mnist", "eanet-fast.json", fast)
    table = tables.accuracy_table(None, None, tables.load_fashion(tmp_path), tmp_path)
    digits, compare, best_row, fast_row, *_ = table.splitlines()[2:]
    for row in (digits, compare, best_row):
        assert "| not yet measured |" in row
    assert "| 8.3 min (epoch 2) on AVX2 only, 2 threads; other work ran beside it" in fast_row
    fast["segments"][0]["idle"] = True
    _write(tmp_path / "fashion-mnist", "eanet-fast.json", fast)
    table = tables.accuracy_table(None, None, tables.load_fashion(tmp_path), tmp_path)
    assert "| 8.3 min (epoch 2) on AVX2 only, 2 threads, idle |" in table
    fast["reached"] = {"0.90": None}
    _write(tmp_path / "fashion-mnist", "eanet-fast-s1.json", fast)  # a second seed beside it
    table = tables.accuracy_table(None, None, tables.load_fashion(tmp_path), tmp_path)
    assert "| seed 0: 8.3 min (epoch 2) on AVX2 only, 2 threads, idle; seed 1: not reached" in table
    assert "[eanet-fast-s1.json](" in table
