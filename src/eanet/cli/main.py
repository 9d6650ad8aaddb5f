"""The `eanet` console script: parse, dispatch, turn user errors into one line and an exit code."""

from __future__ import annotations

import argparse
import os
import sys
import types
from collections.abc import Callable

from eanet.cli.parser import build_parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `eanet` console script."""
    args = build_parser().parse_args(argv)
    from eanet.errors import EANetError, log_to_terminal, one_line, printable

    log_to_terminal(sys.stderr)
    if getattr(args, "progress", False) and not sys.stderr.isatty():
        args.progress = False  # into a file: the one log line per epoch, no bar refreshes
    import eanet.cli.commands as commands

    try:
        return _command(commands, args.command)(args)
    except EANetError as exc:
        if args.debug:
            raise
        print(f"eanet: error: {one_line(exc)}", file=sys.stderr)  # may quote a file's text
        return 2
    except KeyboardInterrupt as exc:  # training's own says how to resume
        # On a terminal the cursor is still on a progress bar's line (or after "^C").
        start = "\n" if sys.stderr.isatty() else ""
        print(f"{start}eanet: {printable(str(exc)) or 'interrupted'}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`eanet predict DIR | head`): stop quietly, as Unix tools do;
        # pointing stdout at devnull stops Python's own complaint when it flushes at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _command(commands: types.ModuleType, name: str) -> Callable[[argparse.Namespace], int]:
    """`eanet NAME`'s function, `cmd_NAME` in `eanet.cli.commands`.

    Imported once the arguments are parsed: `--help`, `--version` and a bad flag answer
    without loading torch.
    """
    return getattr(commands, "cmd_" + name.replace("-", "_"))
