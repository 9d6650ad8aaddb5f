"""The checkpoint format: round trip, and clear errors for anything that is not ours."""

import pytest
import torch
from safetensors.torch import save_file

from eanet import checkpoint
from eanet.errors import CheckpointError
from eanet.models.registry import create_model

META = {"class_names": [f"c{i}" for i in range(10)], "epoch": 3}


def _save(path, name="eanet-cifar", **overrides):
    torch.manual_seed(0)
    model = create_model(name, depth=1, num_classes=10, **overrides)
    model.normalize.set_stats(torch.tensor([1.0, 2, 3]), torch.tensor([4.0, 5, 6]), 9)
    checkpoint.save(path, model, META)
    return model


def test_round_trip_gives_identical_outputs(tmp_path):
    model = _save(tmp_path / "m.safetensors").eval()
    loaded, ckpt = checkpoint.load_model(tmp_path / "m.safetensors")
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(model(x), loaded(x))
    assert ckpt.meta.epoch == 3 and ckpt.class_names == META["class_names"]
    assert torch.equal(loaded.normalize.mean, torch.tensor([1.0, 2, 3]))
    assert not loaded.training


def test_run_directory_resolves_to_its_checkpoint(tmp_path):
    _save(tmp_path / checkpoint.CHECKPOINT_NAME)
    assert checkpoint.load(tmp_path).meta.epoch == 3


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint there"):
        checkpoint.load(tmp_path / "nope")


