"""Options declared once: config dataclass fields with help, choices and a resume rule.

Every training option is a field of a config dataclass (`TrainConfig`, `CompareConfig`,
...) declared with `option(...)`: its help text, its choices and how it behaves on
`--resume`. The command line's flags, config files (YAML in, YAML out), resume merging,
`compare` and `bench` are derived from those fields.

Type checks: configs are built from JSON/YAML (a run's config, a checkpoint's metadata, a
config file) and from `--model-arg KEY=VALUE`; a value of the wrong type must not reach a
comparison or a tensor constructor as a TypeError with a traceback.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import types
import typing
from collections.abc import Callable

from eanet.errors import ConfigError, preview, printable

_NAMES = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    dict: "a JSON object",
    list: "a list",
    type(None): "null",
}


@functools.cache
def _hints(cls: type) -> dict[str, object]:
    return typing.get_type_hints(cls)


def _options(hint: object) -> tuple[object, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _matches(value: object, expected: object) -> bool:
    expected = typing.get_origin(expected) or expected
    if expected is typing.Any:
        return True
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is type(None):
        return value is None
    return isinstance(expected, type) and isinstance(value, expected)


def check_field_types(obj: object, describe: Callable[[str, object], str]) -> None:
    """Raise ConfigError unless every field of dataclass `obj` has its annotated type.

    `describe(name, shown)` words the option for the message (e.g. "--lr 'x'"); `shown` is
    the value's bounded preview, never the value itself, which may be a YAML alias bomb.
    Ints are accepted for floats, bools are not ints; a path object in a str field becomes a
    str.
    """
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        options = _options(hints[f.name])
        if str in options and isinstance(value, os.PathLike):
            value = os.fspath(value)
            setattr(obj, f.name, value)
        if any(_matches(value, option) for option in options):
            continue
        wanted = " or ".join(_NAMES.get(typing.get_origin(o) or o, str(o)) for o in options)
        raise ConfigError(
            f"{describe(f.name, preview(value))} must be {wanted}, not {type(value).__name__}"
            + _quoted_number_hint(value, options)
        )


def _quoted_number_hint(value: object, options: tuple[object, ...]) -> str:
    """A number written as a string ("1e-3" quoted in a config file): say how to write it."""
    if not (isinstance(value, str) and {int, float} & set(options)):
        return ""
    try:
        float(value)
    except ValueError:
        return ""
    return "; write it as a number, without quotes"


# --------------------------------------------------------------------------- declared options

# How an option behaves when a run is continued with `eanet train --resume RUN`:
CHANGE = "change"  # may change: the flag is applied (e.g. --epochs, --device)
MATCH = "match"  # part of the run's recipe: the same value is accepted, another is refused
KEEP = "keep"  # kept from the run: the flag does not apply to a resumed run and is refused
RESUME_RULES = (CHANGE, MATCH, KEEP)


def option(
    default: object = dataclasses.MISSING,
    *,
    help: str,
    resume: str = MATCH,
    choices: tuple[str, ...] | None = None,
    metavar: str | None = None,
    default_factory: Callable[[], object] | None = None,
    results: bool = True,
    group: str | None = None,
    shown_default: str | None = None,
) -> typing.Any:
    """A config dataclass field that carries its help text, choices and resume rule.

    Flags (`eanet.cli.flags`), `--help`, resume merging, compare, bench and config files
    are all derived from these fields; nothing re-declares them. `results=False` marks
    an option that never changes what a run computes (where the data lie, the device), so
    `compare` may reuse a run made with another value. `group`: the heading the option is
    listed under in `--help`. `shown_default`: what `--help` says the default is, where the
    value alone would not say it (e.g. None meaning "one per core").
    """
    if resume not in RESUME_RULES:
        raise ValueError(f"resume={resume!r} must be one of {RESUME_RULES}")
    meta = {"help": help, "resume": resume, "choices": choices, "metavar": metavar}
    meta.update(results=results, group=group, shown_default=shown_default)
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def check_choices(obj: object) -> None:
    """Raise ConfigError naming the first declared field whose value is not a choice."""
    for name, f in declared(type(obj)).items():
        choices = f.metadata["choices"]
        value = getattr(obj, name)
        if choices is not None and value not in choices:
            raise ConfigError(f"{flag(name)} {preview(value)} must be one of {', '.join(choices)}")


def flag(name: str) -> str:
    """The command-line flag of a field: `batch_size` -> `--batch-size`."""
    return "--" + name.replace("_", "-")


def declared(cls: type) -> dict[str, dataclasses.Field]:
    """The fields of a config dataclass declared with `option`, by name."""
    return {f.name: f for f in dataclasses.fields(cls) if "help" in f.metadata}


def field_default(f: dataclasses.Field) -> object:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def value_type(cls: type, name: str) -> object:
    """The annotated type of a field without `None` (`int | None` -> int)."""
    options = [o for o in _options(_hints(cls)[name]) if o is not type(None)]
    return typing.get_origin(options[0]) or options[0] if len(options) == 1 else options[0]


def from_mapping(cls: type, data: object, where: str) -> typing.Any:
    """Build config dataclass `cls` from a mapping; unknown keys and bad values name `where`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of options, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(data) - known)
    if unknown:
        raise ConfigError(
            f"{where}: unknown option {preview(unknown[0])}; known: {', '.join(sorted(known))}"
        )
    try:
        return cls(**data)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def resume_merge(saved: typing.Any, given: dict[str, object], run: str) -> typing.Any:
    """The saved config of `run` with the `given` options applied by their resume rules.

    A CHANGE option is applied; a MATCH option must equal the run's value; a KEEP option
    is refused. Every refusal is a one-line ConfigError naming the flag.
    """
    fields = declared(type(saved))
    changes = {}
    for name, value in given.items():
        rule = fields[name].metadata["resume"]
        old = getattr(saved, name)
        if rule == CHANGE:
            changes[name] = value
        elif rule == KEEP:
            raise ConfigError(
                f"{flag(name)} does not apply to --resume {run}: the run keeps its own; "
                "drop the flag, or start a new run with --out"
            )
        elif value != old:
            raise ConfigError(
                f"{flag(name)} {_show(value)} differs from the run's {_show(old)}: --resume "
                f"{run} continues its own recipe; drop the flag, or start a new run with --out"
            )
    return dataclasses.replace(saved, **changes)


