"""The CUDA path for real: training steps, fast paths, compile, resume, predict/export, DDP.

Every test needs a CUDA GPU and is skipped without one (so `pytest` on a CPU machine
reports them as skipped); `pytest -m cuda` selects them, as benchmarks/gpu/run.sh does.
Tiny models (1 block, width 32) and small synthetic data keep each test to seconds of GPU.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eanet import accel
from eanet.accel import modules
from eanet.cli.main import main
from eanet.data.augment import AugmentConfig
from eanet.data.dataset import synthetic_cifar
from eanet.metrics import MetricSums
from eanet.models.layers import Mlp
from eanet.models.registry import create_model
from eanet.train import step as step_mod
from eanet.train.config import TrainConfig
from eanet.train.loop import fit

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TINY = {"depth": 1, "dim": 32, "mlp_dim": 32}
MODELS = ["eanet-cifar", "vit-cifar"]
STATS = (torch.tensor([129.3, 124.1, 112.4]), torch.tensor([4597.0, 4231.0, 5013.0]), 1)
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _no_tf32():
    """Strict fp32 matmuls for every test (bf16 training turns TF32 on), then as before."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _model(name: str, plain: bool = False, **kw) -> torch.nn.Module:
    """A tiny model on the GPU, with what `eanet.accel` swaps in there (as `train` runs it)."""
    torch.manual_seed(0)
    model = create_model(name, **{**TINY, **kw})
    model.normalize.set_stats(*STATS)
    model = model.to(CUDA)
    if not plain:
        accel.apply(model, CUDA)
    return model


