"""The `eanet` command line: a thin layer over the library (train, evaluate, demo, models)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from eanet import __version__

log = logging.getLogger("eanet")


def _train_defaults() -> dict:
    from eanet.train.config import TrainConfig

    return TrainConfig().to_dict()


def _model_arg(text: str) -> tuple[str, object]:
    """KEY=VALUE with VALUE parsed as JSON when it can be (2, 0.1, true, null), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (e.g. depth=2)")
    lowered = value.lower()
    if lowered in ("true", "false", "null", "none"):
        value = lowered.replace("none", "null")
    try:
        return key.replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return key.replace("-", "_"), value


def _add_data_args(p: argparse.ArgumentParser, dataset_default: str | None) -> None:
    p.add_argument(
        "--dataset",
        choices=["cifar100", "cifar10", "folder", "digits", "synthetic"],
        default=dataset_default,
        help="data set; 'folder': your images, one subfolder per class, in --data-path; "
        "'digits': scikit-learn's 1,797 real digits at 32x32, a fixed quarter as test "
        "(needs scikit-learn); 'synthetic': random CIFAR-100-shaped images, only for "
        "timing the recipe (default: %(default)s)",
    )
    p.add_argument(
        "--data-path",
        help="CIFAR: archive (.tar.gz), extracted folder, or a directory "
        "holding the archive; default: $EANET_DATA or ~/.cache/eanet, downloaded "
        "there if missing. folder: the directory of class subfolders",
    )
    p.add_argument("--md5", help="expected md5 of an archive that is not the official one")
    p.add_argument(
        "--no-verify",
        dest="verify",
        action="store_const",
        const=False,
        default=None,
        help="skip the md5 check of a local archive you trust",
    )


