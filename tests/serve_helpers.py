"""Test helpers for `eanet serve`: a free port, and a real server process on 127.0.0.1."""

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (the OS picks it)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_process(
    checkpoint_path: str | Path,
    *options: str,
    port: int | None = None,
    log_path: str | Path | None = None,
    timeout: float = 120.0,
) -> Iterator[str]:
    """Run `python -m eanet serve CHECKPOINT` on 127.0.0.1 and yield its URL; stop it after.

    For tests and benchmarks: waits until GET /health answers, raises with the end of the
    server's log if it exits or does not answer within `timeout` seconds. The server's output
    goes to `log_path` (default: a temporary file, deleted afterwards).
    """
    import subprocess
    import sys
    import tempfile
    import urllib.request

    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "eanet", "serve", str(checkpoint_path), "--port", str(port)]
    temporary = log_path is None
    if temporary:
        fd, log_path = tempfile.mkstemp(prefix="eanet-serve-", suffix=".log")
        os.close(fd)
    log_path = Path(log_path)
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([*cmd, *options], stdout=log_file, stderr=subprocess.STDOUT)
    tail = lambda: log_path.read_text(errors="replace")[-2000:]  # noqa: E731
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{tail()}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not answer in {timeout:.0f} s:\n{tail()}")
            time.sleep(0.2)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if temporary:
            log_path.unlink(missing_ok=True)


def flat_png(
    width: int, height: int, rgba: tuple[int, int, int, int] = (200, 30, 30, 128)
) -> bytes:
    """A one-colour RGBA PNG of width x height, written row by row: a few hundred KB for 81 MP.

    Built with zlib directly so that making a huge-pixel test image costs no memory: every row
    after the first uses PNG's "up" filter, i.e. all zeros, which compress to almost nothing.
    """
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)  # 8-bit RGBA
    z = zlib.compressobj(9)
    parts = [z.compress(b"\x00" + bytes(rgba) * width)]
    up_row = b"\x02" + bytes(4 * width)
    parts += [z.compress(up_row) for _ in range(height - 1)]
    parts.append(z.flush())
    idat = b"".join(parts)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def read_until_closed(sock, timeout: float) -> tuple[bytes, float | None]:
    """Read `sock` until the server closes it: (what it sent, seconds taken or None if not)."""
    t0 = time.monotonic()
    data = b""
    sock.settimeout(0.2)
    while time.monotonic() - t0 < timeout:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return data, time.monotonic() - t0
        if not chunk:
            return data, time.monotonic() - t0
        data += chunk
    return data, None


def process_memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak resident memory) of process `pid` in KiB, from /proc/PID/status."""
    out = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out
