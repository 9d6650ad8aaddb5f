"""Atomic writes: permissions from the umask, no stray temporary files, errors never masked."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
import torch

from eanet import checkpoint, fileio
from eanet.data.folders import load_folder
from eanet.errors import EANetError
from eanet.models.registry import create_model


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _temps(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if "tmp" in p.name)


def test_checkpoint_json_and_folder_cache_honour_the_umask(
    tmp_path, umask_022, image_folder, monkeypatch
):
    model = create_model("eanet-cifar", depth=1, dim=32, mlp_dim=32, num_classes=3)
    checkpoint.save(tmp_path / "m.safetensors", model, {"class_names": ["a", "b", "c"]})
    fileio.write_json(tmp_path / "x.json", {"a": 1})
    monkeypatch.setenv("EANET_DATA", str(tmp_path / "cache"))
    load_folder(image_folder, progress=False)
    cache = next((tmp_path / "cache" / "folders").glob("*/images.safetensors"))
    assert [_mode(p) for p in (tmp_path / "m.safetensors", tmp_path / "x.json", cache)] == [
        0o644
    ] * 3
    assert _temps(tmp_path) == []  # no `.tmpXXXX` of safetensors', no 0-byte `.tmp`
    os.umask(0o077)
    checkpoint.save(tmp_path / "private.safetensors", model, {"class_names": ["a", "b", "c"]})
    assert _mode(tmp_path / "private.safetensors") == 0o600


def test_the_directory_is_synced_after_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = fileio._fsync, os.replace
    monkeypatch.setattr(fileio, "_fsync", lambda p: (events.append(("fsync", p)), real_fsync(p)))
    monkeypatch.setattr(
        fileio.os, "replace", lambda a, b: (events.append(("replace", b)), real_replace(a, b))
    )
    fileio.write_text(tmp_path / "a.txt", "x")
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"]
    assert events[1][1] == tmp_path / "a.txt" and events[2][1] == tmp_path


def test_a_failing_cleanup_never_masks_the_real_error(tmp_path, monkeypatch, caplog):
    """The directory turned unwritable during the save: the rename fails, so does removing
    the temporary file; the error is still the one line about the write."""

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(fileio.os, "replace", denied)
    monkeypatch.setattr(Path, "unlink", denied)
    model = create_model("eanet-cifar", depth=1, dim=32, mlp_dim=32, num_classes=3)
    with pytest.raises(EANetError) as info:
        checkpoint.save(tmp_path / "m.safetensors", model, {"class_names": ["a", "b", "c"]})
    assert str(info.value) == (
        f"cannot write {tmp_path / 'm.safetensors'}: Permission denied; "
        "check free disk space and permissions"
    )
    assert "cannot remove the temporary file" in caplog.text


def test_an_error_inside_the_write_removes_the_temporary_file(tmp_path):
    with pytest.raises(ZeroDivisionError), fileio.atomic_path(tmp_path / "a.bin") as tmp:
        tmp.write_bytes(b"half")
        1 / 0  # noqa: B018
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_bytes_are_what_safetensors_reads(tmp_path):
    torch.manual_seed(0)
    model = create_model("eanet-cifar", depth=1, dim=32, mlp_dim=32, num_classes=3)
    checkpoint.save(tmp_path / "m.safetensors", model, {"class_names": ["a", "b", "c"]})
    loaded, _ = checkpoint.load_model(tmp_path / "m.safetensors")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_check_output_refuses_the_input_a_directory_and_an_existing_file(tmp_path):
    source = tmp_path / "model.safetensors"
    source.write_bytes(b"weights")
    (tmp_path / "link.safetensors").symlink_to(source)
    for out in (source, tmp_path / "link.safetensors", tmp_path / "sub" / ".." / source.name):
        with pytest.raises(EANetError, match="is the input"):
            fileio.check_output(out, overwrite=True, inputs=[source])
    with pytest.raises(EANetError, match="is a directory"):
        fileio.check_output(tmp_path, overwrite=True)
    other = tmp_path / "model.onnx"
    other.write_bytes(b"old")
    with pytest.raises(EANetError, match="exists; pass --overwrite"):
        fileio.check_output(other, inputs=[source])
    assert fileio.check_output(other, overwrite=True, inputs=[source]) == other
    assert fileio.check_output(tmp_path / "new.onnx", inputs=[source]) == tmp_path / "new.onnx"
    assert source.read_bytes() == b"weights" and other.read_bytes() == b"old"


def test_an_atomic_directory_appears_whole_or_not_at_all(tmp_path):
    out = tmp_path / "images"
    with pytest.raises(RuntimeError), fileio.atomic_directory(out) as tmp:
        (tmp / "a.png").write_bytes(b"1")
        raise RuntimeError("killed halfway")
    assert list(tmp_path.iterdir()) == []  # neither OUT nor a temporary folder
    out.mkdir()  # an empty directory is replaced
    with fileio.atomic_directory(out) as tmp:
        (tmp / "a.png").write_bytes(b"1")
    assert [p.name for p in tmp_path.iterdir()] == ["images"]
    assert (out / "a.png").read_bytes() == b"1"
