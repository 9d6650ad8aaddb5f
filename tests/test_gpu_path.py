"""CPU checks of the GPU-tuned training step: the CPU path unchanged, the CUDA choices wired.

What needs a GPU is in tests/test_cuda.py (skipped here); these run everywhere: the CPU
AdamW is torch's default one bit for bit, a checkpoint brings no other device's kernel,
an epoch on the CUDA-style path reads nothing back from the device before its end, the
CUDA dropout branch computes the same function, compile agrees with eager, the options.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.overrides import TorchFunctionMode

from eanet import accel
from eanet.accel import modules
from eanet.data.augment import AugmentConfig
from eanet.data.load import load_dataset
from eanet.errors import ConfigError
from eanet.models.registry import create_model
from eanet.train import step as step_mod
from eanet.train.config import TrainConfig
from eanet.train.guard import StepGuard

TINY = {"depth": 1, "dim": 32, "mlp_dim": 32}
NO_DROPOUT = {"attn_drop": 0.0, "proj_drop": 0.0, "mlp_drop": 0.0}


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(name: str = "eanet-cifar", **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(name, **{**TINY, **kw})
    model.normalize.set_stats(
        torch.tensor([129.3, 124.1, 112.4]), torch.tensor([4597.0, 4231.0, 5013.0]), 1
    )
    return model


def _batch(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return x, torch.randint(0, 100, (n,), generator=g)


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"model_args": dict(TINY), "batch_size": 2, "device": "cpu", **kw})


# --------------------------------------------------------------------------- optimizer


@pytest.mark.parametrize("rule", ["keras", "torch"])
def test_cpu_adamw_is_torchs_default_bit_for_bit(rule):
    """make_optimizer on the CPU: no fused kernel, the same steps as a plain AdamW (whose
    epsilon, under the Keras rule, is set to 1e-7 / sqrt(1 - 0.999^t) before step t)."""
    a, b = _model(), _model()
    cfg = _cfg(adam_eps_rule=rule)
    ours = step_mod.make_optimizer(a, cfg)
    assert ours.param_groups[0]["fused"] is None and ours.param_groups[0]["foreach"] is None
    plain = torch.optim.AdamW(b.parameters(), lr=1e-3, eps=1e-7, weight_decay=1e-4)
    x, y = _batch(4)
    for model, opt in ((a, ours), (b, plain)):
        torch.manual_seed(1)
        for t in (1, 2):
            if opt is plain and rule == "keras":
                plain.param_groups[0]["eps"] = 1e-7 / (1 - 0.999**t) ** 0.5
            step_mod.train_step(model, opt, x, y, cfg, AugmentConfig())
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_checkpoint_does_not_bring_another_devices_adamw_kernel():
    """load_state_dict copies `fused` from the file; the hook restores this device's choice."""
    model = _model()
    opt = step_mod.make_optimizer(model, _cfg())
    x, y = _batch()
    step_mod.train_step(model, opt, x, y, _cfg(), AugmentConfig())
    saved = copy.deepcopy(opt.state_dict())
    for group in saved["param_groups"]:
        group["fused"] = True  # as a GPU run saves it
    again = step_mod.make_optimizer(model, _cfg())
    again.load_state_dict(saved)
    assert all(g["fused"] is None for g in again.param_groups)
    # the other way (a CPU checkpoint into a fused optimizer): fused kept, steps moved
    fused = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    fused.register_load_state_dict_post_hook(step_mod._own_kernel)
    fused.load_state_dict(opt.state_dict())
    assert all(g["fused"] is True for g in fused.param_groups)
    steps = [s["step"] for s in fused.state.values()]
    assert steps and all(s.dtype == torch.float32 and float(s) == 1 for s in steps)


@pytest.mark.parametrize(("scaling", "batch", "lr"), [("none", 512, 1e-3), ("linear", 512, 4e-3)])
def test_lr_scaling(scaling, batch, lr):
    opt = step_mod.make_optimizer(_model(), _cfg(lr_scaling=scaling, batch_size=batch))
    assert opt.param_groups[0]["lr"] == pytest.approx(lr)


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"compile_mode": "max-autotune"}, "--compile-mode max-autotune applies to torch.compile"),
        ({"compile_mode": "fast", "compile": True}, "--compile-mode 'fast' must be one of"),
        ({"lr_scaling": "sqrt"}, "--lr-scaling 'sqrt' must be one of"),
        ({"synthetic_images": 100}, "--synthetic-images applies to --dataset synthetic"),
        ({"synthetic_images": 4, "dataset": "synthetic"}, r"must be an integer in \[5, "),
    ],
)
def test_gpu_options_refuse_what_cannot_apply(kw, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**kw)


def test_synthetic_images_sizes_the_synthetic_set():
    data = load_dataset("synthetic", synthetic_images=100)
    assert (len(data.train_images), len(data.test_images)) == (100, 20)
    assert data.train_images.shape[1:] == (3, 32, 32) and data.num_classes == 100


# --------------------------------------------------------------------------- the epoch loop


class HostReads(TorchFunctionMode):
    """Counts the calls that copy a tensor's value to Python: each one a sync on a GPU."""

    READS = {"item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"}

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.paused = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if not self.paused and getattr(func, "__name__", "") in self.READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _epoch_reads(monkeypatch, live: bool, guard: StepGuard | None = None) -> int:
    """Host reads in one 25-step epoch (the bar updates at steps 0, 10, 20 and 24).

    The AdamW step is left out: on the CPU torch's AdamW reads its step counts, which
    live on the CPU; on CUDA the fused kernel keeps them on the GPU (tests/test_cuda.py
    checks the whole epoch there with CUDA's sync debug mode).
    """
    monkeypatch.setattr(step_mod, "live_metrics", lambda device: live)
    model = _model()
    cfg = _cfg()
    opt = step_mod.make_optimizer(model, cfg)
    reads = HostReads()
    real_step = opt.step

    def step(*args, **kwargs):
        reads.paused = True
        try:
            return real_step(*args, **kwargs)
        finally:
            reads.paused = False

    opt.step = step
    x, y = _batch(2 * 25)
    with reads:
        step_mod.train_epoch(model, opt, x, y, cfg, progress=True, guard=guard)
    return reads.count


