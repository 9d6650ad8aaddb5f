"""eanet.nn: external attention as a module, checked against its sources, and swap_attention.

The two reference forwards below are transcribed (not imported: neither is a package) from
- MenghaoGuo/EANet, model_torch.py, class `External_attention` (commit 3ae0778df95e), the
  paper's official code, with nn.BatchNorm2d for its SynchronizedBatchNorm2d;
- xmu-xiaoma666/External-Attention-pytorch, model/attention/ExternalAttention.py, class
  `ExternalAttention(d_model, S)` (commit d75848e40233).
Weights are copied across and outputs compared in float32.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import eanet
from eanet.data.digits import raw_digits
from eanet.errors import ConfigError
from eanet.models.config import ModelConfig
from eanet.models.layers import SelfAttention, external_attention
from eanet.models.registry import count_parameters, create_model
from eanet.nn import (
    ExternalAttention,
    ExternalAttention2d,
    MultiheadExternalAttention,
    swap_attention,
)

# --------------------------------------------------------------------------- the sources


class OfficialExternalAttention(nn.Module):
    """MenghaoGuo/EANet model_torch.py `External_attention(c)`: its modules and forward."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 1)
        self.k = 64
        self.linear_0 = nn.Conv1d(c, self.k, 1, bias=False)
        self.linear_1 = nn.Conv1d(self.k, c, 1, bias=False)
        self.conv2 = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        idn = x
        x = self.conv1(x)
        b, c, h, w = x.size()
        x = x.view(b, c, h * w)  # b * c * n
        attn = self.linear_0(x)  # b, k, n
        attn = F.softmax(attn, dim=-1)  # b, k, n
        attn = attn / (1e-9 + attn.sum(dim=1, keepdim=True))  # b, k, n
        x = self.linear_1(attn)  # b, c, n
        x = x.view(b, c, h, w)
        x = self.conv2(x)
        x = x + idn
        x = F.relu(x)
        return x


class PytorchExternalAttention(nn.Module):
    """External-Attention-pytorch `ExternalAttention(d_model, S)`: its modules and forward."""

    def __init__(self, d_model: int, S: int = 64) -> None:
        super().__init__()
        self.mk = nn.Linear(d_model, S, bias=False)
        self.mv = nn.Linear(S, d_model, bias=False)
        self.softmax = nn.Softmax(dim=1)

    def forward(self, queries):
        attn = self.mk(queries)  # bs,n,S
        attn = self.softmax(attn)  # bs,n,S
        attn = attn / torch.sum(attn, dim=2, keepdim=True)  # bs,n,S
        out = self.mv(attn)  # bs,n,d_model
        return out


def official_with_our_weights(ours: ExternalAttention2d) -> OfficialExternalAttention:
    ref = OfficialExternalAttention(ours.channels)
    ref.conv1.load_state_dict(ours.proj_in.state_dict())
    ref.linear_0.load_state_dict(ours.mk.state_dict())
    ref.linear_1.load_state_dict(ours.mv.state_dict())
    ref.conv2[0].load_state_dict(ours.proj.state_dict())
    ref.conv2[1].load_state_dict(ours.norm.state_dict())
    return ref


@pytest.mark.parametrize("train", [True, False])
def test_external_attention_2d_is_the_official_block(train):
    torch.manual_seed(0)
    ours = ExternalAttention2d(32)  # the official memory: S = 64
    with torch.no_grad():  # running statistics of their own, so eval mode means something
        ours.norm.running_mean.uniform_(-0.5, 0.5)
        ours.norm.running_var.uniform_(0.5, 2.0)
        ours.norm.weight.uniform_(0.5, 1.5)
        ours.norm.bias.uniform_(-0.5, 0.5)
    ref = official_with_our_weights(ours)
    ours.train(train), ref.train(train)
    x = torch.randn(3, 32, 7, 9)  # H != W: the pixel order must agree too
    out, expected = ours(x), ref(x)
    assert out.shape == x.shape
    assert (out - expected).abs().max() <= 1e-6
    torch.testing.assert_close(ours.norm.running_mean, ref.conv2[1].running_mean)


