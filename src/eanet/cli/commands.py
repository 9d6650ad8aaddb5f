"""The `eanet` commands: each turns parsed arguments into one library call and prints the result.

Each command imports what it runs (torch among it) only once it has said what it is doing:
this module loads without torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from eanet.cli.checks import check_checkpoint, check_data_path, check_image_inputs, check_positive
from eanet.cli.flags import given
from eanet.errors import ConfigError, one_line, printable
from eanet.fileio import SHIPPED_MODELS, shipped_model
from eanet.options import declared
from eanet.train.config import TrainConfig
from eanet.train.recipes import load_recipe
from eanet.train.resolve import recipe_values, resolve_config

if TYPE_CHECKING:  # the demo's modules load only when `eanet demo` runs
    from eanet.demo import DemoPart, ShippedPart

log = logging.getLogger("eanet")


def train_config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, Path, bool]:
    """(config, run directory, resume?) of `eanet train`: `eanet.train.resolve.resolve_config`
    of the flags given, --config FILE, --out, --resume and --auto-resume."""
    return resolve_config(
        given(args, TrainConfig),
        args.config or None,
        out=args.out,
        resume=args.resume,
        auto_resume=args.auto_resume,
        overwrite=args.overwrite,
    )


def cmd_recipes(args: argparse.Namespace) -> int:
    from eanet.train.recipes import describe_recipe, recipe_names, recipe_path

    for name in recipe_names():
        print(f"{name:<12} {describe_recipe(name)}")
        if args.verbose:
            print(f"{'':<12} {recipe_path(name)}")
            for key, value in load_recipe(name).items():
                print(f"{'':<14}{key}: {value}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    config, out, resume = train_config_from_args(args)
    check_data_path(config.dataset, config.data_path)
    out = Path(out)
    log.info("run directory: %s", out)
    from eanet.train.loop import fit
    from eanet.train.rundir import finished_epochs, refuse_input_in_run

    done = finished_epochs(out, config.epochs) if resume else None
    if done is not None:  # nothing to train: the test is not run again
        print(
            f"{out} is complete: {done} epochs trained and tested (metrics.json); to train "
            f"it longer: eanet train --resume {out} --epochs N, with N > {done}"
        )
        return 0
    if not resume and args.config:
        refuse_input_in_run(out, [args.config], "--config")
    # --auto-resume starting a run again replaces what a kill before epoch 1 left (its
    # config.json was found equal to the options asked for)
    restart = args.auto_resume and not resume and (out / "config.json").is_file()
    overwrite = args.overwrite or restart
    metrics = fit(config, out, resume=resume, overwrite=overwrite, progress=args.progress)
    print(score_lines(metrics, out))
    return 0


def score_lines(metrics: dict, out: Path) -> str:
    """`train`'s last lines: the test scores of each weights the run kept, named plainly."""
    from eanet.checkpoint import BEST_NAME, CHECKPOINT_NAME

    kept = [("test", f"last weights: epoch {metrics['epochs']}, {CHECKPOINT_NAME}")]
    if "best_epoch" in metrics:
        best = f"best weights: epoch {metrics['best_epoch']} (best val top-1), {BEST_NAME}"
        kept.append(("best_test", best))
    if "ema_test_top1" in metrics:
        kept.append(("ema_test", f"EMA weights: their moving average, in {CHECKPOINT_NAME}"))
    lines = [
        f"test top-1 {metrics[f'{key}_top1']:.2%}  top-5 {metrics[f'{key}_top5']:.2%}  "
        f"loss {metrics[f'{key}_loss']:.4f}  {name}"
        for key, name in kept
    ]
    return "\n".join([*lines, f"({metrics['test_images']} test images) -> {out}"])


