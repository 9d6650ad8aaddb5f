"""A run's options from their layers: flags over a config file over a recipe over the defaults.

`resolve_config` is the one place these rules live: `eanet train` turns its argparse
namespace into plain mappings and calls it, and so may a script. Crossed with where the run
is: a new run (`out`, optionally fine-tuning an `init_from` checkpoint), `resume` (the run's
saved options, each given option merged by its resume rule) or `auto_resume` (resume `out`
when it holds a checkpoint, else start it).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path

from eanet.errors import ConfigError, preview
from eanet.options import CHANGE, declared, flag, from_mapping, read_config_file, resume_merge
from eanet.train.config import TrainConfig
from eanet.train.recipes import DEFAULT_RECIPE, apply_recipe, load_recipe

MODEL_OPTIONS = {"model", "model_args"}


def resolve_config(
    flags: Mapping[str, object],
    config: str | os.PathLike | Mapping[str, object] | None = None,
    *,
    out: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
    auto_resume: bool = False,
    overwrite: bool = False,
) -> tuple[TrainConfig, Path, bool]:
    """(config, run directory, resume?) from `flags` over `config` over --recipe over defaults.

    `flags`: the options given explicitly (TrainConfig field names), as on the command line.
    `config`: a config file (YAML/JSON path) or its mapping. With `resume` the run's saved
    options apply (its recipe's values among them) and each given option is merged by its
    resume rule (`eanet.options.resume_merge`): applied, or refused in one line.
    """
    file, where = _config_layer(config)
    if file:
        from_mapping(TrainConfig, file, where)  # unknown keys, bad values
    flags = dict(flags)
    if resume is not None:
        requested = {**file, **flags}
    else:
        requested = recipe_values(flags.get("recipe", file.get("recipe")), file, flags)
    named = {*file, *flags}  # by the user, not a recipe or a default
    init_from = flags.get("init_from")
    if auto_resume:
        if out is None or resume is not None or overwrite:
            raise ConfigError(
                "--auto-resume needs --out RUN_DIR and neither --resume nor --overwrite: "
                "it resumes RUN_DIR when it holds a checkpoint and starts it otherwise"
            )
        return _auto_resume(Path(out), requested, named, init_from)
    if resume is not None:
        if out is not None and Path(out) != Path(resume):
            raise ConfigError(f"--out {out} and --resume {resume} name two runs; give one")
        from eanet.train.rundir import load_run_config

        saved = load_run_config(resume)
        return resume_merge(saved, requested, str(resume)), Path(resume), True
    cfg = new_run_config(requested, init_from, bool(MODEL_OPTIONS & named))
    return cfg, Path(out or Path("runs") / f"{cfg.model}-{cfg.dataset}-{_stamp()}"), False


def _config_layer(config: str | os.PathLike | Mapping | None) -> tuple[dict, str]:
    """(the config file's options, how messages name it)."""
    if config is None:
        return {}, ""
    if isinstance(config, Mapping):
        return dict(config), "config"
    return read_config_file(config), str(config)


def recipe_values(name: str | None, *layers: dict) -> dict:
    """The options of recipe `name` (default: the reference) overridden by `layers` in turn."""
    name = name or DEFAULT_RECIPE
    values = load_recipe(name)
    from_mapping(TrainConfig, values, f"recipe {name}")  # a broken recipe file: one line
    return {**apply_recipe(values, *layers), "recipe": name}


def new_run_config(requested: dict, init_from: str | None, named_model: bool) -> TrainConfig:
    """The options of a new run: `requested` over the defaults (+ an `init_from` model).

    Without model/model_args named by the user (flags or config file), `init_from` builds
    the checkpoint's architecture; a recipe's model options (e.g. drop_path) apply on top.
    """
    if init_from is not None and not named_model:
        from eanet.train.finetune import inherited_model

        # Fine-tune the checkpoint's own architecture; stored, so --resume rebuilds it.
        requested["model"], inherited, size = inherited_model(init_from)
        requested["model_args"] = {**inherited, **requested.get("model_args", {})}
        if requested.get("dataset", "cifar100") == "folder" and "image_size" not in requested:
            requested["image_size"] = size
    return TrainConfig().with_overrides(requested)


def _auto_resume(
    out: Path, requested: dict, named: set[str], init_from: str | None
) -> tuple[TrainConfig, Path, bool]:
    """Resume `out` when it holds a checkpoint, else start it afresh.

    The options asked for (flags over config over the defaults, as for a new run) are
    compared with the run's saved ones: an option that differs is merged by its resume rule,
    so a MATCH or KEEP option that differs is refused in one line, never silently dropped.
    """
    from eanet.checkpoint import CHECKPOINT_NAME
    from eanet.train.rundir import load_run_config

    wanted = new_run_config(requested, init_from, bool(MODEL_OPTIONS & named))
    if not (out / "config.json").is_file():
        return wanted, out, False
    saved = load_run_config(out)
    old, new = saved.to_dict(), wanted.to_dict()
    # The recipe first: the options it sets differ with it, and it is what to repeat.
    order = sorted(old, key=lambda name: name != "recipe")
    differs = {k: new[k] for k in order if new[k] != old[k]}
    _refuse_unrepeated(out, saved, differs, named)
    cfg = resume_merge(saved, differs, str(out))
    # A run killed before its first epoch was saved has a config but no checkpoint:
    # it starts again (its partial files are replaced, see cmd_train).
    return cfg, out, (out / CHECKPOINT_NAME).is_file()


def _refuse_unrepeated(out: Path, saved: TrainConfig, differs: dict, named: set[str]) -> None:
    """Another recipe, or an option of the run that this command leaves at another value (a
    default, or its recipe's) without naming it: say which value to repeat, not "drop the
    flag" (`resume_merge` words the options given)."""
    fields = declared(TrainConfig)
    for name, value in differs.items():
        if name != "recipe" and (name in named or fields[name].metadata["resume"] == CHANGE):
            continue
        raise ConfigError(
            f"{out} was trained with {flag(name)} {preview(getattr(saved, name))}, not "
            f"{preview(value)}: repeat the run's {flag(name)} to continue it with "
            "--auto-resume, or choose another --out"
        )


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")
