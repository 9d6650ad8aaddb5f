"""One precision option: what `--precision` resolves to, what runs in bf16, and that it learns."""

import statistics

import pytest
import torch

from eanet import bench, runtime
from eanet.demo import DIGITS_RECIPE
from eanet.errors import ConfigError
from eanet.inference import predict_logits
from eanet.models.registry import create_model
from eanet.train.config import TrainConfig
from eanet.train.loop import fit


def test_auto_is_bf16_only_where_the_device_computes_it_natively(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_info", lambda: ("x", ("avx2", "avx512f")))
    assert runtime.resolve_precision("auto", cpu) == "fp32"
    monkeypatch.setattr(runtime, "cpu_info", lambda: ("x", ("avx512f", "avx512_bf16")))
    assert runtime.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(runtime, "cpu_info", lambda: ("x", ("amx_bf16",)))
    assert runtime.resolve_precision("auto", cpu) == "bf16"
    assert runtime.resolve_precision("fp32", cpu) == "fp32"
    assert runtime.resolve_precision("bf16", cpu) == "bf16"  # asked for: honoured everywhere
    with pytest.raises(ConfigError, match="--precision 'fp16' must be one of fp32, bf16, auto"):
        runtime.resolve_precision("fp16", cpu)


def test_cpu_info_names_the_model_and_its_flags():
    model, flags = runtime.cpu_info()
    assert set(flags) <= set(runtime.CPU_FLAGS)
    env = runtime.environment()
    assert env["cpu_flags"] == list(flags) and "cpu_capability" in env


def _record_dtypes(monkeypatch) -> list[tuple[str, torch.dtype]]:
    """(phase, dtype) of the first layer's output in every forward of bench's model.

    Phases: "train" (train mode with autograd: the timed step), "infer" (eval mode), and
    "count" (train mode without autograd: the multiply-add count on the reference ops).
    """
    seen: list[tuple[str, torch.dtype]] = []

    def phase(m) -> str:
        if not m.training:
            return "infer"
        return "train" if torch.is_grad_enabled() else "count"

    real = bench.create_model

    def create(*args, **kwargs):
        model = real(*args, **kwargs)
        model.patch_embed.proj.register_forward_hook(
            lambda m, i, o: seen.append((phase(m), o.dtype))
        )
        return model

    monkeypatch.setattr(bench, "create_model", create)
    return seen


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_bench_times_the_training_step_in_the_precision_asked(monkeypatch, precision, dtype):
    seen = _record_dtypes(monkeypatch)
    cfg = TrainConfig(model_args={"depth": 1}, batch_size=4, device="cpu", precision=precision)
    r = bench.bench_model(cfg, warmup=0, steps=1, peak=100.0, peak_bf16=400.0)
    assert r.precision == precision
    train = {d for p, d in seen if p == "train"}
    infer = {d for p, d in seen if p == "infer"}
    assert train == {dtype} and infer == {dtype}


def test_bf16_inference_stays_close_to_fp32():
    torch.manual_seed(0)
    model = create_model("eanet-cifar", depth=2).eval()
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    p32 = predict_logits(model, x).softmax(-1)
    p16 = predict_logits(model, x, precision="bf16").softmax(-1)
    assert p16.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa: probabilities move by ~1e-2 at most on 8 blocks
    assert (p16 - p32).abs().max() < 0.05


@pytest.mark.slow
def test_bf16_training_learns_as_fp32_does_on_real_digits(tmp_path, digits_data):
    """Learning parity: bf16's held-out top-1 is within the spread of 3 fp32 seeds.

    The learning check's configuration (depth 2, 4x4 patches, lr 2e-3, 8 epochs; at 4
    epochs the model is still at ~60%); the figures of each seed are in the assertion
    message. The spread has a floor of 2 points (9 of 449 images): three seeds that agree
    closely would otherwise demand bit-level agreement of two numerics.
    """
    results: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for precision in results:
        for seed in range(3):
            cfg = TrainConfig(**DIGITS_RECIPE, device="cpu", seed=seed, precision=precision)
            out = tmp_path / f"{precision}-{seed}"
            results[precision].append(fit(cfg, out, data=digits_data, progress=False)["test_top1"])
    fp32, bf16 = results["fp32"], results["bf16"]
    spread = max(max(fp32) - min(fp32), 0.02)
    assert min(fp32) >= 0.9, results  # both learn: chance is 10%
    assert statistics.mean(bf16) >= statistics.mean(fp32) - spread, results


@pytest.mark.parametrize("name", ["eanet-cifar", "vit-cifar"])
def test_fast_paths_match_the_reference_ops_under_bf16(name):
    """Outputs and gradients of the fast path vs the literal ops, both under bf16 autocast.

    Documented tolerance: bfloat16 keeps 8 bits of mantissa, so two orders of the same sums
    differ by about one unit in the last place (2^-8 relative); logits within 2% of the
    largest one; the whole gradient within 5% of its norm, and each parameter's within 10%
    of its own norm plus 1e-3 of the whole (some biases have a true gradient of exactly 0:
    the softmax over tokens ignores them, so only float noise is left to compare).
    """
    import copy

    from eanet.models import use_reference_ops

    torch.manual_seed(0)
    fast = create_model(name, depth=2).eval()  # eval: no dropout, the same function
    ref = use_reference_ops(copy.deepcopy(fast))
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    outs = []
    for model in (fast, ref):
        with runtime.autocast("bf16", torch.device("cpu")):
            out = model(x)
        out.float().square().mean().backward()
        outs.append(out.float())
    assert (outs[0] - outs[1]).abs().max() <= 2e-2 * outs[1].abs().max()
    pairs = list(zip(fast.named_parameters(), ref.parameters(), strict=True))
    whole = torch.cat([b.grad.flatten() for _, b in pairs])
    diff = torch.cat([(a.grad - b.grad).flatten() for (_, a), b in pairs])
    assert diff.norm() < 0.05 * whole.norm()
    for (name_, a), b in pairs:
        err = (a.grad - b.grad).norm()
        assert err <= 0.1 * b.grad.norm() + 1e-3 * whole.norm(), (name_, err.item())


@pytest.mark.slow
def test_compiled_forward_predicts_as_eager_in_evaluate_predict_api_and_serve(
    tiny_run, small_sample, tmp_path, capsys
):
    """--compile (torch.compile of the forward pass) gives eager's logits in every inference
    command; the served model compiles at load, for batches of any size."""
    import json

    from PIL import Image

    from eanet import api, checkpoint
    from eanet.cli.main import main
    from eanet.evaluate import evaluate_checkpoint
    from eanet.serve.model import ServedModel

    model, _ = checkpoint.load_model(tiny_run, torch.device("cpu"))
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    eager = predict_logits(model, x)
    served = ServedModel(tiny_run, "cpu", compile=True)
    assert served.compiled and not isinstance(served.runner, type(model))
    for n in (5, 3):  # sizes it was not warmed up with
        torch.testing.assert_close(served.forward(x[:n]), eager[:n], atol=1e-4, rtol=1e-4)
    got = api.load(tiny_run, device="cpu", compile=True).predict(x[0])
    want = api.load(tiny_run, device="cpu").predict(x[0])
    assert got.indices == want.indices
    torch.testing.assert_close(got.probabilities, want.probabilities, atol=1e-4, rtol=0)
    runs = [
        evaluate_checkpoint(
            tiny_run, data=small_sample, out_dir=tmp_path / str(c), progress=False, compile=c
        )
        for c in (False, True)
    ]
    assert abs(runs[0]["test_loss"] - runs[1]["test_loss"]) < 1e-4
    assert runs[0]["test_top1"] == runs[1]["test_top1"]
    png = tmp_path / "one.png"
    Image.fromarray(x[0].permute(1, 2, 0).numpy()).save(png)
    for extra in ([], ["--compile"]):
        assert main(["predict", str(tiny_run), str(png), "--json", "--device", "cpu", *extra]) == 0
    eager_line, compiled_line = capsys.readouterr().out.strip().splitlines()

    def classes(line: str) -> list[int]:
        return [p["index"] for p in json.loads(line)["predictions"]]

    assert classes(eager_line) == classes(compiled_line)
