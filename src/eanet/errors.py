"""User-facing errors: each carries one line that names the input and what to do.

Text read from a file (a checkpoint's model name, a class name, a config value) may hold
terminal control sequences or be huge: `printable` escapes the one, `preview` bounds both.
"""

import logging
import reprlib
from collections.abc import Callable


class EANetError(Exception):
    """An error caused by the user's input; the CLI prints it as one line and exits non-zero."""


class DataError(EANetError):
    """A data set, archive or image that cannot be used."""


class ConfigError(EANetError):
    """An impossible option or configuration."""


class CheckpointError(EANetError):
    """A checkpoint that is missing, corrupt or belongs to another model."""


def one_line(what: BaseException | str, *, with_type: bool = False) -> str:
    """A message squeezed onto one line (it may quote names from a damaged file).

    An exception without text is named by its type; `with_type` names the type always.
    Control characters left after the squeeze are escaped (`printable`).
    """
    text = printable(" ".join(str(what).split()))
    if isinstance(what, BaseException):
        name = type(what).__name__
        if not text:
            return name
        if with_type:
            return f"{name}: {text}"
    return text


def _python_escape(char: str) -> str:
    return repr(char)[1:-1]


def printable(text: str, escape: Callable[[str], str] = _python_escape) -> str:
    """`text` safe to show on a terminal: every character that is not printable (ESC, BEL,
    carriage return, newline, C1 controls, bidi overrides, ...) written as an escape.

    The default escape is Python's (`\\x1b`, `\\n`, `\\u202e`); JSON passes its own.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else escape(c) for c in text)


class PrintableFormatter(logging.Formatter):
    """Log records made safe for a terminal line by line (`printable`): a name read from a
    file or a request cannot clear the screen; a traceback keeps its lines."""

    def format(self, record: logging.LogRecord) -> str:
        return "\n".join(map(printable, super().format(record).split("\n")))


def log_to_terminal(stream: object = None) -> None:
    """Log INFO and above as bare messages through `PrintableFormatter` (to stderr by
    default), unless the root logger already has a handler (`logging.basicConfig`)."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(PrintableFormatter("%(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 40, 40
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 4
PREVIEW_CHARS = 60


def preview(value: object) -> str:
    """A bounded, escaped view of a value for a message: at most PREVIEW_CHARS characters,
    whatever its size or nesting (a YAML alias bomb costs no more than a number)."""
    try:
        text = printable(_REPR.repr(value))
    except Exception:  # an int past Python's digit limit, a broken __repr__
        return f"<{type(value).__name__}>"
    return text if len(text) <= PREVIEW_CHARS else text[: PREVIEW_CHARS - 3] + "..."
