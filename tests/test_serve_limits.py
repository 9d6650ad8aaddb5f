"""`eanet serve` against stalled, disconnecting and huge-pixel clients, on a real server.

One server process (127.0.0.1, short timeouts, a 4-megapixel budget, bf16) is shared by the
tests of this module; each sends a bounded number of requests and finishes in seconds.
"""

import json
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

pytest.importorskip("fastapi", reason="eanet serve needs the [serve] extra")
pytest.importorskip("uvicorn", reason="eanet serve needs the [serve] extra")

from serve_helpers import (  # noqa: E402
    flat_png,
    free_port,
    process_memory_kb,
    read_until_closed,
    server_process,
)
from test_serve import files, png_bytes, tiny_ckpt  # noqa: E402, F401  (the fixture)

pytestmark = pytest.mark.slow

OPTIONS = (
    *("--device", "cpu", "--threads", "1", "--precision", "bf16", "--max-wait-ms", "2"),
    *("--max-upload-mb", "1", "--max-images", "4", "--max-image-mp", "4", "--max-request-mp", "6"),
    *("--max-large-decodes", "1", "--header-timeout-s", "1", "--body-timeout-s", "1.5"),
    *("--keep-alive-s", "1"),
)
LARGE = (1990, 1990)  # 3.96 megapixels: under the 4 MP budget, decoded in the large lane


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):  # noqa: F811
    log = tmp_path_factory.mktemp("serve_limits") / "server.log"
    with server_process(tiny_ckpt, *OPTIONS, log_path=log) as url:
        yield url, log


@pytest.fixture(scope="module")
def small_png(sample_data):
    return png_bytes(sample_data.test_images[0])


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def _health(url: str) -> dict:
    return httpx.get(f"{url}/health").json()


def _upload_head(length: int, content_type: str) -> bytes:
    return (
        f"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def test_a_client_leaving_mid_upload_is_one_info_line(server):
    url, log = server
    before = _health(url)
    part = b'--zz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
    for head, body in [
        (_upload_head(200_000, "image/png"), b"\x89PNG" + bytes(5000)),
        (_upload_head(200_000, "multipart/form-data; boundary=zz"), part + bytes(5000)),
    ]:
        with socket.create_connection(_address(url)) as s:
            s.sendall(head + body)
            time.sleep(0.2)  # the server is reading the body now
    deadline = time.monotonic() + 5
    while _health(url)["client_disconnects"] < before["client_disconnects"] + 2:
        assert time.monotonic() < deadline, "the disconnects were not counted"
        time.sleep(0.1)
    after = _health(url)
    assert after["internal_errors"] == before["internal_errors"]
    text = log.read_text()
    assert text.count("the client disconnected after") == 2
    assert "Traceback" not in text and "ClientDisconnect" not in text
    assert "POST /predict 500" not in text


def _dribble(sock: socket.socket, stop: threading.Event) -> None:
    """Send a byte of a request line every 0.25 s: each byte arrives well within any timeout."""
    for byte in b"POST /predict HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 100:
        if stop.wait(0.25):
            return
        try:
            sock.send(bytes([byte]))
        except OSError:
            return


def test_stalled_connections_are_closed(server, small_png):
    url, _ = server
    addr = _address(url)
    t0 = time.monotonic()
    silent = socket.create_connection(addr)
    partial = socket.create_connection(addr)
    partial.sendall(b"POST /predict HTTP/1.1\r\nHost: t\r\n")
    dribbler = socket.create_connection(addr)
    stop = threading.Event()
    threading.Thread(target=_dribble, args=(dribbler, stop), daemon=True).start()
    body_stalled = socket.create_connection(addr)
    body_stalled.sendall(_upload_head(1000, "image/png") + small_png[:10])
    idle = socket.create_connection(addr)
    idle.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")  # answered, then kept alive
    try:
        results = {
            name: read_until_closed(s, timeout=6)
            for name, s in [
                ("silent", silent),
                ("partial headers", partial),
                ("dribbling headers", dribbler),
                ("stalled body", body_stalled),
                ("idle keep-alive", idle),
            ]
        }
    finally:
        stop.set()
        for s in (silent, partial, dribbler, body_stalled, idle):
            s.close()
    for name, (_, took) in results.items():
        assert took is not None, f"{name}: still open after 6 s"
    assert time.monotonic() - t0 < 5  # header 1 s, body 1.5 s, keep-alive 1 s, plus slack
    assert results["silent"][0] == b"" and results["dribbling headers"][0] == b""
    answer = results["stalled body"][0].decode()
    assert answer.startswith("HTTP/1.1 408")
    detail = json.loads(answer.split("\r\n\r\n", 1)[1])["detail"]
    assert "--body-timeout-s" in detail and "\n" not in detail
    assert results["idle keep-alive"][0].startswith(b"HTTP/1.1 200")
    r = httpx.post(f"{url}/predict", files=files(small_png))  # still serving
    assert r.status_code == 200


def test_oversized_headers_are_refused(server):
    url, _ = server
    with socket.create_connection(_address(url)) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")
        answer, took = read_until_closed(s, timeout=5)
    assert took is not None and answer.startswith(b"HTTP/1.1 431")  # --max-header-kb 16
    assert b"--max-header-kb" in answer
    with socket.create_connection(_address(url)) as s:  # just under the limit: served
        s.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 15_000 + b"\r\n\r\n")
        s.settimeout(5)
        assert s.recv(100).startswith(b"HTTP/1.1 200")


