"""`python -m eanet ARGS` for torchrun tests, recording what this rank wrote and logged.

Usage: torchrun ... tests/ddp_worker.py RECORD_DIR ARGS...  (ARGS as for `eanet`).
Writes RECORD_DIR/rank{RANK}.json: {"rc": exit status, "written": [every path this process
opened for writing, created, renamed or removed, seen through Python's audit hooks],
"log": [the messages of the `eanet` loggers]}.
"""

import json
import logging
import os
import sys
from pathlib import Path

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
written: list[str] = []
recording = True


def _audit(event: str, args: tuple) -> None:
    if not recording:
        return
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        if args[2] & WRITE_FLAGS:
            written.append(os.fsdecode(args[0]))
    elif event in ("os.mkdir", "os.remove", "os.rmdir"):
        written.append(os.fsdecode(args[0]))
    elif event == "os.rename":  # also os.replace: the atomic writes' final step
        written.extend(os.fsdecode(a) for a in args[:2])


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def run() -> int:
    global recording
    record_dir, argv = Path(sys.argv[1]), sys.argv[2:]
    sys.addaudithook(_audit)
    keep = _Keep()
    logging.getLogger("eanet").addHandler(keep)
    from eanet.cli.main import main

    rc = main(argv)
    recording = False
    record = {"rc": rc, "written": written, "log": keep.messages}
    (record_dir / f"rank{os.environ['RANK']}.json").write_text(json.dumps(record))
    return rc


if __name__ == "__main__":
    sys.exit(run())
