"""`eanet attention` and `Classifier.attention`: EANet's memory units, ViT's rollout."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import eanet
from eanet import checkpoint
from eanet.attention_maps import attention_kind, attention_maps, maps_of_tensors
from eanet.cli.main import main
from eanet.errors import ConfigError, DataError
from eanet.models.registry import create_model
from eanet.nn import swap_attention

NAMES = ["apple", "bicycle", "cloud"]


def tiny(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, depth=2, dim=32, mlp_dim=32, patch_size=4, num_classes=3).eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A real checkpoint of a 2-block EANet and ViT (8x8 patches of 4x4), 3 classes."""
    root = tmp_path_factory.mktemp("ckpt")
    paths = {}
    for name in ("eanet-cifar", "vit-cifar"):
        paths[name] = root / f"{name}.safetensors"
        checkpoint.save(paths[name], tiny(name), {"class_names": NAMES, "epoch": 1})
    return paths


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Two real-looking PNGs of other sizes (40x30, 32x32) and a file that is no image."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(root / "a.png")
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "b.png")
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    return root


def test_eanet_maps_are_the_layers_attention_over_the_patch_grid():
    model = tiny("eanet-cifar")
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    seen = []  # what each block's attention module gets in the model's own forward
    hooks = [
        b.attn.register_forward_pre_hook(lambda m, args: seen.append(m.attention_map(args[0])))
        for b in model.blocks
    ]
    with torch.no_grad():
        logits = model(x)
    for h in hooks:
        h.remove()
    maps = maps_of_tensors(model, NAMES, x, ["one", "two"])
    assert [m.kind for m in maps] == ["external", "external"]
    for i, m in enumerate(maps):
        assert m.attention.shape == (2, 16, 64, 8)  # (blocks, heads, N, S): S = 32 // 4
        torch.testing.assert_close(m.attention, torch.stack([s[i] for s in seen]))
        torch.testing.assert_close(m.attention.sum(-1), torch.ones(2, 16, 64))  # L1 over S
        units = m.unit_maps()
        assert units.shape == (2, 8, 8, 8) and m.grid == 8  # (blocks, S, rows, cols)
        # unit s of block b at patch (row 2, col 5) = token 2*8 + 5, averaged over heads
        torch.testing.assert_close(units[1, 3, 2, 5], m.attention[1, :, 21, 3].mean())
        assert m.label == NAMES[int(logits[i].argmax())]
        assert m.probability == pytest.approx(float(logits[i].softmax(-1).max()), abs=1e-6)


def test_vit_rollout_by_hand():
    model = tiny("vit-cifar")
    x = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    (m,) = maps_of_tensors(model, NAMES, x, ["one"])
    assert m.kind == "self" and m.attention.shape == (2, 4, 64, 64)  # (blocks, heads, N, N)
    torch.testing.assert_close(m.attention.sum(-1), torch.ones(2, 4, 64))  # over the keys
    a1, a2 = (0.5 * a.mean(0) + 0.5 * torch.eye(64) for a in m.attention)
    rollout = m.rollout()
    assert rollout.shape == (2, 8, 8)
    torch.testing.assert_close(rollout[0].flatten(), a1.mean(0))
    torch.testing.assert_close(rollout[1].flatten(), (a2 @ a1).mean(0))
    torch.testing.assert_close(rollout.sum((1, 2)), torch.ones(2))


def test_the_accelerated_model_gives_the_same_maps(checkpoints, images):
    plain = eanet.load(checkpoints["eanet-cifar"], device="cpu", accel=False)
    fast = eanet.load(checkpoints["eanet-cifar"], device="cpu")
    assert type(fast.model.blocks[0].attn).__name__ == "FoldedExternalAttention"
    a, b = plain.attention(images / "a.png")[0], fast.attention(images / "a.png")[0]
    torch.testing.assert_close(a.attention, b.attention)
    assert a.label == b.label == fast.predict(images / "a.png").label


def test_a_model_with_two_kinds_of_attention_is_refused_in_one_line():
    model = tiny("vit-cifar")
    swap_attention(model.blocks[0])  # one block external, the other self-attention
    with pytest.raises(ConfigError, match="blocks of one kind.*this model's are external, self"):
        attention_kind(model)


def test_the_api_takes_what_predict_takes_and_refuses_a_bad_image(checkpoints, images):
    clf = eanet.load(checkpoints["vit-cifar"], device="cpu")
    maps = clf.attention([np.zeros((20, 20, 3), np.uint8), images / "b.png"])
    assert [m.source for m in maps] == ["image 0", str(images / "b.png")]
    with pytest.raises(DataError, match="broken.png: not an image Pillow can read") as err:
        clf.attention(images / "broken.png")
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="no images given"):
        attention_maps(clf.model, NAMES, [])


