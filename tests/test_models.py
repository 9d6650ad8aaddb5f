"""The models reproduce the Keras example exactly: counts, layout, normalisation, init."""

import math

import pytest
import torch
import torch.nn.functional as F

from eanet.errors import ConfigError
from eanet.models.config import ModelConfig
from eanet.models.layers import ExternalAttention, SelfAttention, patchify
from eanet.models.registry import MODELS, count_parameters, create_model, model_config
from eanet.models.transformer import EANet, ViT


@pytest.mark.parametrize(
    ("name", "trainable", "total"),
    [("eanet-cifar", 361_380, 361_387), ("vit-cifar", 623_268, 623_275)],
)
def test_parameter_counts_match_keras_summary(name, trainable, total):
    model = create_model(name)
    buffers = sum(b.numel() for b in model.buffers())
    assert count_parameters(model) == trainable
    assert buffers == 7  # mean (3), variance (3), count (1): Keras's non-trainable weights
    assert trainable + buffers == total


def test_eanet_and_vit_classes_force_their_attention():
    assert isinstance(EANet(ModelConfig(attention="self")).blocks[0].attn, ExternalAttention)
    assert isinstance(ViT().blocks[0].attn, SelfAttention)


@pytest.mark.parametrize("name", list(MODELS))
def test_forward_backward_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = create_model(name, depth=2)
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    logits = model(x)
    assert logits.shape == (3, 100)
    assert torch.isfinite(logits).all()
    logits.logsumexp(1).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


def test_wrong_input_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, 32, 32\)"):
        create_model("eanet-cifar", depth=1)(torch.zeros(2, 3, 28, 28))


def test_patchify_order_on_hand_built_image():
    # pixel value encodes (channel, row, col) so every position is identifiable
    c, h, w = torch.meshgrid(torch.arange(3), torch.arange(32), torch.arange(32), indexing="ij")
    img = (c * 10_000 + h * 100 + w).float()[None]
    patches = patchify(img, 2)
    assert patches.shape == (1, 256, 12)
    for gy, gx in [(0, 0), (0, 1), (1, 0), (7, 13), (15, 15)]:
        expected = [
            ch * 10_000 + (2 * gy + dy) * 100 + (2 * gx + dx)
            for dy in range(2)
            for dx in range(2)
            for ch in range(3)
        ]
        assert patches[0, gy * 16 + gx].tolist() == expected


def test_external_attention_double_normalisation():
    torch.manual_seed(0)
    attn = ExternalAttention(ModelConfig()).eval()
    a = attn.attention_map(torch.randn(2, 256, 64))
    assert a.shape == (2, 256, 16, 16)  # (B, N, heads, S)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 256, 16))  # rows over memory sum to 1
    assert not torch.allclose(a.sum(1), torch.ones(2, 16, 16))  # but not over tokens


def test_external_attention_equals_the_reference_formulation():
    """The transpose-free module gives the Keras code's numbers (B, heads, N, d) layout."""
    torch.manual_seed(0)
    m = ExternalAttention(ModelConfig()).eval()
    x = torch.randn(2, 256, 64)
    t = m.proj_in(x).reshape(2, 256, 16, 16).transpose(1, 2)  # (B, h, N, d) as Keras
    attn = F.softmax(m.mk(t), dim=2)  # softmax over N
    attn = attn / (1e-9 + attn.sum(-1, keepdim=True))
    ref = m.mv(attn).transpose(1, 2).reshape(2, 256, 256)
    torch.testing.assert_close(m(x), m.proj(ref), atol=1e-6, rtol=1e-5)
    # softmax over the memory axis instead (a known porting mistake) must differ clearly
    wrong = F.softmax(m.mk(t), dim=3)
    wrong = m.proj(m.mv(wrong).transpose(1, 2).reshape(2, 256, 256))
    assert (m(x) - wrong).abs().max() > 1e-3


