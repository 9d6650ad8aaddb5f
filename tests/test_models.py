"""The models reproduce the Keras example exactly: counts, layout, normalisation, init."""

import math

import pytest
import torch
import torch.nn.functional as F

from eanet.errors import ConfigError
from eanet.models.config import ModelConfig
from eanet.models.layers import ExternalAttention, SelfAttention, external_attention, patchify
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
    x = torch.randint(0, 256, (3, *model.input_shape), dtype=torch.uint8)
    logits = model(x)
    assert logits.shape == (3, model.config.num_classes)
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
    attn = external_attention(ModelConfig()).eval()
    a = attn.attention_map(torch.randn(2, 256, 64))
    assert a.shape == (2, 16, 256, 16)  # (B, heads, N, S)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 16, 256))  # rows over memory sum to 1
    assert not torch.allclose(a.sum(2), torch.ones(2, 16, 16))  # but not over tokens


def test_external_attention_equals_the_reference_formulation():
    """The module gives the Keras code's numbers, written out here in its (B, heads, N, d)
    layout."""
    torch.manual_seed(0)
    m = external_attention(ModelConfig()).eval()
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
