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
    assert ckpt.meta["epoch"] == 3 and ckpt.class_names == META["class_names"]
    assert torch.equal(loaded.normalize.mean, torch.tensor([1.0, 2, 3]))
    assert not loaded.training


def test_run_directory_resolves_to_its_checkpoint(tmp_path):
    _save(tmp_path / checkpoint.CHECKPOINT_NAME)
    assert checkpoint.load(tmp_path).meta["epoch"] == 3


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
