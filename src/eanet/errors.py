"""User-facing errors: each carries one line that names the input and what to do."""


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
    """
    text = " ".join(str(what).split())
    if isinstance(what, BaseException):
        name = type(what).__name__
        if not text:
            return name
        if with_type:
            return f"{name}: {text}"
    return text
