"""Record, as JSON, the figures that the fidelity tests and the digits learning check assert.

    python tools/record_checks.py fidelity        # benchmarks/results/fidelity/fidelity.json
    python tools/record_checks.py learning-check  # benchmarks/results/digits/learning_check.json

`fidelity` runs in eanet's own environment, without Keras: the Keras side is the committed
fixtures in tests/fixtures/keras/, compared exactly as the tests compare them (through
tests/keras_helpers.py): the parameter counts of eanet-cifar and vit-cifar against the Keras
files' and model.summary()'s (tests/test_models.py); the output probabilities of the
imported Keras files against Keras's own, plain and with eanet.accel, and with the wrong
(erf) GELU for scale (tests/test_interop_keras.py); the 10 training steps against Keras's
trajectory, with Keras's epsilon rule and with torch's (tests/test_keras_training.py).

`learning-check` trains the learning check of tests/test_train.py (eanet.demo.DIGITS_RECIPE,
2-block EANet, 8 epochs on the shipped real digits) and records its held-out top-1.

Each file holds the command, the date, the machine class (benchmarks/compare_reference.py's)
and eanet.runtime.environment(); the README's tables are generated from them
(tools/results_tables.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests")]
from compare_reference import machine_class  # noqa: E402
from keras_helpers import (  # noqa: E402
    FILES,
    FIXTURE,
    FORWARD_TOLERANCE,
    LOSS_TOLERANCE,
    STEPS,
    TORCH_RULE_MARGIN,
    TRAINING_TOLERANCE,
    fixture_pixels,
    keras_batches,
    keras_parameters,
    load_fixture,
    mapped,
    max_difference,
    prob_difference,
    train_like_keras,
)

from eanet import accel  # noqa: E402
from eanet.interop import keras as K  # noqa: E402
from eanet.models.registry import count_parameters, create_model  # noqa: E402
from eanet.runtime import environment  # noqa: E402

MODELS = {"eanet": "eanet-cifar", "vit": "vit-cifar"}  # provenance.json's names -> eanet's
LEARNING_CHECK_THRESHOLD = 0.90  # tests/test_train.py::test_learning_check_on_real_digits


def parameters() -> dict:
    """Per model: eanet's counts, the Keras file's weights and Keras's summary total."""
    keras_total = keras_parameters()
    files = {"eanet": "eanet.weights.h5", "vit": "vit.weights.h5"}
    found = {}
    for short, name in MODELS.items():
        model = create_model(name)
        state = K.read_keras_model(FIXTURE / files[short]).state
        stats = sum(v.size for k, v in state.items() if k.startswith("normalize."))
        found[name] = {
            "eanet": {
                "trainable": count_parameters(model),
                "statistics": sum(b.numel() for b in model.buffers()),
            },
            "keras_file": {"trainable": sum(v.size for v in state.values()) - stats}
            | {"statistics": stats},
            "keras_summary_total": keras_total[short],
        }
    return {"checked_by": "tests/test_models.py", "tolerance": 0, "models": found}


def forward() -> dict:
    """Max |p - p_keras| per fixture file: imported plain, with eanet.accel, with erf GELU."""
    expected = load_fixture("expected.npz")
    pixels = fixture_pixels(expected)
    files = {}
    for name, (key, _, _) in FILES.items():
        km = K.read_keras_model(FIXTURE / name)
        model = K.to_torch(km)
        row = {"plain": prob_difference(model, pixels, expected[key])}
        accel.apply(model, "cpu")
        row["accel"] = prob_difference(model, pixels, expected[key])
        erf = dataclasses.replace(km, config=dataclasses.replace(km.config, gelu="erf"))
        row["erf_gelu"] = prob_difference(erf, pixels, expected[key])
        files[name] = {"model": km.kind, **row}
    return {
        "checked_by": "tests/test_interop_keras.py",
        "tolerance": FORWARD_TOLERANCE,
        "images": len(pixels),
        "files": files,
    }


def training() -> dict:
    """Max |W - W_keras| after steps 1, 5 and 10, with Keras's epsilon rule and with torch's."""
    keras_run = load_fixture("training.npz")
    batches = keras_batches(keras_run)
    out = {
        "checked_by": "tests/test_keras_training.py",
        "steps": STEPS,
        "batch": len(batches[0][0]),
    }
    out |= {"tolerance": TRAINING_TOLERANCE, "loss_tolerance": LOSS_TOLERANCE}
    with tempfile.TemporaryDirectory() as tmp:
        for rule in ("keras", "torch"):
            snapshots = (1, 5, STEPS) if rule == "keras" else (STEPS,)
            losses, weights, _, _ = train_like_keras(batches, rule, False, snapshots)
            worst = {}
            for step in snapshots:
                diff, where = max_difference(
                    weights[step], mapped(keras_run, f"w{step}", Path(tmp))
                )
                worst[str(step)] = {"max_abs_diff": diff, "tensor": where}
            rel = [abs(a - b) / abs(b) for a, b in zip(losses, keras_run["losses"], strict=True)]
            out[f"{rule}_rule"] = {"weights": worst, "loss_max_rel_diff": max(rel)}
    out["torch_rule"]["must_exceed"] = TORCH_RULE_MARGIN * TRAINING_TOLERANCE
    return out


def learning_check() -> dict:
    """The digits learning check: its recipe trained once here, its held-out figures."""
    from eanet.data.load import load_dataset
    from eanet.demo import DIGITS_RECIPE
    from eanet.train.config import TrainConfig
    from eanet.train.loop import fit

    cfg = TrainConfig(**DIGITS_RECIPE, dataset="digits", device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        metrics = fit(cfg, tmp, data=load_dataset("digits"), progress=False)
    return {
        "checked_by": "tests/test_train.py::test_learning_check_on_real_digits",
        "what": "2-block EANet (4x4 patches) on the shipped real digits, no augmentation",
        "recipe": {**DIGITS_RECIPE, "seed": cfg.seed},
        "threshold": LEARNING_CHECK_THRESHOLD,
        "metrics": metrics,
    }


RECORDS = {  # name -> (its file, its parts)
    "fidelity": (
        RESULTS / "fidelity" / "fidelity.json",
        {"parameters": parameters, "forward": forward, "training": training},
    ),
    "learning-check": (
        RESULTS / "digits" / "learning_check.json",
        {"learning_check": learning_check},
    ),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("record", choices=RECORDS, help="which record to measure and write")
    parser.add_argument("--out", type=Path, help="write it there instead")
    args = parser.parse_args(argv)
    out, parts = RECORDS[args.record]
    out = args.out or out
    env = environment()
    record = {
        "command": f"python tools/record_checks.py {args.record}",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine_class": machine_class(env),
        "environment": env,
    }
    t0 = time.perf_counter()
    for part, measure in parts.items():
        record[part] = measure()
        print(f"{part}: done after {time.perf_counter() - t0:.0f} s", flush=True)
    record["seconds"] = round(time.perf_counter() - t0, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
