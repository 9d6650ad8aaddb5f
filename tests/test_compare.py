"""`eanet compare`: runs, report, figures, resumability, bad options; the digits data set."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eanet.cli.main import build_parser, main
from eanet.compare.config import CompareConfig
from eanet.compare.report import CallRecord, CompareReport, Group, format_report
from eanet.compare.run import earlier_calls, run_compare, steady_images_per_s
from eanet.data.cifar import SAMPLE_ARCHIVE, SAMPLE_MD5
from eanet.data.load import load_dataset
from eanet.errors import ConfigError, DataError, EANetError
from eanet.fileio import write_json
from eanet.info import describe
from eanet.options import declared
from eanet.train import loop as train
from eanet.train.config import TrainConfig

TINY = {"depth": 1, "dim": 32, "mlp_dim": 32, "patch_size": 4}
TINY_CLI = [arg for k, v in TINY.items() for arg in ("--model-arg", f"{k}={v}")]


def tiny_compare(**kw) -> CompareConfig:
    base = dict(
        models=["eanet-cifar", "vit-cifar"],
        model_args=dict(TINY),
        epochs=1,
        seeds=1,
        augment_orders=["fixed", "reference-bug"],
        batch_size=32,
        bench_steps=1,
        device="cpu",
    )
    values = {**base, **kw}
    own = {k: values.pop(k) for k in list(values) if k in declared(CompareConfig)}
    return CompareConfig(**own, train=TrainConfig(**values))


@pytest.fixture(scope="module")
def compared(tmp_path_factory, small_sample):
    """Two tiny models x two augmentation orders, 1 epoch each, on the real CIFAR-100 slice."""
    out = tmp_path_factory.mktemp("compare")
    report = run_compare(tiny_compare(), out, data=small_sample, progress=False)
    return out, report


def test_report_has_every_model_order_figure_and_table(compared):
    out, report = compared
    names = ["eanet-cifar-fixed", "eanet-cifar-reference-bug", "vit-cifar-fixed"]
    names.append("vit-cifar-reference-bug")
    assert report["runs"] == {f"{n}-seed0": "trained" for n in names}
    for n in names:
        assert (out / "runs" / f"{n}-seed0" / "metrics.json").is_file()
    saved = json.loads((out / "report.json").read_text())
    assert [(g["model"], g["augment"]) for g in saved["groups"]] == [
        ("eanet-cifar", "fixed"),
        ("eanet-cifar", "reference-bug"),
        ("vit-cifar", "fixed"),
        ("vit-cifar", "reference-bug"),
    ]
    eanet, vit = saved["groups"][0], saved["groups"][2]
    assert eanet["params"] < vit["params"]
    # ViT as implemented does what the architecture says (attention products included);
    # EANet's fast path folds M_k and M_v into the projections, so it does less.
    assert vit["macs_per_image"] == describe("vit-cifar", **TINY)["macs_per_image"]
    assert eanet["macs_per_image"] == describe("eanet-cifar", **TINY)["macs_per_image"]
    for g in saved["groups"]:
        s = g["summary"]
        assert s["test_top1"]["n"] == 1 and s["test_top1"]["std"] is None
        assert 0 <= s["best_val_top1"]["mean"] <= 1 and 0 <= s["test_top5"]["mean"] <= 1
        assert s["best_val_top1"]["mean"] >= s["final_val_top1"]["mean"]
        assert g["speed"]["train_img_s"] > 0 and g["speed"]["infer_img_s"] > 0
        assert g["curves"]["epoch"] == [1] and len(g["curves"]["val_top1"]) == 1
        (run,) = g["runs"]  # one epoch: its own speed is the steady one
        assert s["steady_train_img_s"]["mean"] == run["steady_train_img_s"] > 0
    stats = saved["input_distribution"]["stats"]
    assert stats["reference-bug / training"]["min"] >= 0  # negatives clipped to 0
    assert stats["reference-bug / training"]["zero"] > 0.2
    assert stats["fixed / training"]["negative"] > 0.3
    assert stats["inference (both orders)"]["negative"] > 0.3
    for file in saved["figures"].values():
        assert (out / file).read_bytes()[:4] == b"\x89PNG"
        assert (out / file).stat().st_size > 10_000
    md = (out / "report.md").read_text()
    assert md.count("| `eanet-cifar` | fixed | ") == 2  # results and gap tables
    assert "| `vit-cifar` | reference-bug | " in md and "eanet compare --models" in md
    assert "![" in md and "exactly 0 %" in md and "- machine: " in md
    assert md.count("| training s / run | training img/s, epochs 2+ |") == 1


def test_the_report_is_typed_and_its_json_and_markdown_are_what_was_written(compared):
    out, report = compared
    saved = json.loads((out / "report.json").read_text())
    typed = CompareReport.from_dict(saved)
    assert all(isinstance(g, Group) for g in typed.groups)
    assert typed.calls == [CallRecord(typed.created, typed.invocation_seconds, 4, 0, 0)]
    assert typed.data.train_images + typed.data.val_images == 96  # small_sample
    assert typed.to_dict() == saved == json.loads(json.dumps(report))
    assert format_report(typed) == (out / "report.md").read_text()


def test_the_committed_report_round_trips_through_the_typed_report(tmp_path):
    committed = Path(__file__).parents[1] / "docs" / "compare-digits" / "report.json"
    typed = CompareReport.from_dict(json.loads(committed.read_text()))
    assert [(g.model, g.augment) for g in typed.groups][:2] == [
        ("eanet-cifar", "fixed"),
        ("eanet-cifar", "reference-bug"),
    ]
    write_json(tmp_path / "report.json", typed.to_dict())
    assert (tmp_path / "report.json").read_text() == committed.read_text()  # byte for byte


def test_a_call_record_keeps_the_keys_of_an_older_file():
    old = {"created": "then", "seconds": 1.5, "trained": 2, "resumed": 0, "skipped": 1, "x": 7}
    assert CallRecord.from_dict(old).to_dict() == old
    assert list(CallRecord.from_dict(old).to_dict()) == list(old)
    runs = {"a": "trained", "b": "skipped", "c": "trained"}
    assert CallRecord.of(runs, "now", 3.0) == CallRecord("now", 3.0, 2, 0, 1)


def test_the_steady_speed_leaves_out_the_first_epoch():
    speeds = [10.0, 100.0, 120.0, 110.0]  # epoch 1: kernels compiled, caches warmed
    history = [{"epoch": i + 1, "train_images_per_s": s} for i, s in enumerate(speeds)]
    assert steady_images_per_s(history) == 110.0
    assert steady_images_per_s(history[:3]) == 110.0  # the median of 100 and 120
    assert steady_images_per_s(history[:1]) == 10.0  # one epoch: all there is


def test_second_call_skips_finished_runs(compared, small_sample):
    out, _ = compared
    kept = [out / "runs" / "vit-cifar-fixed-seed0" / "checkpoint.safetensors", out / "bench.json"]
    before = [f.stat().st_mtime_ns for f in kept]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".compare.lock").write_text(str(dead.pid))  # left by a compare that was killed
    report = run_compare(tiny_compare(), out, data=small_sample, progress=False)
    assert set(report["runs"].values()) == {"skipped"}
    assert [f.stat().st_mtime_ns for f in kept] == before  # no training, no re-timing
    assert [(c["trained"], c["skipped"]) for c in report["calls"]] == [(4, 0), (0, 4)]
    assert "4 runs trained" in (out / "report.md").read_text()
    assert not (out / ".compare.lock").exists()


def test_a_second_call_on_finished_runs_measures_nothing_again(compared, small_sample, monkeypatch):
    """Nothing to train: no timing, no forward pass through the blocks (only the first
    layer's inputs are histogrammed), so the call takes seconds, not a minute."""
    import eanet.compare.run as compare_run
    from eanet.models.layers import Block

    out, first = compared

    def measured(*args, **kwargs):
        raise AssertionError("measured again")

    for name in ("bench_model", "matmul_peak_gflops"):
        monkeypatch.setattr(compare_run, name, measured)
    monkeypatch.setattr(Block, "forward", measured)
    report = run_compare(tiny_compare(), out, data=small_sample, progress=False)
    assert set(report["runs"].values()) == {"skipped"}
    for old, new in zip(first["groups"], report["groups"], strict=True):
        assert new["speed"] == old["speed"] and new["macs_per_image"] == old["macs_per_image"]
    assert report["input_distribution"]["stats"] == first["input_distribution"]["stats"]


def test_a_directory_in_use_is_refused(compared, small_sample):
    out, _ = compared
    (out / ".compare.lock").write_text(str(os.getpid()))  # a live process holds it
    try:
        with pytest.raises(EANetError, match=f"compare directory in use by PID {os.getpid()}"):
            run_compare(tiny_compare(), out, data=small_sample, progress=False)
    finally:
        (out / ".compare.lock").unlink()


def test_other_recipe_in_the_same_directory_is_refused(compared, small_sample):
    out, _ = compared
    with pytest.raises(ConfigError, match="was trained with epochs=1, not 2"):
        run_compare(tiny_compare(epochs=2), out, data=small_sample, progress=False)


def test_interrupted_run_is_resumed(tmp_path, small_sample, monkeypatch):
    cfg = tiny_compare(models=["eanet-cifar"], augment_orders=["fixed"], epochs=2, bench_steps=0)
    real = train.write_history

    def killed(*args, **kwargs):  # the process dies right after epoch 1's checkpoint
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "write_history", killed)
    with pytest.raises(KeyboardInterrupt):
        run_compare(cfg, tmp_path, data=small_sample, progress=False)
    run = tmp_path / "runs" / "eanet-cifar-fixed-seed0"
    assert (run / "checkpoint.safetensors").is_file() and not (run / "metrics.json").exists()
    monkeypatch.setattr(train, "write_history", real)
    report = run_compare(cfg, tmp_path, data=small_sample, progress=False)
    assert report["runs"] == {"eanet-cifar-fixed-seed0": "resumed"}
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert (
        report["groups"][0]["speed"] is None
        and "not measured" in (tmp_path / "report.md").read_text()
    )


