"""User-facing errors: each carries one line that names the input and what to do."""


class EANetError(Exception):
    """An error caused by the user's input; the CLI prints it as one line and exits non-zero."""


class DataError(EANetError):
    """A data set, archive or image that cannot be used."""


class ConfigError(EANetError):
    """An impossible option or configuration."""


class CheckpointError(EANetError):
    """A checkpoint that is missing, corrupt or belongs to another model."""
