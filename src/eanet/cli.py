"""The `eanet` command line: a thin layer over the library (train, evaluate, demo, models)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from eanet import __version__

log = logging.getLogger("eanet")


def _train_defaults() -> dict:
    from eanet.train import TrainConfig

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
        choices=["cifar100", "cifar10"],
        default=dataset_default,
        help="data set (default: %(default)s)",
    )
    p.add_argument(
        "--data-path",
        help="archive (.tar.gz), extracted folder, or a directory "
        "holding the archive; default: $EANET_DATA or ~/.cache/eanet, downloaded "
        "there if missing",
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
    t.add_argument("--out", type=Path, help="run directory (default: runs/MODEL-DATASET-TIME)")
    t.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR "
        "from its last complete epoch (its saved options apply; --epochs may extend "
        "it; --data-path, --device, --threads may change)",
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
    return parser


# --------------------------------------------------------------------------- commands


def cmd_train(args: argparse.Namespace) -> int:
    from eanet.train import TrainConfig, fit, load_run_config

    if args.resume is not None:
        cfg = load_run_config(args.resume).to_dict()
        changeable = ("epochs", "data_path", "device", "threads")
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
    from eanet.models import MODELS, count_parameters, create_model

    for name, spec in MODELS.items():
        print(f"{name:<18} {count_parameters(create_model(name)):>9,} params  {spec.description}")
    return 0


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "demo": cmd_demo, "models": cmd_models}


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
    except KeyboardInterrupt:
        print("eanet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
