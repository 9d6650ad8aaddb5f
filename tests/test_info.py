"""`eanet info`: parameter counts of the reference, multiply-adds checked by FlopCounterMode."""

import json
import re

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from eanet import checkpoint
from eanet.cli.main import main
from eanet.info import describe, model_info
from eanet.models.registry import create_model
from eanet.runtime import CPU_FLAGS

HOSTILE = "\x1b[2J\x1b[H\x1b]0;TITLE\x07FAKE: all good\r"  # issue 25's model_name


@pytest.mark.parametrize(
    ("name", "trainable", "total"),
    [("eanet-cifar", 361_380, 361_387), ("vit-cifar", 623_268, 623_275)],
)
def test_counts_match_the_reference(name, trainable, total):
    info = describe(name)
    assert info["trainable_parameters"] == trainable
    assert info["normalization_statistics"] == 7
    assert info["total_parameters"] == total
    assert sum(r["parameters"] for r in info["layers"]) == trainable
    assert sum(r["statistics"] for r in info["layers"]) == 7


def _measured_macs(model) -> int:
    """FLOPs / 2 of one forward pass on one image, as torch counts them."""
    model.eval()
    # The CPU's fused attention kernel has no FLOP formula; the math path runs plain bmm.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model(torch.zeros(1, *model.input_shape))
    return fc.get_total_flops() // 2


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("eanet-cifar", {}),
        ("vit-cifar", {}),
        ("eanet-cifar-s64", {}),
        ("eanet-cifar", {"depth": 2, "dim": 32, "num_heads": 2, "image_size": 16, "patch_size": 4}),
        ("vit-cifar", {"depth": 1, "dim": 48, "num_heads": 3, "num_classes": 10}),
    ],
)
def test_analytic_macs_equal_flop_counter(name, overrides):
    model = create_model(name, **overrides)
    assert model_info(model)["macs_per_image"] == _measured_macs(model)


def test_eanet_forward_is_about_a_tenth_of_a_giga_mac():
    macs = describe("eanet-cifar")["macs_per_image"]
    assert macs == 100_866_304 and 0.095e9 < macs < 0.105e9  # docs/reference.md section 1: ~0.10 G


def test_cli_text_and_json(capsys):
    assert main(["info", "eanet-cifar"]) == 0
    out = capsys.readouterr().out
    assert "361,380" in out and "361,387" in out and "100,866,304" in out
    assert "blocks.7.attn.mk" in out and "dim_coefficient=4" in out
    assert main(["info", "vit-cifar", "--model-arg", "depth=2", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["depth"] == 2 and info["model"] == "vit-cifar"
    assert {r["layer"] for r in info["layers"]} >= {"blocks.1.attn", "head", "normalize"}


def test_info_alone_describes_this_machine(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out and "threads" in out and "flags:" in out
    assert re.search(r"--precision auto -> (fp32|bf16)", out)
    assert "native CPU kernels (--accel): " in out
    assert "kernel cache: " in out and "EANET_KERNELS" in out
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch"] == torch.__version__ and info["precision_auto"] in ("fp32", "bf16")
    assert set(info["cpu_flags"]) <= set(CPU_FLAGS)
    assert main(["info", "eanet-cifar"]) == 0
    assert "on this machine: --precision auto -> " in capsys.readouterr().out


def test_cli_on_a_checkpoint(tiny_run, capsys):
    assert main(["info", str(tiny_run), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["checkpoint"]["classes"] == 100 and info["checkpoint"]["epoch"] == 1
    assert info["config"]["depth"] == 1
    assert main(["info", str(tiny_run)]) == 0
    assert "eanet-cifar (dim=32, depth=1, mlp_dim=32)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["info", "resnet50"], "neither a registered model"),
        (["info", "eanet-cifar", "--model-arg", "depth=0"], "depth=0 must be a positive integer"),
    ],
)
def test_cli_bad_input(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_a_checkpoints_text_cannot_drive_the_terminal(tiny_run, tmp_path, capsys):
    model, ckpt = checkpoint.load_model(tiny_run)
    ckpt.meta.model_name = HOSTILE
    path = tmp_path / "hostile.safetensors"
    checkpoint.save(path, model, ckpt.meta)
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert not any(c in out for c in "\x1b\x07\r")
    assert out.startswith(r"\x1b[2J\x1b[H\x1b]0;TITLE\x07FAKE: all good\r: external attention")
    assert main(["info", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == HOSTILE  # JSON keeps it, escaped
