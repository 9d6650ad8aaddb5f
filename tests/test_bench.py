"""Benchmarks measure what they say: model cost, activation memory growth, CLI output."""

import json

import pytest
import torch

from eanet.bench import bench_model, macs_per_image, saved_activation_bytes
from eanet.cli.main import main
from eanet.models.registry import create_model
from eanet.train.config import TrainConfig


def test_macs_per_image_matches_the_hand_count():
    # per block: proj_in 256*64*256 + M_k, M_v 2*256*16*16*16 + proj 256*256*64 + MLP 2*256*64*64
    per_block = 2 * 256 * 64 * 256 + 2 * 256 * 16 * 16 * 16 + 2 * 256 * 64 * 64
    expected = 256 * 12 * 64 + 8 * per_block + 64 * 100
    assert macs_per_image(create_model("eanet-cifar"), torch.device("cpu")) == expected
    vit = macs_per_image(create_model("vit-cifar"), torch.device("cpu"))
    assert 0.41e9 < vit < 0.43e9  # linear layers plus the 256x256 attention matmuls


def test_bench_model_reports_throughput_and_machine():
    cfg = TrainConfig(batch_size=4, device="cpu", model_args={"depth": 1})
    r = bench_model(cfg, warmup=1, steps=2, peak=100.0)
    assert r.train_img_s > 0 and r.infer_img_s > 0
    assert len(r.train_step_s) == 2 and r.matmul_peak_gflops == 100.0
    assert r.environment["torch"] == torch.__version__
    assert 0 < r.train_fraction_of_peak < 1
    assert r.native_kernels == {
        "on": ["double_normalize", "gelu", "layer_norm", "dropout", "softmax"],
        "openmp": True,
    }


def test_bench_model_times_a_grey_model():
    # a 1-channel model (eanet-fashion) gets 1-channel statistics, not CIFAR's three
    cfg = TrainConfig(batch_size=4, device="cpu", model="eanet-fashion", model_args={"depth": 1})
    r = bench_model(cfg, warmup=0, steps=1, peak=100.0)
    assert r.model == "eanet-fashion" and r.train_img_s > 0 and r.infer_img_s > 0


def test_bench_cli_names_the_native_kernels(capsys, monkeypatch):
    from eanet.accel import native

    args = ["bench", "--model-arg", "depth=1", "--batch-size", "2", "--steps", "1"]
    assert main([*args, "--device", "cpu"]) == 0
    assert (
        "native CPU kernels: double_normalize, gelu, layer_norm, dropout, softmax (OpenMP)"
        in capsys.readouterr().out
    )
    monkeypatch.setitem(native.ENABLED, "native", False)
    assert main([*args, "--device", "cpu"]) == 0
    assert "native CPU kernels: off (torch's ops)" in capsys.readouterr().out


def test_activation_memory_is_linear_for_external_and_quadratic_for_self_attention():
    def grow(name: str) -> float:
        sizes = []
        for side in (32, 64):  # 256 and 1024 tokens
            torch.manual_seed(0)
            model = create_model(name, depth=1, image_size=side)
            x = torch.randint(0, 256, (1, 3, side, side), dtype=torch.uint8)
            sizes.append(saved_activation_bytes(model, x))
        return sizes[1] / sizes[0]

    assert 3 < grow("eanet-cifar") < 4.5  # 4x tokens -> ~4x memory (plus fixed weights)
    assert grow("vit-cifar") > 8  # the (N x N) attention weights dominate


def test_bench_cli_json(capsys):
    args = [
        "bench",
        "--model-arg",
        "depth=1",
        "--batch-size",
        "4",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--device",
        "cpu",
        "--json",
    ]
    assert main(args) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["model"] == "eanet-cifar" and r["batch_size"] == 4


@pytest.mark.slow
def test_scaling_cli_writes_table_and_plot(tmp_path, capsys):
    assert main(["bench", "--scaling", "--sizes", "8", "16", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "scaling.json").read_text())["rows"]
    assert {r["tokens"] for r in rows} == {16, 64}
    assert {r["model"] for r in rows} == {"eanet-cifar", "vit-cifar"}
    assert (tmp_path / "scaling.png").stat().st_size > 10_000
    assert "| 64 | 16x16 | vit-cifar |" in (tmp_path / "scaling.md").read_text()


def test_scaling_writes_nothing_without_out(tmp_path, monkeypatch, capsys):
    import eanet.bench

    row = {"tokens": 16, "image_size": 8, "model": "eanet-cifar", "infer_ms_per_image": 1.0}
    row |= {"train_ms_per_image": 2.0, "activation_mb_per_image": 0.5}
    row |= {"forward_gmacs_per_image": 0.001}
    monkeypatch.setattr(eanet.bench, "scaling", lambda sizes, **kw: [row])
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--scaling", "--sizes", "8"]) == 0
    out = capsys.readouterr().out
    assert "| 16 | 8x8 | eanet-cifar |" in out and "not written: --out DIR" in out
    assert list(tmp_path.iterdir()) == []  # no benchmarks/results/ where it happened to run
    assert "--out" in _bench_help() and "write nothing, print the table" in _bench_help()


def _bench_help() -> str:
    from eanet.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return " ".join(sub.choices["bench"].format_help().split())


def test_bad_bench_options():
    from eanet.errors import ConfigError

    with pytest.raises(ConfigError, match="--precision"):
        bench_model(TrainConfig(precision="float16"))


@pytest.mark.parametrize(("seconds", "side"), [(1.0, 256), (1e-3, 1024), (1e-6, 2048)])
def test_matmul_peak_grows_only_while_a_product_fits_the_budget(monkeypatch, seconds, side):
    """An emulated dtype (bf16 without avx512_bf16/AMX) must not be timed at 2048^2 for minutes:
    the side doubles from 256 only while 8x one product's time stays under the budget."""
    from eanet import bench

    sides = []

    def fake_time_calls(fn, device, warmup, repeats):
        sides.append(fn().shape[0])
        return [seconds * (sides[-1] / 256) ** 3] * repeats

    monkeypatch.setattr(bench, "time_calls", fake_time_calls)
    gflops = bench.matmul_peak_gflops(torch.device("cpu"), budget_s=0.25)
    assert sides[-1] == side and max(sides) == side
    assert gflops == pytest.approx(2 * 256**3 / seconds / 1e9)
