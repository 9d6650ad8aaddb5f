"""Type checks for configuration dataclasses: a hand-edited config.json is a one-line error.

`TrainConfig` and `ModelConfig` are built from JSON (a run's config.json, a checkpoint's
metadata) and from `--model-arg KEY=VALUE`; a value of the wrong type must not reach a
comparison or a tensor constructor as a TypeError with a traceback.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import types
import typing
from collections.abc import Callable

from eanet.errors import ConfigError

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

    `describe(name, value)` words the option for the message (e.g. "--lr 'x'"). Ints are
    accepted for floats, bools are not ints; a path object in a str field becomes a str.
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
        raise ConfigError(f"{describe(f.name, value)} must be {wanted}, not {type(value).__name__}")
