"""Training recipes as files: named sets of TrainConfig values shipped in `recipes/*.yaml`.

`eanet train --recipe NAME` starts from the recipe's values; `--config FILE` and flags
override them (flags > --config > --recipe > the TrainConfig defaults). `reference` is the
Keras example's recipe (the defaults themselves); `modern` a published small-transformer
recipe adapted to this model (each value's source is in the file's comments).
"""

from __future__ import annotations

from pathlib import Path

from eanet.errors import ConfigError
from eanet.options import read_config_file

RECIPES_DIR = Path(__file__).parent / "recipes"
DEFAULT_RECIPE = "reference"


def recipe_names() -> tuple[str, ...]:
    """The names of the shipped recipes, `reference` first."""
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    return tuple(sorted(names, key=lambda n: n != DEFAULT_RECIPE))


def recipe_path(name: str) -> Path:
    """The YAML file of recipe `name`; ConfigError naming the choices if there is none."""
    if name not in recipe_names():
        raise ConfigError(
            f"--recipe {name!r} is unknown; choose one of {', '.join(recipe_names())} "
            "(see `eanet recipes`)"
        )
    return RECIPES_DIR / f"{name}.yaml"


def load_recipe(name: str) -> dict:
    """The option values of recipe `name` (field names of TrainConfig), as in its file."""
    values = read_config_file(recipe_path(name))
    if "recipe" in values:
        raise ConfigError(f"{recipe_path(name)}: a recipe cannot name another recipe")
    return values


def describe_recipe(name: str) -> str:
    """The first comment line of the recipe's file: what the recipe is."""
    for line in recipe_path(name).read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            text = line.lstrip("# ").strip()
            return text.removeprefix(f"{name}: ")
    return ""


def apply_recipe(recipe: dict, *layers: dict) -> dict:
    """`recipe` overridden by each of `layers` in turn; `model_args` merged key by key."""
    out = dict(recipe)
    for layer in layers:
        model_args = {**out.get("model_args", {}), **layer.get("model_args", {})}
        out.update(layer)
        if model_args:
            out["model_args"] = model_args
    return out
