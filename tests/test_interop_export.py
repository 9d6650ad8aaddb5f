"""Export: ONNX and TorchScript files of tiny models reproduce PyTorch, with dynamic batch,
raw-pixel input, class names in the metadata, and no file when parity fails."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from eanet import checkpoint, cli
from eanet.interop import export as X
from eanet.models.registry import create_model

MODELS = ["eanet-cifar", "vit-cifar"]
NAMES = [f"class {i}" for i in range(10)]


def tiny_checkpoint(path: Path, name: str) -> Path:
    """A depth-1 model with real-looking normalization and non-zero biases, saved."""
    torch.manual_seed(0)
    model = create_model(name, depth=1, num_classes=len(NAMES))
    model.normalize.set_stats(
        torch.tensor([129.3, 124.1, 112.4]), torch.tensor([4500.0, 4100.0, 4800.0]), 1024
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
        model.head.weight.mul_(4)  # outputs away from uniform
    ckpt = path / f"{name}.safetensors"
    checkpoint.save(ckpt, model, {"class_names": NAMES})
    return ckpt


def reference_probs(ckpt: Path, x: torch.Tensor) -> np.ndarray:
    model, _ = checkpoint.load_model(ckpt)
    with torch.no_grad():
        return model(x).softmax(dim=-1).numpy()


def pixels(batch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(batch)
    return torch.randint(0, 256, (batch, 3, 32, 32), generator=gen).float()


@pytest.mark.parametrize("name", MODELS)
def test_onnx_export(name, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    ckpt, out = tiny_checkpoint(tmp_path, name), tmp_path / "model.onnx"
    assert cli.main(["export", str(ckpt), "--format", "onnx", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "parity onnx vs PyTorch: max |diff| of probabilities" in printed
    assert "(batch sizes 2, 5)" in printed and ": ok" in printed
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type, outp.name) == ("pixels", "tensor(float)", "probabilities")
    assert inp.shape[1:] == [3, 32, 32] and not isinstance(inp.shape[0], int)
    x = pixels(3)  # a batch size the parity check did not use
    got = session.run(None, {"pixels": x.numpy()})[0]
    assert got.shape == (3, len(NAMES))
    assert np.abs(got - reference_probs(ckpt, x)).max() <= 1e-4
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props["class_names"]) == NAMES
    assert json.loads(props["model_config"])["depth"] == 1


@pytest.mark.parametrize("name", MODELS)
def test_torchscript_export(name, tmp_path, capsys):
    ckpt, out = tiny_checkpoint(tmp_path, name), tmp_path / "model.pt"
    assert cli.main(["export", str(ckpt), "--format", "torchscript", "--out", str(out)]) == 0
    assert "parity torchscript vs PyTorch" in capsys.readouterr().out
    extra = {"class_names.json": ""}
    with X._quiet():
        loaded = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra["class_names.json"]) == NAMES
    for batch in (1, 3):
        x = pixels(batch)
        with torch.no_grad(), X._quiet():
            got = loaded(x).numpy()
        assert got.shape == (batch, len(NAMES))
        assert np.abs(got - reference_probs(ckpt, x)).max() <= 1e-4


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_failed_parity_exits_non_zero_and_leaves_no_file(fmt, tmp_path, capsys, monkeypatch):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    ckpt, out = tiny_checkpoint(tmp_path, "eanet-cifar"), tmp_path / "out" / "model.bin"
    real = X.check_parity

    def off_by_a_little(reference, run, shape, tolerance):
        return real(reference, lambda x: run(x) + 1e-3, shape, tolerance)

    monkeypatch.setattr(X, "check_parity", off_by_a_little)
    assert cli.main(["export", str(ckpt), "--format", fmt, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("eanet: error: ") and err.count("\n") == 1
    assert "not written" in err and "1.00e-03" in err and "FAILED" in err
    assert list(out.parent.iterdir()) == []  # neither the file nor a temporary


def test_non_finite_outputs_fail_parity():
    flat = torch.nn.Flatten()  # (B, 3, 2, 2) -> (B, 12)
    parity = X.check_parity(flat, lambda x: np.full((len(x), 12), np.nan), (3, 2, 2))
    assert not parity.ok and parity.max_abs_diff == float("inf")


def test_missing_onnx_names_the_extra(tmp_path, capsys, monkeypatch):
    ckpt = tiny_checkpoint(tmp_path, "eanet-cifar")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    out = tmp_path / "m.onnx"
    assert cli.main(["export", str(ckpt), "--format", "onnx", "--out", str(out)]) == 2
    assert "eanet[export]" in capsys.readouterr().err and not out.exists()


def test_bad_checkpoint_is_a_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    out = tmp_path / "m.pt"
    assert cli.main(["export", str(bad), "--format", "torchscript", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("eanet: error: ") and err.count("\n") == 1 and not out.exists()


def _export(source: Path, out: Path, *extra: str) -> int:
    return cli.main(["export", str(source), "--format", "torchscript", "--out", str(out), *extra])


def test_export_never_writes_over_its_input_or_a_run(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    files = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    for name in ("checkpoint.safetensors", "best.safetensors", "config.json"):
        for extra in ([], ["--overwrite"]):
            assert _export(run, run / name, *extra) == 2
            err = capsys.readouterr().err
            assert f"is the {name} of the run in {run}" in err and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == files
    assert checkpoint.load(run).meta.epoch == 1  # still a run that evaluate and resume read
    ckpt = tiny_checkpoint(tmp_path, "eanet-cifar")  # a lone checkpoint, not a run
    assert _export(ckpt, ckpt, "--overwrite") == 2
    assert "is the input" in capsys.readouterr().err
    assert checkpoint.load(ckpt).meta.class_names == NAMES


def test_export_replaces_an_existing_file_only_with_overwrite(tmp_path, capsys):
    ckpt, out = tiny_checkpoint(tmp_path, "eanet-cifar"), tmp_path / "m.pt"
    out.write_bytes(b"someone's file")
    assert _export(ckpt, out) == 2
    assert f"{out} exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"someone's file"
    assert _export(ckpt, out, "--overwrite") == 0
    assert torch.jit.load(str(out))(pixels(2)).shape == (2, len(NAMES))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eanet-cifar.safetensors", "m.pt"]
