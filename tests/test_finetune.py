"""Fine-tuning a slice-trained checkpoint onto a 3-class folder of real images."""

import json

import pytest
import torch

from eanet import checkpoint
from eanet.cli.main import main
from eanet.data.folders import load_folder
from eanet.data.splits import compute_normalization
from eanet.errors import CheckpointError, ConfigError
from eanet.models.registry import create_model
from eanet.train.config import TrainConfig
from eanet.train.finetune import inherited_model, load_compatible
from eanet.train.loop import fit

TINY = {"depth": 1, "dim": 32, "mlp_dim": 32}  # the tiny_run fixture's architecture


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EANET_DATA", str(tmp_path / "cache"))


@pytest.fixture
def folder_data(image_folder):
    return load_folder(image_folder, progress=False)


def _backbone(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith(("head.", "normalize."))}


def test_load_compatible_reports_and_reinitialises_the_head(tiny_run, folder_data, caplog):
    model = create_model("eanet-cifar", **TINY, num_classes=3)
    fresh_head = model.head.weight.detach().clone()
    with caplog.at_level("INFO", logger="eanet.train.finetune"):
        report = load_compatible(model, tiny_run, folder_data.class_names)
    source = checkpoint.load(tiny_run).model_state
    for name, tensor in _backbone(model.state_dict()).items():
        assert torch.equal(tensor, source[name]), name
    assert torch.equal(model.head.weight, fresh_head)
    assert len(report["loaded"]) == len(_backbone(source))
    skipped = " ".join(report["skipped"])
    assert "head.weight (new head: 3 classes" in skipped and "normalize.mean (recomputed" in skipped
    assert f"loaded {len(report['loaded'])} of" in caplog.text and "head.bias" in caplog.text


def test_same_classes_keep_the_head(tiny_run, small_sample):
    model = create_model("eanet-cifar", **TINY)
    report = load_compatible(model, tiny_run, small_sample.class_names)
    assert "head.weight" in report["loaded"]
    assert torch.equal(model.head.weight, checkpoint.load(tiny_run).model_state["head.weight"])


def test_nothing_compatible_is_a_clear_error(tiny_run, folder_data):
    model = create_model("eanet-cifar", depth=1, dim=16, mlp_dim=16, num_classes=3)
    with pytest.raises(CheckpointError, match="no tensor fits the model"):
        load_compatible(model, tiny_run, folder_data.class_names)


def test_fine_tune_onto_a_folder(tiny_run, folder_data, tmp_path):
    cfg = TrainConfig(
        model_args=dict(TINY),
        dataset="folder",
        init_from=str(tiny_run),
        epochs=2,
        batch_size=16,
        device="cpu",
    )
    metrics = fit(cfg, tmp_path / "ft", data=folder_data, progress=False)
    assert metrics["test_images"] == len(folder_data.test_labels)
    ckpt = checkpoint.load(tmp_path / "ft")
    assert ckpt.class_names == ["apple", "bicycle", "cloud"]
    assert ckpt.model_config.num_classes == 3
    assert ckpt.meta.train_config["init_from"] == str(tiny_run)
    mean, var, _ = compute_normalization(folder_data.train_images)  # from the NEW data
    assert torch.allclose(ckpt.model_state["normalize.mean"], mean)
    assert torch.allclose(ckpt.model_state["normalize.var"], var)
    source = checkpoint.load(tiny_run).model_state
    moved = [k for k, v in _backbone(ckpt.model_state).items() if not torch.equal(v, source[k])]
    assert moved  # the whole network trains


def test_freeze_backbone_trains_only_the_head_and_resumes(tiny_run, folder_data, tmp_path):
    cfg = TrainConfig(
        model_args=dict(TINY),
        dataset="folder",
        init_from=str(tiny_run),
        freeze_backbone=True,
        epochs=1,
        batch_size=8,
        lr=1e-2,
        device="cpu",
    )
    run = tmp_path / "frozen"
    fit(cfg, run, data=folder_data, progress=False)
    cfg.epochs = 2
    fit(cfg, run, data=folder_data, resume=True, progress=False)
    ckpt = checkpoint.load(run)
    assert ckpt.meta.epoch == 2
    source = checkpoint.load(tiny_run).model_state
    for name, tensor in _backbone(ckpt.model_state).items():
        assert torch.equal(tensor, source[name]), name  # bit-identical: frozen
    fresh = create_model("eanet-cifar", **TINY, num_classes=3)
    assert not torch.equal(ckpt.model_state["head.weight"], fresh.head.weight)
    assert len(ckpt.optimizer_state["state"]) == 2  # AdamW holds only the head's two tensors


def test_freeze_needs_init_from():
    with pytest.raises(ConfigError, match="--freeze-backbone .* --init-from"):
        TrainConfig(freeze_backbone=True)


def test_inherited_model_rebuilds_the_architecture(tiny_run):
    assert inherited_model(tiny_run) == ("eanet-cifar", TINY, 32)


def test_cli_fine_tune_evaluate_predict_on_a_folder(tiny_run, image_folder, tmp_path, capsys):
    run = tmp_path / "ft"
    common = ["--dataset", "folder", "--data-path", str(image_folder), "--no-progress"]
    args = ["train", *common, "--init-from", str(tiny_run), "--epochs", "1", "--out", str(run)]
    assert main([*args, "--freeze-backbone"]) == 0
    assert "test top-1" in capsys.readouterr().out
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["model_args"] == TINY  # inherited from the checkpoint
    assert config["train"]["freeze_backbone"] is True
    assert config["model"]["num_classes"] == 3

    assert main(["evaluate", str(run), "--json", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dataset"] == "folder" and result["images"] == len(
        list((image_folder / "test").rglob("*.png"))
    )

    assert main(["predict", str(run), str(image_folder / "test" / "cloud"), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {p["class"] for r in rows for p in r["predictions"]} == {"apple", "bicycle", "cloud"}


def test_mostly_incompatible_checkpoint_warns(tiny_run, folder_data, caplog):
    model = create_model("eanet-cifar", depth=1, dim=16, mlp_dim=32, num_classes=3)
    with caplog.at_level("INFO", logger="eanet.train.finetune"):
        report = load_compatible(model, tiny_run, folder_data.class_names)
    assert 0 < len(report["loaded"]) < 5
    assert "of the backbone comes from" in caplog.text
