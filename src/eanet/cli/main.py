"""The `eanet` console script: parse, dispatch, turn user errors into one line and an exit code."""

from __future__ import annotations

import logging
import os
import sys

from eanet.cli.commands import (
    cmd_attention,
    cmd_bench,
    cmd_compare,
    cmd_demo,
    cmd_evaluate,
    cmd_export,
    cmd_import_keras,
    cmd_info,
    cmd_models,
    cmd_predict,
    cmd_recipes,
    cmd_sample_images,
    cmd_serve,
    cmd_train,
)
from eanet.cli.parser import build_parser

COMMANDS = {
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "demo": cmd_demo,
    "models": cmd_models,
    "recipes": cmd_recipes,
    "import-keras": cmd_import_keras,
    "export": cmd_export,
    "predict": cmd_predict,
    "info": cmd_info,
    "bench": cmd_bench,
    "sample-images": cmd_sample_images,
    "compare": cmd_compare,
    "serve": cmd_serve,
    "attention": cmd_attention,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `eanet` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from eanet.errors import EANetError

    try:
        return COMMANDS[args.command](args)
    except EANetError as exc:
        if args.debug:
            raise
        print(f"eanet: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # training's own says how to resume
        print(f"eanet: {str(exc) or 'interrupted'}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`eanet predict DIR | head`): stop quietly, as Unix tools do;
        # pointing stdout at devnull stops Python's own complaint when it flushes at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
