"""eanet against the Keras example, side by side on this machine, in one run.

For each model, `eanet bench` and `benchmarks/reference_keras.py` run one after the other
(each in its own process, nothing else of ours running), `--rounds` times in alternation;
the medians go into benchmarks/results/<stamp>-reference.json and a markdown table with the
ratios and the 2x targets (benchmarks/results/reference_comparison.md):

    python benchmarks/compare_reference.py --keras-python /path/to/keras-venv/bin/python

The Keras interpreter needs `pip install 'eanet[reference]'` (Keras 3 + TensorFlow CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODELS = {"eanet": "eanet-cifar", "vit": "vit-cifar"}
TARGET = 2.0


def run_json(cmd: list[str]) -> dict:
    """Run a benchmark command and parse the JSON it prints (last JSON object on stdout)."""
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        sys.exit(f"benchmark failed: {' '.join(cmd)}\n{out.stderr[-2000:]}")
    return json.loads(out.stdout[out.stdout.index("{") :])


def measure(model: str, args: argparse.Namespace) -> dict:
    """Medians over rounds of ours and the reference's train and inference images/s."""
    common = [
        "--batch-size",
        str(args.batch_size),
        "--warmup",
        str(args.warmup),
        "--steps",
        str(args.steps),
        "--json",
    ]
    ours_cmd = [
        sys.executable,
        "-m",
        "eanet",
        "bench",
        "--model",
        MODELS[model],
        "--device",
        "cpu",
        *common,
    ]
    ref_cmd = [args.keras_python, "benchmarks/reference_keras.py", "--model", model, *common]
    ours, ref = [], []
    for r in range(args.rounds):
        print(f"[{model}] round {r + 1}/{args.rounds}: eanet ...", file=sys.stderr, flush=True)
        ours.append(run_json(ours_cmd))
        print(f"[{model}] round {r + 1}/{args.rounds}: keras ...", file=sys.stderr, flush=True)
        ref.append(run_json(ref_cmd))

    def med(rows: list[dict], key: str) -> float:
        return statistics.median(row[key] for row in rows)

    return {
        "model": model,
        "eanet_train_img_s": med(ours, "train_img_s"),
        "eanet_infer_img_s": med(ours, "infer_img_s"),
        "keras_train_img_s": med(ref, "train_img_s"),
        "keras_infer_img_s": med(ref, "infer_img_s"),
        "train_ratio": med(ours, "train_img_s") / med(ref, "train_img_s"),
        "infer_ratio": med(ours, "infer_img_s") / med(ref, "infer_img_s"),
        "matmul_peak_gflops": med(ours, "matmul_peak_gflops"),
        "eanet_train_fraction_of_peak": med(ours, "train_fraction_of_peak"),
        "eanet_infer_fraction_of_peak": med(ours, "infer_fraction_of_peak"),
        "keras_framework": ref[0]["framework"],
        "environment": ours[0]["environment"],
        "runs": {"eanet": ours, "keras": ref},
    }


def table(rows: list[dict], args: argparse.Namespace) -> str:
    """The markdown table of the comparison."""
    env = rows[0]["environment"]
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {env.get('cpu_model', env['processor'])} "
        f"({env['cpu_count']} cores, {env['torch_threads']} torch threads), torch "
        f"{env['torch']} vs {rows[0]['keras_framework']}; batch {args.batch_size}, fp32, "
        f"median of {args.steps} steps after {args.warmup} warm-up, {args.rounds} alternating "
        "round(s); command: `python benchmarks/compare_reference.py "
        f"--rounds {args.rounds} --steps {args.steps}`.",
        "",
        "| model | | eanet img/s | Keras img/s | ratio (target >= 2x) "
        "| eanet share of matmul peak |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        for kind, label in (("train", "training step"), ("infer", "inference")):
            ok = "yes" if r[f"{kind}_ratio"] >= TARGET else "no"
            lines.append(
                f"| {r['model']} | {label} | {r[f'eanet_{kind}_img_s']:.1f} | "
                f"{r[f'keras_{kind}_img_s']:.1f} | {r[f'{kind}_ratio']:.2f}x ({ok}) | "
                f"{r[f'eanet_{kind}_fraction_of_peak']:.0%} of "
                f"{r['matmul_peak_gflops']:.0f} GFLOP/s |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--keras-python",
        default=sys.executable,
        help="interpreter with Keras 3 + TensorFlow (default: this one)",
    )
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["eanet", "vit"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    rows = [measure(m, args) for m in args.models]
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"{stamp}-reference.json").write_text(json.dumps(rows, indent=2) + "\n")
    md = table(rows, args)
    (RESULTS / "reference_comparison.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