def build_parser() -> argparse.ArgumentParser:
    d = _train_defaults()
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

    t = sub.add_parser(
        "train",
        help="train a model (the reference recipe by default)",
        description="Train EANet or ViT. Defaults are the Keras example's recipe "
        "with its augmentation bug fixed.",
    )
    t.add_argument(
        "--model",
        default=None,
        help=f"registered model (default: {d['model']}; see `eanet models`)",
    )
    t.add_argument(
        "--model-arg",
        action="append",
        type=_model_arg,
        default=None,
        metavar="KEY=VALUE",
        help="override a model config field, repeatable "
        "(e.g. --model-arg depth=2 --model-arg memory_size=64)",
    )
    _add_data_args(t, None)
    t.add_argument("--epochs", type=int, help=f"epochs (default: {d['epochs']})")
    t.add_argument("--batch-size", type=int, help=f"batch size (default: {d['batch_size']})")
    t.add_argument(
        "--eval-batch-size",
        type=int,
        help=f"batch size for validation/test (default: {d['eval_batch_size']})",
    )
    t.add_argument("--lr", type=float, help=f"AdamW learning rate, constant (default: {d['lr']})")
    t.add_argument(
        "--weight-decay",
        type=float,
        help=f"AdamW decoupled weight decay (default: {d['weight_decay']})",
    )
    t.add_argument(
        "--label-smoothing", type=float, help=f"label smoothing (default: {d['label_smoothing']})"
    )
    t.add_argument(
        "--val-fraction",
        type=float,
        help="fraction of the training set held out for validation, taken from its "
        f"end as Keras does (default: {d['val_fraction']})",
    )
    t.add_argument(
        "--augment",
        choices=["fixed", "reference-bug", "none"],
        help="'fixed': augment in pixel space, then normalise (default); "
        "'reference-bug': the Keras example's order (normalise, then contrast clipped "
        "to 0..255), only to reproduce its failure; 'none'",
    )
    t.add_argument("--seed", type=int, help=f"random seed (default: {d['seed']})")
    t.add_argument("--device", help="auto, cpu or cuda (default: auto)")
    t.add_argument("--threads", type=int, help="CPU threads for torch (default: one per core)")
    t.add_argument(
        "--compile",
        action="store_const",
        const=True,
        help="torch.compile the model for training (GPU; on a CPU compiling costs minutes)",
    )
    t.add_argument(
        "--amp",
        choices=["off", "bf16"],
        help="'bf16': bfloat16 autocast (+TF32 on CUDA), for GPUs; 'off': fp32 as the "
        "reference (default: off)",
    )
    t.add_argument(
        "--on-nonfinite",
        choices=["stop", "skip"],
        help="a NaN or infinite training loss: 'stop' training, keeping the last complete "
        "epoch's checkpoint (default), or 'skip' the batch (no optimizer step; counted in "
        "the history as skipped_batches)",
    )
    t.add_argument(
        "--deterministic",
        action="store_const",
        const=True,
        help="torch's deterministic algorithms, cuDNN deterministic, no benchmark, "
        "CUBLAS_WORKSPACE_CONFIG=:4096:8: repeatable GPU runs, maybe slower",
    )
    t.add_argument(
        "--image-size",
        type=int,
        help="--dataset folder: resize every whole image to this side (default: 32; with "
        "--init-from: the checkpoint's)",
    )
    t.add_argument(
        "--init-from",
        metavar="CHECKPOINT",
        help="fine-tune: start from every tensor of this run directory or checkpoint that "
        "fits (same name and shape); a new head when the classes differ; normalization "
        "statistics from the new data; its architecture unless --model/--model-arg is given",
    )
    t.add_argument(
        "--freeze-backbone",
        action="store_true",
        default=None,
        help="with --init-from: train only the classification head",
    )
    t.add_argument("--out", type=Path, help="run directory (default: runs/MODEL-DATASET-TIME)")
    t.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR "
        "from its last complete epoch (its saved options apply; --epochs may extend "
        "it; --data-path, --md5, --no-verify, --device, --threads, --on-nonfinite may change)",
    )
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run files in an existing --out directory",
    )
    t.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bars (the one-line log per epoch stays)",
    )

    e = sub.add_parser(
        "evaluate",
        help="test loss, top-1/top-5, per-class CSV, confusion PNG",
        description="Evaluate a run directory or checkpoint on its data set.",
    )
    e.add_argument("checkpoint", type=Path, metavar="RUN_DIR_OR_CHECKPOINT")
    _add_data_args(e, None)
    e.add_argument(
        "--split",
        choices=["test", "val"],
        default="test",
        help="which split (default: %(default)s)",
    )
    e.add_argument("--out", type=Path, help="where to write the files (default: the run dir)")
    e.add_argument("--batch-size", type=int, default=500, help="default: %(default)s")
    e.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.add_argument("--no-progress", dest="progress", action="store_false")

    m = sub.add_parser(
        "demo",
        help="offline demo on the CIFAR-100 slice shipped in the package",
        description="Train the reference EANet for a few epochs on the real "
        "CIFAR-100 slice in the package (no internet), evaluate it and show "
        "predictions with real class names.",
    )
    m.add_argument("--out", type=Path, help="run directory (default: runs/demo-TIME)")
    m.add_argument("--epochs", type=int, default=None, help="default: 4")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--device", default="auto")
    m.add_argument("--no-progress", dest="progress", action="store_false")

    sub.add_parser("models", help="list the registered models")
    _add_interop_parsers(sub)
    _add_use_parsers(sub)
    _add_bench_parser(sub)
    _add_compare_parser(sub)
    _add_serve_parser(sub)
    return parser


def _add_serve_parser(sub: argparse._SubParsersAction) -> None:
    """The `serve` command."""
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
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    s.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    s.add_argument(
        "--max-batch", type=int, default=64, help="images per forward pass (default: %(default)s)"
    )
    s.add_argument(
        "--max-wait-ms",
        type=float,
        default=5.0,
        help="how long a request waits for others to share its forward pass (default: %(default)s)",
    )
    s.add_argument(
        "--workers",
        type=int,
        default=1,
        help="uvicorn worker processes, each loading the model (default: %(default)s)",
    )
    s.add_argument(
        "--max-upload-mb",
        type=float,
        default=10.0,
        help="request body limit in MB, larger is refused with 413 (default: %(default)s)",
    )
    s.add_argument(
        "--max-images",
        type=int,
        default=64,
        help="images per request, more is refused with 413 (default: %(default)s)",
    )
    s.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    s.add_argument(
        "--threads",
        type=int,
        help="torch threads per worker (default: cores / workers - 1, at least 1: a core is "
        "left for HTTP and decoding)",
    )


