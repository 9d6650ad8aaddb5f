"""The `eanet` command line, the top layer: flags derived from the config dataclasses."""

from eanet.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
