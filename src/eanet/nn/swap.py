"""`swap_attention`: external attention in place of the self-attention of an existing model.

Self-attention compares every token with every other, (N x N) weights per head; external
attention compares every token with S learned memory units, (N x S). Both map (B, N, dim)
to (B, N, dim), so one can stand in for the other in a block that keeps everything else
(norms, residuals, MLP). Replaced: torch's `nn.MultiheadAttention` used as self-attention
(batch_first or not; by `MultiheadExternalAttention`, which takes its call) and eanet's own
`SelfAttention` (by a plain `ExternalAttention`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from eanet.errors import ConfigError
from eanet.models.layers import ExternalAttention, SelfAttention

ATTENTION_TYPES = (nn.MultiheadAttention, SelfAttention)


class MultiheadExternalAttention(ExternalAttention):
    """ExternalAttention behind `nn.MultiheadAttention`'s call, to stand in for it.

    `forward(query, key, value, ...)` -> (output, None), as torch's TransformerEncoderLayer
    calls its `self_attn`. Self-attention only: `key` and `value` must be `query` itself
    (or None). Masks are refused: external attention has no query-key pairs to mask, and its
    softmax over all N tokens would see the future under a causal mask. The weights are
    None (there is no (N x N) matrix); `attention_map(x)` gives the (B, heads, N, S) one.
    """

    def __init__(self, dim: int, *, batch_first: bool = False, **options) -> None:
        super().__init__(dim, **options)
        self.batch_first = batch_first  # (B, N, dim) if True, else (N, B, dim)
        # torch's TransformerEncoderLayer reads this before its fused kernel: None keeps
        # the layer on its Python path, which calls this module.
        self.in_proj_bias = None

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, None]:
        """(query, key, value, ...) as `nn.MultiheadAttention` -> (output, None)."""
        _check_call(query, key, value, key_padding_mask, attn_mask, is_causal)
        if query.dim() == 2:  # unbatched (N, dim)
            return super().forward(query[None])[0], None
        if self.batch_first:
            return super().forward(query), None
        return super().forward(query.transpose(0, 1)).transpose(0, 1), None


def _check_call(query, key, value, key_padding_mask, attn_mask, is_causal) -> None:
    """Raise ConfigError for a call external attention cannot answer."""
    if (key is not None and key is not query) or (value is not None and value is not query):
        raise ConfigError(
            "MultiheadExternalAttention answers self-attention only (key and value the query "
            "itself); keep nn.MultiheadAttention for cross-attention"
        )
    if key_padding_mask is not None or attn_mask is not None or is_causal:
        raise ConfigError(
            "MultiheadExternalAttention takes no attention or padding mask (external attention "
            "has no query-key pairs, and sees every token); call it without masks, or keep "
            "self-attention for masked or causal sequences"
        )
    if query.dim() not in (2, 3):
        raise ConfigError(
            f"MultiheadExternalAttention takes (B, N, dim), (N, B, dim) or (N, dim) tokens, "
            f"got shape {tuple(query.shape)}"
        )


@dataclass(frozen=True)
class Replaced:
    """One replaced module: where, what it was and became, and their parameter counts."""

    path: str
    before: str
    after: str
    params_before: int
    params_after: int


@dataclass(frozen=True)
class SwapReport:
    """What `swap_attention` replaced, and the model's parameter count before and after."""

    replaced: list[Replaced] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0

    @property
    def paths(self) -> list[str]:
        return [r.path for r in self.replaced]

    def summary(self) -> str:
        """One line: how many modules of which kinds, and the parameter counts."""
        kinds = sorted({f"{r.before} -> {r.after}" for r in self.replaced})
        return (
            f"replaced {len(self.replaced)} attention module(s) ({', '.join(kinds)}); "
            f"parameters {self.params_before:,} -> {self.params_after:,}"
        )