def _add_compare_parser(sub: argparse._SubParsersAction) -> None:
    """The `compare` command."""
    d = _train_defaults()
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
    c.add_argument(
        "--models",
        nargs="+",
        default=["eanet-cifar", "vit-cifar"],
        metavar="MODEL",
        help="registered models (default: %(default)s; see `eanet models`)",
    )
    _add_data_args(c, d["dataset"])
    c.add_argument("--epochs", type=int, default=d["epochs"], help="default: %(default)s")
    c.add_argument(
        "--seeds", type=int, default=1, help="runs per model and order, seeds 0..K-1 (default: 1)"
    )
    c.add_argument(
        "--model-arg",
        action="append",
        type=_model_arg,
        default=None,
        metavar="KEY=VALUE",
        help="override a model config field of every model, repeatable (e.g. depth=2)",
    )
    c.add_argument(
        "--augment-orders",
        nargs="+",
        default=["fixed"],
        metavar="ORDER",
        help="'fixed' (pixel space, then normalise), 'reference-bug' (the Keras example's "
        "order), 'none' (default: fixed)",
    )
    c.add_argument("--batch-size", type=int, default=d["batch_size"], help="default: %(default)s")
    c.add_argument("--lr", type=float, default=d["lr"], help="default: %(default)s")
    c.add_argument(
        "--val-fraction", type=float, default=d["val_fraction"], help="default: %(default)s"
    )
    c.add_argument("--image-size", type=int, help="--dataset folder or digits: image side")
    c.add_argument(
        "--bench-steps",
        type=int,
        default=3,
        help="timed steps per model for img/s, 0 to skip (default: %(default)s)",
    )
    c.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    c.add_argument("--threads", type=int, help="CPU threads (default: one per core)")
    c.add_argument("--out", type=Path, required=True, help="comparison directory")
    c.add_argument("--no-progress", dest="progress", action="store_false")


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """The `bench` command."""
    b = sub.add_parser(
        "bench",
        help="training and inference throughput, peak memory",
        description="Time the training step (augmentation, forward, loss, backward, AdamW) and "
        "inference on random CIFAR-shaped data: warm-up excluded, median of the timed steps. "
        "Also times a large fp32 matmul in the same run and reports the model's share of it.",
    )
    b.add_argument("--model", default="eanet-cifar", help="default: %(default)s")
    b.add_argument("--batch-size", type=int, default=128, help="default: %(default)s")
    b.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    b.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="bfloat16 = autocast (default: %(default)s)",
    )
    b.add_argument("--compile", action="store_true", help="torch.compile the model")
    b.add_argument("--steps", type=int, default=10, help="timed steps (default: %(default)s)")
    b.add_argument("--warmup", type=int, default=3, help="untimed steps (default: %(default)s)")
    b.add_argument("--threads", type=int, help="CPU threads (default: one per core)")
    b.add_argument(
        "--model-arg",
        action="append",
        type=_model_arg,
        default=None,
        metavar="KEY=VALUE",
        help="override a model config field, repeatable",
    )
    b.add_argument("--json", action="store_true", help="print the full result as JSON")
    b.add_argument(
        "--scaling",
        action="store_true",
        help="instead: time and activation memory per image of EANet vs ViT as the token "
        "count grows (patch 2, image sizes --sizes); writes a table and a log-log plot",
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
        default=Path("benchmarks/results/scaling"),
        help="directory for the --scaling table and plot (default: %(default)s)",
    )


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
    p.add_argument("--top-k", type=int, default=5, help="classes per image (default: 5)")
    p.add_argument("--json", action="store_true", help="one JSON object per image and line")
    p.add_argument("--batch-size", type=int, default=64, help="default: %(default)s")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")

    i = sub.add_parser(
        "info",
        help="parameters per layer, multiply-adds per image, configuration",
        description="Describe a registered model or a checkpoint: parameters per layer "
        "(and the 7 normalization statistics), multiply-adds per image, its config.",
    )
    i.add_argument("target", metavar="MODEL_NAME_OR_CHECKPOINT")
    i.add_argument(
        "--model-arg",
        action="append",
        type=_model_arg,
        default=None,
        metavar="KEY=VALUE",
        help="override a field of a model name's config, repeatable",
    )
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
    x.add_argument("--format", choices=["onnx", "torchscript"], required=True)
    x.add_argument("--out", type=Path, required=True, metavar="FILE", help="file to write")
    x.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="largest allowed |difference| of probabilities vs PyTorch (default: %(default)s)",
    )