def _show(value: object) -> str:
    """A value as the message shows it: numbers, booleans and null as JSON, the rest bounded."""
    if value is None or isinstance(value, (bool, int, float)):
        return json.dumps(value)
    return preview(value)


# --------------------------------------------------------------------------- config files


# A config file holds a few dozen options: far past these it is a mistake or an attack (a
# 500-byte YAML alias bomb names a billion strings), refused before any value is used.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_VALUES = 10_000  # values of the document with every YAML alias expanded


def read_config_file(path: str | os.PathLike) -> dict:
    """The mapping in a YAML (.yaml/.yml) or JSON (.json) config file; one-line errors.

    Bounded: a file over MAX_CONFIG_BYTES, or whose values (aliases expanded) exceed
    MAX_CONFIG_VALUES, is refused. YAML floats may omit the dot (`lr: 1e-3`), as in YAML 1.2.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror or exc})") from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB; a config file holds a few "
            "options, check it is the right file"
        )
    try:
        text = raw.decode("utf-8")
        data = json.loads(text) if path.endswith(".json") else _load_yaml(text)
    except Exception as exc:  # yaml.YAMLError, json.JSONDecodeError, RecursionError, Unicode
        first = " ".join(str(exc).split())[:200]
        raise ConfigError(f"{path}: not valid {_kind(path)} ({printable(first)})") from exc
    if _count_values(data) > MAX_CONFIG_VALUES:
        raise ConfigError(
            f"{path}: expands to more than {MAX_CONFIG_VALUES:,} values (YAML anchors and "
            "aliases repeat them); write the options out, without aliases"
        )
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ConfigError(f"{path}: expected a mapping of option names to values")
    return data


def _count_values(data: object, limit: int = MAX_CONFIG_VALUES) -> int:
    """How many values `data` holds, each alias counted again; stops just past `limit`
    (so a self-referencing or exponential document costs at most `limit` steps)."""
    count, stack = 0, [data]
    while stack and count <= limit:
        value = stack.pop()
        count += 1
        if isinstance(value, dict):
            stack += [*value.keys(), *value.values()]
        elif isinstance(value, list):
            stack += value
    return count


@functools.cache
def _yaml_loader() -> type:
    """yaml.SafeLoader that also reads `1e-3` as a float (YAML 1.1 wants `1.0e-3`)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    exponent = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", exponent, list("-+0123456789."))
    return Loader


def _load_yaml(text: str) -> object:
    import yaml

    return yaml.load(text, Loader=_yaml_loader())


def _kind(path: str) -> str:
    return "JSON" if path.endswith(".json") else "YAML"


def to_yaml(values: dict, header: str = "") -> str:
    """`values` as YAML in field order, after `header` comment lines."""
    import yaml

    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    body = yaml.safe_dump(values, sort_keys=False, default_flow_style=False, allow_unicode=True)
    return "\n".join([*lines, body]) if lines else body


def to_argv(obj: object, skip: tuple[str, ...] = ()) -> list[str]:
    """The flags that rebuild `obj` from its class's defaults (fields left at default omitted)."""
    argv: list[str] = []
    for name, f in declared(type(obj)).items():
        value = getattr(obj, name)
        if name in skip or value == field_default(f):
            continue
        if isinstance(value, bool):
            argv.append(flag(name) if value else "--no-" + flag(name)[2:])
        elif isinstance(value, dict):  # model_args: --model-arg KEY=VALUE, repeated
            for key, v in value.items():
                argv += ["--model-arg", f"{key}={v if isinstance(v, str) else json.dumps(v)}"]
        elif isinstance(value, list):
            argv += [flag(name), *map(str, value)]
        elif value is not None:
            argv += [flag(name), str(value)]
    return argv
