"""`eanet.accel.apply`: the applied model computes the plain model's function, faster.

Parity compares two models (the plain one and a copy with accel applied): outputs and
gradients, fp32 tightly, over odd shapes of both models; bf16 parity is in
test_precision.py. Also what `apply` reports, `restore`, hooks, and what runs record.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.profiler import profile

from eanet import accel
from eanet.accel.modules import FastMlp, FoldedExternalAttention, FusedBlocks
from eanet.models.config import ModelConfig
from eanet.models.layers import Block, ExternalAttention, Mlp, SelfAttention
from eanet.models.registry import create_model

STATS = (torch.tensor([129.0, 124, 112]), torch.tensor([4500.0, 4200, 5000]), 1)

# Odd shapes: batch 1/3/127, dim 40/48, 1-6 heads, patch 1/4/32, memory size 7/64, both
# models (each value at least once; every pair of dim and heads divides).
SHAPES = [
    ("eanet-cifar", 3, {"dim": 40, "num_heads": 1, "patch_size": 4, "memory_size": 7}),
    ("eanet-cifar", 1, {"dim": 48, "num_heads": 6, "patch_size": 1, "image_size": 16}),
    ("eanet-cifar", 127, {"dim": 40, "num_heads": 5, "patch_size": 32, "mlp_dim": 24}),
    ("eanet-cifar", 3, {"dim": 48, "num_heads": 3, "patch_size": 4, "memory_size": 64}),
    ("eanet-cifar-s64", 3, {"dim": 40, "num_heads": 2, "patch_size": 4}),
    ("vit-cifar", 3, {"dim": 40, "num_heads": 4, "patch_size": 4}),
    ("vit-cifar", 1, {"dim": 48, "num_heads": 6, "patch_size": 1, "image_size": 16}),
    ("vit-cifar", 127, {"dim": 48, "num_heads": 1, "patch_size": 32}),
    ("vit-cifar", 3, {"dim": 40, "num_heads": 5, "patch_size": 4, "mlp_dim": 24}),
]


def _pair(name: str, precision: str = "fp32", **overrides):
    """(plain, applied) copies of one freshly initialised model, depth 2."""
    plain, fast, _ = _applied(name, precision, **overrides)
    return plain, fast


def _applied(name: str, precision: str = "fp32", change=None, **overrides):
    """(plain, applied, report): copies of one freshly initialised model, depth 2, first
    changed by `change(model)` where given (a user's edit of the model)."""
    torch.manual_seed(0)
    plain = create_model(name, depth=2, **overrides)
    plain.normalize.set_stats(*STATS)
    if change is not None:
        change(plain)
    fast = copy.deepcopy(plain)
    report = accel.apply(fast, "cpu", precision)
    return plain, fast, report


def _images(model, batch: int) -> torch.Tensor:
    return torch.randint(0, 256, (batch, *model.input_shape), dtype=torch.uint8)


def _random_biases(model) -> None:
    """Non-zero biases in every linear layer (they start at 0), so that where a bias goes
    (a linear layer or a kernel after it) shows in the results."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0.0, 0.5)


def _assert_same_function(plain, fast, x, seed: int | None = None) -> None:
    """Outputs and gradients agree; `seed`: torch's seed before each forward pass (the
    stochastic depth's draws, the only random numbers with the dropout rates at 0)."""
    outs = []
    for model in (fast, plain):
        if seed is not None:
            torch.manual_seed(seed)
        outs.append(model(x))
    a, b = outs
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    a.logsumexp(1).sum().backward()
    b.logsumexp(1).sum().backward()
    scale = max(p.grad.abs().max() for p in plain.parameters())
    for (pname, p), q in zip(fast.named_parameters(), plain.parameters(), strict=True):
        assert (p.grad - q.grad).abs().max() <= 1e-4 * scale, pname


@pytest.mark.parametrize(("name", "batch", "shape"), SHAPES)
def test_applied_model_computes_the_plain_function_in_eval(name, batch, shape):
    """Outputs and gradients of every parameter, without dropout (eval mode)."""
    plain, fast = _pair(name, **shape)
    _assert_same_function(plain.eval(), fast.eval(), _images(plain, batch))


@pytest.mark.parametrize(("name", "batch", "shape"), SHAPES[::2])
def test_applied_model_computes_the_plain_function_in_training(name, batch, shape):
    """Training mode takes other branches (the explicit attention, the mask dropout): with
    the dropout rates at 0 they must still be the plain function."""
    no_dropout = {"attn_drop": 0.0, "proj_drop": 0.0, "mlp_drop": 0.0}
    plain, fast = _pair(name, **shape, **no_dropout)
    _assert_same_function(plain.train(), fast.train(), _images(plain, batch))


NO_DROPOUT = {"attn_drop": 0.0, "proj_drop": 0.0, "mlp_drop": 0.0}


def _users_changes(model) -> None:
    """A user's edit of the first block: the MLP's GELU swapped for SiLU, and the attention's
    input projection (EANet's proj_in, ViT's q) replaced by one without a bias, the same
    weight. Neither fits its faster class, which reads the GELU's `approximate` and that
    bias."""
    block = model.blocks[0]
    block.mlp.act = torch.nn.SiLU()
    name = "proj_in" if isinstance(block.attn, ExternalAttention) else "q"
    old = getattr(block.attn, name)
    new = torch.nn.Linear(old.in_features, old.out_features, bias=False)
    with torch.no_grad():
        new.weight.copy_(old.weight)
    setattr(block.attn, name, new)


ODD_OPTIONS = [
    pytest.param({"gelu": "erf"}, None, id="erf-gelu"),  # the MLP's act runs as torch's GELU
    pytest.param({}, _random_biases, id="odd-biases"),  # b_in left out, b_out split off
    pytest.param({"drop_path": 0.3}, None, id="drop-path"),
    pytest.param({"drop_path": 0.3}, _users_changes, id="users-block"),
]


@pytest.mark.parametrize("name", ["eanet-cifar", "vit-cifar"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize(("options", "change"), ODD_OPTIONS)
def test_applied_model_computes_the_plain_function_with_odd_options(
    name, precision, options, change
):
    """The erf GELU, non-zero biases everywhere, stochastic depth in training, and a user's
    changed block: outputs and gradients of the plain function, in fp32 on the CPU, in eval
    mode and in training mode under one seed (stochastic depth draws its per-sample keeps
    from torch's generator in the same order both ways; the dropout rates are 0, since the
    applied model draws its dropout masks from another generator, see internals.md). Applied
    for bf16 the blocks are `FusedBlocks`, whose fp32 path is torch's ops: the same function
    as `Block.forward`, which it writes out (this pins that write-out to the plain block)."""
    plain, fast, report = _applied(name, precision, change, **options, **NO_DROPOUT)
    x = _images(plain, 3)
    _assert_same_function(plain.eval(), fast.eval(), x)
    plain.zero_grad(), fast.zero_grad()
    _assert_same_function(plain.train(), fast.train(), x, seed=7)
    assert isinstance(fast.blocks, FusedBlocks) is (precision == "bf16")
    if change is _users_changes:
        attention = "FoldedExternalAttention" if name == "eanet-cifar" else "FastSelfAttention"
        projection = "proj_in" if name == "eanet-cifar" else "q"
        assert report.plain == {
            "blocks.0.attn": f"{attention}: {projection} has no bias",
            "blocks.0.mlp": "FastMlp: act is SiLU, not GELU",
        }
        assert type(fast.blocks[0].mlp) is Mlp and type(fast.blocks[1].mlp) is FastMlp
    else:
        assert report.plain == {}


def test_dropout_in_training_takes_the_plain_rates():
    """With dropout, the applied model's train-mode outputs average to its eval output:
    the rescales folded into the next weights are right."""
    torch.manual_seed(0)
    mlp = Mlp(ModelConfig())
    accel.apply(mlp, "cpu")
    assert isinstance(mlp, FastMlp)
    x = torch.randn(1, 64)
    with torch.no_grad():
        expected = mlp.eval()(x)
        outs = torch.stack([mlp.train()(x) for _ in range(4000)])
    assert outs.std(0).min() > 0
    torch.testing.assert_close(outs.mean(0), expected, atol=0.05, rtol=0.05)


def test_apply_reports_what_it_swapped_and_keeps_the_state_dict():
    plain, fast = _pair("eanet-cifar", "bf16")
    report = accel.apply(fast, "cpu", "bf16")  # a second time: nothing more to swap
    assert report.modules == {"FastMlp": 2, "FoldedExternalAttention": 2, "FusedBlocks": 1}
    assert report.precision == "bf16" and report.device == "cpu"
    assert set(report.kernels) == {"double_normalize", "gelu", "layer_norm", "dropout", "softmax"}
    assert "2 FoldedExternalAttention" in report.summary()
    assert list(fast.state_dict()) == list(plain.state_dict())
    assert isinstance(fast.blocks[0].attn, ExternalAttention)  # subclasses: checks still hold
    fast.load_state_dict(plain.state_dict())  # checkpoints load either way


def test_fp32_and_cuda_swap_only_what_pays_there():
    model = create_model("vit-cifar", depth=1)
    report = accel.apply(model, "cpu", "fp32")
    assert "FusedBlocks" not in report.modules  # the fused add + norm is a bf16 kernel
    cuda = create_model("eanet-cifar", depth=1)
    report = accel.apply(cuda, "cuda", "bf16")  # only decides: nothing runs on the GPU
    assert report.modules == {"FoldedExternalAttention": 1} and report.kernels == []
    assert type(cuda.blocks[0].mlp) is Mlp


def test_restore_gives_back_the_plain_model():
    plain, fast = _pair("eanet-cifar", "bf16")
    with torch.no_grad():
        fast.eval()(_images(fast, 2))  # fills the folded-weights cache
    accel.restore(fast)
    for a, b in zip(fast.modules(), plain.modules(), strict=True):
        assert type(a) is type(b)
    assert "_folded" not in fast.blocks[0].attn.__dict__


def test_hooks_on_a_block_see_what_they_see_in_the_plain_model():
    """FusedBlocks defers each block's last add; with a hook on a block it runs the blocks
    one by one, so the hook gets the block's true output (a tensor, not a pair)."""
    plain, fast = _pair("eanet-cifar", "bf16")
    assert isinstance(fast.blocks, FusedBlocks)
    seen, x = {}, _images(plain, 2)
    for label, model in (("plain", plain), ("fast", fast)):
        model.blocks[0].register_forward_hook(lambda m, i, o, k=label: seen.setdefault(k, o))
        with torch.no_grad():
            model.eval()(x)
    torch.testing.assert_close(seen["fast"], seen["plain"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["eanet-cifar", "vit-cifar"])
def test_dropouts_drawn_inside_the_adds_are_the_layers_own(name):
    """In CPU bf16 training FusedBlocks draws each branch's last dropout (projection, MLP)
    inside the residual add + LayerNorm; the blocks run one by one (a hook on the sequence's
    first block) draw it in the layers themselves. Under one torch seed both draw the same
    masks: the same logits and gradients, to bf16's rounding (other masks differ by far more).
    The fused blocks also add the branches' last biases (non-zero here) inside those kernels
    and take their gradients from the LayerNorm backward; the layers, in their linears."""
    _, fast = _pair(name, "bf16")
    _random_biases(fast)
    fast.train()
    x = _images(fast, 4)
    results = []
    for one_by_one in (False, True):
        hook = fast.blocks[0].register_forward_hook(lambda *a: None) if one_by_one else None
        fast.zero_grad()
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = fast(x).float()
        logits.logsumexp(1).sum().backward()
        results.append((logits, [p.grad.clone() for p in fast.parameters()]))
        if hook:
            hook.remove()
    (a, grads_a), (b, grads_b) = results
    torch.testing.assert_close(a, b, atol=0.02, rtol=0.02)
    scale = max(g.abs().max() for g in grads_b)
    gap = max((ga - gb).abs().max() for ga, gb in zip(grads_a, grads_b, strict=True))
    assert gap < 0.02 * scale


def test_the_plain_model_runs_torchs_ops_and_the_applied_one_the_kernels():
    plain, fast = _pair("eanet-cifar", "bf16")
    x = _images(plain, 2)

    def ops(model):
        with profile() as prof, torch.autocast("cpu", dtype=torch.bfloat16):
            model.train()(x).float().sum().backward()
        return {e.key for e in prof.key_averages()}

    kernels = {
        "eanet::double_normalize_cpu",
        "eanet::double_normalize_cpu_backward",
        "eanet::gelu_tanh_cpu",
        "eanet::layer_norm_cpu",
        "eanet::add_layer_norm_cpu",
        "eanet::layer_norm_cpu_backward",
        "eanet::dropout_cpu",
    }
    assert kernels <= ops(fast)
    assert not {k for k in ops(plain) if k.startswith("eanet::")}


class _LayerScaleBlock(Block):
    """A user's block with its own forward (a layer scale on each branch)."""

    def forward(self, x):
        x = x + 0.5 * self.attn(self.norm1(x))
        return x + 0.5 * self.mlp(self.norm2(x))


def _set(path: str, make):
    """A change of the model: the module at `path` (dotted) replaced by make(old)."""

    def change(model):
        *parents, last = path.split(".")
        parent = model.get_submodule(".".join(parents))
        setattr(parent, last, make(getattr(parent, last)))

    return change


def _hook_on(path: str):
    def change(model):
        model.get_submodule(path).register_forward_hook(lambda *a: None)

    return change


def _own_forward(model):
    import types

    mlp = model.blocks[0].mlp
    mlp.forward = types.MethodType(Mlp.forward, mlp)  # a deep copy binds it to the copy


def _layer_scale(model):
    old = model.blocks[1]
    new = _LayerScaleBlock(model.config, old.drop_path)
    new.load_state_dict(old.state_dict())
    model.blocks[1] = new


class _MyMlp(Mlp):
    """A user's subclass (its code may differ from the plain class's)."""


UNSUPPORTED = [
    (
        _set("blocks.0.attn.attn_drop", lambda d: torch.nn.Identity()),
        "blocks.0.attn",
        "FoldedExternalAttention: attn_drop is Identity, not Dropout",
    ),
    (
        _set("blocks.0.mlp.drop", lambda d: torch.nn.AlphaDropout(0.0)),
        "blocks.0.mlp",
        "FastMlp: drop is AlphaDropout, not Dropout",
    ),
    (
        _set("blocks.0.mlp.fc2", lambda f: torch.nn.Linear(f.in_features, f.out_features, False)),
        "blocks.0.mlp",
        "FastMlp: fc2 has no bias",
    ),
    (_set("blocks.0.mlp.act", lambda a: torch.nn.GELU()), None, None),  # erf: supported
    (
        _set("blocks.0.mlp", lambda m: _MyMlp(_mlp_config())),
        "blocks.0.mlp",
        "FastMlp: _MyMlp is not the plain Mlp (its own code)",
    ),
    (_own_forward, "blocks.0.mlp", "FastMlp: forward set on the instance"),
    (
        _hook_on("blocks.0.attn.mk"),
        "blocks.0.attn",
        "FoldedExternalAttention: mk has hooks, which the fast path would skip",
    ),
    (
        _set("blocks.1.norm2", lambda n: torch.nn.RMSNorm(n.normalized_shape)),
        "blocks",
        "FusedBlocks: block 1: norm2 is RMSNorm, not LayerNorm",
    ),
    (_layer_scale, "blocks", "FusedBlocks: block 1: _LayerScaleBlock has its own forward"),
]


def _mlp_config() -> ModelConfig:
    """eanet-cifar's MLP sizes."""
    return ModelConfig(dim=64, mlp_dim=64, **NO_DROPOUT)


@pytest.mark.parametrize(("change", "path", "reason"), UNSUPPORTED)
def test_apply_leaves_what_a_layer_does_not_support_plain_and_says_why(change, path, reason):
    """Each faster class supports exactly the plain class with the children and attributes
    its fast path reads (`FastLayer.unsupported`): another dropout, a linear layer without
    the bias it reads, a subclass, a forward of the instance's own, a hook on a child the
    fast path skips, another norm or a block with its own forward stay plain (the sequence
    of blocks then runs block by block), reported with the reason; the model computes the
    plain model's function (fp32 run of the bf16-applied model: torch's ops, exact)."""
    plain, fast, report = _applied("eanet-cifar", "bf16", change, **NO_DROPOUT)
    assert report.plain == ({} if path is None else {path: reason})
    if path is not None:
        assert "left plain: " + path in report.summary()
        assert type(fast.get_submodule(path)) is type(plain.get_submodule(path))
    assert report.to_dict()["plain"] == report.plain
    _assert_same_function(plain.eval(), fast.eval(), _images(plain, 2))


def test_fused_blocks_write_out_the_plain_block():
    """FusedBlocks runs a sequence of blocks with `Block.forward` written out (norm1, attn,
    drop_path, norm2, mlp, in that order); it takes exactly those children: plain LayerNorms,
    any attention and MLP modules, and a numeric drop_path, in a block of the plain class.
    (The function itself is pinned by the parity tests above, the bf16-applied model in
    fp32, and by test_dropouts_drawn_inside_the_adds_are_the_layers_own.)"""
    from eanet.accel.modules import FastLayer

    model = create_model("eanet-cifar", depth=2)
    assert issubclass(FusedBlocks, FastLayer) and FusedBlocks.supports(model.blocks)
    block = model.blocks[0]
    assert {n for n, _ in block.named_children()} == {"norm1", "attn", "norm2", "mlp"}
    assert type(block.norm1) is type(block.norm2) is torch.nn.LayerNorm
    assert isinstance(block.drop_path, float)
    for fast in (FoldedExternalAttention, FastMlp):
        assert fast.supports(getattr(block, "attn" if fast is FoldedExternalAttention else "mlp"))
    block.drop_path = torch.tensor(0.1)
    assert FusedBlocks.unsupported(model.blocks).startswith("block 0: drop_path=tensor(")
    assert FusedBlocks.unsupported(torch.nn.Sequential()) == "no blocks"
    mixed = torch.nn.Sequential(model.blocks[1], torch.nn.Identity())
    assert FusedBlocks.unsupported(mixed) == "block 1: Identity is not a Block"


def test_folded_memories_are_cached_for_inference_until_the_weights_change():
    """Without gradients the folded weights are reused; an optimizer step, an in-place
    change or load_state_dict makes them be folded afresh (outputs equal the uncached ones)."""
    model = create_model("eanet-cifar", depth=1).eval()
    accel.apply(model, "cpu")
    attn, x = model.blocks[0].attn, _images(model, 2)
    assert isinstance(attn, FoldedExternalAttention)
    with torch.no_grad():
        model(x)
        first = attn.folded_weights_cached()
        assert all(a is b for a, b in zip(first, attn.folded_weights_cached(), strict=True))
        attn.mk.weight.mul_(1.5)
        assert not torch.equal(first[0], attn.folded_weights_cached()[0])
        with torch.autocast("cpu", dtype=torch.bfloat16):  # kept in the dtype to compute in
            cast = attn.folded_weights_cached()
        assert all(w.dtype == torch.bfloat16 for w in cast)
        assert torch.equal(cast[0], attn.folded_weights()[0].bfloat16())
        assert attn.folded_weights_cached()[0].dtype == torch.float32
    model.load_state_dict(create_model("eanet-cifar", depth=1).state_dict())
    with torch.inference_mode():
        cached = model(x)
    torch.testing.assert_close(cached, model(x), rtol=0, atol=0)


def test_compiled_inference_compiles_once():
    """Repeated no-grad calls of a compiled model reuse one graph (the folded-weights cache
    and the LayerNorm kernel stay out of compiled code, whose guards would recompile)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    model = create_model("eanet-cifar", depth=2).eval()
    accel.apply(model, "cpu", "bf16")
    model = torch.compile(model, backend=counter)
    x = _images(model, 4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(3):
            model(x)
    assert counter.frame_count == 1


def test_self_attention_is_swapped_on_any_device_and_keeps_plain_names():
    model = create_model("vit-cifar", depth=1)
    names = [n for n, _ in model.named_parameters()]
    accel.apply(model, "cpu")
    assert isinstance(model.blocks[0].attn, SelfAttention)
    assert type(model.blocks[0].attn).__name__ == "FastSelfAttention"
    assert [n for n, _ in model.named_parameters()] == names


@pytest.mark.parametrize(("use_accel", "precision"), [(True, "auto"), (False, "bf16")])
def test_a_run_records_the_resolved_precision_and_what_accel_did(
    tmp_path, small_sample, use_accel, precision
):
    """config.json says which precision ran ('auto' resolved) and what accel swapped in
    (None with --no-accel, where the plain model trains)."""
    import json

    from eanet.runtime import resolve_precision
    from eanet.train.config import TrainConfig
    from eanet.train.loop import fit

    cfg = TrainConfig(
        model_args={"depth": 1, "dim": 32, "mlp_dim": 32},
        epochs=1,
        batch_size=32,
        device="cpu",
        precision=precision,
        accel=use_accel,
    )
    fit(cfg, tmp_path, data=small_sample, progress=False)
    record = json.loads((tmp_path / "config.json").read_text())
    resolved = resolve_precision(precision, torch.device("cpu"))
    assert record["precision"] == resolved and record["train"]["precision"] == precision
    if use_accel:
        assert record["accel"]["precision"] == resolved
        assert record["accel"]["modules"]["FoldedExternalAttention"] == 1
        assert "double_normalize" in record["accel"]["kernels"]
    else:
        assert record["accel"] is None and record["train"]["accel"] is False


def test_bench_json_records_accel(monkeypatch):
    from eanet.bench import bench_model
    from eanet.train.config import TrainConfig

    base = {"model_args": {"depth": 1}, "batch_size": 2, "device": "cpu"}
    on = bench_model(TrainConfig(**base), warmup=0, steps=1)
    off = bench_model(TrainConfig(**base, accel=False), warmup=0, steps=1)
    assert on.to_dict()["accel"]["modules"] == {"FastMlp": 1, "FoldedExternalAttention": 1}
    assert off.accel is None and off.native_kernels == {}
    assert on.forward_macs_per_image == off.forward_macs_per_image  # counted on the plain ops


def test_predict_evaluate_and_the_api_give_the_same_answer_with_and_without_accel(
    tiny_run, small_sample, tmp_path, capsys
):
    """--no-accel / accel=False run the plain model: the same predictions."""
    import json

    from PIL import Image

    from eanet import api
    from eanet.cli.main import main
    from eanet.evaluate import evaluate_checkpoint

    x = small_sample.test_images[:3]
    a = api.load(tiny_run, device="cpu").predict(x)
    b = api.load(tiny_run, device="cpu", accel=False).predict(x)
    assert [p.indices for p in a] == [p.indices for p in b]
    assert type(api.load(tiny_run, device="cpu", accel=False).model.blocks[0].attn) is (
        ExternalAttention
    )
    runs = [
        evaluate_checkpoint(
            tiny_run, data=small_sample, out_dir=tmp_path / str(flag), progress=False, accel=flag
        )
        for flag in (True, False)
    ]
    assert abs(runs[0]["test_loss"] - runs[1]["test_loss"]) < 1e-4
    png = tmp_path / "one.png"
    Image.fromarray(x[0].permute(1, 2, 0).numpy()).save(png)
    for extra in ([], ["--no-accel"]):
        assert main(["predict", str(tiny_run), str(png), "--json", "--device", "cpu", *extra]) == 0
    with_accel, plain = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert with_accel["predictions"][0]["index"] == plain["predictions"][0]["index"]


def test_bf16_inference_attention_in_chunks_is_the_plain_models(monkeypatch):
    """CPU bf16 inference runs self-attention a few images at a time (`attention_in_chunks`);
    with chunks that do not divide the batch, the logits are the plain model's under
    autocast (the same bf16 ops: equal to a unit of bf16's last place)."""
    from eanet.accel import modules

    calls = []
    real = modules.attention_in_chunks
    monkeypatch.setattr(
        modules, "attention_in_chunks", lambda *a: calls.append(a[0].shape) or real(*a)
    )
    monkeypatch.setattr(modules, "CHUNK_BYTES", 3 * 4 * 64 * 64 * 2)  # 3 images per chunk
    monkeypatch.setattr(modules, "cpu_info", lambda: ("a CPU without AMX", ("avx512_bf16",)))
    plain, fast = _pair("vit-cifar", "bf16", patch_size=4)
    x = _images(plain, 7)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = fast.eval()(x).float(), plain.eval()(x).float()
    assert calls and calls[0] == (7, 4, 64, 64)
    assert (a - b).abs().max() <= 2**-7 * b.abs().max()


@pytest.mark.parametrize(
    "flags, dtype, chunks",
    [
        (("avx512_bf16",), torch.bfloat16, True),
        (("avx512_bf16", "amx_bf16", "amx_tile"), torch.bfloat16, False),  # the fused kernel
        (("avx512_bf16",), torch.float32, False),
    ],
)
def test_attention_runs_in_chunks_only_in_bf16_without_amx(monkeypatch, flags, dtype, chunks):
    from eanet.accel import modules

    monkeypatch.setattr(modules, "cpu_info", lambda: ("a CPU", flags))
    assert modules.chunked_attention(torch.zeros(2, 4, 8, 8, dtype=dtype)) is chunks


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_external_attention_in_chunks_is_the_whole_batchs(monkeypatch, precision):
    """CPU inference runs external attention a few images at a time (so each chunk's logits
    stay in the cache); with chunks that do not divide the batch, the logits are exactly
    those of the whole batch at once, and the plain model's to rounding. Training and
    gradient-taking calls never chunk."""
    from eanet.accel import modules

    calls = []
    real, real_test = modules.external_attention_in_chunks, modules.in_cache_chunks
    monkeypatch.setattr(
        modules, "external_attention_in_chunks", lambda *a: calls.append(len(a[0])) or real(*a)
    )
    plain, fast = _pair("eanet-cifar", precision, patch_size=4)
    size = 2 if precision == "bf16" else 4
    monkeypatch.setattr(modules, "CHUNK_BYTES", 3 * 64 * 4 * 64 * size)  # 3 images per chunk
    x = _images(plain, 7)
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, precision == "bf16"):
        chunked = fast.eval()(x).float()
        assert calls == [7, 7]  # both blocks, in chunks of 3, 3 and 1
        monkeypatch.setattr(modules, "in_cache_chunks", lambda *a: False)
        whole, expected = fast(x).float(), plain.eval()(x).float()
    assert torch.equal(chunked, whole)
    tol = 2**-7 if precision == "bf16" else 1e-5
    assert (chunked - expected).abs().max() <= tol * expected.abs().max()
    calls.clear()
    monkeypatch.setattr(modules, "in_cache_chunks", real_test)
    with torch.autocast("cpu", torch.bfloat16, precision == "bf16"):
        fast.train()(x).float().sum().backward()
        with torch.no_grad():
            fast(x)  # training mode (dropout on) without gradients: no chunks either
    assert calls == []


@pytest.mark.parametrize("name", ["eanet-cifar", "vit-cifar"])
def test_inference_adds_the_branch_biases_inside_the_kernels(monkeypatch, name):
    """CPU bf16 inference leaves fc1's bias to the GELU kernel and the last bias of each
    branch (fc2's, external attention's output projection's in chunks) to the residual add
    + LayerNorm kernel; with non-zero biases the logits are the plain model's to bf16's
    rounding. Calls that take gradients or train leave every bias in its linear layer."""
    from eanet.accel import modules
    from eanet.accel.ops import gelu as gelu_ops
    from eanet.accel.ops import layer_norm as norm_ops

    plain, fast = _pair(name, "bf16", patch_size=4)
    _random_biases(plain)
    fast.load_state_dict(plain.state_dict())
    monkeypatch.setattr(modules, "CHUNK_BYTES", 3 * 64 * 4 * 64 * 2)  # EANet: 3 images a chunk
    calls = {"gelu": 0, "norm": 0}

    def counted(key, real, with_bias):
        def call(*args):
            calls[key] += with_bias(args)
            return real(*args)

        return call

    gelu, norm = gelu_ops._native_gelu_bias, norm_ops._native_add_layer_norm_
    monkeypatch.setattr(gelu_ops, "_native_gelu_bias", counted("gelu", gelu, lambda a: True))
    norm = counted("norm", norm, lambda a: a[2] is not None)  # (x, h, h's bias, w, b, eps)
    monkeypatch.setattr(norm_ops, "_native_add_layer_norm_", norm)
    x = _images(plain, 7)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = fast.eval()(x).float(), plain.eval()(x).float()
    assert calls["gelu"] == 2  # each block's fc1
    assert calls["norm"] == (3 if name == "eanet-cifar" else 1)  # the biases left to the adds
    assert (a - b).abs().max() <= 2**-6 * b.abs().max()
    assert not modules.bias_in_gelu(fast.blocks[0].mlp, x)  # gradients on, outside inference
    with torch.no_grad():
        assert not modules.bias_in_gelu(fast.blocks[0].mlp.train(), x)


def test_bf16_inference_adds_in_place_but_never_into_the_input(monkeypatch):
    """CPU bf16 inference writes each residual add over the stream the blocks made
    themselves (one pass less through memory), with the same logits as adding into fresh
    memory; the tensor handed to the blocks stays as it was."""
    from eanet.accel import fused, modules
    from eanet.accel.ops import layer_norm as norm_ops

    _, fast = _pair("eanet-cifar", "bf16", patch_size=4)
    fast.eval()
    tokens = torch.randn(5, 64, 64)
    before = tokens.clone()
    calls = []
    real = norm_ops._native_add_layer_norm_
    monkeypatch.setattr(norm_ops, "_native_add_layer_norm_", lambda *a: calls.append(1) or real(*a))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        in_place = fast.blocks(tokens)
        # the second block's two adds, and the first block's second, whose attention left its
        # bias to the kernel: into a copy of the input
        assert torch.equal(tokens, before) and len(calls) == 3
        monkeypatch.setattr(
            modules,
            "add_layer_norm",
            lambda n, x, r, in_place, p, bias: fused.add_layer_norm(n, x, r, bias=bias),
        )
        fresh = fast.blocks(tokens)
    assert torch.equal(in_place, fresh) and torch.equal(tokens, before)


@pytest.mark.parametrize("name", ["eanet-cifar", "vit-cifar"])
def test_weights_written_through_data_are_served_not_the_cached_fold(name):
    """`p.data.copy_(new)` bumps no version counter; the cached folds (external attention's
    memories, self-attention's q/k/v) must still follow it: the applied model's outputs
    equal the plain model's after new weights are copied in place."""
    plain, fast = _pair(name)
    plain.eval(), fast.eval()
    x = _images(fast, 3)
    with torch.no_grad():
        fast(x)  # fills the cache
        torch.manual_seed(1)
        new = create_model(name, depth=2).state_dict()
        for model in (plain, fast):
            for key, p in model.named_parameters():
                p.data.copy_(new[key])
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast(x)  # the bf16 copy of the fold, then changed again
        for model in (plain, fast):
            for p in model.parameters():
                p.data.mul_(0.5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(fast(x), plain(x), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", ["eanet-cifar", "vit-cifar"])
@pytest.mark.parametrize("grad", [False, True])
def test_empty_batches_and_token_sequences_give_the_plain_models_outputs(name, precision, grad):
    """0 images, and 0 tokens (the blocks alone), as the plain model: empty outputs of the
    same shape and dtype, in inference and in training."""
    plain, fast = _pair(name, precision)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    for training in (False, True):
        plain.train(training), fast.train(training)
        with torch.set_grad_enabled(grad), autocast:
            images = torch.zeros(0, *fast.input_shape, dtype=torch.uint8)
            want, got = plain(images), fast(images)
            assert (got.shape, got.dtype) == (want.shape, want.dtype)
            for batch in (0, 3):
                tokens = torch.randn(batch, 0, fast.config.dim, requires_grad=grad)
                want, got = plain.blocks(tokens), fast.blocks(tokens)
                assert (got.shape, got.dtype) == (want.shape, want.dtype)
                if grad:
                    got.sum().backward()
