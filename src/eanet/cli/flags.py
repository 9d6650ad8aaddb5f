"""Command-line flags derived from config dataclass fields (`eanet.options.option`).

Every flag's name, type, choices and help come from its field; the default shown in
`--help` is the field's. Flags default to None, so the parsed namespace tells which were
given: `given(args, cls)` returns exactly those, for config files and `--resume` to merge.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable

from eanet.options import CHANGE, KEEP, MATCH, declared, field_default, flag, value_type

MODEL_ARG = "model_args"  # the dict field given as repeated --model-arg KEY=VALUE
RESUME_WORDS = {
    CHANGE: "may change on --resume",
    MATCH: "on --resume must match the run",
    KEEP: "not with --resume",
}


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


def _help(f, default: object, show_resume: bool) -> str:
    shown = "none" if default is None else default
    if isinstance(default, bool):
        shown = "on" if default else "off"
    elif isinstance(default, (list, dict)):
        shown = " ".join(map(str, default)) if isinstance(default, list) else "none"
    rule = f"; {RESUME_WORDS[f.metadata['resume']]}" if show_resume else ""
    return f"{f.metadata['help']} (default: {shown}{rule})".replace("%", "%%")


def add_config_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    only: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    defaults: dict[str, object] | None = None,
    fill_defaults: bool = False,
    show_resume: bool = False,
) -> None:
    """One flag per declared field of `cls` (or those in `only`), all defaulting to None.

    `defaults` overrides the default shown in the help (e.g. evaluate's data set: the
    run's). `fill_defaults`: the parsed value of a flag not given is the field's default
    (for commands that take the options as they are, with nothing to merge).
    `show_resume`: say in the help how each option behaves on `--resume` (train).
    """
    fields = declared(cls)
    names = [n for n in (only if only is not None else fields) if n not in set(exclude)]
    for name in names:
        f = fields[name]
        default = (defaults or {}).get(name, field_default(f))
        kind = value_type(cls, name)
        kw: dict = {
            "default": default if fill_defaults else None,
            "help": _help(f, default, show_resume),
        }
        kw["dest"] = name
        if f.metadata["metavar"]:
            kw["metavar"] = f.metadata["metavar"]
        if name == MODEL_ARG:
            parser.add_argument("--model-arg", action="append", type=model_arg, **kw)
            continue
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif kind is list:
            kw["nargs"] = "+"
        else:
            kw["type"] = kind
            if f.metadata["choices"]:
                kw["choices"] = f.metadata["choices"]
        parser.add_argument(flag(name), **kw)


def given(args: argparse.Namespace, cls: type) -> dict[str, object]:
    """The fields of `cls` whose flags were given on the command line, as field values."""
    out = {}
    for name in declared(cls):
        value = getattr(args, name, None)
        if value is None:
            continue
        out[name] = dict(value) if name == MODEL_ARG else value
    return out
