"""Command-line flags derived from config dataclass fields (`eanet.options.option`).

Every flag's name, type, choices and help come from its field; the default and the range
(`option(low=..., ...)`) shown in `--help` are the field's. Flags default to None, so the
parsed namespace tells which were given: `given(args, cls)` returns exactly those, for
config files and `--resume` to merge.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable

from eanet.options import CHANGE, KEEP, declared, field_default, flag, range_text, value_type

MODEL_ARG = "model_args"  # the dict field given as repeated --model-arg KEY=VALUE
# An option's rule on --resume, said once in `RESUME_LEGEND` and per option by its mark; the
# rule of most options (MATCH: must repeat the run's value) goes unmarked.
RESUME_MARKS = {CHANGE: "[changeable]", KEEP: "[new run only]"}
RESUME_LEGEND = (
    "With --resume RUN_DIR the run's own options apply: a flag given must repeat the run's "
    f"value, except those marked {RESUME_MARKS[CHANGE]} (applied, e.g. --epochs, --device) and "
    f"{RESUME_MARKS[KEEP]} (refused)."
)


def model_arg(text: str) -> tuple[str, object]:
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


def _shown(default: object) -> str:
    """A default as `--help` says it: on/off, none, a list's values."""
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, list):
        return " ".join(map(str, default))
    return "none" if default is None or isinstance(default, dict) else str(default)


def _help(f, bounds: str | None, shown_default: str | None, show_resume: bool) -> str:
    """The option's help, its range, its default said once, and (train) its resume mark."""
    shown = shown_default if shown_default is not None else _shown(field_default(f))
    mark = RESUME_MARKS.get(f.metadata["resume"]) if show_resume else None
    text = f.metadata["help"] + (f"; {bounds}" if bounds else "") + f" (default: {shown})"
    return (text + (f" {mark}" if mark else "")).replace("%", "%%")


def add_config_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    only: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    defaults: dict[str, object] | None = None,
    fill_defaults: bool = False,
    show_resume: bool = False,
    groups: dict[str, argparse._ArgumentGroup] | None = None,
    rename: dict[str, str] | None = None,
) -> None:
    """One flag per declared field of `cls` (or those in `only`), all defaulting to None.

    `defaults` overrides the default shown in the help (e.g. evaluate's data set: the
    run's). `fill_defaults`: the parsed value of a flag not given is the field's default
    (for commands that take the options as they are, with nothing to merge).
    `show_resume`: mark each option's rule on `--resume` (train; see RESUME_LEGEND).
    `groups`: the help's argument group of each field's `group` (tests/test_options.py
    checks that every TrainConfig field names one). `rename`: a field offered under another
    name, for its flag and its attribute of the parsed namespace (evaluate's `--batch-size`
    is `eval_batch_size`); not for commands that merge with `given`, which reads field names.
    """
    fields = declared(cls)
    names = [n for n in (only if only is not None else fields) if n not in set(exclude)]
    for name in names:
        f = fields[name]
        shown = (defaults or {}).get(name, f.metadata.get("shown_default"))
        dest = (rename or {}).get(name, name)
        kw: dict = {
            "default": field_default(f) if fill_defaults else None,
            "help": _help(f, range_text(cls, name), shown, show_resume),
            "dest": dest,
        }
        target = (groups or {}).get(f.metadata["group"], parser)  # ungrouped: under "options"
        _add_flag(target, cls, name, kw, flag(dest))


def _add_flag(
    parser: argparse._ActionsContainer, cls: type, name: str, kw: dict, option: str
) -> None:
    """The flag `option` of field `name`: its action, type, choices and metavar from the field."""
    f = declared(cls)[name]
    kind = value_type(cls, name)
    if f.metadata["metavar"]:
        kw["metavar"] = f.metadata["metavar"]
    if name == MODEL_ARG:
        parser.add_argument("--model-arg", action="append", type=model_arg, **kw)
        return
    if kind is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif kind is list:
        kw["nargs"] = "+"
    else:
        kw["type"] = kind
        if f.metadata["choices"]:
            kw["choices"] = f.metadata["choices"]
    parser.add_argument(option, **kw)


def given(args: argparse.Namespace, cls: type) -> dict[str, object]:
    """The fields of `cls` whose flags were given on the command line, as field values."""
    out = {}
    for name in declared(cls):
        value = getattr(args, name, None)
        if value is None:
            continue
        out[name] = dict(value) if name == MODEL_ARG else value
    return out