@pytest.mark.parametrize("cut", [0.5, 0.99])
def test_truncated_checkpoint(tmp_path, cut):
    path = tmp_path / "m.safetensors"
    _save(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(CheckpointError, match="m.safetensors: not a readable safetensors"):
        checkpoint.load(path)


def test_garbage_file(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"\x80\x04garbage" * 100)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        checkpoint.load(path)


def test_foreign_safetensors_file(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="not an eanet checkpoint"):
        checkpoint.load(path)


def test_checkpoint_of_another_architecture(tmp_path):
    _save(tmp_path / "vit.safetensors", name="vit-cifar")
    ckpt = checkpoint.load(tmp_path / "vit.safetensors")
    eanet = create_model("eanet-cifar", depth=1, num_classes=10)
    with pytest.raises(CheckpointError, match="do not fit the model.*another architecture"):
        checkpoint.load_weights(eanet, ckpt, "vit.safetensors")
    other_classes = create_model("vit-cifar", depth=1, num_classes=100)
    with pytest.raises(CheckpointError, match="shape differs"):
        checkpoint.load_weights(other_classes, ckpt, "vit.safetensors")


def test_tampered_metadata(tmp_path):
    path = tmp_path / "m.safetensors"
    model = _save(path)
    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    save_file(
        tensors,
        str(path),
        metadata={
            "format": "eanet-checkpoint",
            "format_version": "1",
            "meta": '{"model_config": {"depth": "x"}}',
        },
    )
    with pytest.raises(CheckpointError, match="metadata is damaged"):
        checkpoint.load(path)


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    _save(tmp_path / "m.safetensors")
    _save(tmp_path / "m.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


# --------------------------------------------------------------------------- crafted metadata


def _forge(path, edit, checksum: str = "recompute", edit_tensors=None):
    """Rewrite a checkpoint's metadata with `edit(meta)` (and its tensors with
    `edit_tensors`), its checksum recomputed (as a forger would) or dropped."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        header = dict(f.metadata())
    tensors = load_file(str(path))
    meta = json.loads(header["meta"])
    edit(meta)
    if edit_tensors:
        edit_tensors(tensors)
    header["meta"] = json.dumps(meta)
    header.pop("sha256")
    if checksum == "recompute":  # what a forger does
        header["sha256"] = checkpoint.digest(tensors, header)
    save_file(tensors, str(path), metadata=header)


@pytest.mark.parametrize("checksum", ["recompute", "absent"])
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"dim": 65536, "depth": 1000}, "over its bound"),  # the model options' own bounds
        ({"depth": 2}, "implies"),  # plausible, but not what the file holds
        ({"mlp_dim": 128}, "implies"),
    ],
)
def test_a_header_claiming_another_model_is_refused_before_building_it(
    tmp_path, checksum, change, message, monkeypatch
):
    import time

    from eanet.cli.main import main

    path = tmp_path / "m.safetensors"
    _save(path)
    _forge(path, lambda meta: meta["model_config"].update(change), checksum)
    devices = []
    real = checkpoint.build_model

    def build(cfg):
        model = real(cfg)
        devices.append(next(model.parameters()).device.type)
        return model

    monkeypatch.setattr(checkpoint, "build_model", build)
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=f"checkpoint metadata is damaged .*{message}"):
        checkpoint.load_model(path)
    assert time.perf_counter() - t0 < 5  # milliseconds of work; generous for a busy CI
    assert set(devices) <= {"meta"}  # nothing was built with real memory
    monkeypatch.undo()
    for command in (["info", str(path)], ["predict", str(path), str(tmp_path)]):
        assert main(command) == 2


def test_a_header_whose_shapes_differ_with_the_same_count_is_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    _save(path)

    def transpose(tensors):  # the same parameter count, another shape
        key = "model.blocks.0.attn.proj_in.weight"
        tensors[key] = tensors[key].t().contiguous()

    _forge(path, lambda meta: None, edit_tensors=transpose)
    with pytest.raises(
        CheckpointError, match="metadata is damaged .*does not describe the file's tensors"
    ):
        checkpoint.load(path)


def test_metadata_is_typed_and_round_trips_unknown_keys(tmp_path):
    model = create_model("eanet-cifar", depth=1, num_classes=10)
    meta = {**META, "model_name": "eanet-cifar", "future_key": {"x": 1}}
    checkpoint.save(tmp_path / "m.safetensors", model, meta)
    loaded = checkpoint.load(tmp_path / "m.safetensors").meta
    assert isinstance(loaded, checkpoint.CheckpointMeta)
    assert (loaded.model_name, loaded.epoch, loaded.history) == ("eanet-cifar", 3, None)
    assert loaded.model_config == model.config and loaded.extra == {"future_key": {"x": 1}}
    checkpoint.save(tmp_path / "again.safetensors", model, loaded)  # the typed form saves too
    assert checkpoint.load(tmp_path / "again.safetensors").meta == loaded


def test_an_old_checkpoint_with_a_plain_dict_header_still_loads(tmp_path):
    """Written as eanet wrote them before CheckpointMeta (and before the checksum)."""
    import json

    model = create_model("eanet-cifar", depth=1, num_classes=10)
    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    meta = {"class_names": META["class_names"], "model_config": model.config.to_dict()}
    header = {"format": "eanet-checkpoint", "format_version": "1", "meta": json.dumps(meta)}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=header)
    _, ckpt = checkpoint.load_model(tmp_path / "old.safetensors")
    assert ckpt.meta.epoch is None and ckpt.meta.model_name is None


def _forge_meta_text(path, text: str) -> None:
    """Replace a checkpoint's metadata JSON with `text`, the checksum recomputed."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        header = dict(f.metadata())
    tensors = load_file(str(path))
    header["meta"] = text
    header.pop("sha256")
    header["sha256"] = checkpoint.digest(tensors, header)
    save_file(tensors, str(path), metadata=header)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 200_000 + "]" * 200_000, "nested deeper than 64 levels"),
        ('{"class_names": ' + "[" * 100 + "]" * 100 + "}", "nested deeper than 64 levels"),
        ('{"x": "' + "a" * (17 << 20) + '"}', "more than 16,777,216"),
    ],
    ids=["200000-deep", "100-deep", "17-MB"],
)
def test_metadata_too_deep_or_too_large_is_a_one_line_error(tmp_path, capsys, text, message):
    from eanet.cli.main import main

    path = tmp_path / "m.safetensors"
    _save(path)
    _forge_meta_text(path, text)
    with pytest.raises(CheckpointError, match=f"checkpoint metadata is damaged .*{message}"):
        checkpoint.load(path)
    for command in (["info", str(path)], ["predict", str(path), str(tmp_path)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_metadata_depth_ignores_brackets_inside_strings(tmp_path):
    path = tmp_path / "m.safetensors"
    _save(path)
    names = ["[" * 100 + '\\"{', *(f"c{i}" for i in range(1, 10))]
    model = create_model("eanet-cifar", depth=1, num_classes=10)
    checkpoint.save(path, model, {**META, "class_names": names})
    assert checkpoint.load(path).class_names == names