def test_self_attention_is_keras_multi_head_attention():
    torch.manual_seed(0)
    m = SelfAttention(ModelConfig(attention="self")).eval()
    assert (m.q.out_features, m.proj.in_features) == (256, 256)  # 4 heads x key_dim 64
    x = torch.randn(2, 10, 64)

    def heads(t):
        return t.view(2, 10, 4, 64).transpose(1, 2)

    q, k, v = heads(m.q(x)), heads(m.k(x)), heads(m.v(x))
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(64), dim=-1)
    ref = m.proj((w @ v).transpose(1, 2).reshape(2, 10, 256))
    torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)


def test_mlp_uses_tanh_gelu_and_layernorm_eps():
    model = create_model("eanet-cifar")
    assert model.blocks[0].mlp.act.approximate == "tanh"
    assert model.blocks[0].norm1.eps == 1e-5


def test_normalization_buffers():
    model = create_model("eanet-cifar", depth=1)
    model.normalize.set_stats(torch.tensor([100.0, 120, 140]), torch.tensor([4.0, 9, 16]), 7)
    x = torch.tensor([102.0, 117, 148]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    out = model.normalize(x)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([1.0, -1.0, 2.0]))
    assert int(model.normalize.count) == 7


def test_keras_initialisation():
    torch.manual_seed(0)
    ea = create_model("eanet-cifar")
    w = ea.blocks[0].attn.proj_in.weight  # Dense 64 -> 256: Glorot limit sqrt(6 / 320)
    limit = math.sqrt(6 / (64 + 256))
    assert w.abs().max() <= limit and w.abs().max() > 0.95 * limit
    assert ea.blocks[0].attn.proj_in.bias.abs().sum() == 0
    pos = ea.patch_embed.pos_embed  # Embedding: U(-0.05, 0.05)
    assert pos.abs().max() <= 0.05 and pos.abs().max() > 0.045
    vit = create_model("vit-cifar")
    q = vit.blocks[0].attn.q.weight  # Keras kernel (64, 4, 64): fans 4*64 and 64*64
    q_limit = math.sqrt(6 / (256 + 4096))
    assert q.abs().max() <= q_limit and q.abs().max() > 0.95 * q_limit
    o = vit.blocks[0].attn.proj.weight  # Keras kernel (4, 64, 64): fans 256 and 256
    o_limit = math.sqrt(6 / 512)
    assert o.abs().max() <= o_limit and o.abs().max() > 0.95 * o_limit
    s64 = create_model("eanet-cifar-s64")
    assert s64.blocks[0].attn.mk.bias is None and s64.blocks[0].attn.mk.out_features == 64
    assert s64.blocks[0].attn.proj_in.weight.std() < 0.03  # trunc-normal std 0.02


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"patch_size": 3}, "patch_size=3 does not divide image_size=32"),
        ({"dim": 66}, "dim=66 is not divisible by num_heads=4"),
        ({"attn_drop": 1.5}, "attn_drop"),
        ({"attention": "linear"}, "attention='linear' must be one of"),
        ({"depth": 0}, "depth=0 must be a positive integer"),
        ({"bogus": 1}, "unknown model option"),
    ],
)
def test_impossible_configs_are_clear_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        model_config("eanet-cifar", **overrides)


def test_unknown_model_name():
    with pytest.raises(ConfigError, match="unknown model 'resnet'"):
        create_model("resnet")


def test_config_round_trip():
    cfg = model_config("eanet-cifar-s64", num_classes=10)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


# --------------------------------------------------------------------------- fast path


@pytest.mark.parametrize("name", ["eanet-cifar", "eanet-cifar-s64", "vit-cifar"])
def test_fast_path_computes_the_reference_function(name):
    """Folded memories, fused normalisation and mask dropout: same outputs and gradients."""
    import copy

    from eanet.models import use_reference_ops

    torch.manual_seed(0)
    fast = create_model(name, depth=2).eval()
    fast.normalize.set_stats(torch.tensor([129.0, 124, 112]), torch.tensor([4500.0, 4200, 5000]), 1)
    ref = use_reference_ops(copy.deepcopy(fast))
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    a, b = fast(x), ref(x)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    a.logsumexp(1).sum().backward()
    b.logsumexp(1).sum().backward()
    scale = max(p.grad.abs().max() for p in ref.parameters())
    for (pname, p), q in zip(fast.named_parameters(), ref.parameters(), strict=True):
        assert (p.grad - q.grad).abs().max() <= 1e-4 * scale, pname


