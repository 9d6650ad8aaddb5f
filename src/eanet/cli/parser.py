"""The `eanet` argument parser: one sub-parser per command, option flags derived from configs.

Training options are `TrainConfig` fields (`eanet.options.option`); `train`, `compare`,
`bench`, `evaluate`, `predict` and `serve` take their flags from those declarations, so
each option is declared once: its name, type, choices, default and help.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from eanet import __version__
from eanet.choices import WEIGHTS
from eanet.cli.flags import RESUME_LEGEND, add_config_flags
from eanet.compare.config import PER_RUN, CompareConfig
from eanet.serve.config import ServeConfig
from eanet.train.config import DISTRIBUTED, GROUPS, RECIPE, RUN, TrainConfig

DATA = ("dataset", "data_path", "md5", "verify")  # where a data set comes from
RUNTIME = ("device", "precision", "accel", "compile")  # where and how the model computes
BENCHED = (
    "model",
    "model_args",
    "batch_size",
    "device",
    "threads",
    "compile",
    "compile_mode",
    "precision",
    "accel",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eanet",
        description="EANet (External Attention Transformer) and its ViT "
        "baseline: train, evaluate and inspect, faithful to the Keras example.",
    )
    parser.add_argument("--version", action="version", version=f"eanet {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show full tracebacks instead of one-line errors"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train_parser(sub)
    _add_evaluate_parser(sub)
    _add_demo_parser(sub)
    sub.add_parser("models", help="list the registered models")
    r = sub.add_parser(
        "recipes",
        help="list the training recipes for `eanet train --recipe NAME`",
        description="List the shipped training recipes (YAML files in the package): "
        "'reference' (the Keras example's, the default) and 'modern'.",
    )
    r.add_argument("--verbose", "-v", action="store_true", help="also show each value")
    _add_interop_parsers(sub)
    _add_use_parsers(sub)
    _add_bench_parser(sub)
    _add_compare_parser(sub)
    _add_serve_parser(sub)
    _add_attention_parser(sub)
    return parser


def _no_progress(p: argparse._ActionsContainer) -> None:
    p.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bars (the one-line log per epoch stays)",
    )


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    """The `train` command: every TrainConfig field under its group, plus where the run goes."""
    t = sub.add_parser(
        "train",
        help="train a model (the reference recipe by default)",
        usage="%(prog)s [--out DIR] [--dataset NAME] [--recipe NAME] [OPTION ...]",
        description="Train EANet or ViT. Defaults are the Keras example's recipe "
        "with its augmentation bug fixed (--recipe reference); --recipe modern: a published "
        "small-transformer recipe (see `eanet recipes`). Precedence: flags over --config FILE "
        "over --recipe NAME over the defaults. " + RESUME_LEGEND,
    )
    groups = {name: t.add_argument_group(name) for name in GROUPS}
    _add_run_flags(groups[RUN])
    groups[RECIPE].add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="options from a YAML or JSON file (a run's config.yaml reproduces the run); "
        "flags given on the command line override it",
    )
    add_config_flags(t, TrainConfig, show_resume=True, groups=groups)
    groups[DISTRIBUTED].description = (
        "Launched by torchrun (torchrun --nproc-per-node N -m eanet train ...), every process "
        "trains one model with DDP: --batch-size is over all processes, rank 0 alone writes "
        "the run directory, and --auto-resume lets torchrun --max-restarts restart the run."
    )


def _add_run_flags(g: argparse._ArgumentGroup) -> None:
    """`train`'s run directory: where it goes, resuming, overwriting, progress bars."""
    g.add_argument("--out", type=Path, help="run directory (default: runs/MODEL-DATASET-TIME)")
    g.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last complete epoch",
    )
    g.add_argument(
        "--auto-resume",
        action="store_true",
        help="resume --out if it holds a checkpoint, else start it (the same command can be "
        "re-run, e.g. by torchrun --max-restarts); refused if the run's options differ",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run files in an existing --out directory",
    )
    _no_progress(g)


def _weights_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--weights",
        choices=WEIGHTS,
        default="last",
        help="a run's weights: of the last epoch, of the best validation top-1 "
        "(best.safetensors), or their moving average (runs trained with --ema-decay) "
        "(default: %(default)s)",
    )


def _add_evaluate_parser(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "evaluate",
        help="test loss, top-1/top-5, per-class CSV, confusion PNG",
        description="Evaluate a run directory or checkpoint on its data set.",
    )
    e.add_argument("checkpoint", type=Path, metavar="RUN_DIR_OR_CHECKPOINT")
    _weights_flag(e)
    add_config_flags(e, TrainConfig, only=DATA, defaults={"dataset": "the run's"})
    add_config_flags(e, TrainConfig, only=RUNTIME, fill_defaults=True)
    e.add_argument(
        "--split",
        choices=["test", "val"],
        default="test",
        help="which split (default: %(default)s)",
    )
    e.add_argument("--out", type=Path, help="where to write the files (default: the run dir)")
    batch = {"eval_batch_size": "batch_size"}  # evaluate's one batch size: --batch-size
    add_config_flags(e, TrainConfig, only=["eval_batch_size"], fill_defaults=True, rename=batch)
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    _no_progress(e)


