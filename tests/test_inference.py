"""`eanet.inference.Runtime`: device, precision, accel and compile resolved once, and every
command that runs a model (train, evaluate, predict, serve, bench, `eanet.load`) using it."""

import ast
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from eanet import accel, runtime
from eanet.errors import ConfigError
from eanet.inference import Prepared, Runtime
from eanet.models.registry import create_model

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "eanet"
CPU = torch.device("cpu")


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_device_is_the_cpu_without_a_gpu(no_gpu):
    rt = Runtime.resolve()
    assert rt == Runtime(CPU, "fp32", accel=True, compile=False, compile_mode="default")


def test_a_device_object_is_kept_as_given():
    device = torch.device("cpu")  # as a training rank's (`Distributed.device`)
    assert Runtime.resolve(device).device is device


@pytest.mark.parametrize("native, chosen", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_is_resolved_once_to_what_the_device_runs_natively(
    monkeypatch, native, chosen
):
    monkeypatch.setattr(runtime, "native_bf16", lambda device: native)
    assert Runtime.resolve("cpu", "auto").precision == chosen
    assert Runtime.resolve("cpu", "bf16").precision == "bf16"  # asked for: kept
    assert Runtime.resolve("cpu", "fp32").precision == "fp32"


@pytest.mark.parametrize(
    "options, message",
    [
        ({"device": "cuda"}, "no CUDA GPU is available"),
        ({"device": "tpu"}, "device 'tpu' must be one of"),
        ({"precision": "fp16"}, "--precision 'fp16' must be one of"),
        ({"compile_mode": "max-autotune"}, "--compile-mode max-autotune applies to torch.compile"),
    ],
)
def test_an_impossible_runtime_is_one_config_error_line(no_gpu, options, message):
    with pytest.raises(ConfigError, match=message) as err:
        Runtime.resolve(**options)
    assert "\n" not in str(err.value)


def test_to_dict_is_json_ready():
    rt = Runtime.resolve("cpu", "fp32", accel=False, compile=True, compile_mode="max-autotune")
    got = json.loads(json.dumps(rt.to_dict()))
    assert got == {
        "device": "cpu",
        "precision": "fp32",
        "accel": False,
        "compile": True,
        "compile_mode": "max-autotune",
    }


def _model():
    torch.manual_seed(0)
    return create_model("eanet-cifar", depth=1, dim=32, mlp_dim=32, num_classes=3)


def test_prepare_with_accel_swaps_in_the_faster_layers_and_reports_them():
    model = _model()
    ready = Runtime.resolve("cpu").prepare(model)
    assert isinstance(ready, Prepared) and ready.runner is ready.model is model
    assert ready.accel is not None and ready.accel.device == "cpu"
    assert ready.accel.precision == "fp32" and ready.accel.modules
    swapped = {type(m).__name__ for m in model.modules() if type(m) in accel.FAST_CLASSES}
    assert swapped == set(ready.accel.modules)


def test_prepare_without_accel_leaves_the_plain_model():
    model = _model()
    ready = Runtime.resolve("cpu", accel=False).prepare(model)
    assert ready.runner is model and ready.accel is None
    assert not any(type(m) in accel.FAST_CLASSES for m in model.modules())


def test_prepare_with_compile_wraps_the_forward_pass_in_its_mode(monkeypatch):
    seen = []

    def compile(model, mode=None):
        seen.append(mode)
        return torch.nn.Sequential(model)  # a stand-in: compiling itself is slow

    monkeypatch.setattr(torch, "compile", compile)
    model = _model()
    ready = Runtime.resolve("cpu", compile=True).prepare(model)
    assert ready.runner is not model and ready.runner[0] is model and ready.model is model
    Runtime.resolve("cpu", compile=True, compile_mode="max-autotune").prepare(_model())
    assert seen == [None, "max-autotune"]


def test_place_moves_and_accelerates_but_never_compiles(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("compiled"))
    model = _model()
    report = Runtime.resolve("cpu", compile=True).place(model)
    assert report is not None and report.modules


# --------------------------------------------------------------------- every user goes through it


@pytest.fixture
def calls(monkeypatch):
    """Each Runtime.prepare and Runtime.place call, as ('prepare'|'place', runtime)."""
    seen = []
    prepare, place = Runtime.prepare, Runtime.place

    def counted_prepare(self, model):
        seen.append(("prepare", self))
        return prepare(self, model)

    def counted_place(self, model):
        seen.append(("place", self))
        return place(self, model)

    monkeypatch.setattr(Runtime, "prepare", counted_prepare)
    monkeypatch.setattr(Runtime, "place", counted_place)
    return seen


def test_the_api_prepares_through_the_runtime(tiny_run, calls):
    import eanet

    clf = eanet.load(tiny_run, device="cpu", accel=False)
    assert [c for c, _ in calls] == ["prepare", "place"]
    assert calls[0][1] == Runtime(CPU, "fp32", accel=False) and clf.precision == "fp32"


def test_evaluate_prepares_through_the_runtime(tiny_run, small_sample, tmp_path, calls):
    from eanet.evaluate import evaluate_checkpoint

    evaluate_checkpoint(tiny_run, data=small_sample, out_dir=tmp_path, progress=False)
    assert [c for c, _ in calls] == ["prepare", "place"] and calls[0][1].accel


def test_the_served_model_prepares_through_the_runtime(tiny_run, calls):
    from eanet.serve.model import ServedModel

    served = ServedModel(tiny_run, "cpu", "bf16")
    assert [c for c, _ in calls] == ["prepare", "place"]
    assert served.precision == calls[0][1].precision == "bf16" and served.accel is not None


def test_predict_prepares_through_the_runtime(tiny_run, small_sample, tmp_path, calls, capsys):
    from eanet.cli.main import main

    png = tmp_path / "one.png"
    Image.fromarray(small_sample.test_images[0].permute(1, 2, 0).numpy()).save(png)
    assert main(["predict", str(tiny_run), str(png), "--json", "--device", "cpu"]) == 0
    assert [c for c, _ in calls] == ["prepare", "place"]
    assert json.loads(capsys.readouterr().out)["file"] == str(png)


def test_bench_and_train_place_the_model_and_compile_their_own_step(small_sample, tmp_path, calls):
    from eanet.bench import bench_model
    from eanet.train.config import TrainConfig
    from eanet.train.loop import fit

    shape = {"depth": 1, "dim": 32, "mlp_dim": 32}
    cfg = TrainConfig(model_args=shape, batch_size=8, device="cpu", accel=False)
    bench_model(cfg, warmup=0, steps=1, peak=100.0)
    assert calls == [("place", Runtime(CPU, "fp32", accel=False))]
    calls.clear()
    cfg = TrainConfig(model_args=shape, epochs=1, batch_size=32, device="cpu")
    fit(cfg, tmp_path / "run", data=small_sample, progress=False)
    assert calls == [("place", Runtime(CPU, "fp32"))]
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["precision"] == "fp32" and record["accel"]["device"] == "cpu"


def _set_up_calls(path: Path) -> list[str]:
    """The calls of `accel.apply`, `compiled_forward` and `torch.compile` in a module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
        owner = f.value if isinstance(f, ast.Attribute) else None
        owner_name = getattr(owner, "attr", getattr(owner, "id", ""))
        if name == "compiled_forward" or (name, owner_name) in {
            ("apply", "accel"),
            ("compile", "torch"),
        }:
            found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {ast.unparse(f)}")
    return found


def test_the_inference_set_up_is_written_once():
    """Only `inference.py` applies accel and compiles a forward pass; training's step is
    compiled in `train/step.py` (`accelerate`); `interop/export.py` undoes accel instead."""
    allowed = {"inference.py", "train/step.py"}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE))
        if rel not in allowed and not rel.startswith("accel/"):
            found += _set_up_calls(path)
    assert found == [], "set-up outside eanet.inference.Runtime:\n" + "\n".join(found)