def test_external_attention_2d_starts_as_the_official_code():
    torch.manual_seed(0)
    m = ExternalAttention2d(256, memory=64)
    assert torch.equal(m.mk.weight, m.mv.weight.permute(1, 0, 2))  # M_k = M_v^T
    assert m.mk.weight.data_ptr() != m.mv.weight.data_ptr()  # but two memories
    for weight in (m.mv.weight, m.proj_in.weight, m.proj.weight):
        assert abs(weight.std().item() / (2 / 256) ** 0.5 - 1) < 0.03
    assert m.mk.bias is None and m.mv.bias is None and m.proj.bias is None


def test_its_attention_map_is_softmax_over_pixels_then_l1_over_memory():
    m = ExternalAttention2d(8, memory=5).eval()
    a = m.attention_map(torch.randn(2, 8, 4, 6))
    assert a.shape == (2, 5, 4, 6)  # (B, S, H, W)
    torch.testing.assert_close(a.sum(1), torch.ones(2, 4, 6))  # each pixel's units sum to 1


def test_external_attention_with_one_head_and_no_projection_is_external_attention_pytorch():
    torch.manual_seed(0)
    d, S = 48, 8
    ref = PytorchExternalAttention(d, S)
    ours = ExternalAttention(d, heads=1, coefficient=1, memory=S, bias=False).eval()
    with torch.no_grad():
        for proj in (ours.proj_in, ours.proj):  # theirs has no projections: identities
            proj.weight.copy_(torch.eye(d))
            proj.bias.zero_()
    ours.mk.load_state_dict(ref.mk.state_dict())
    ours.mv.load_state_dict(ref.mv.state_dict())
    x = torch.randn(5, 49, d)  # their example's 49 tokens
    assert (ours(x) - ref(x)).abs().max() <= 1e-6


def test_the_defaults_build_the_keras_example_layer():
    ours = ExternalAttention(64)
    theirs = external_attention(ModelConfig())  # what EANet's blocks are built of
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes == {k: v.shape for k, v in theirs.state_dict().items()}
    assert (ours.heads, ours.head_dim, ours.memory, ours.inner) == (16, 16, 16, 256)
    assert (ours.attn_drop.p, ours.proj_drop.p) == (0.2, 0.2)
    assert sum(p.numel() for p in ours.parameters()) == 33_632
    model = create_model("eanet-cifar")
    assert all(type(b.attn) is ExternalAttention for b in model.blocks)
    assert count_parameters(model) == 361_380


@pytest.mark.parametrize(
    "module, x",
    [
        (
            ExternalAttention(6, heads=2, coefficient=2, memory=3, attn_drop=0, proj_drop=0),
            (2, 5, 6),
        ),
        (ExternalAttention(4, heads=1, coefficient=1, memory=3, bias=False), (1, 3, 4)),
        (ExternalAttention2d(4, memory=3), (2, 4, 2, 3)),
    ],
    ids=["tokens", "tokens-one-head", "maps"],
)
def test_gradients_by_gradcheck_in_float64(module, x):
    torch.manual_seed(0)
    module = module.double().eval()  # eval: dropout off, BatchNorm's running statistics
    x = torch.randn(*x, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(module, (x,))
    names, params = zip(*module.named_parameters(), strict=True)

    def of_parameters(*values):
        return torch.func.functional_call(module, dict(zip(names, values, strict=True)), (x,))

    assert torch.autograd.gradcheck(of_parameters, params)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: ExternalAttention(64, heads=7), "heads=7 does not divide dim.coefficient=256"),
        (lambda: ExternalAttention(2, coefficient=4), "memory=0 must be a positive integer"),
        (lambda: ExternalAttention(0), "dim=0 must be a positive integer"),
        (lambda: ExternalAttention2d(16, memory=0), "memory=0 must be a positive integer"),
    ],
)
def test_impossible_sizes_are_one_line_errors(build, match):
    with pytest.raises(ConfigError, match=match) as err:
        build()
    assert "\n" not in str(err.value)


