"""The package reads as its layers: lower layers never import higher ones, and no cycles.

The imports of every module are read from its source (AST), including the imports inside
functions (lazy imports count: they run too). A module may import its own layer or lower.
Also: inference (`eanet.load(ckpt).predict`, the server's app) stays lean, and no function
is longer than 100 lines.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "eanet"

# Along the data flow, lowest first; the first dotted part below `eanet` names the layer.
LAYERS: list[set[str]] = [
    {"choices", "compat", "errors", "fileio", "locks", "options", "runtime"},  # foundations
    {"models", "data"},  # the model; archives/folders -> uint8 tensors -> augmentation
    {"nn"},  # external attention for the user's own models; swap_attention
    {"accel"},  # the model's speed: faster layers swapped in, native kernels
    {"metrics", "checkpoint", "inference", "plots"},  # loss/metrics, the one file format
    {"train"},  # config, loop, run directory, guard, distributed
    {"evaluate", "predict", "info", "bench", "demo", "api", "compare", "serve", "interop"}
    | {"attention_maps", "attention_plots"},  # what each block attends to, and its figure
    {"cli"},  # the command line, last
]
TOP = {"__init__", "__main__"}  # the package's lazy front door and `python -m eanet`


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(("eanet", *parts))


def imports_of(path: Path) -> set[str]:
    """Every `eanet...` module that `path` imports, anywhere in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "eanet"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != "eanet":
                continue
            found.add(node.module)
            for a in node.names:  # `from eanet.train import guard` imports a module
                if (PACKAGE.joinpath(*node.module.split(".")[1:], a.name)).exists() or (
                    PACKAGE.joinpath(*node.module.split(".")[1:], f"{a.name}.py")
                ).exists():
                    found.add(f"{node.module}.{a.name}")
    return found


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) == 1:
        return None  # `eanet` itself: __version__ only
    for i, layer in enumerate(LAYERS):
        if parts[1] in layer:
            return i
    return None


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def test_every_module_belongs_to_a_layer():
    unplaced = sorted(m for m in graph() if layer_of(m) is None and m.split(".")[-1] not in TOP)
    assert unplaced == [], f"modules outside every layer: {unplaced}; add them to LAYERS"


def test_no_module_imports_a_higher_layer():
    upward = []
    for module, deps in graph().items():
        own = layer_of(module)
        if own is None:
            continue
        for dep in deps:
            target = layer_of(dep)
            if target is not None and target > own:
                upward.append(f"{module} -> {dep}")
    assert upward == [], "upward imports:\n" + "\n".join(sorted(upward))


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(edges.get(node, ())):
            if dep == node or dep not in edges:
                continue
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle():
    edges = graph()
    # A package's __init__ and the modules inside it are separate nodes; `eanet` itself
    # (its lazy __getattr__) is left out: it imports nothing at import time.
    edges.pop("eanet", None)
    cycle = _cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


BANNED_FOR_INFERENCE = ("matplotlib", "eanet.data.cifar", "eanet.train", "eanet.plots")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A real checkpoint of a 1-block EANet with 3 classes, written by eanet.checkpoint.save."""
    import torch

    from eanet import checkpoint
    from eanet.models.registry import create_model

    torch.manual_seed(0)
    model = create_model("eanet-cifar", depth=1, dim=32, mlp_dim=32, num_classes=3)
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    checkpoint.save(path, model, {"class_names": ["apple", "bicycle", "cloud"], "epoch": 1})
    return path


def _modules_imported_by(code: str, banned: tuple[str, ...]) -> list[str]:
    """Run `code` in a fresh interpreter; the banned modules it ended up importing."""
    check = f"{code}\nimport sys; print(sorted(m for m in sys.modules if m.startswith({banned!r})))"
    run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip().splitlines()


def test_load_and_predict_imports_no_plotting_and_no_archive_code(tiny_checkpoint):
    code = (
        "import numpy as np, eanet\n"
        f"c = eanet.load({str(tiny_checkpoint)!r}, device='cpu')\n"
        "p = c.predict(np.zeros((32, 32, 3), np.uint8), top_k=2)\n"
        "assert p.label in ('apple', 'bicycle', 'cloud'), p\n"
        "print('predicted', p.label)"
    )
    out = _modules_imported_by(code, BANNED_FOR_INFERENCE)
    assert out[0].startswith("predicted ") and out[-1] == "[]", f"imported: {out}"


@pytest.mark.parametrize(
    "code, banned",
    [
        (
            "import torch, eanet; m = eanet.create_model('eanet-cifar', depth=1);import eanet.api",
            BANNED_FOR_INFERENCE,
        ),
        ("import eanet.serve.app", ("matplotlib", "eanet.data.cifar", "eanet.train")),
    ],
)
def test_the_inference_path_imports_no_plotting_and_no_archive_code(code, banned):
    assert _modules_imported_by(code, banned) == ["[]"]


def test_no_function_is_longer_than_100_lines():
    """Every def in the package reads at once: none over 100 lines (aim for under ~60)."""
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > 100:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({n})")
    assert long == [], "functions over 100 lines:\n" + "\n".join(long)
