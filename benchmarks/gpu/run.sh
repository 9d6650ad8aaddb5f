#!/usr/bin/env bash
# Every GPU check of eanet in one command, for one lent CUDA machine (docs/gpu.md).
#
#   bash benchmarks/gpu/run.sh [--dry-run] [--only STEPS] [--epochs N] [--compile-mode MODE]
#
# Steps, in order, each time-boxed with `timeout`, each writing under $OUT as it goes
# (default OUT=./gpu-out):
#   install  pip install --no-deps --no-build-isolation -e .   (PYTHONPATH=src covers a failure)
#   tests    pytest -m cuda tests/test_cuda.py                  -> pytest-cuda.xml, tests.log
#   probe    eanet bench of EANet bf16 batch 128 under each torch.compile mode
#            -> compile_modes.json; the fastest training step picks the recipe's mode
#   recipe   the 50-epoch reference recipe end to end on --dataset synthetic (40,000
#            training images, batch 128, validation every epoch): EANet bf16, EANet
#            fp32 with TF32, ViT bf16, ViT fp32 with TF32, all compiled in that mode
#            -> recipe.json, runs/*/history.json
#   bench    eanet bench, both models, batch 128 and 1024, fp32 and bf16 -> bench.json
#   summary  benchmarks/gpu/summarize.py -> table.md
# steps.tsv has each step's exit status and seconds; STEP.log its output.
#
# --dry-run: the same steps at tiny sizes on the CPU (2 epochs, 100 synthetic images, a
# 1-block width-32 model, one bench batch size, no install, no compile probe: inductor on
# a CPU takes minutes), so CI can run the script (tests/test_gpu_script.py).
# --only tests,recipe: a subset of the steps (e.g. to split the work over two calls).
# Time limits (seconds) per step or per run: T_INSTALL T_TESTS T_PROBE T_RUN T_BENCH (T_DRY
# for each step of a dry run).
# Exit status: 0 if every step that ran exited 0, else 1.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT" || exit 2
DRY=0
ONLY="install,tests,probe,recipe,bench,summary"
EPOCHS=50
MODE=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --only) ONLY="$2,summary"; shift ;;
        --epochs) EPOCHS="$2"; shift ;;
        --compile-mode) MODE="$2"; shift ;;
        -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
        *) echo "run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

OUT=${OUT:-./gpu-out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
PYTHON=${PYTHON:-python}
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
RUNS="$PYTHON benchmarks/gpu/runs.py"
FAILED=0

wanted() { case ",$ONLY," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

# step NAME LIMIT_S COMMAND...: run it under timeout, output to NAME.log, row in steps.tsv
step() {
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/$name.log"
    timeout --kill-after=20 "$limit" "$@" >>"$OUT/$name.log" 2>&1
    rc=$?
    [ "$rc" = 124 ] && echo "== $name: stopped at its ${limit}s limit" | tee -a "$OUT/$name.log"
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - start))" >>"$OUT/steps.tsv"
    tail -n 3 "$OUT/$name.log"
    [ "$rc" = 0 ] || FAILED=1
    return "$rc"
}

skipped() { printf '%s\tskipped: %s\t0\n' "$1" "$2" >>"$OUT/steps.tsv"; echo "== $1 skipped: $2"; }

if [ "$DRY" = 1 ]; then
    DEVICE=cpu
    TINY=(--threads 1 --model-arg depth=1 --model-arg dim=32 --model-arg mlp_dim=32)
    DATA=(--synthetic-images 100)
    EPOCHS=2
    BATCHES=(16)
    BENCH_STEPS=(--steps 1 --warmup 0)
    # A dry run's limits only catch a hang: bf16 is emulated (about 100x slower matmuls) on
    # CPUs without avx512_bf16 or AMX, and CI machines are shared.
    DRY_LIMIT=${T_DRY:-900}
else
    DEVICE=cuda
    TINY=()
    DATA=()
    BATCHES=(128 1024)
    BENCH_STEPS=(--steps 20 --warmup 5)
fi

# --------------------------------------------------------------------------- machine
{
    echo "date: $(date -u +%FT%TZ)  dry_run: $DRY  epochs: $EPOCHS"
    command -v nvidia-smi >/dev/null && nvidia-smi
    $PYTHON -c 'import sys, torch; print(sys.version); print("torch", torch.__version__,
"cuda", torch.version.cuda, "available", torch.cuda.is_available(),
torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")'
} >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