# --------------------------------------------------------------------------- commands


def cmd_train(args: argparse.Namespace) -> int:
    from eanet.train.config import TrainConfig
    from eanet.train.loop import fit
    from eanet.train.rundir import load_run_config

    if args.resume is not None:
        cfg = load_run_config(args.resume).to_dict()
        changeable = (
            *("epochs", "data_path", "md5", "verify", "device", "threads", "compile"),
            "on_nonfinite",
        )
        ignored = [
            k
            for k in (
                "model",
                "dataset",
                "batch_size",
                "lr",
                "weight_decay",
                "seed",
                "augment",
                "label_smoothing",
                "val_fraction",
                "model_arg",
                "image_size",
                "init_from",
                "freeze_backbone",
                "deterministic",
            )
            if getattr(args, k) is not None
        ]
        if ignored:
            log.warning("--resume keeps the run's own options; ignoring %s", ", ".join(ignored))
        cfg.update({k: getattr(args, k) for k in changeable if getattr(args, k) is not None})
        out, resume = args.resume, True
    else:
        cfg = _train_defaults()
        for key in cfg:
            value = getattr(args, key, None)
            if value is not None:
                cfg[key] = value
        cfg["model_args"] = dict(args.model_arg or [])
        if args.init_from is not None and args.model is None and not args.model_arg:
            from eanet.train.finetune import inherited_model

            # Fine-tune the checkpoint's own architecture; stored, so --resume rebuilds it.
            cfg["model"], cfg["model_args"], size = inherited_model(args.init_from)
            if cfg["dataset"] == "folder" and args.image_size is None:
                cfg["image_size"] = size
        out = args.out or Path("runs") / f"{cfg['model']}-{cfg['dataset']}-{_stamp()}"
        resume = False
    config = TrainConfig.from_dict(cfg)
    log.info("run directory: %s", out)
    metrics = fit(config, out, resume=resume, overwrite=args.overwrite, progress=args.progress)
    print(
        f"test top-1 {metrics['test_top1']:.2%}  top-5 {metrics['test_top5']:.2%}  "
        f"loss {metrics['test_loss']:.4f}  ({metrics['test_images']} images)  -> {out}"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from eanet.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(
        args.checkpoint,
        dataset=args.dataset,
        data_path=args.data_path,
        md5=args.md5,
        verify=args.verify,
        split=args.split,
        out_dir=args.out,
        batch_size=args.batch_size,
        device=args.device,
        progress=args.progress,
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        s = args.split
        print(
            f"{result['dataset']} {s}: loss {result[f'{s}_loss']:.4f}  top-1 "
            f"{result[f'{s}_top1']:.2%}  top-5 {result[f'{s}_top5']:.2%}  "
            f"({result['images']} images)"
        )
        for f in result["files"]:
            print(f"  wrote {f}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from eanet.demo import DEMO_EPOCHS, run_demo

    out = args.out or Path("runs") / f"demo-{_stamp()}"
    t0 = time.perf_counter()
    r = run_demo(
        out,
        epochs=args.epochs or DEMO_EPOCHS,
        seed=args.seed,
        device=args.device,
        progress=args.progress,
    )
    m = r["metrics"]
    print(
        f"\nTrained the reference EANet on {r['train_images']} real CIFAR-100 images "
        f"(the shipped slice; the full set has 50,000) for {m['epochs']} epochs."
    )
    print(
        f"test top-1 {m['test_top1']:.2%} top-5 {m['test_top5']:.2%} on "
        f"{m['test_images']} real test images (chance: {r['chance_top1']:.0%} / "
        f"{5 * r['chance_top1']:.0%}); a slice this small cannot teach 100 classes.\n"
    )
    print(f"{'#':>3}  {'true class':<16} top-3 predictions")
    for p in r["predictions"]:
        preds = "  ".join(f"{name} {prob:.1%}" for name, prob in p["top3"])
        print(f"{p['test_index']:>3}  {p['true']:<16} {preds}")
    print(
        f"\nRun directory: {out} (config, history, curves.png, checkpoint, metrics, "
        f"per-class CSV, confusion PNG); {time.perf_counter() - t0:.0f} s in all."
    )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from eanet.models.registry import MODELS, count_parameters, create_model

    for name, spec in MODELS.items():
        print(f"{name:<18} {count_parameters(create_model(name)):>9,} params  {spec.description}")
    return 0


def cmd_import_keras(args: argparse.Namespace) -> int:
    from eanet.interop.keras import import_keras, read_class_names

    names = read_class_names(args.class_names) if args.class_names else None
    s = import_keras(args.file, args.out, class_names=names, overwrite=args.overwrite)
    print(
        f"imported Keras {s['model']} ({s['depth']} blocks, {s['num_classes']} classes, "
        f"{s['parameters']:,} params + normalization statistics) -> {s['checkpoint']}"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from eanet.interop.export import export

    parity = export(args.checkpoint, args.format, args.out, tolerance=args.tolerance)
    print(parity.message(args.format))
    print(f"wrote {args.out}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from eanet import checkpoint
    from eanet.predict import Failure, check_top_k, expand_inputs, iter_predict_files
    from eanet.runtime import resolve_device

    check_top_k(args.top_k)
    model, ckpt = checkpoint.load_model(args.checkpoint, resolve_device(args.device))
    names = ckpt.class_names
    files, failures = expand_inputs(args.inputs)
    for f in failures:
        print(f"eanet: error: {f.source}: {f.reason}", file=sys.stderr)
    k = min(args.top_k, len(names))
    file_w = max((len(str(f)) for f in files), default=4) + 2
    cell_w = max(len(n) for n in names) + 9
    if files and not args.json:
        header = "".join(f"{f'top-{j + 1}':<{cell_w}}" for j in range(k))
        print(f"{'file':<{file_w}}{header}".rstrip())
    done = 0
    for r in iter_predict_files(model, names, files, args.top_k, args.batch_size):
        if isinstance(r, Failure):
            failures.append(r)
            print(f"eanet: error: {r.source}: {r.reason}", file=sys.stderr)
        elif args.json:
            print(json.dumps(r.to_dict()), flush=True)
            done += 1
        else:
            cells = (f"{c} {p:.1%}" for c, p in zip(r.classes, r.probabilities, strict=True))
            print(f"{r.source:<{file_w}}" + "".join(f"{c:<{cell_w}}" for c in cells).rstrip())
            done += 1
    if failures:
        print(f"eanet: {done} image(s) predicted, {len(failures)} failed", file=sys.stderr)
        return 1
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from eanet.info import describe, format_info

    info = describe(args.target, **dict(args.model_arg or []))
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def cmd_sample_images(args: argparse.Namespace) -> int:
    from eanet.data.cifar import SAMPLE_ARCHIVE, SAMPLE_MD5
    from eanet.data.folders import write_image_folder
    from eanet.data.load import load_dataset
    from eanet.errors import EANetError

    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise EANetError(f"{args.out} exists and is not an empty directory; choose a new OUT")
    data = load_dataset("cifar100", SAMPLE_ARCHIVE, md5=SAMPLE_MD5, progress=False)
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    counts = write_image_folder(data, args.out, classes=classes, fmt=args.format)
    n = len(classes) if classes else data.num_classes
    print(
        f"wrote {counts['train']} train and {counts['test']} test images of {n} classes "
        f"(real CIFAR-100, 32x32 {args.format}) to {args.out}/train/ and {args.out}/test/"
    )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from eanet.bench import bench_model

    if args.scaling:
        return _bench_scaling(args)
    r = bench_model(
        args.model,
        args.batch_size,
        args.device,
        args.dtype,
        args.compile,
        args.warmup,
        args.steps,
        args.threads,
        dict(args.model_arg or []),
    )
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    env = r["environment"]
    print(
        f"{r['model']} batch {r['batch_size']} {r['dtype']} on {r['device']} "
        f"({env.get('cuda') or env.get('cpu_model', env['processor'])}, "
        f"{env['torch_threads']} threads, torch {env['torch']}"
        f"{', compiled' if r['compile'] else ''})"
    )
    print(
        f"  train     {r['train_img_s']:9.1f} img/s  {r['train_gflops']:7.1f} GFLOP/s  "
        f"{r['train_fraction_of_peak']:.0%} of matmul peak"
    )
    print(
        f"  inference {r['infer_img_s']:9.1f} img/s  {r['infer_gflops']:7.1f} GFLOP/s  "
        f"{r['infer_fraction_of_peak']:.0%} of matmul peak"
    )
    print(
        f"  matmul peak {r['matmul_peak_gflops']:.1f} GFLOP/s; {r['peak_memory_kind']} "
        f"{r['peak_memory_mb']:.0f} MB; forward {r['forward_macs_per_image'] / 1e9:.3f} "
        f"GMACs/image"
    )
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from eanet.compare.config import CompareConfig
    from eanet.compare.run import run_compare

    cfg = CompareConfig(
        models=args.models,
        dataset=args.dataset,
        data_path=args.data_path,
        md5=args.md5,
        verify=args.verify is not False,
        epochs=args.epochs,
        seeds=args.seeds,
        model_args=dict(args.model_arg or []),
        augment_orders=args.augment_orders,
        batch_size=args.batch_size,
        lr=args.lr,
        val_fraction=args.val_fraction,
        image_size=args.image_size,
        bench_steps=args.bench_steps,
        device=args.device,
        threads=args.threads,
    )
    report = run_compare(cfg, args.out, progress=args.progress)
    done = list(report["runs"].values())
    print(
        f"{len(done)} runs ({done.count('skipped')} finished earlier, "
        f"{done.count('resumed')} resumed) in {report['invocation_seconds']:.0f} s"
    )
    for g in report["groups"]:
        s = g["summary"]
        print(
            f"  {g['model']:<16} {g['augment']:<14} {g['params']:>9,} params  "
            f"best val top-1 {s['best_val_top1']['mean']:.1%}  "
            f"test top-1 {s['test_top1']['mean']:.1%}  top-5 {s['test_top5']['mean']:.1%}"
        )
    print(f"report: {args.out / 'report.md'}")
    return 0


def _bench_scaling(args: argparse.Namespace) -> int:
    from eanet.bench import scaling
    from eanet.fileio import write_json, write_text
    from eanet.plots import plot_scaling
    from eanet.runtime import environment

    rows = scaling(tuple(args.sizes), batch_size=2, device=args.device)
    lines = [
        "| tokens | image | model | inference ms/img | train ms/img | activations MB/img "
        "| forward GMACs/img |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tokens']} | {r['image_size']}x{r['image_size']} | {r['model']} | "
            f"{r['infer_ms_per_image']:.1f} | {r['train_ms_per_image']:.1f} | "
            f"{r['activation_mb_per_image']:.1f} | {r['forward_gmacs_per_image']:.3f} |"
        )
    table = "\n".join(lines) + "\n"
    write_json(args.out / "scaling.json", {"rows": rows, "environment": environment()})
    write_text(args.out / "scaling.md", table)
    plot_scaling(rows, args.out / "scaling.png")
    print(table)
    print(f"wrote {args.out}/scaling.json, scaling.md, scaling.png")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from eanet.serve.config import ServeConfig, check_dependencies
    from eanet.serve.server import serve

    check_dependencies()
    config = ServeConfig(
        checkpoint=str(args.checkpoint),
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        workers=args.workers,
        max_upload_mb=args.max_upload_mb,
        max_images=args.max_images,
        device=args.device,
        threads=args.threads,
    )
    serve(config)
    return 0


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


COMMANDS = {
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "demo": cmd_demo,
    "models": cmd_models,
    "import-keras": cmd_import_keras,
    "export": cmd_export,
    "predict": cmd_predict,
    "info": cmd_info,
    "bench": cmd_bench,
    "sample-images": cmd_sample_images,
    "compare": cmd_compare,
    "serve": cmd_serve,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `eanet` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from eanet.errors import EANetError

    try:
        return COMMANDS[args.command](args)
    except EANetError as exc:
        if args.debug:
            raise
        print(f"eanet: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # training's own says how to resume
        print(f"eanet: {exc or 'interrupted'}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`eanet predict DIR | head`): stop quietly, as Unix tools do;
        # pointing stdout at devnull stops Python's own complaint when it flushes at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