def _add_demo_parser(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser(
        "demo",
        help="offline demo: learn real handwritten digits, then the CIFAR-100 pipeline",
        description="Offline: train EANet on 1,797 real handwritten digits shipped in the "
        "package until it works, and show its predictions; then run the reference recipe on "
        "the shipped CIFAR-100 slice. It takes a few minutes on 2 CPU cores.",
    )
    m.add_argument(
        "--out",
        type=Path,
        help="the CIFAR-100 run's directory; the digits run goes to OUT/digits (default: "
        "runs/demo, or runs/demo-2, -3, ... when it exists)",
    )
    m.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the runs of an earlier demo in --out (their run files only)",
    )
    cifar_epochs = {"epochs": "4 for the CIFAR part; the digits part trains 8"}
    add_config_flags(m, TrainConfig, only=["epochs"], defaults=cifar_epochs)  # not given: None
    add_config_flags(m, TrainConfig, only=["seed", "device", "threads"], fill_defaults=True)
    _no_progress(m)


def _add_compare_parser(sub: argparse._SubParsersAction) -> None:
    """The `compare` command: CompareConfig's fields and the shared recipe's."""
    c = sub.add_parser(
        "compare",
        help="train models (and augmentation orders) side by side; report.md with plots",
        description="Train every model x augmentation order x seed under one recipe (runs in "
        "OUT/runs/MODEL-AUGMENT-seedK/), then write OUT/report.md, OUT/report.json and PNG "
        "figures: parameters, multiply-adds, train/inference img/s, best/final val and test "
        "top-1/top-5 as mean +- std over seeds, curves, and what the first layer sees under "
        "each order. Calling it again with the same --out skips finished runs and resumes "
        "interrupted ones.",
    )
    add_config_flags(c, CompareConfig)
    add_config_flags(c, TrainConfig, exclude=PER_RUN)
    c.add_argument("--out", type=Path, required=True, help="comparison directory")
    _no_progress(c)


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """The `bench` command: times the training step `train` runs with the same options."""
    b = sub.add_parser(
        "bench",
        help="training and inference throughput, peak memory",
        description="Time the training step (augmentation, forward, loss, backward, AdamW) "
        "that `eanet train` runs with the same options, and inference, on random "
        "CIFAR-shaped data: warm-up excluded, median of the timed steps. Also times large "
        "fp32 (and, where native, bf16) matmuls in the same run and reports the model's "
        "share of them.",
    )
    add_config_flags(b, TrainConfig, only=BENCHED)
    b.add_argument("--steps", type=int, default=10, help="timed steps (default: %(default)s)")
    b.add_argument("--warmup", type=int, default=3, help="untimed steps (default: %(default)s)")
    b.add_argument("--json", action="store_true", help="print the full result as JSON")
    b.add_argument(
        "--scaling",
        action="store_true",
        help="instead: time and activation memory per image of EANet vs ViT as the token "
        "count grows (patch 2, image sizes --sizes); prints a table, and with --out DIR "
        "writes it with a log-log plot",
    )
    b.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[32, 48, 64, 96],
        help="image sides for --scaling (default: %(default)s = 256..2304 tokens)",
    )
    b.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="--scaling only: write DIR/scaling.json, scaling.md and scaling.png (default: "
        "write nothing, print the table; the repository's figures are in "
        "benchmarks/results/scaling)",
    )


def _add_serve_parser(sub: argparse._SubParsersAction) -> None:
    """The `serve` command: every ServeConfig field."""
    s = sub.add_parser(
        "serve",
        help="serve a checkpoint over HTTP: POST /predict, /health, /info, an upload page",
        description="Serve a run directory or checkpoint with FastAPI + uvicorn: POST /predict "
        "(multipart files or raw image bytes, ?top_k=5) answers the top-k classes of each "
        "image as JSON; GET /health, GET /info, and GET / a page to upload an image. "
        "Concurrent requests share forward passes (dynamic batching). Needs: pip install "
        "'eanet[serve]'.",
    )
    s.add_argument("checkpoint", type=Path, metavar="RUN_DIR_OR_CHECKPOINT")
    add_config_flags(s, ServeConfig, exclude=["checkpoint"], fill_defaults=True)