def swap_attention(
    model: nn.Module,
    *,
    heads: int | None = None,
    coefficient: int = 4,
    memory: int | None = None,
    bias: bool = True,
    attn_drop: float | None = None,
    proj_drop: float = 0.0,
) -> SwapReport:
    """Replace, in place, every self-attention module of `model` with external attention of
    the same width; return what was replaced.

    Replaced: `nn.MultiheadAttention` (by `MultiheadExternalAttention`, batch_first kept)
    and eanet's `SelfAttention` (by `ExternalAttention`); everything else stays. The options
    are ExternalAttention's; `heads` defaults to the replaced module's heads * coefficient
    (the Keras example's rule), `attn_drop` to its attention dropout. The new modules are
    freshly initialised, on the replaced one's device and dtype. Nothing is changed when
    one module cannot be replaced (ConfigError naming it). A module shared under several
    paths (one object, as in weight-tied layers) becomes one new module, shared the same
    way, at every path, each path in the report. torch's TransformerEncoder is set not to
    convert inputs to nested tensors (its fused path runs torch's own attention).
    """
    options = dict(coefficient=coefficient, memory=memory, bias=bias, proj_drop=proj_drop)
    # every path, a shared module's too (named_modules lists a module at its first only)
    modules = list(model.named_modules(remove_duplicate=False))
    found = [(p, m) for p, m in modules if isinstance(m, ATTENTION_TYPES)]
    if not found:
        raise ConfigError(
            f"{type(model).__name__} has no self-attention module to replace; swap_attention "
            "replaces nn.MultiheadAttention and eanet's SelfAttention"
        )
    parents = dict(modules)
    # every replacement is built (or refused, at every path) before the model is touched
    built: dict[int, ExternalAttention] = {}  # id(replaced module) -> its one replacement
    plan = []
    for path, old in found:
        new = _replacement(path, old, parents, heads, attn_drop, options, built.get(id(old)))
        plan.append((path, old, built.setdefault(id(old), new)))
    before = _count(model)
    replaced = []
    for path, old, new in plan:
        parent, _, name = path.rpartition(".")
        setattr(parents[parent], name, new)
        replaced.append(
            Replaced(path, type(old).__name__, type(new).__name__, _count(old), _count(new))
        )
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False
    return SwapReport(replaced, before, _count(model))


def _replacement(
    path: str,
    old: nn.Module,
    parents: dict[str, nn.Module],
    heads: int | None,
    attn_drop: float | None,
    options: dict,
    built: ExternalAttention | None = None,
) -> ExternalAttention:
    """The external attention that replaces `old` at `path` (`built`, where `old` was met at
    another path already); ConfigError if there is none."""
    refusal = _refusal(path, old, parents)
    if refusal:
        raise ConfigError(f"cannot replace {path or 'the model itself'}: {refusal}")
    if built is not None:
        return built
    if isinstance(old, nn.MultiheadAttention):
        cls, dim, n, p = MultiheadExternalAttention, old.embed_dim, old.num_heads, old.dropout
        extra = {"batch_first": old.batch_first}
    else:
        cls, dim, n, p = ExternalAttention, old.q.in_features, old.heads, old.attn_drop.p
        extra = {}
    heads = n * options["coefficient"] if heads is None else heads
    p = p if attn_drop is None else attn_drop
    try:
        new = cls(dim, heads=heads, attn_drop=p, **extra, **options)
    except ConfigError as exc:
        raise ConfigError(f"cannot replace {path} (width {dim}): {exc}") from exc
    first = next(old.parameters(), None)
    if first is not None:
        new.to(device=first.device, dtype=first.dtype)
    return new.train(old.training)


def _refusal(path: str, old: nn.Module, parents: dict[str, nn.Module]) -> str | None:
    """Why `old` cannot become external attention, or None."""
    if not path:
        return "it is the model; build ExternalAttention directly"
    if not isinstance(old, nn.MultiheadAttention):
        return None
    parent, _, name = path.rpartition(".")
    if isinstance(parents[parent], nn.TransformerDecoderLayer) and name == "multihead_attn":
        return "it is a decoder's cross-attention (queries from one sequence, keys from another)"
    if old.kdim != old.embed_dim or old.vdim != old.embed_dim:
        return (
            f"its keys and values have other widths (kdim={old.kdim}, vdim={old.vdim}): "
            "cross-attention, which external attention does not replace"
        )
    if old.bias_k is not None or old.add_zero_attn:
        return "add_bias_kv / add_zero_attn add keys, and external attention has none"
    return None


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