if wanted install; then
    if [ "$DRY" = 1 ]; then
        skipped install "dry run uses PYTHONPATH=src"
    else
        step install "${T_INSTALL:-180}" $PYTHON -m pip install --no-deps --no-build-isolation -e .
    fi
fi

if wanted tests; then
    step tests "${T_TESTS:-420}" $PYTHON -m pytest -m cuda tests/test_cuda.py -q -rs \
        -p no:cacheprovider --junitxml="$OUT/pytest-cuda.xml"
fi

# --------------------------------------------------------------------------- compile mode
if wanted probe && [ -z "$MODE" ]; then
    if [ "$DRY" = 1 ]; then
        skipped probe "inductor on a CPU compiles for minutes; the dry run trains eager"
        MODE=none
    else
        for m in default max-autotune reduce-overhead; do
            step "probe-$m" "${T_PROBE:-300}" $RUNS bench --json "$OUT/compile_modes.json" \
                --run "eanet-cifar,bf16,128,$m" -- --device "$DEVICE" --steps 30 --warmup 10
        done
        MODE=$($RUNS best-mode "$OUT/compile_modes.json")
    fi
fi
MODE=${MODE:-default}
[ "$DRY" = 1 ] && MODE=none
echo "compile mode of the recipe: $MODE" | tee -a "$OUT/machine.txt"

# --------------------------------------------------------------------------- recipe
RECIPE_RUNS=("eanet-cifar,bf16,$MODE" "eanet-cifar,fp32-tf32,$MODE" "vit-cifar,bf16,$MODE"
    "vit-cifar,fp32-tf32,$MODE")
RECIPE_COMMON=(--dataset synthetic --device "$DEVICE" --epochs "$EPOCHS" --batch-size 128
    "${DATA[@]}" "${TINY[@]}")
if wanted recipe; then
    if [ "$DRY" = 1 ]; then  # one process: the torch import once
        args=()
        for r in "${RECIPE_RUNS[@]}"; do args+=(--run "$r"); done
        step recipe "$DRY_LIMIT" $RUNS recipe --json "$OUT/recipe.json" --runs "$OUT/runs" "${args[@]}" \
            -- "${RECIPE_COMMON[@]}"
    else  # a process and a time limit per run
        for r in "${RECIPE_RUNS[@]}"; do
            step "recipe-${r//,/-}" "${T_RUN:-600}" $RUNS recipe --json "$OUT/recipe.json" \
                --runs "$OUT/runs" --run "$r" -- "${RECIPE_COMMON[@]}"
        done
    fi
fi

# --------------------------------------------------------------------------- bench
BENCH_RUNS=()
for model in eanet-cifar vit-cifar; do
    for batch in "${BATCHES[@]}"; do
        for precision in fp32 bf16; do BENCH_RUNS+=("$model,$precision,$batch,none"); done
    done
done
BENCH_COMMON=(--device "$DEVICE" "${BENCH_STEPS[@]}" "${TINY[@]}")
if wanted bench; then
    if [ "$DRY" = 1 ]; then
        args=()
        for r in "${BENCH_RUNS[@]}"; do args+=(--run "$r"); done
        step bench "$DRY_LIMIT" $RUNS bench --json "$OUT/bench.json" "${args[@]}" -- "${BENCH_COMMON[@]}"
    else
        for r in "${BENCH_RUNS[@]}"; do
            step "bench-${r//,/-}" "${T_BENCH:-120}" $RUNS bench --json "$OUT/bench.json" \
                --run "$r" -- "${BENCH_COMMON[@]}"
        done
    fi
fi

# --------------------------------------------------------------------------- summary
# compile caches and checkpoints are large and say nothing the JSON files do not
rm -rf "$OUT"/runs/*-caches "$OUT/bench-caches"
find "$OUT" -name '*.safetensors' -delete 2>/dev/null
if wanted summary; then
    step summary 60 $PYTHON benchmarks/gpu/summarize.py "$OUT"
fi
echo "results in $OUT (steps.tsv, table.md)"
exit "$FAILED"