def test_feature_maps_of_the_wrong_width_are_a_one_line_error():
    with pytest.raises(ValueError, match=r"channels=8\) takes feature maps \(B, 8, H, W\)"):
        ExternalAttention2d(8)(torch.zeros(1, 3, 4, 4))


# --------------------------------------------------------------------------- swap_attention


class DigitRows(nn.Module):
    """A small transformer over the 8 rows of an 8x8 digit: 8 tokens of 8 pixels each."""

    def __init__(self, batch_first: bool, dim: int = 32) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(8, dim)
        self.pos = nn.Parameter(torch.randn(8, 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, 4, 64, dropout=0.1, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=batch_first)
        self.head = nn.Linear(dim, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(images / 16).transpose(0, 1) + self.pos  # (N rows, B, dim)
        if self.batch_first:
            return self.head(self.encoder(x.transpose(0, 1)).mean(1))
        return self.head(self.encoder(x).mean(0))


def train_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> list[float]:
    """AdamW on batches of 64 in turn; the loss of each step."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for step in range(steps):
        i = torch.arange(step * 64, step * 64 + 64) % len(y)
        loss = F.cross_entropy(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("batch_first", [True, False])
def test_swap_attention_in_a_torch_transformer_then_train(batch_first):
    torch.manual_seed(0)
    images, labels = raw_digits()
    model = DigitRows(batch_first)
    kept = {n: p for n, p in model.named_parameters() if "self_attn" not in n}
    report = swap_attention(model)
    assert report.paths == ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn"]
    assert {(r.before, r.after) for r in report.replaced} == {
        ("MultiheadAttention", "MultiheadExternalAttention")
    }
    # MHA 32 wide: 4*32*32 + 4*32 = 4,224; external: 32 -> 128 (4,224), 16 heads of 8 and
    # S = 8 (M_k, M_v 72 each), 128 -> 32 (4,128)
    assert [(r.params_before, r.params_after) for r in report.replaced] == [(4224, 8496)] * 2
    assert report.params_after - report.params_before == 2 * (8496 - 4224)
    assert report.params_after == sum(p.numel() for p in model.parameters())
    assert all(p is dict(model.named_parameters())[n] for n, p in kept.items())
    layer = model.encoder.layers[0]
    assert layer.self_attn.batch_first is batch_first and layer.self_attn.memory == 8
    losses = train_steps(model, images[:1500], labels[:1500], 80)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses
    model.eval()  # torch's fused inference path must leave the swapped layers alone
    with torch.no_grad():
        accuracy = (model(images[1500:]).argmax(1) == labels[1500:]).float().mean()
    assert accuracy > 0.45  # 297 held-out digits, chance 10% (measured: 57%)


def test_batch_first_or_not_the_swapped_layers_compute_the_same():
    images = raw_digits()[0][:4]
    outputs = []
    for batch_first in (True, False):
        torch.manual_seed(0)
        model = DigitRows(batch_first).eval()
        swap_attention(model)
        with torch.no_grad():
            outputs.append(model(images))
    torch.testing.assert_close(outputs[0], outputs[1])


@pytest.mark.slow
def test_swap_attention_turns_the_vit_baseline_into_eanet_then_trains():
    assert count_parameters(create_model("vit-cifar")) == 623_268
    vit = create_model("vit-cifar")
    report = swap_attention(vit, proj_drop=0.2)
    assert report.params_before == 623_268 and report.params_after == 361_380  # EANet's
    assert report.paths == [f"blocks.{i}.attn" for i in range(8)]
    assert type(vit.blocks[0].attn) is ExternalAttention
    eanet_model = create_model("eanet-cifar")
    shapes = {k: v.shape for k, v in vit.state_dict().items()}
    assert shapes == {k: v.shape for k, v in eanet_model.state_dict().items()}

    torch.manual_seed(0)
    small = create_model("vit-cifar", depth=2, patch_size=4, num_classes=10, dim=32, mlp_dim=32)
    swap_attention(small)
    images, labels = raw_digits()
    x = F.interpolate(images[:, None] * (255 / 16), size=32, mode="bilinear").repeat(1, 3, 1, 1)
    losses = train_steps(small, x, labels, 40)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses
    assert all(p.grad is not None for p in small.parameters())


def test_a_swapped_model_is_accelerated_like_the_registered_eanet():
    from eanet import accel

    torch.manual_seed(0)
    vit = create_model("vit-cifar", depth=2).eval()
    swap_attention(vit)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        plain = vit(x)
        report = accel.apply(vit, "cpu")
        assert report.modules.get("FoldedExternalAttention") == 2
        torch.testing.assert_close(vit(x), plain, atol=1e-5, rtol=1e-5)


def test_the_replacements_take_options_and_follow_the_replaced_module():
    mha = nn.MultiheadAttention(64, 8, dropout=0.3, batch_first=True).double()
    model = nn.Sequential(mha)
    swap_attention(model, coefficient=2, memory=32, bias=False)
    new = model[0]
    assert isinstance(new, MultiheadExternalAttention)
    assert (new.heads, new.inner, new.memory, new.mk.bias) == (16, 128, 32, None)
    assert new.attn_drop.p == 0.3 and new.proj_drop.p == 0.0
    assert new.proj.weight.dtype == torch.float64
    out, weights = new(torch.zeros(2, 5, 64, dtype=torch.float64), need_weights=True)
    assert out.shape == (2, 5, 64) and weights is None
    assert new(torch.zeros(5, 64, dtype=torch.float64))[0].shape == (5, 64)  # unbatched
    sa = nn.Sequential(SelfAttention(ModelConfig(attention="self", attn_drop=0.1)).eval())
    swap_attention(sa, heads=8)
    assert (sa[0].heads, sa[0].attn_drop.p, sa[0].training) == (8, 0.1, False)
    assert eanet.swap_attention is swap_attention


def _decoder() -> nn.Module:
    return nn.TransformerDecoderLayer(16, 2, 32)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: nn.Sequential(nn.Linear(4, 4)), "Sequential has no self-attention module"),
        (lambda: nn.MultiheadAttention(16, 2), "cannot replace the model itself"),
        (_decoder, "cannot replace multihead_attn: it is a decoder's cross-attention"),
        (
            lambda: nn.Sequential(nn.MultiheadAttention(16, 2, kdim=8, vdim=8)),
            r"cannot replace 0: its keys and values have other widths \(kdim=8, vdim=8\)",
        ),
        (
            lambda: nn.Sequential(nn.MultiheadAttention(16, 2, add_bias_kv=True)),
            "cannot replace 0: add_bias_kv",
        ),
        (
            lambda: nn.Sequential(nn.MultiheadAttention(16, 2)),
            r"cannot replace 0 \(width 16\): ExternalAttention heads=3",
        ),
    ],
)
def test_what_cannot_be_replaced_is_refused_in_one_line_and_nothing_changes(build, match):
    model = build()
    before = [type(m) for m in model.modules()]
    heads = 3 if "heads=3" in match else None
    with pytest.raises(ConfigError, match=match) as err:
        swap_attention(model, heads=heads)
    assert "\n" not in str(err.value)
    assert [type(m) for m in model.modules()] == before


def test_masks_and_cross_attention_are_refused_at_the_call():
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 1)
    swap_attention(model)
    x = torch.zeros(2, 5, 16)
    assert model(x).shape == (2, 5, 16)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    with pytest.raises(ConfigError, match="takes no attention or padding mask"):
        model(x, mask=causal)
    with pytest.raises(ConfigError, match="takes no attention or padding mask"):
        model.eval()(x, src_key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ConfigError, match="self-attention only"):
        model.layers[0].self_attn(x, torch.ones(2, 5, 16), torch.ones(2, 5, 16))


# --------------------------------------------------------------------------- the docs' examples


@pytest.mark.slow  # trains 8 epochs on the digits (about 7 s on one thread)
def test_docs_cnn_example_learns_the_digits(capsys):
    """The example runs on one thread (repeatable); the page's figure is within 2 points."""
    from docs_helpers import DOCS, python_block

    heading = "## A small CNN with ExternalAttention2d"
    example = python_block("external-attention.md", heading)
    threads = torch.get_num_threads()
    try:
        exec(compile(example, "docs/external-attention.md", "exec"), {})
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    accuracy = float(out.split("held-out top-1 ")[1].split("%")[0])
    page = (DOCS / "external-attention.md").read_text(encoding="utf-8").split(heading)[1]
    shown = float(page.split("It prints `held-out top-1 ")[1].split("%")[0])
    assert abs(accuracy - shown) <= 2.0, (out, shown)  # chance is 10%


@pytest.mark.slow  # trains 10 epochs on the digits (about 5 s on one thread)
def test_docs_swap_example_prints_what_the_page_shows(capsys):
    from docs_helpers import DOCS, python_block

    heading = "## swap_attention on an existing model"
    example = python_block("external-attention.md", heading)
    exec(compile(example, "docs/external-attention.md", "exec"), {})
    out = capsys.readouterr().out
    page = (DOCS / "external-attention.md").read_text(encoding="utf-8").split(heading)[1]
    shown = page.split("```text\n", 1)[1].split("```", 1)[0]
    assert out.splitlines()[:3] == shown.splitlines()[:3]  # the report, to the parameter
    accuracy = float(out.split("held-out top-1 ")[1].split("%")[0])
    assert accuracy > 75, out  # the page says 87.9%; chance is 10%


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_external_attention_2d_can_be_scripted():
    """torch.jit.script compiles it; the scripted module computes the same, in training
    (batch statistics) and in eval mode, and refuses maps of the wrong width in one line."""
    torch.manual_seed(0)
    m = ExternalAttention2d(8, memory=5)
    scripted = torch.jit.script(m)
    x = torch.randn(2, 8, 3, 5)
    for train in (True, False):
        m.train(train), scripted.train(train)
        torch.testing.assert_close(scripted(x), m(x), rtol=0, atol=0)
    torch.testing.assert_close(scripted.attention_map(x), m.attention_map(x), rtol=0, atol=0)
    with pytest.raises(Exception, match=r"takes feature maps \(B, 8, H, W\), got shape \(1, 3"):
        scripted(torch.zeros(1, 3, 4, 4))


def test_a_module_shared_under_two_paths_is_replaced_at_both():
    """One SelfAttention object at two paths (tied layers): both paths get one new module,
    still shared, and the report names both paths."""
    shared = SelfAttention(ModelConfig(attention="self"))
    model = nn.ModuleDict({"a": nn.Sequential(shared), "b": nn.Sequential(nn.Identity(), shared)})
    mha = nn.MultiheadAttention(16, 2, batch_first=True)
    model["c"], model["d"] = mha, mha
    report = swap_attention(model)
    assert report.paths == ["a.0", "b.1", "c", "d"]
    assert isinstance(model["a"][0], ExternalAttention) and model["a"][0] is model["b"][1]
    assert isinstance(model["c"], MultiheadExternalAttention) and model["c"] is model["d"]
    assert not any(isinstance(m, SelfAttention | nn.MultiheadAttention) for m in model.modules())
    assert report.params_after == sum(p.numel() for p in model.parameters())


def test_a_shared_module_refused_at_one_path_changes_nothing():
    decoder = nn.TransformerDecoderLayer(16, 2, 32)
    model = nn.ModuleDict({"tied": nn.Sequential(decoder.multihead_attn), "dec": decoder})
    with pytest.raises(ConfigError, match="cannot replace dec.multihead_attn: it is a decoder"):
        swap_attention(model)
    assert model["tied"][0] is decoder.multihead_attn
    assert isinstance(decoder.self_attn, nn.MultiheadAttention)
