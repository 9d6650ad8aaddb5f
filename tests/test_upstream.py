"""Private upstream names live in two files: `accel/upstream.py` and `compat.py`.

The package's source is read (AST) for names of torch's that start with an underscore
(`torch._foreach_norm`, `F._x`, `from torch._dynamo import ...`), under any alias; only
those two files may use them. `compat`'s functions also run their public fallbacks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from eanet import compat

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "eanet"
ALLOWED = {PACKAGE / "accel" / "upstream.py", PACKAGE / "compat.py"}


def _private(dotted: str) -> bool:
    """Whether a dotted torch name has a private part (`_x`; dunders such as `__version__`
    are public)."""
    return any(p.startswith("_") and not p.endswith("__") for p in dotted.split("."))


def _torch_aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> the torch name it stands for (`F` -> torch.nn.functional)."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "torch":
                    aliases[a.asname or "torch"] = a.name if a.asname else "torch"
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch":
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    return aliases


def private_torch_names(source: str) -> set[str]:
    """The private torch names `source` imports or reads, as dotted torch names."""
    tree = ast.parse(source)
    aliases = _torch_aliases(tree)
    found = {name for name in aliases.values() if _private(name)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {
                a.name for a in node.names if a.name.startswith("torch.") and _private(a.name)
            }
        if not isinstance(node, ast.Attribute):
            continue
        parts, inner = [node.attr], node.value
        while isinstance(inner, ast.Attribute):
            parts.append(inner.attr)
            inner = inner.value
        if isinstance(inner, ast.Name) and inner.id in aliases:
            dotted = ".".join([aliases[inner.id], *reversed(parts)])
            if _private(dotted):
                found.add(dotted)
    return found


def test_the_scan_finds_private_names_under_any_alias():
    source = (
        "import torch\nimport torch.nn.functional as F\nimport torch._inductor\n"
        "from torch import _foreach_norm as fn\nfrom torch._dynamo import reset\n"
        "def f(t):\n    return torch._standard_gamma(t), F._x(t), torch.__version__, t._version\n"
    )
    assert private_torch_names(source) == {
        "torch._inductor",
        "torch._foreach_norm",
        "torch._dynamo.reset",
        "torch._standard_gamma",
        "torch.nn.functional._x",
    }


def test_private_torch_names_only_in_upstream_and_compat():
    """Every private torch name is behind a function with its reason (accel/upstream.py for
    the speed layer, compat.py for the rest), so an upstream change is mended in one place."""
    found = {
        str(path.relative_to(PACKAGE)): names
        for path in sorted(PACKAGE.rglob("*.py"))
        if path not in ALLOWED and (names := private_torch_names(path.read_text(encoding="utf-8")))
    }
    assert found == {}, f"private torch names outside upstream.py and compat.py: {found}"


@pytest.fixture(params=["private", "public fallback"])
def route(request, monkeypatch):
    """Each compat function both ways: torch's private name, and the fallback used where a
    torch no longer has it."""
    if request.param == "public fallback":
        monkeypatch.setattr(compat, "_private", lambda name: None)
    return request.param


def test_max_abs_each_finds_nan_and_inf(route):
    tensors = [
        torch.tensor([1.0, -3.0]),
        torch.tensor([[0.5, float("nan")]]),
        torch.tensor([float("-inf")], dtype=torch.bfloat16),
        torch.zeros(2, 2, dtype=torch.float64),
    ]
    norms = compat.max_abs_each(tensors)
    assert [n.dim() for n in norms] == [0, 0, 0, 0]
    assert norms[0].item() == 3.0 and norms[1].isnan() and norms[2].isinf()
    assert norms[3].item() == 0.0


def test_the_guard_sees_non_finite_gradients_either_way(route):
    from eanet.train.guard import _all_finite

    assert _all_finite([torch.ones(3), torch.zeros(0)]).item()
    assert not _all_finite([torch.ones(3), torch.tensor([float("nan")])]).item()


def test_standard_gamma_draws_the_same_numbers_either_way(route):
    """The fallback (torch.distributions.Gamma without its checks) draws what torch's
    private sampler draws from the same seed; mixup's Beta(a, a) factor is in (0, 1)."""
    from eanet.data.mixing import _beta

    a = torch.tensor([0.4, 0.4, 2.0])
    torch.manual_seed(3)
    drawn = compat.standard_gamma(a)
    torch.manual_seed(3)
    assert torch.equal(drawn, torch._standard_gamma(a))
    assert 0.0 < _beta(0.4, torch.device("cpu")).item() < 1.0