def test_double_normalize_gradient():
    from eanet.models.fused import double_normalize

    z = torch.randn(2, 7, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: double_normalize(t, token_dim=1), (z,))
    q = double_normalize(z.detach(), token_dim=1)
    torch.testing.assert_close(q.sum(-1), torch.ones(2, 7, 3, dtype=torch.float64))


def _normalize_with_grad(z: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from eanet.models.fused import double_normalize

    z = z.detach().requires_grad_()
    q = double_normalize(z, token_dim=1)
    q.backward(g)
    return q.float(), z.grad.float()


def _normalize_both_ways(monkeypatch, z, g):
    """(q, dL/dz) by the native kernel and by torch's ops (the kernel switched off)."""
    from eanet.models import native

    assert native.available("double_normalize")  # this machine has a C compiler
    fast = _normalize_with_grad(z, g)
    monkeypatch.setitem(native.ENABLED, "native", False)
    return fast, _normalize_with_grad(z, g)


@pytest.mark.parametrize("shape", [(3, 256, 16, 16), (1, 7, 3, 5), (5, 64, 4, 16)])
def test_native_double_normalize_matches_torch_in_fp32(monkeypatch, shape):
    """The kernel (S = 16 unrolled, any other S generic; batches split over threads) gives
    torch's values and gradients to fp32 rounding, also for a non-contiguous gradient."""
    torch.manual_seed(0)
    z = torch.randn(shape) * 4
    g = torch.randn(shape[:2] + (shape[3], shape[2])).transpose(-1, -2)  # strided
    (q, grad), (q_ref, grad_ref) = _normalize_both_ways(monkeypatch, z, g)
    torch.testing.assert_close(q, q_ref, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(grad, grad_ref, atol=1e-6, rtol=1e-4)


def test_native_double_normalize_matches_torch_in_bf16(monkeypatch):
    """bfloat16 in and out, fp32 inside either way: a unit or two of bf16's last place."""
    torch.manual_seed(0)
    z = (torch.randn(4, 64, 16, 16) * 4).bfloat16()
    g = torch.randn(4, 64, 16, 16).bfloat16()
    (q, grad), (q_ref, grad_ref) = _normalize_both_ways(monkeypatch, z, g)
    torch.testing.assert_close(q, q_ref, atol=1e-6, rtol=2**-7)  # atol: values near 0
    torch.testing.assert_close(grad, grad_ref, atol=1e-6, rtol=2**-7)


def test_native_double_normalize_keeps_extremes_finite(monkeypatch):
    """Logits far apart (exp underflows to 0 for all but the largest) still sum to 1."""
    z = torch.zeros(2, 8, 2, 4)
    z[:, 0] = 200.0  # token 0 takes all the weight of every column
    z[1, 3, 1, 2] = -1e30
    (q, grad), (q_ref, grad_ref) = _normalize_both_ways(monkeypatch, z, torch.ones_like(z))
    assert torch.isfinite(q).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(q, q_ref)
    torch.testing.assert_close(grad, grad_ref)


def test_model_runs_the_native_kernel_on_the_cpu():
    from torch.profiler import profile

    model = create_model("eanet-cifar", depth=1).train()
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with profile() as prof:
        model(x).sum().backward()
    names = {e.key for e in prof.key_averages()}
    assert {"eanet::double_normalize_cpu", "eanet::double_normalize_cpu_backward"} <= names
    assert {"eanet::gelu_tanh_cpu", "eanet::gelu_tanh_cpu_backward"} <= names


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_tanh_gelu_matches_torch(dtype):
    """The GELU kernel against F.gelu(approximate="tanh"): values and gradients, for a
    non-contiguous input of odd length and the tails of tanh (|x| up to 30)."""
    from eanet.models.fused import _native_gelu_applies, gelu_tanh

    torch.manual_seed(0)
    base = torch.cat([torch.randn(2, 1001) * 3, torch.linspace(-30, 30, 2002).view(2, -1)], 1)
    x = base.to(dtype).t()  # strided
    assert _native_gelu_applies(x)
    g = torch.randn(x.shape).to(dtype)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    gelu_tanh(a).backward(g)
    y_ref = F.gelu(b, approximate="tanh")
    y_ref.backward(g)
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-6, "rtol": 2**-7}
    torch.testing.assert_close(gelu_tanh(x).float(), y_ref.float(), **tol)
    torch.testing.assert_close(a.grad.float(), b.grad.float(), **tol)


def _layer_norm_both_ways(dim, rows, grad_dtype):
    """(fused.layer_norm, torch's LayerNorm cast to bf16) under CPU bf16 autocast: outputs
    and the gradients of x, weight and bias for the same upstream gradient."""
    from eanet.models.fused import _native_norm_applies, layer_norm

    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(dim, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(rows, 3, dim) * 3 + 1  # a mean far from 0: no cancellation allowed
    g = torch.randn(rows, 3, dim).to(grad_dtype)
    results = []
    for fn in (layer_norm, lambda module, t: module(t).bfloat16()):
        a = x.clone().requires_grad_()
        norm.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert _native_norm_applies(norm, a)
            y = fn(norm, a)
        y.backward(g)
        results.append((y, a.grad, norm.weight.grad.clone(), norm.bias.grad.clone()))
    return results


@pytest.mark.parametrize(
    ("dim", "rows", "grad_dtype"),
    [(64, 700, torch.bfloat16), (48, 5, torch.bfloat16), (64, 9, torch.float32)],
)
def test_native_layer_norm_matches_torch(dim, rows, grad_dtype):
    """The LayerNorm kernel against torch's LayerNorm + cast: the result in bf16 (the same
    rounding of the same fp32 values, to a unit of bf16's last place), the gradients in fp32
    (the weight's summed over 3 x 700 rows: more than one block of the kernel)."""
    (y, gx, gw, gb), (y_ref, gx_ref, gw_ref, gb_ref) = _layer_norm_both_ways(dim, rows, grad_dtype)
    assert y.dtype == torch.bfloat16 and gx.dtype == torch.float32
    torch.testing.assert_close(y.float(), y_ref.float(), atol=1e-6, rtol=2**-7)
    torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gw, gw_ref, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(gb, gb_ref, atol=1e-3, rtol=1e-4)


def test_native_add_layer_norm_matches_torch():
    """The residual add fused into the norm: s = x + h (fp32 stream, bf16 branch) and
    LayerNorm(s) in bf16, against torch's add, LayerNorm and cast; gradients of x, h, the
    weights, with gradients arriving both through the norm and along the stream."""
    from eanet.models.fused import add_layer_norm

    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x, h = torch.randn(300, 64) * 2 + 1, torch.randn(300, 64).bfloat16()
    g_s, g_y = torch.randn(300, 64), torch.randn(300, 64).bfloat16()

    def run(fused):
        a, b = x.clone().requires_grad_(), h.clone().requires_grad_()
        norm.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if fused:
                s, y = add_layer_norm(norm, a, b)
            else:
                s = a + b
                y = norm(s).bfloat16()
        torch.autograd.backward([s, y], [g_s, g_y])
        return s, y, a.grad, b.grad, norm.weight.grad.clone(), norm.bias.grad.clone()

    (s, y, gx, gh, gw, gb), ref = run(True), run(False)
    assert torch.equal(s, ref[0]) and y.dtype == torch.bfloat16 and gh.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref[1].float(), atol=1e-6, rtol=2**-7)
    torch.testing.assert_close(gx, ref[2], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gh.float(), ref[3].float(), atol=1e-6, rtol=2**-7)
    torch.testing.assert_close(gw, ref[4], atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(gb, ref[5], atol=1e-3, rtol=1e-4)


def test_native_layer_norm_only_where_its_result_goes_to_bf16():
    """Outside bf16 autocast (fp32 training, the reference's numerics), for a bf16 input or
    a norm without affine weights, and with the reference's ops, torch's LayerNorm runs."""
    from torch.profiler import profile

    from eanet.models import use_reference_ops
    from eanet.models.fused import _native_norm_applies

    norm, x = torch.nn.LayerNorm(64), torch.randn(2, 64)
    assert not _native_norm_applies(norm, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _native_norm_applies(norm, x)
        assert not _native_norm_applies(norm, x.bfloat16())
        assert not _native_norm_applies(torch.nn.LayerNorm(64, elementwise_affine=False), x)
    model = create_model("eanet-cifar", depth=1).train()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)

    def ops(m):
        with profile() as prof, torch.autocast("cpu", dtype=torch.bfloat16):
            m(images).float().sum().backward()
        return {e.key for e in prof.key_averages()}

    fused = {"eanet::layer_norm_cpu", "eanet::add_layer_norm_cpu", "eanet::layer_norm_cpu_backward"}
    assert fused <= ops(model)
    assert not fused & ops(use_reference_ops(model))


def test_keep_mask_rate_and_reproducibility():
    from eanet.models.fused import keep_mask, masked

    like = torch.zeros(200, 1000)
    torch.manual_seed(1)
    m = keep_mask(like, 0.2)
    assert m.dtype == torch.float32 and set(m.unique().tolist()) == {0.0, 1.0}
    assert abs(m.mean().item() - 0.8) < 0.005  # 200k draws: std 0.0009
    torch.manual_seed(1)
    assert torch.equal(m, keep_mask(like, 0.2))
    assert keep_mask(like.bfloat16(), 0.2).dtype == torch.bfloat16
    x = torch.randn(10)
    assert masked(x, 0.0) is x


@pytest.mark.slow
def test_compiled_masks_are_independent_draws_with_the_right_gradient():
    """Under torch.compile every mask is its own draw (graphs merge calls with equal
    arguments: two masks of one shape once came out identical), and the backward
    multiplies by the very mask of the forward (not a fresh one)."""
    from eanet.models.fused import masked

    x = torch.randn(64, 512, requires_grad=True)
    y = torch.randn(64, 512, requires_grad=True)
    a, b = torch.compile(lambda x, y: (masked(x, 0.3), masked(y, 0.3)))(x, y)
    assert not torch.equal(a != 0, b != 0)
    assert abs((a != 0).float().mean().item() - 0.7) < 0.01
    (a.sum() + 2 * b.sum()).backward()
    assert torch.equal(x.grad, (a != 0).float()) and torch.equal(y.grad, 2 * (b != 0).float())


def test_dropout_is_active_in_training_and_scaled_right():
    """Train-mode outputs vary; averaged over many masks they match eval-mode outputs."""
    from eanet.models.layers import Mlp

    torch.manual_seed(0)
    mlp = Mlp(ModelConfig())
    x = torch.randn(1, 64)
    with torch.no_grad():
        fc1_out = mlp.act(mlp.fc1(x))
        mlp.train()
        outs = torch.stack([mlp(x) for _ in range(4000)])
        # E[drop2(fc2(drop1(h)))] = fc2(h): the folded rescales must keep the mean
        expected = mlp.fc2(fc1_out)
    assert outs.std(0).min() > 0
    torch.testing.assert_close(outs.mean(0), expected, atol=0.05, rtol=0.05)


def test_fast_self_attention_in_training_mode_equals_sdpa():
    import copy

    from eanet.models import use_reference_ops

    torch.manual_seed(0)
    fast = create_model("vit-cifar", depth=1, attn_drop=0.0, proj_drop=0.0, mlp_drop=0.0)
    ref = use_reference_ops(copy.deepcopy(fast))
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(fast.train()(x), ref.train()(x), atol=1e-5, rtol=1e-5)


def test_folded_memories_are_cached_for_inference_until_the_weights_change():
    """Without gradients the folded weights are reused; an optimizer step, an in-place
    change or load_state_dict makes them be folded afresh (outputs equal the uncached ones)."""
    model = create_model("eanet-cifar", depth=1).eval()
    attn, x = model.blocks[0].attn, torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        model(x)
        first = attn.folded_weights_cached()
        assert all(a is b for a, b in zip(first, attn.folded_weights_cached(), strict=True))
        attn.mk.weight.mul_(1.5)
        assert not torch.equal(first[0], attn.folded_weights_cached()[0])
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
    model = torch.compile(create_model("eanet-cifar", depth=2).eval(), backend=counter)
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(3):
            model(x)
    assert counter.frame_count == 1