def _batch(n: int = 64, classes: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return x.to(CUDA), torch.randint(0, classes, (n,), generator=g).to(CUDA)


def _data(n: int = 320):
    return synthetic_cifar(train=n, test=n // 5)


def _cfg(**kw) -> TrainConfig:
    base = {"model_args": dict(TINY), "batch_size": 64, "device": "cuda", "epochs": 1}
    return TrainConfig(**{**base, **kw})


# --------------------------------------------------------------------------- training steps


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", MODELS)
def test_training_steps_learn_a_batch_on_the_gpu(name, precision):
    """Fused AdamW, autocast: repeated steps on one batch lower its loss; all stays finite."""
    model = _model(name)
    cfg = _cfg(model=name, precision=precision, augment="none")  # the same batch each step
    optimizer = step_mod.make_optimizer(model, cfg)
    assert optimizer.param_groups[0]["fused"] is True
    x, y = _batch()
    losses = []
    for _ in range(15):
        logits, loss = step_mod.train_step(model, optimizer, x, y, cfg, AugmentConfig())
        losses.append(float(loss))
    assert logits.is_cuda and loss.dtype == torch.float32
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_cuda_uses_native_dropout_not_the_cpu_masks(monkeypatch):
    """On CUDA the fast paths call torch's dropout; `fused.masked` is the CPU's trick."""

    def no_masks(x, p):  # masked(x, 0) is x itself (the layers' forward returns it so)
        if p != 0:
            raise AssertionError("fused.masked drew a mask on CUDA")
        return x

    from eanet.accel.ops import double_normalize, gelu, layer_norm, softmax

    for module in (modules, double_normalize, gelu, layer_norm, softmax):  # each calls masked
        monkeypatch.setattr(module, "masked", no_masks)
    for name in MODELS:
        model = _model(name).train()
        x, _ = _batch(8)
        a, b = model(x), model(x)
        assert not torch.equal(a, b)  # dropout is active


def test_native_dropout_keeps_the_mean_on_the_gpu():
    """Averaged over many masks, the train-mode MLP matches eval mode (rescale right)."""
    from eanet.models.config import ModelConfig

    torch.manual_seed(0)
    mlp = Mlp(ModelConfig()).to(CUDA)
    accel.apply(mlp, CUDA)
    x = torch.randn(1, 64, device=CUDA)
    with torch.no_grad():
        expected = mlp.eval()(x)
        outs = torch.stack([mlp.train()(x) for _ in range(4000)])
    assert outs.std(0).min() > 0
    torch.testing.assert_close(outs.mean(0), expected, atol=0.05, rtol=0.05)


# --------------------------------------------------------------------------- fast paths


@pytest.mark.parametrize("name", ["eanet-cifar", "eanet-cifar-s64", "vit-cifar"])
def test_fast_path_computes_the_reference_function_on_the_gpu(name):
    """As tests/test_models.py on the CPU: same outputs and gradients as the literal ops."""
    fast = _model(name, depth=2, dim=64, mlp_dim=64).eval()
    ref = accel.restore(copy.deepcopy(fast))
    x, _ = _batch(3)
    a, b = fast(x), ref(x)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    a.logsumexp(1).sum().backward()
    b.logsumexp(1).sum().backward()
    scale = max(p.grad.abs().max() for p in ref.parameters())
    for (pname, p), q in zip(fast.named_parameters(), ref.parameters(), strict=True):
        assert (p.grad - q.grad).abs().max() <= 1e-3 * scale, pname


@pytest.mark.parametrize("name", MODELS)
def test_fast_path_in_training_mode_without_dropout_on_the_gpu(name):
    """Train mode takes the CUDA branches (native dropout, fused attention): same function."""
    fast = _model(name, attn_drop=0.0, proj_drop=0.0, mlp_drop=0.0).train()
    ref = accel.restore(copy.deepcopy(fast))
    x, _ = _batch(4)
    torch.testing.assert_close(fast(x), ref(x), atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- compile


@pytest.mark.parametrize("name", MODELS)
def test_compiled_model_matches_eager_on_the_gpu(name):
    """torch.compile (inductor, --compile-mode default): logits and gradients as eager."""
    eager = _model(name, attn_drop=0.0, proj_drop=0.0, mlp_drop=0.0).train()
    compiled_src = copy.deepcopy(eager)
    compiled = step_mod.accelerate(compiled_src, _cfg(model=name, compile=True), CUDA)
    x, _ = _batch(8)
    a, b = eager(x), compiled(x)
    # inductor fuses and reorders reductions: fp32 rounding, not the reference's bits
    torch.testing.assert_close(b, a, atol=5e-4, rtol=1e-4)
    a.logsumexp(1).sum().backward()
    b.logsumexp(1).sum().backward()
    scale = max(p.grad.abs().max() for p in eager.parameters())
    for (pname, p), q in zip(eager.named_parameters(), compiled_src.parameters(), strict=True):
        assert (q.grad - p.grad).abs().max() <= 1e-3 * scale, pname


def test_compiled_bf16_training_runs_an_epoch(tmp_path):
    """--compile --precision bf16 through `fit`: finite figures, the run's files written."""
    metrics = fit(
        _cfg(compile=True, precision="bf16"), tmp_path / "run", data=_data(), progress=False
    )
    assert torch.isfinite(torch.tensor(metrics["test_loss"]))


# --------------------------------------------------------------------------- the epoch loop


def test_no_host_sync_inside_an_epoch_on_the_gpu(monkeypatch):
    """CUDA's sync debug mode raises on any synchronising call but the metrics' final read."""
    reads = []
    real = MetricSums.result

    def counted(self):
        reads.append(1)
        torch.cuda.set_sync_debug_mode("default")
        try:
            return real(self)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    monkeypatch.setattr(MetricSums, "result", counted)
    model = _model("eanet-cifar")
    cfg = _cfg(batch_size=32)
    optimizer = step_mod.make_optimizer(model, cfg)
    x, y = _batch(32 * 12)
    step_mod.train_step(model, optimizer, x[:32], y[:32], cfg, AugmentConfig())  # warm up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        m = step_mod.train_epoch(model, optimizer, x, y, cfg, progress=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert m.count == len(x)
    assert len(reads) == 2  # the bar's last update and the epoch's result


# --------------------------------------------------------------------------- resume


def _history(run: Path) -> list[dict]:
    return json.loads((run / "history.json").read_text())


def test_resume_on_the_gpu_continues_the_run(tmp_path):
    """2 epochs straight vs 1 + a resumed 1: the same figures (fused AdamW state restored)."""
    data = _data()
    fit(_cfg(epochs=2), tmp_path / "straight", data=data, progress=False)
    fit(_cfg(epochs=1), tmp_path / "resumed", data=data, progress=False)
    fit(_cfg(epochs=2), tmp_path / "resumed", data=data, resume=True, progress=False)
    a, b = _history(tmp_path / "straight")[1], _history(tmp_path / "resumed")[1]
    for key in ("train_loss", "val_loss", "val_top1"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


def test_a_cpu_checkpoint_resumes_on_the_gpu_and_back(tmp_path):
    """CPU epoch 1, GPU epoch 2 (fused AdamW), CPU epoch 3: each device's own kernel."""
    from eanet import checkpoint

    data, run = _data(), tmp_path / "run"
    fit(_cfg(epochs=1, device="cpu", threads=2), run, data=data, progress=False)
    fit(_cfg(epochs=2), run, data=data, resume=True, progress=False)
    groups = checkpoint.load(run).optimizer_state["param_groups"]
    assert all(g["fused"] is True for g in groups)
    fit(_cfg(epochs=3, device="cpu", threads=2), run, data=data, resume=True, progress=False)
    groups = checkpoint.load(run).optimizer_state["param_groups"]
    assert all(not g["fused"] for g in groups)
    assert [h["epoch"] for h in _history(run)] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in _history(run))


# --------------------------------------------------------------------------- use the model


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("gpu_run") / "run"
    fit(_cfg(precision="bf16"), run, data=_data(), progress=False)
    return run


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("images") / "imgs"
    assert main(["sample-images", str(out), "--classes", "apple,bicycle"]) == 0
    return out / "test"


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_predict_from_a_gpu_trained_checkpoint(gpu_run, images, device, capsys):
    capsys.readouterr()
    assert main(["predict", str(gpu_run), str(images), "--json", "--device", device]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line]
    assert lines and all(len(row["predictions"]) == 5 for row in lines), lines[:1]


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_from_a_gpu_trained_checkpoint(gpu_run, tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnx")
        pytest.importorskip("onnxruntime")
    out = tmp_path / f"model.{'onnx' if fmt == 'onnx' else 'pt'}"
    assert main(["export", str(gpu_run), "--format", fmt, "--out", str(out)]) == 0
    assert out.stat().st_size > 0


# --------------------------------------------------------------------------- DDP


def test_ddp_with_nccl_at_world_size_one(tmp_path):
    """torchrun with one process: an nccl process group, DDP-wrapped training, one run."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    cmd += ["-m", "eanet", "train", "--dataset", "synthetic", "--synthetic-images", "320"]
    cmd += ["--device", "cuda", "--epochs", "1", "--batch-size", "64", "--no-progress"]
    for key, value in TINY.items():
        cmd += ["--model-arg", f"{key}={value}"]
    cmd += ["--out", str(run)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    record = json.loads((run / "config.json").read_text())
    assert record["distributed"] == {"world_size": 1, "backend": "nccl"}
    assert len(_history(run)) == 1
