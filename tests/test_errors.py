"""Text from files on a terminal: `printable` escapes control sequences, `preview` bounds a
value of any size, and the log formatter does both for every line eanet logs."""

import json
import logging
import subprocess
import sys
import time

from eanet.errors import PREVIEW_CHARS, PrintableFormatter, one_line, preview, printable

# A checkpoint's model_name from issue 25: clears the screen, sets the window title and
# overwrites the line.
HOSTILE = "\x1b[2J\x1b[H\x1b]0;TITLE\x07FAKE: all good\r"
CONTROLS = ("\x1b", "\x07", "\r", "\n", "\x9b", "\u202e")  # C0, C1 CSI, a bidi override


def _safe(text: str) -> bool:
    return not any(c in text for c in CONTROLS)


def test_printable_escapes_every_control_and_keeps_the_rest():
    shown = printable(HOSTILE + "\x9b\u202e café ✓")
    assert _safe(shown)
    assert shown == r"\x1b[2J\x1b[H\x1b]0;TITLE\x07FAKE: all good\r\x9b\u202e café ✓"
    assert printable("plain text") == "plain text"
    assert printable("\x1b", escape=lambda c: f"<{ord(c)}>") == "<27>"


def test_one_line_is_printable_too():
    assert one_line(ValueError(f"name {HOSTILE}\nnext")) == (
        r"name \x1b[2J\x1b[H\x1b]0;TITLE\x07FAKE: all good next"
    )


def test_preview_is_bounded_whatever_the_value():
    bomb = ["lol"] * 9
    for _ in range(9):  # 9**10 strings if expanded, as a YAML alias bomb
        bomb = [bomb] * 9
    t0 = time.perf_counter()
    shown = [preview(v) for v in (bomb, "x" * 10**6, {HOSTILE: HOSTILE}, 10**5000)]
    assert time.perf_counter() - t0 < 1
    assert all(len(s) <= PREVIEW_CHARS and _safe(s) for s in shown)
    assert shown[3] == "<int>"  # past Python's digit limit for str(int)
    assert preview("1e-3") == "'1e-3'" and preview(2.5) == "2.5"


def test_log_lines_are_escaped_line_by_line():
    record = logging.LogRecord("eanet", logging.INFO, __file__, 1, "serving %s", (HOSTILE,), None)
    assert PrintableFormatter("%(message)s").format(record) == f"serving {printable(HOSTILE)}"
    record.msg, record.args = "first\x1b[2J\nsecond", ()
    assert PrintableFormatter("%(message)s").format(record) == "first\\x1b[2J\nsecond"


def test_the_command_lines_log_and_error_lines_are_escaped(tmp_path):
    """`eanet` logs through PrintableFormatter and prints its error line escaped: here a
    --data-path from a config file names a folder with control characters, and --out too
    (logged as "run directory: OUT")."""
    folder = tmp_path / f"{HOSTILE}data"
    folder.mkdir()
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"data_path": str(folder), "md5": HOSTILE}))
    args = [sys.executable, "-m", "eanet", "train", "--config", str(config)]
    out = tmp_path / f"{HOSTILE}run"
    done = subprocess.run([*args, "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    log, error = done.stderr.strip().split("\n")
    assert log == f"run directory: {printable(str(out))}"
    assert error.startswith(f"eanet: error: {one_line(str(folder))}: holds neither")
    assert _safe(log) and _safe(error) and not out.exists()