def test_the_cuda_epoch_reads_the_device_only_at_its_end(monkeypatch):
    """On CUDA (`live_metrics` False) the bar shows img/s only: 2 metric reads, not 4+1."""
    cpu_reads = _epoch_reads(monkeypatch, live=True)
    cuda_reads = _epoch_reads(monkeypatch, live=False)
    per_read = 3  # loss, top-1, top-5
    assert cpu_reads == 5 * per_read  # the counter sees the reads the CPU path makes
    assert cuda_reads == 2 * per_read  # the bar's last update and the epoch's result
    # StepGuard's non-finite check reads once per 32 steps and once at the epoch's end
    with_guard = _epoch_reads(monkeypatch, live=False, guard=StepGuard("stop"))
    assert with_guard == cuda_reads + 2


def test_the_cpu_progress_bar_shows_the_running_metrics(monkeypatch):
    shown = []
    monkeypatch.setattr(step_mod.tqdm, "set_postfix", lambda self, **kw: shown.append(kw))
    model = _model()
    x, y = _batch(4)
    step_mod.train_epoch(model, step_mod.make_optimizer(model, _cfg()), x, y, _cfg())
    assert shown and set(shown[-1]) == {"loss", "top1", "top5", "img_s"}


# --------------------------------------------------------------------------- dropout


def test_the_cpu_keeps_the_cheap_masks(monkeypatch):
    calls = []
    real = modules.masked
    monkeypatch.setattr(modules, "masked", lambda x, p: calls.append(p) or real(x, p))
    for name in ("eanet-cifar", "vit-cifar"):
        model = _model(name)
        accel.apply(model, "cpu")
        model.train()(_batch(2)[0])
    assert calls and all(p == 0.2 for p in calls)


@pytest.mark.parametrize("name", ["eanet-cifar", "vit-cifar"])
def test_the_cuda_dropout_branch_computes_the_same_function(monkeypatch, name):
    """The branch CUDA takes, run on the CPU: without dropout, the reference's outputs."""
    ref = _model(name, **NO_DROPOUT).train()
    fast = copy.deepcopy(ref)
    accel.apply(fast, "cuda")  # what CUDA swaps in, run here on the CPU
    monkeypatch.setattr(modules, "torch_dropout", lambda x: True)
    # masked(x, 0) is x itself; a mask drawn by the trick fails the test
    monkeypatch.setattr(modules, "masked", lambda x, p: x if p == 0 else pytest.fail("mask trick"))
    x, _ = _batch(2)
    torch.testing.assert_close(fast(x), ref(x), atol=1e-5, rtol=1e-5)


def test_the_cuda_dropout_branch_keeps_the_mean(monkeypatch):
    """With dropout: the average over many draws is the eval-mode output (rescale right)."""
    monkeypatch.setattr(modules, "torch_dropout", lambda x: True)
    torch.manual_seed(0)
    attn = modules.FoldedExternalAttention(64)  # the Keras example's layer, dropout 0.2
    x = torch.randn(1, 16, 64)  # 16 tokens: any count works
    with torch.no_grad():
        expected = attn.eval()(x)
        attn.train()
        mean = torch.stack([attn(x) for _ in range(600)]).mean(0)
    assert (mean - expected).abs().mean() < 0.1 * expected.abs().mean()


# --------------------------------------------------------------------------- compile


@pytest.mark.slow
def test_compiled_step_matches_eager(monkeypatch):
    """accelerate's torch.compile (its mode passed on) against eager: logits and gradients.

    Inductor on this CPU took 129 s wall (42 s CPU) to compile the tiny model, over the
    test budget, so the test compiles with backend='aot_eager' (dynamo + AOT autograd, the
    graph capture inductor also starts from); the product keeps inductor.
    """
    seen = {}
    real = torch.compile

    def compile_for_test(model, mode=None, **kw):
        seen["mode"] = mode
        return real(model, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", compile_for_test)
    eager = _model(**NO_DROPOUT).train()
    src = copy.deepcopy(eager)
    cfg = _cfg(compile=True, compile_mode="max-autotune")
    compiled = step_mod.accelerate(src, cfg, torch.device("cpu"))
    assert seen["mode"] == "max-autotune"
    x, _ = _batch(4)
    a, b = eager(x), compiled(x)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    a.logsumexp(1).sum().backward()
    b.logsumexp(1).sum().backward()
    for (name, p), q in zip(eager.named_parameters(), src.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
    torch._dynamo.reset()


def test_compile_mode_default_is_torchs_default(monkeypatch):
    seen = {}
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: seen.update(mode=mode))
    step_mod.accelerate(_model(), _cfg(compile=True), torch.device("cpu"))
    assert seen == {"mode": None}


def test_bench_takes_the_compile_mode():
    """run.sh's probe: `eanet bench --compile --compile-mode MODE` reaches the config."""
    from eanet.cli.flags import given
    from eanet.cli.parser import build_parser

    args = build_parser().parse_args(["bench", "--compile", "--compile-mode", "reduce-overhead"])
    assert given(args, TrainConfig)["compile_mode"] == "reduce-overhead"