def test_command_line_reproduces_the_config():
    cfg = tiny_compare(seeds=3, lr=0.002, dataset="digits")
    argv = shlex.split(cfg.command("out dir"))
    assert argv[:2] == ["eanet", "compare"]
    args = build_parser().parse_args(argv[1:])
    assert args.models == cfg.models and args.seeds == 3 and args.lr == 0.002
    assert dict(args.model_args) == TINY and str(args.out) == "out dir"
    assert args.augment_orders == cfg.augment_orders and args.dataset == "digits"


def test_cli_end_to_end_and_rerun(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = [
        "compare",
        "--models",
        "eanet-cifar",
        "--dataset",
        "cifar100",
        "--data-path",
        str(SAMPLE_ARCHIVE),
        "--md5",
        SAMPLE_MD5,
        "--epochs",
        "1",
        *TINY_CLI,
        "--batch-size",
        "128",
        "--bench-steps",
        "1",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "1 runs (0 finished earlier" in text and "report:" in text
    assert (out / "report.md").is_file() and (out / "val_top1.png").is_file()
    assert main(argv) == 0
    assert "1 runs (1 finished earlier" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--models", "eanet-cifar", "resnet"], "--models 'resnet' is unknown"),
        (["--seeds", "0"], "--seeds 0 must be a positive integer"),
        (["--models", "vit-cifar", "vit-cifar"], "--models lists 'vit-cifar' twice"),
        (["--augment-orders", "fixed", "heavy"], "--augment-orders 'heavy' must be one of fixed"),
        (["--epochs", "0"], "--epochs 0 must be an integer in [1,"),
        (["--bench-steps", "-1"], "--bench-steps -1 must be >= 0"),
        (["--dataset", "digits", "--data-path", "x.tar.gz"], "does not apply to --dataset digits"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, capsys, args, message):
    assert main(["compare", *args, "--out", str(tmp_path / "c"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("eanet: error: ") and message in err[0], err
    assert not (tmp_path / "c" / "runs").exists()


# --------------------------------------------------------------------------- digits


def test_digits_loader_is_the_fixture(digits_data):
    data = load_dataset("digits")
    assert data.name == "digits" and data.class_names == [str(i) for i in range(10)]
    assert data.train_images.shape == (1348, 3, 32, 32) and data.test_images.shape[0] == 449
    assert data.train_images.dtype == torch.uint8 and int(data.train_images.max()) == 255
    assert torch.equal(data.train_images, digits_data.train_images)
    assert torch.equal(data.test_labels, digits_data.test_labels)
    assert load_dataset("digits", image_size=16).train_images.shape[-1] == 16


def test_digits_are_shipped_and_need_no_scikit_learn(monkeypatch, tmp_path):
    from sklearn.datasets import load_digits as sk_load_digits

    from eanet.data.digits import raw_digits

    images, labels = raw_digits()  # the shipped asset is scikit-learn's data, every pixel
    sk = sk_load_digits()
    assert torch.equal(images, torch.tensor(sk.images, dtype=torch.float32))
    assert torch.equal(labels, torch.tensor(sk.target, dtype=torch.int64))
    monkeypatch.setitem(sys.modules, "sklearn", None)  # any scikit-learn import fails
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    assert load_dataset("digits").test_images.shape == (449, 3, 32, 32)
    bad = tmp_path / "digits.npz"
    bad.write_bytes(b"not an npz")
    with pytest.raises(DataError, match=r"digits file .* is missing or damaged"):
        raw_digits(bad)


def test_a_damaged_history_of_calls_is_checked_and_escaped(tmp_path, caplog):
    good = {"created": "2026-12-04 10:00", "seconds": 12.5, "trained": 4, "resumed": 0}
    calls = [
        {**good, "skipped": 0},
        {**good, "skipped": 0, "created": "\x1b[2J\x1b]0;TITLE\x07now"},
        {**good, "skipped": 0, "seconds": "fast"},  # formatted with :.0f in the report
        {**good},  # no count of skipped runs
        ["not", "a", "call"],
    ]
    (tmp_path / "report.json").write_text(json.dumps({"calls": calls}))
    kept = earlier_calls(tmp_path)
    assert [c["created"] for c in kept] == ["2026-12-04 10:00", r"\x1b[2J\x1b]0;TITLE\x07now"]
    assert "dropped damaged entries" in caplog.text
    (tmp_path / "report.json").write_text(json.dumps({"runs": ["x"], "created": "then"}))
    assert earlier_calls(tmp_path) == []
    # a report from before reports kept their calls, without the call's seconds
    old = {"runs": {"eanet-s0": "trained"}, "created": "then"}
    (tmp_path / "report.json").write_text(json.dumps(old))
    assert earlier_calls(tmp_path) == []
    (tmp_path / "report.json").write_text(json.dumps({**old, "invocation_seconds": 3.0}))
    assert [c["seconds"] for c in earlier_calls(tmp_path)] == [3.0]