def test_save_writes_a_png_and_the_tensors(checkpoints, images, tmp_path):
    clf = eanet.load(checkpoints["eanet-cifar"], device="cpu")
    (m,) = clf.attention(images / "a.png")
    png, raw = m.save(tmp_path / "out", "a")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 200
    with safe_open(raw, "pt") as f:
        assert set(f.keys()) == {"image", "attention", "unit_maps"}
        assert f.get_tensor("image").dtype == torch.uint8
        torch.testing.assert_close(f.get_tensor("unit_maps"), m.unit_maps())
        meta = f.metadata()
    assert meta["kind"] == "external" and meta["label"] in NAMES
    assert "softmax over the tokens" in meta["axes"]


@pytest.mark.slow  # draws four figures
@pytest.mark.parametrize(
    ("name", "drawn"), [("eanet-cifar", "unit_maps"), ("vit-cifar", "rollout")]
)
def test_the_command_draws_each_image_and_reports_bad_files(
    checkpoints, images, tmp_path, capsys, name, drawn
):
    out = tmp_path / "maps"
    code = main(
        ["attention", str(checkpoints[name]), str(images), "nowhere.png", "--out", str(out)]
    )
    assert code == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert "eanet: error: nowhere.png: no such file or directory" in captured.err
    assert f"eanet: error: {images / 'broken.png'}: not an image Pillow can read" in captured.err
    assert "2 image(s) drawn, 2 failed" in captured.err
    assert sorted(p.name for p in out.iterdir()) == [
        "a-attention.png",
        "a-attention.safetensors",
        "b-attention.png",
        "b-attention.safetensors",
    ]
    assert "a-attention.png" in captured.out
    with safe_open(out / "b-attention.safetensors", "pt") as f:
        assert drawn in f.keys()  # noqa: SIM118 (safe_open is no dict)


def test_the_command_names_a_missing_checkpoint_in_one_line(tmp_path, capsys):
    assert main(["attention", str(tmp_path / "none"), "x.png", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("eanet: error: ") and err.count("\n") == 1


def test_docs_python_example_runs(checkpoints, tmp_path, monkeypatch, capsys):
    from docs_helpers import python_block

    run = tmp_path / "runs" / "digits-eanet"
    run.mkdir(parents=True)
    (run / checkpoint.CHECKPOINT_NAME).write_bytes(checkpoints["eanet-cifar"].read_bytes())
    monkeypatch.chdir(tmp_path)
    example = python_block("external-attention.md", "The same from Python")
    exec(compile(example, "docs/external-attention.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("external ") and lines[0].endswith("(2, 16, 64, 8)")
    assert lines[1] == "(2, 8, 8, 8)"
    assert (tmp_path / "maps" / "digit-4.png").is_file()


def test_the_command_refuses_to_replace_maps_without_overwrite(
    checkpoints, images, tmp_path, capsys
):
    """`eanet attention` replaced an existing OUT/NAME-attention.* silently."""
    out = tmp_path / "maps"
    out.mkdir()
    (out / "b-attention.safetensors").write_bytes(b"the user's")
    argv = [
        "attention",
        str(checkpoints["eanet-cifar"]),
        str(images / "a.png"),
        str(images / "b.png"),
    ]
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"eanet: error: {out / 'b-attention.safetensors'} exists; pass --overwrite to replace "
        "it, or choose another --out"
    ]
    assert [p.name for p in out.iterdir()] == ["b-attention.safetensors"]  # nothing drawn
    assert (
        main(
            [
                "attention",
                str(checkpoints["eanet-cifar"]),
                str(images / "b.png"),
                "--out",
                str(out),
                "--overwrite",
            ]
        )
        == 0
    )
    assert (out / "b-attention.safetensors").read_bytes() != b"the user's"


def test_many_memory_units_are_drawn_quickly_and_kept_whole(images, tmp_path, caplog, monkeypatch):
    """4,096 memory units: one axes each drew nothing in 300 s; the first MAX_DRAWN_UNITS
    are drawn, a line says so, and the tensors hold every unit."""
    from eanet.attention_maps import MAX_DRAWN_UNITS

    torch.manual_seed(0)
    model = create_model(
        "eanet-cifar", depth=1, dim=32, mlp_dim=32, patch_size=4, num_classes=3, memory_size=4096
    )
    ckpt = tmp_path / "many.safetensors"
    checkpoint.save(ckpt, model, {"class_names": NAMES, "epoch": 1})
    out = tmp_path / "maps"
    from matplotlib.figure import Figure

    axes_saved, savefig = [], Figure.savefig

    def counting_savefig(fig, *args, **kwargs):
        axes_saved.append(len(fig.axes))
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", counting_savefig)
    with caplog.at_level(logging.INFO, logger="eanet"):
        assert main(["attention", str(ckpt), str(images / "b.png"), "--out", str(out)]) == 0
    # the work is bounded by what is drawn, whatever the machine's speed: not 4,096 axes
    assert axes_saved and max(axes_saved) <= MAX_DRAWN_UNITS + 16
    assert f"drawing the first {MAX_DRAWN_UNITS} of the 4096 memory units" in caplog.text
    with safe_open(out / "b-attention.safetensors", "pt") as f:
        assert f.get_slice("unit_maps").get_shape() == [1, 4096, 8, 8]
