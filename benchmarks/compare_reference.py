"""eanet against the Keras example, side by side on this machine, in one run.

For each model, `eanet bench` and `benchmarks/reference_keras.py` run one after the other
(each in its own process, nothing else of ours running), `--rounds` times in alternation;
eanet in each `--precisions` (Keras always fp32: the reference has no bf16 path), and with
`--compiled` each of them under torch.compile too; the medians
go into benchmarks/results/cpu/<machine class>/<stamp>-reference.json and a markdown table
with the ratios, the targets and the CPU's flags (.../reference_comparison.md); the machine
class is avx2, avx512, avx512-bf16 or amx-bf16, from /proc/cpuinfo:

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


# Targets of the side-by-side comparison (eanet / Keras fp32), by eanet's precision.
TARGETS = {
    ("eanet", "fp32"): (1.6, 1.6),
    ("vit", "fp32"): (1.1, 1.1),
    # only on a CPU with native bf16 (the AVX-512-bf16 class's targets; AMX met 3.0/4.0, 2.0/2.0)
    ("eanet", "bf16"): (3.5, 4.0),
    ("vit", "bf16"): (2.5, 2.0),
}


def measure(model: str, args: argparse.Namespace) -> list[dict]:
    """Medians over alternating rounds: Keras (fp32) and eanet in each asked precision."""
    common = ["--batch-size", str(args.batch_size), "--warmup", str(args.warmup)]
    common += ["--steps", str(args.steps), "--json"]
    ours_cmd = [sys.executable, "-m", "eanet", "bench", "--model", MODELS[model]]
    ours_cmd += ["--device", "cpu", *common]
    ref_cmd = [args.keras_python, "benchmarks/reference_keras.py", "--model", model, *common]
    variants = [(p, False) for p in args.precisions]
    variants += [(p, True) for p in args.precisions] if args.compiled else []
    ours: dict[tuple[str, bool], list[dict]] = {v: [] for v in variants}
    ref: list[dict] = []
    for r in range(args.rounds):
        for p, compiled in variants:
            name = f"{p}{' compiled' if compiled else ''}"
            print(f"[{model}] round {r + 1}/{args.rounds}: eanet {name} ...", file=sys.stderr)
            extra = ["--compile"] if compiled else []
            ours[(p, compiled)].append(run_json([*ours_cmd, "--precision", p, *extra]))
        print(f"[{model}] round {r + 1}/{args.rounds}: keras ...", file=sys.stderr, flush=True)
        ref.append(run_json(ref_cmd))

    def med(rows: list[dict], key: str) -> float:
        return statistics.median(row[key] for row in rows)

    out = []
    for (p, compiled), rows in ours.items():
        out.append(
            {
                "model": model,
                "precision": rows[0]["precision"],
                "compile": compiled,
                "eanet_train_img_s": med(rows, "train_img_s"),
                "eanet_infer_img_s": med(rows, "infer_img_s"),
                "keras_train_img_s": med(ref, "train_img_s"),
                "keras_infer_img_s": med(ref, "infer_img_s"),
                "train_ratio": med(rows, "train_img_s") / med(ref, "train_img_s"),
                "infer_ratio": med(rows, "infer_img_s") / med(ref, "infer_img_s"),
                "matmul_peak_gflops": med(rows, "matmul_peak_gflops"),
                "matmul_peak_bf16_gflops": rows[0]["matmul_peak_bf16_gflops"],
                "eanet_train_fraction_of_peak": med(rows, "train_fraction_of_peak"),
                "eanet_infer_fraction_of_peak": med(rows, "infer_fraction_of_peak"),
                "keras_framework": ref[0]["framework"],
                "environment": rows[0]["environment"],
                "runs": {"eanet": rows, "keras": ref},
                "asked_precision": p,
            }
        )
    return out


def _verdict(ratio: float, target: float | None) -> str:
    if target is None:
        return f"{ratio:.2f}x"
    return f"{ratio:.2f}x ({'yes' if ratio >= target else 'no'}, target {target:g}x)"


def table(rows: list[dict], args: argparse.Namespace) -> str:
    """The markdown table of the comparison, naming the machine and its CPU flags."""
    env = rows[0]["environment"]
    flags = ", ".join(env.get("cpu_flags", [])) or "none of avx2/avx512/bf16/amx"
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {env.get('cpu_model', env['processor'])} "
        f"(CPU flags: {flags}; torch CPU capability {env.get('cpu_capability')}; "
        f"{env['cpu_count']} cores, {env['torch_threads']} torch threads), torch "
        f"{env['torch']} vs {rows[0]['keras_framework']} (fp32; the reference has no bf16 "
        f"path); batch {args.batch_size}, median of {args.steps} steps after {args.warmup} "
        f"warm-up, {args.rounds} alternating round(s); command: `python "
        f"benchmarks/compare_reference.py --rounds {args.rounds} --steps {args.steps} "
        f"--precisions {' '.join(args.precisions)}{' --compiled' if args.compiled else ''}`.",
        "",
        "| model | eanet precision | | eanet img/s | Keras fp32 img/s | ratio "
        "| eanet share of the matmul peak |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        targets = TARGETS.get((r["model"], r["precision"]), (None, None))
        peak = r["matmul_peak_bf16_gflops"] if r["precision"] == "bf16" else None
        peak = peak or r["matmul_peak_gflops"]
        for i, (kind, label) in enumerate((("train", "training step"), ("infer", "inference"))):
            lines.append(
                f"| {r['model']} | {r['precision']}{' + compile' if r.get('compile') else ''} "
                f"| {label} | {r[f'eanet_{kind}_img_s']:.1f} | "
                f"{r[f'keras_{kind}_img_s']:.1f} | {_verdict(r[f'{kind}_ratio'], targets[i])} | "
                f"{r[f'eanet_{kind}_fraction_of_peak']:.0%} of {peak:.0f} GFLOP/s "
                f"({r['precision']}) |"
            )
    return "\n".join(lines) + "\n"


def machine_class(env: dict) -> str:
    """'amx-bf16', 'avx512-bf16', 'avx512' or 'avx2': which results folder a run belongs to."""
    flags = set(env.get("cpu_flags", []))
    if "amx_bf16" in flags:
        return "amx-bf16"
    if "avx512_bf16" in flags:
        return "avx512-bf16"
    return "avx512" if "avx512f" in flags else "avx2"


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
    parser.add_argument(
        "--precisions",
        nargs="+",
        choices=["fp32", "bf16", "auto"],
        default=["fp32", "bf16"],
        help="eanet's precisions to time against Keras fp32 (default: fp32 bf16)",
    )
    parser.add_argument(
        "--compiled",
        action="store_true",
        help="also time each precision with `eanet bench --compile` (torch.compile of the "
        "training step and of the forward pass)",
    )
    args = parser.parse_args()
    rows = [row for m in args.models for row in measure(m, args)]
    folder = RESULTS / "cpu" / machine_class(rows[0]["environment"])
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (folder / f"{stamp}-reference.json").write_text(json.dumps(rows, indent=2) + "\n")
    md = table(rows, args)
    (folder / "reference_comparison.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
