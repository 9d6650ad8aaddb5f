"""Options declared once: config dataclass fields with help, choices, range and resume rule.

Every option is a field of a config dataclass (`TrainConfig`, `CompareConfig`,
`ServeConfig`, `ModelConfig`) declared with `option(...)`: its help text, its choices, the
numbers it admits and how it behaves on `--resume`. The command line's flags, config files
(YAML in, YAML out), resume merging, `compare`, `bench` and the checks of every value
(`check_declared`, `check_known`) are derived from those fields.

Type checks: configs are built from JSON/YAML (a run's config, a checkpoint's metadata, a
config file) and from `--model-arg KEY=VALUE`; a value of the wrong type must not reach a
comparison or a tensor constructor as a TypeError with a traceback.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import types
import typing
from collections.abc import Callable, Iterable

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


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The numbers an option admits, declared with `option(low=..., high=..., ...)`.

    `low`, `high`: the least and the greatest value (`high_open`: below `high`, not up to
    it); `positive`: above 0 (an integer: at least 1); `cap`: a sanity bound far past any
    real use, so that a typo (depth=1e9) is one line, not an out-of-memory crash; a value
    over it "is over its bound". A float must also be finite.
    """

    low: float | None = None
    high: float | None = None
    high_open: bool = False
    positive: bool = False
    cap: float | None = None

    def __post_init__(self) -> None:
        if self.high_open and self.high is None:
            raise ValueError("high_open=True needs high=")
        if self.positive and self.low is not None:
            raise ValueError("give low= or positive=True, not both")

    def admits(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):  # nan, inf
            return False
        if (self.positive and value <= 0) or (self.low is not None and value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return self.cap is None or value <= self.cap

    def text(self, integer: bool) -> str:
        """The range in a few characters, as `--help` shows it: 'in [0, 1)', '> 0', '>= 0'."""
        upper = (self.high, self.high_open) if self.high is not None else (self.cap, False)
        return _interval(*self._lower(integer), *upper)

    def problem(self, value: float, integer: bool) -> str:
        """What is wrong with `value`, not admitted: 'must be an integer in [1, 1,000,000]'."""
        if isinstance(value, float) and math.isinf(value):
            return f"must be a finite number {self.text(integer)}"
        if self.cap is not None and value > self.cap:
            return f"is over its bound of {_number(self.cap)}"
        if self.high is not None:
            return f"must be {'an integer ' if integer else ''}{self.text(integer)}"
        if self.positive:
            return f"must be a positive {'integer' if integer else 'number'}"
        return f"must be {_interval(*self._lower(integer), None, False)}"

    def _lower(self, integer: bool) -> tuple[float | None, bool]:
        """The lower end and whether it is open: positive is (0, open), or 1 for an integer."""
        if self.positive:
            return (1, False) if integer else (0, True)
        return self.low, False


def _interval(low: float | None, low_open: bool, high: float | None, high_open: bool) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {_number(low)}"
    if low is None:
        return f"{'<' if high_open else '<='} {_number(high)}"
    left, right = "(" if low_open else "[", ")" if high_open else "]"
    return f"in {left}{_number(low)}, {_number(high)}{right}"


def _number(value: float) -> str:
    """A bound as messages write it: 1,000,000; 2**63; 0.5."""
    if isinstance(value, int):
        power = value > 2**32 and value & (value - 1) == 0
        return f"2**{value.bit_length() - 1}" if power else f"{value:,}"
    return f"{value:g}"


# The range of a probability or a fraction that cannot be whole: `option(..., **FRACTION)`.
FRACTION: dict = {"low": 0, "high": 1, "high_open": True}


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
    low: float | None = None,
    high: float | None = None,
    high_open: bool = False,
    positive: bool = False,
    cap: float | None = None,
) -> typing.Any:
    """A config dataclass field that carries its help text, choices, range and resume rule.

    Flags (`eanet.cli.flags`), `--help`, resume merging, compare, bench, config files and
    `check_declared` are all derived from these fields; nothing re-declares them.
    `results=False` marks an option that never changes what a run computes (where the data
    lie, the device), so `compare` may reuse a run made with another value. `group`: the
    heading the option is listed under in `--help`. `shown_default`: what `--help` says the
    default is, where the value alone would not say it (e.g. None meaning "one per core").
    `low`, `high`, `high_open`, `positive`, `cap`: the numbers it admits (`Bounds`; None,
    where the type allows it, is always admitted).
    """
    if resume not in RESUME_RULES:
        raise ValueError(f"resume={resume!r} must be one of {RESUME_RULES}")
    bounds = Bounds(low, high, high_open, positive, cap)
    meta = {"help": help, "resume": resume, "choices": choices, "metavar": metavar}
    meta.update(results=results, group=group, shown_default=shown_default)
    meta["bounds"] = None if bounds == Bounds() else bounds
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def as_flag(name: str, shown: str) -> str:
    """How a message names an option and its value: `--lr 0.0`."""
    return f"{flag(name)} {shown}"


def check_declared(obj: object, describe: Callable[[str, object], str] = as_flag) -> None:
    """Raise ConfigError naming the first field of `obj` of the wrong type, not one of its
    choices, or out of its range (`describe(name, shown)` words the option)."""
    check_field_types(obj, describe)
    check_choices(obj, describe)
    check_ranges(obj, describe)


def check_choices(obj: object, describe: Callable[[str, object], str] = as_flag) -> None:
    """Raise ConfigError naming the first declared field whose value is not a choice (of a
    list field: the first item that is not)."""
    for name, f in declared(type(obj)).items():
        choices, value = f.metadata["choices"], getattr(obj, name)
        if choices is None:
            continue
        items = value if isinstance(value, list) else [value]
        bad = [item for item in items if item not in choices]
        if bad:
            raise ConfigError(
                f"{describe(name, preview(bad[0]))} must be one of {', '.join(choices)}"
            )


def check_ranges(obj: object, describe: Callable[[str, object], str] = as_flag) -> None:
    """Raise ConfigError naming the first declared field whose number is out of its range
    (after `check_field_types`: the values are numbers, or None)."""
    cls = type(obj)
    for name, f in declared(cls).items():
        bounds, value = f.metadata["bounds"], getattr(obj, name)
        if bounds is None or value is None or bounds.admits(value):
            continue
        problem = bounds.problem(value, integer=value_type(cls, name) is int)
        raise ConfigError(f"{describe(name, preview(value))} {problem}")


def range_text(cls: type, name: str) -> str | None:
    """The declared range of field `name` as `--help` shows it ('in [0, 1)'), or None."""
    bounds = declared(cls)[name].metadata["bounds"]
    return bounds.text(integer=value_type(cls, name) is int) if bounds else None


def check_known(keys: Iterable[object], known: type | Iterable[str], what: str = "option") -> None:
    """Raise ConfigError naming the first of `keys` that is not known, and the known ones.

    `known`: the names, or a dataclass whose fields they are; `what` says what kind of
    option (e.g. "model option"). The one check of unknown keys, wherever options are read
    by name: config files, a run's saved options, model options.
    """
    names = [f.name for f in dataclasses.fields(known)] if isinstance(known, type) else known
    names = sorted(names)
    unknown = sorted(str(k) for k in set(keys) - set(names))
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise ConfigError(f"unknown {what} {preview(unknown[0])}{more}; known: {', '.join(names)}")


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
    try:
        check_known(data, cls)
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