def cmd_evaluate(args: argparse.Namespace) -> int:
    check_checkpoint(args.checkpoint, args.weights, "eanet evaluate RUN_DIR_OR_CHECKPOINT")
    if args.out is None and shipped_model(args.checkpoint):
        raise ConfigError(
            f"{args.checkpoint} is a model shipped in the package: give --out DIR for the reports"
        )
    check_positive("--batch-size", args.batch_size)
    check_data_path(args.dataset, args.data_path)
    data = args.dataset or "its data set"
    log.info(
        "evaluating %s (%s weights) on %s, %s split",
        args.checkpoint,
        args.weights,
        data,
        args.split,
    )
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
        precision=args.precision,
        weights=args.weights,
        compile=args.compile,
        accel=args.accel,
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        s = args.split
        print(
            f"{printable(result['dataset'])} {s}: loss {result[f'{s}_loss']:.4f}  top-1 "
            f"{result[f'{s}_top1']:.2%}  top-5 {result[f'{s}_top5']:.2%}  "
            f"({result['images']} images)"
        )
        for f in result["files"]:
            print(f"  wrote {f}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    TrainConfig().with_overrides(given(args, TrainConfig))  # the declared ranges (--epochs 0)
    out = args.out or unused_dir(Path("runs") / "demo")
    log.info("demo: part 1 (digits) in %s, part 2 (CIFAR-100) in %s", out / "digits", out)
    t0 = time.perf_counter()
    from eanet.demo import DEMO_EPOCHS, run_demo

    r = run_demo(
        out,
        epochs=DEMO_EPOCHS if args.epochs is None else args.epochs,
        seed=args.seed,
        device=args.device,
        threads=args.threads,
        progress=args.progress,
        overwrite=args.overwrite,
    )
    _print_demo_digits(r.digits)
    _print_demo_cifar(r.cifar)
    _print_demo_shipped(r.shipped)
    threads = f"{r.torch_threads} thread" + ("s" if r.torch_threads > 1 else "")
    print(
        f"\nRuns in {out}/digits (part 1) and {out} (part 2); "
        f"{time.perf_counter() - t0:.0f} s in all, {threads}."
    )
    return 0


def _print_demo_digits(part: DemoPart) -> None:
    """Part 1 of the demo: it learns, shown on held-out images it never trained on."""
    m = part.metrics
    print(
        f"\n1. Learning. A 2-block EANet trained {m['epochs']} epochs ({part.seconds:.0f} s) on "
        f"{part.train_images:,} real handwritten\n   digits (8x8, shipped in the package).\n"
        f"   Held-out top-1 {m['test_top1']:.1%} on {m['test_images']} digits it never saw "
        f"(chance: {part.chance_top1:.0%}).\n"
    )
    print(f"   {'#':>3}  true  predicted  probability")
    _print_top1(part.predictions, "{:>4}  {:>9}")
    right = sum(p.correct for p in part.predictions)
    print(f"   {right} of the {len(part.predictions)} shown are right.")


def _print_top1(predictions: list, columns: str) -> None:
    """One line per prediction: index, true and predicted class (`columns` lays the two
    out), probability, and whether it is right."""
    for p in predictions:
        name, prob = p.top[0]
        mark = "ok" if p.correct else "WRONG"
        print(f"   {p.test_index:>3}  {columns.format(p.true, name)}  {prob:>11.1%}  {mark}")


def _print_demo_cifar(part: DemoPart) -> None:
    """Part 2 of the demo: the full pipeline on real CIFAR-100, too few images to learn."""
    m = part.metrics
    print(
        f"\n2. Pipeline. The reference EANet and recipe, {m['epochs']} epochs "
        f"({part.seconds:.0f} s), on {part.train_images} real CIFAR-100\n"
        "   images (the shipped slice; the full set has 50,000).\n"
        f"   Test top-1 {m['test_top1']:.2%}, top-5 {m['test_top5']:.2%} on {m['test_images']} "
        f"real test images (chance: {part.chance_top1:.0%} / {5 * part.chance_top1:.0%}).\n"
        "   This slice is far too small to learn 100 classes: this part shows the files,\n"
        "   reports and predictions that a real run produces, not accuracy.\n"
    )
    print(f"   {'#':>3}  {'true class':<16} top-3 predictions")
    for p in part.predictions:
        preds = "  ".join(f"{name} {prob:.1%}" for name, prob in p.top)
        print(f"   {p.test_index:>3}  {p.true:<16} {preds}")
    print(
        f"   In {part.run_dir}: config, history, curves.png, checkpoint, metrics,\n"
        "   per-class CSV, confusion PNG."
    )


def _print_demo_shipped(part: ShippedPart) -> None:
    """Part 3 of the demo: a trained model on real photos, nothing trained."""
    print(
        f"\n3. A trained model. The EANet shipped as `{part.name}` (trained on Fashion-MNIST's\n"
        f"   training photos) on {part.photos:,} real test photos shipped beside it:\n"
        f"   top-1 {part.top1:.1%} ({part.seconds:.1f} s, nothing trained; chance: 10%).\n"
    )
    print(f"   {'#':>3}  {'true':<12} {'predicted':<12} probability")
    _print_top1(part.predictions, "{:<12} {:<12}")
    print(f"   These photos are in {part.folder}: eanet predict {part.name} {part.folder}")


def cmd_models(args: argparse.Namespace) -> int:
    print(f"{'model':<18} {'parameters':>16}  description", flush=True)  # before torch loads
    from eanet import checkpoint
    from eanet.models.registry import MODELS, count_parameters, create_model

    for name, spec in MODELS.items():
        print(f"{name:<18} {count_parameters(create_model(name)):>9,} params  {spec.description}")
    print("\ntrained, shipped in the package (a name for predict, serve, attention, eanet.load):")
    for name, path in SHIPPED_MODELS.items():
        meta = checkpoint.load(path).meta
        test = meta.extra.get("test", {})
        print(
            f"{name:<18} {meta.model_name} trained on {meta.train_config['dataset']}, "
            f"test top-1 {test.get('test_top1', float('nan')):.2%}"
        )
    return 0


def cmd_import_keras(args: argparse.Namespace) -> int:
    log.info("importing %s -> %s", args.file, args.out)
    from eanet.interop.keras import import_keras, read_class_names

    names = read_class_names(args.class_names) if args.class_names else None
    s = import_keras(args.file, args.out, class_names=names, overwrite=args.overwrite)
    print(
        f"imported Keras {s['model']} ({s['depth']} blocks, {s['num_classes']} classes, "
        f"{s['parameters']:,} params + normalization statistics) -> {s['checkpoint']}"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    check_checkpoint(args.checkpoint, args.weights, "eanet export RUN_DIR_OR_CHECKPOINT --out FILE")
    log.info(
        "exporting %s (%s weights) to %s: %s", args.checkpoint, args.weights, args.format, args.out
    )
    from eanet.interop.export import export

    parity = export(
        args.checkpoint,
        args.format,
        args.out,
        tolerance=args.tolerance,
        weights=args.weights,
        overwrite=args.overwrite,
    )
    print(parity.message(args.format))
    print(f"wrote {args.out}")
    return 0


PREDICT_USAGE = "eanet predict RUN_DIR_OR_CHECKPOINT IMAGE_OR_DIR [IMAGE_OR_DIR ...]"


def cmd_predict(args: argparse.Namespace) -> int:
    check_checkpoint(args.checkpoint, args.weights, PREDICT_USAGE)
    check_image_inputs(args.inputs, PREDICT_USAGE)
    check_positive("--top-k", args.top_k)
    check_positive("--batch-size", args.batch_size)
    log.info("predicting with %s (%s weights)", args.checkpoint, args.weights)
    from eanet import checkpoint
    from eanet.inference import Runtime
    from eanet.predict import Failure, expand_inputs, iter_predict_files

    rt = Runtime.resolve(args.device, args.precision, args.accel, args.compile)
    model, ckpt = checkpoint.load_model(args.checkpoint, rt.device, args.weights)
    runner = rt.prepare(model).runner
    names = ckpt.class_names
    files, failures = expand_inputs(args.inputs)
    for f in failures:
        print(f"eanet: error: {one_line(f'{f.source}: {f.reason}')}", file=sys.stderr)
    k = min(args.top_k, len(names))
    shown = {n: printable(n) for n in names}  # an escape sequence, a newline: as escapes
    file_w = max((len(printable(str(f))) for f in files), default=4) + 2
    cell_w = max(len(n) for n in shown.values()) + 9
    header = "".join(f"{f'top-{j + 1}':<{cell_w}}" for j in range(k))
    done = 0
    for r in iter_predict_files(runner, names, files, args.top_k, args.batch_size, rt.precision):
        if isinstance(r, Failure):
            failures.append(r)
            print(f"eanet: error: {one_line(f'{r.source}: {r.reason}')}", file=sys.stderr)
        elif args.json:
            print(json.dumps(r.to_dict()), flush=True)
            done += 1
        else:
            if not done:  # the header over the first row: none when every file failed
                print(f"{'file':<{file_w}}{header}".rstrip())
            cells = (f"{shown[c]} {p:.1%}" for c, p in zip(r.classes, r.probabilities, strict=True))
            source = printable(r.source)
            print(f"{source:<{file_w}}" + "".join(f"{c:<{cell_w}}" for c in cells).rstrip())
            done += 1
    if failures:
        print(f"eanet: {done} image(s) predicted, {len(failures)} failed", file=sys.stderr)
        return 1
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from eanet.info import describe, format_info, format_machine, machine_info

    if args.target is None:  # the machine itself
        if args.model_args:
            raise ConfigError("--model-arg needs a MODEL_NAME_OR_CHECKPOINT to apply to")
        machine = machine_info()
        print(json.dumps(machine, indent=2) if args.json else format_machine(machine))
        return 0
    info = describe(args.target, **dict(args.model_args or []))
    info["machine"] = machine_info()
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def cmd_sample_images(args: argparse.Namespace) -> int:
    log.info("writing the shipped CIFAR-100 slice to %s", args.out)
    from eanet.data.cifar import SAMPLE_ARCHIVE, SAMPLE_MD5
    from eanet.data.folders import write_image_folder
    from eanet.data.load import load_dataset
    from eanet.errors import EANetError
    from eanet.fileio import atomic_directory

    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise EANetError(f"{args.out} exists and is not an empty directory; choose a new OUT")
    data = load_dataset("cifar100", SAMPLE_ARCHIVE, md5=SAMPLE_MD5, progress=False)
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    with atomic_directory(args.out) as tmp:  # all the images or none
        counts = write_image_folder(data, tmp, classes=classes, fmt=args.format)
    n = len(classes) if classes else data.num_classes
    print(
        f"wrote {counts['train']} train and {counts['test']} test images of {n} classes "
        f"(real CIFAR-100, 32x32 {args.format}) to {args.out}/train/ and {args.out}/test/"
    )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.scaling:
        for size in args.sizes:
            check_positive("--sizes", size)
        return _bench_scaling(args)
    if args.out is not None:
        raise ConfigError("--out applies to --scaling (the step timing prints, or --json)")
    check_positive("--steps", args.steps)
    if args.warmup < 0:
        raise ConfigError(f"--warmup {args.warmup} must be >= 0")
    cfg = TrainConfig().with_overrides(given(args, TrainConfig))
    log.info(
        "timing %s, batch %d: %d warm-up and %d timed steps",
        cfg.model,
        cfg.batch_size,
        args.warmup,
        args.steps,
    )
    from eanet.bench import bench_model

    r = bench_model(cfg, args.warmup, args.steps)
    if args.json:
        print(json.dumps(r.to_dict(), indent=2))
        return 0
    env = r.environment
    where = env.get("cuda") or env.get("cpu_model", env["processor"])
    flags = " ".join(env.get("cpu_flags", [])) or "none of note"
    print(
        f"{r.model} batch {r.batch_size} {r.precision} on {r.device} ({where}; CPU flags: "
        f"{flags}; {env['torch_threads']} threads, torch {env['torch']}"
        f"{', compiled' if r.compile else ''})"
    )
    for what, img_s, gflops, share in (
        ("train", r.train_img_s, r.train_gflops, r.train_fraction_of_peak),
        ("inference", r.infer_img_s, r.infer_gflops, r.infer_fraction_of_peak),
    ):
        print(
            f"  {what:<9} {img_s:9.1f} img/s  {gflops:7.1f} GFLOP/s  "
            f"{share:.0%} of the {r.precision} matmul peak"
        )
    bf16 = f", bf16 {r.matmul_peak_bf16_gflops:.1f}" if r.matmul_peak_bf16_gflops else ""
    print(
        f"  matmul peak fp32 {r.matmul_peak_gflops:.1f}{bf16} GFLOP/s; {r.peak_memory_kind} "
        f"{r.peak_memory_mb:.0f} MB; forward {r.forward_macs_per_image / 1e9:.3f} GMACs/image"
    )
    if r.native_kernels:
        on, threads = r.native_kernels["on"], "OpenMP" if r.native_kernels["openmp"] else "threads"
        kernels = f"{', '.join(on)} ({threads})" if on else "off (torch's ops)"
        print(f"  native CPU kernels: {kernels}")
    return 0


def compare_config_from_args(args: argparse.Namespace):
    """The CompareConfig of `eanet compare`: its flags, and the recipe flags over --recipe."""
    from eanet.compare.config import CompareConfig

    flags = given(args, TrainConfig)
    recipe = TrainConfig().with_overrides(recipe_values(flags.get("recipe"), flags))
    compare = given(args, CompareConfig)
    if "augment_orders" not in compare:  # the recipe's own augmentation (modern: crop-flip)
        compare["augment_orders"] = [recipe.augment]
    return CompareConfig(**{**compare, "train": recipe})


def cmd_compare(args: argparse.Namespace) -> int:
    check_data_path(args.dataset, args.data_path)  # before the model names load torch
    cfg = compare_config_from_args(args)  # validated (CompareConfig.__post_init__)
    log.info("comparison directory: %s", args.out)
    from eanet.compare.run import run_compare

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
    log.info("timing EANet and ViT at image sides %s", " ".join(map(str, args.sizes)))
    from eanet.bench import scaling
    from eanet.fileio import write_json, write_text
    from eanet.plots import plot_scaling
    from eanet.runtime import environment

    bar = sys.stderr.isatty()  # into a file: no bar refreshes
    rows = scaling(tuple(args.sizes), batch_size=2, device=args.device or "auto", progress=bar)
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
    print(table)
    if args.out is None:  # nothing written where the command happens to run
        print("(not written: --out DIR keeps scaling.json, scaling.md and scaling.png)")
        return 0
    write_json(args.out / "scaling.json", {"rows": rows, "environment": environment()})
    write_text(args.out / "scaling.md", table)
    plot_scaling(rows, args.out / "scaling.png")
    print(f"wrote {args.out}/scaling.json, scaling.md, scaling.png")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from eanet.serve.config import ServeConfig, check_dependencies

    check_dependencies()
    check_checkpoint(args.checkpoint, "last", "eanet serve RUN_DIR_OR_CHECKPOINT")
    log.info("serving %s on http://%s:%d", args.checkpoint, args.host, args.port)
    from eanet.serve.server import serve

    values = {name: getattr(args, name) for name in declared(ServeConfig)}
    serve(ServeConfig(checkpoint=str(args.checkpoint), **values))
    return 0


def unused_dir(base: Path) -> Path:
    """`base` if nothing is there, else the first of base-2, base-3, ... that is free."""
    n, path = 1, base
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def cmd_attention(args: argparse.Namespace) -> int:
    usage = "eanet attention RUN_DIR_OR_CHECKPOINT IMAGE_OR_DIR [IMAGE_OR_DIR ...] --out DIR"
    check_checkpoint(args.checkpoint, args.weights, usage)
    check_image_inputs(args.inputs, usage)
    from eanet import checkpoint
    from eanet.attention_maps import MAX_DRAWN_UNITS, iter_file_maps
    from eanet.predict import Failure, expand_inputs
    from eanet.runtime import resolve_device

    model, ckpt = checkpoint.load_model(args.checkpoint, resolve_device(args.device), args.weights)
    files, failures = expand_inputs(args.inputs)
    names = _attention_names(files, args.out, args.overwrite)
    for f in failures:
        print(f"eanet: error: {f.source}: {f.reason}", file=sys.stderr)
    drawn = 0
    for r in iter_file_maps(model, ckpt.class_names, files):
        if isinstance(r, Failure):
            failures.append(r)
            print(f"eanet: error: {r.source}: {r.reason}", file=sys.stderr)
            continue
        units = r.attention.shape[-1] if r.kind == "external" else 0
        if drawn == 0 and units > MAX_DRAWN_UNITS:
            log.info(
                "drawing the first %d of the %d memory units of each block (all of them are "
                "in the .safetensors files)",
                MAX_DRAWN_UNITS,
                units,
            )
        png, raw = r.save(args.out, names[r.source].pop(0))
        label = printable(r.label)
        print(f"{printable(r.source)}: {label} {r.probability:.1%}  ->  {png}, {raw.name}")
        drawn += 1
    if failures:
        print(f"eanet: {drawn} image(s) drawn, {len(failures)} failed", file=sys.stderr)
        return 1
    return 0


def _attention_names(files: list[Path], out: Path, overwrite: bool) -> dict[str, list[str]]:
    """NAME-attention of each input file, in order (NAME-attention-2, ... for a repeated
    name); an existing output file is refused, before anything is drawn, unless `overwrite`."""
    from eanet.errors import EANetError

    taken: set[str] = set()
    names: dict[str, list[str]] = {}
    for f in files:
        names.setdefault(str(f), []).append(_unique(f"{f.stem}-attention", taken))
    for name in () if overwrite else sorted(taken):
        for path in (out / f"{name}.png", out / f"{name}.safetensors"):
            if path.exists() or path.is_symlink():
                raise EANetError(
                    f"{path} exists; pass --overwrite to replace it, or choose another --out"
                )
    return names


def _unique(name: str, taken: set[str]) -> str:
    """`name`, or `name-2`, `name-3`, ... if taken; the result is added to `taken`."""
    candidate, k = name, 1
    while candidate in taken:
        k += 1
        candidate = f"{name}-{k}"
    taken.add(candidate)
    return candidate