@pytest.fixture(scope="module")
def huge_png():
    return flat_png(9000, 9000)  # 81 megapixels in ~330 KB, under Pillow's bomb limit


def test_huge_pixel_images_are_refused_from_the_header(server, huge_png):
    url, _ = server
    before = _health(url)
    t0 = time.monotonic()
    r = httpx.post(f"{url}/predict", content=huge_png, headers={"Content-Type": "image/png"})
    assert r.status_code == 413
    detail = r.json()["detail"]
    assert "9000x9000 = 81.0 megapixels" in detail and "--max-image-mp" in detail
    assert "\n" not in detail
    two = flat_png(*LARGE)
    r = httpx.post(f"{url}/predict", files=files(two, two))
    assert r.status_code == 413 and "--max-request-mp" in r.json()["detail"]
    assert time.monotonic() - t0 < 5  # nothing was decoded
    assert _health(url)["large_decodes"] == before["large_decodes"]


def test_large_decodes_keep_to_the_memory_bound_and_do_not_hold_small_requests(
    server, small_png, huge_png
):
    url, _ = server
    info = httpx.get(f"{url}/info").json()
    pid, bound_mb = info["server"]["pid"], info["server"]["decode_memory_bound_mb"]
    large = flat_png(*LARGE)
    httpx.post(f"{url}/predict", content=large, headers={"Content-Type": "image/png"})
    with open(f"/proc/{pid}/clear_refs", "w") as f:  # reset the peak (VmHWM) to now
        f.write("5")
    rss_before = process_memory_kb(pid)["VmRSS"]
    done: dict[str, float] = {}
    t0 = time.monotonic()

    def post(name: str, body: bytes) -> None:
        r = httpx.post(
            f"{url}/predict", content=body, headers={"Content-Type": "image/png"}, timeout=60
        )
        done[name] = time.monotonic() - t0
        assert r.status_code == (413 if body is huge_png else 200), (name, r.text)

    jobs = [(f"large {i}", large) for i in range(6)] + [(f"huge {i}", huge_png) for i in range(3)]
    threads = [threading.Thread(target=post, args=job) for job in jobs]
    for t in threads:
        t.start()
    time.sleep(0.3)  # the large ones are decoding or queued now
    post("small", small_png)
    for t in threads:
        t.join()
    peak_mb = (process_memory_kb(pid)["VmHWM"] - rss_before) / 1024
    assert len(done) == 10
    assert done["small"] < max(done[f"large {i}"] for i in range(6)), done
    assert _health(url)["large_decodes"] >= 7
    # the stated bound: decodes in flight hold at most decode_memory_bound_mb; 64 MB for the
    # request bodies (9 x 0.3 MB), the allocator's slack and the responses
    assert peak_mb < bound_mb + 64, (peak_mb, bound_mb)


def test_bf16_serves_and_info_reports_it(server, small_png):
    url, _ = server
    info = httpx.get(f"{url}/info").json()
    assert info["precision"] == "bf16"
    r = httpx.post(f"{url}/predict", files=files(small_png))
    assert r.status_code == 200 and len(r.json()["predictions"][0]["predictions"]) == 5


def _weights_that_do_not_fit(tiny_ckpt, folder):  # noqa: F811
    """A checkpoint whose tensors do not fit its model config: a tensor gone, no digest.

    `checkpoint.load` refuses it before building anything ("checkpoint metadata is damaged"),
    in the parent, before a worker starts."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(tiny_ckpt), framework="pt") as f:
        header = {k: v for k, v in (f.metadata() or {}).items() if k != "sha256"}
    tensors = load_file(str(tiny_ckpt))
    tensors.pop(next(k for k in tensors if k.startswith("model.")))
    path = folder / "unfit.safetensors"
    save_file(tensors, str(path), metadata=header)
    return path


@pytest.mark.parametrize("case", ["device cuda without a GPU", "weights that do not fit"])
def test_workers_that_cannot_load_the_model_exit_2_at_once(case, tiny_ckpt, tmp_path):  # noqa: F811
    if case.startswith("device"):
        if torch.cuda.is_available():
            pytest.skip("needs a machine without CUDA")
        ckpt, extra, word = tiny_ckpt, ["--device", "cuda"], "cuda"
    else:
        ckpt, extra, word = _weights_that_do_not_fit(tiny_ckpt, tmp_path), [], "damaged"
    cmd = [sys.executable, "-m", "eanet", "serve", str(ckpt), "--workers", "2", *extra]
    cmd += ["--port", str(free_port())]
    try:  # before the fix: workers die and are restarted for ever
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"eanet serve --workers 2 with {case} did not exit") from exc
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()  # "serving CKPT on URL" first, then the one error
    errors = [line for line in lines if line.startswith("eanet: error:")]
    assert lines[-1] == errors[0] and len(errors) == 1 and word in errors[0] and len(lines) <= 2


def test_workers_serve(tiny_ckpt, small_png):  # noqa: F811
    opts = ("--workers", "2", "--device", "cpu", "--threads", "1")
    with server_process(tiny_ckpt, *opts, timeout=60) as url:
        r = httpx.post(f"{url}/predict", files=files(small_png))
        assert r.status_code == 200
        assert httpx.get(f"{url}/info").json()["server"]["workers"] == 2