def _add_use_parsers(sub: argparse._SubParsersAction) -> None:
    """The `predict`, `info` and `sample-images` commands."""
    p = sub.add_parser(
        "predict",
        help="top-k classes of image files or directories",
        description="Predict the classes of images: any file Pillow reads (PNG, JPEG, BMP, "
        "WebP, GIF, TIFF; grey, RGBA composited on black, palette, 16-bit), any size (the "
        "whole image resized to the model's input, no crop). Directories are walked "
        "recursively for image files. A file that cannot be read gets an error line on "
        "stderr, the others are still predicted, and the exit code is 1.",
    )
    p.add_argument("checkpoint", type=Path, metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    _weights_flag(p)
    p.add_argument("--top-k", type=int, default=5, help="classes per image (default: 5)")
    p.add_argument("--json", action="store_true", help="one JSON object per image and line")
    p.add_argument("--batch-size", type=int, default=64, help="default: %(default)s")
    add_config_flags(p, TrainConfig, only=RUNTIME, fill_defaults=True)

    i = sub.add_parser(
        "info",
        help="this machine's facts, or a model's parameters per layer and multiply-adds",
        description="Without an argument: this machine's torch version, CPU flags (avx2, "
        "avx512f, avx512_bf16, amx), threads, what --device auto and --precision auto "
        "resolve to, and which native CPU kernels run (compiled into $EANET_KERNELS). With "
        "one: describe a registered model or a checkpoint: parameters per layer (and the 7 "
        "normalization statistics), multiply-adds per image, its config, and the precision "
        "and kernels this machine would use.",
    )
    i.add_argument("target", nargs="?", metavar="MODEL_NAME_OR_CHECKPOINT")
    add_config_flags(i, TrainConfig, only=["model_args"])
    i.add_argument("--json", action="store_true", help="print the result as JSON")

    s = sub.add_parser(
        "sample-images",
        help="write the shipped CIFAR-100 slice as a folder of PNG images",
        description="Write real images to try the folder commands on: the CIFAR-100 slice "
        "shipped in the package as OUT/train/CLASS/*.png and OUT/test/CLASS/*.png.",
    )
    s.add_argument("out", type=Path, metavar="OUT")
    s.add_argument(
        "--classes",
        help="comma-separated class names (default: all 100), e.g. apple,bicycle,cloud",
    )
    s.add_argument(
        "--format", choices=["png", "jpg", "bmp", "webp"], default="png", help="default: png"
    )


def _add_attention_parser(sub: argparse._SubParsersAction) -> None:
    """The `attention` command: attention maps of images, a PNG and the tensors per image."""
    a = sub.add_parser(
        "attention",
        help="attention maps of images: EANet's memory units, ViT's rollout (PNG + tensors)",
        description="Write, for each image, OUT/NAME-attention.png (the image beside its "
        "maps) and OUT/NAME-attention.safetensors (the raw tensors). EANet: each block's "
        "attention of every memory unit over the patch grid (mean over heads); ViT: "
        "attention rollout over the patches after each block. Computed in float32 by the "
        "plain layers. Directories are walked for image files; a file that cannot be read "
        "gets an error line on stderr, the others are still drawn, and the exit code is 1.",
    )
    a.add_argument("checkpoint", type=Path, metavar="RUN_DIR_OR_CHECKPOINT")
    a.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    a.add_argument("--out", type=Path, required=True, metavar="DIR", help="where to write")
    a.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing OUT/NAME-attention.png and .safetensors files",
    )
    _weights_flag(a)
    add_config_flags(a, TrainConfig, only=["device"], fill_defaults=True)


def _add_interop_parsers(sub: argparse._SubParsersAction) -> None:
    """The `import-keras` and `export` commands."""
    k = sub.add_parser(
        "import-keras",
        help="convert the Keras example's trained EANet/ViT into an eanet checkpoint",
        description="Read a Keras 3 .keras or .weights.h5 file of the Keras example's EANet "
        "or ViT (detected from the weights), map every weight and the normalization "
        "statistics, and write an eanet checkpoint. Needs h5py: pip install 'eanet[keras]'.",
    )
    k.add_argument("file", type=Path, metavar="FILE", help=".keras or .weights.h5 file")
    k.add_argument(
        "out",
        type=Path,
        metavar="OUT",
        help="a .safetensors file, or a directory that gets checkpoint.safetensors",
    )
    k.add_argument(
        "--class-names",
        type=Path,
        metavar="FILE",
        help="text file, one class name per line (default: CIFAR-100's 100 fine labels)",
    )
    k.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint")

    x = sub.add_parser(
        "export",
        help="export a checkpoint to ONNX or TorchScript (checked against PyTorch)",
        description="Export a checkpoint with normalization inside: input 'pixels' float32 "
        "(B, 3, H, W), raw values 0..255; output 'probabilities' (B, classes); class names "
        "in the metadata. The file is written only if it matches PyTorch within the "
        "tolerance. ONNX needs: pip install 'eanet[export]'.",
    )
    x.add_argument("checkpoint", type=Path, metavar="RUN_DIR_OR_CHECKPOINT")
    _weights_flag(x)
    x.add_argument("--format", choices=["onnx", "torchscript"], required=True)
    x.add_argument("--out", type=Path, required=True, metavar="FILE", help="file to write")
    x.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing FILE (never the checkpoint read, nor a run's own files)",
    )
    x.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="largest allowed |difference| of probabilities vs PyTorch (default: %(default)s)",
    )


# --------------------------------------------------------------------------- commands
