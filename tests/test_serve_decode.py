"""`eanet serve`'s decode budget: formats, JPEG scans and CPU time, checked in process."""

import io
import struct
import time
import zlib

import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="eanet serve needs the [serve] extra")

from serve_helpers import flat_png  # noqa: E402
from test_serve import TestClient, files, make_config, tiny_ckpt  # noqa: E402, F401

from eanet.serve import decode  # noqa: E402
from eanet.serve.app import create_app  # noqa: E402

# A DC refinement scan (Ss=Se=0, Ah=1, Al=0) of component 1 needs no Huffman table, so one with
# no data is 10 bytes that libjpeg accepts, and still makes a pass over the image's blocks.
EMPTY_SCAN = b"\xff\xda\x00\x08\x01\x01\x00\x00\x00\x10"


def progressive_jpeg(width: int, height: int, extra: bytes | int = 0) -> bytes:
    """A one-colour progressive JPEG with `extra` (bytes, or so many empty scans) before EOI."""
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (120, 30, 200)).save(buf, "JPEG", progressive=True)
    data = buf.getvalue()
    assert data.endswith(b"\xff\xd9")
    extra = EMPTY_SCAN * extra if isinstance(extra, int) else extra
    return data[:-2] + extra + b"\xff\xd9"


def icns_holding(png: bytes) -> bytes:
    """An ICNS file with one 128x128 ('ic07') entry that is in fact `png`, of any size."""
    entry = b"ic07" + struct.pack(">I", 8 + len(png)) + png
    return b"icns" + struct.pack(">I", 8 + len(entry)) + entry


def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 30)).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def client(tiny_ckpt):  # noqa: F811
    with TestClient(create_app(make_config(tiny_ckpt, max_upload_mb=4))) as c:
        yield c


@pytest.mark.parametrize(
    "size, scans", [((1000, 1000), 2000), ((4000, 4000), 500)], ids=["1 MP", "16 MP"]
)
def test_jpegs_of_too_many_scans_are_refused_before_decoding(client, size, scans):
    data = progressive_jpeg(*size, scans)
    t0 = time.monotonic()
    r = client.post("/predict", content=data, headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 413, r.text
    assert r.json()["detail"] == (
        "image 1: a JPEG of more than 100 scans; the server decodes at most 100 (each scan is "
        "a pass over the whole image)"
    )
    assert time.monotonic() - t0 < 2  # decoding them took seconds (47 s for 300,000)
    r = client.post("/predict", content=progressive_jpeg(*size), headers=r.request.headers)
    assert r.status_code == 200


def test_the_scan_count_reads_markers_as_libjpeg_does():
    assert decode.jpeg_markers(progressive_jpeg(64, 64))[0] == 10  # libjpeg's script
    assert decode.jpeg_markers(progressive_jpeg(64, 64, 90))[0] == 100
    assert decode.jpeg_markers(progressive_jpeg(64, 64, 300_000))[0] == 101  # stops there
    filled = progressive_jpeg(64, 64).replace(b"\xff\xda", b"\xff\xff\xff\xda")
    assert decode.jpeg_markers(filled)[0] == 10  # fill bytes before a marker
    comments = progressive_jpeg(64, 64)[:2] + b"\xff\xfe\x00\x02" * 100_000
    t0 = time.monotonic()
    assert decode.jpeg_markers(comments)[1] == 501  # Pillow's header parser: 2 million in 14 s
    assert time.monotonic() - t0 < 0.5


@pytest.mark.parametrize("fmt", ["ICNS", "ICO", "TIFF", "PPM"])
def test_containers_and_other_formats_are_refused_with_415(client, fmt):
    # The ICNS case: its header says 128x128 (16,384 pixels), and Pillow decoded the 4 MP PNG
    # inside before it noticed the size (64 MP and +250 MB in the report).
    data = icns_holding(flat_png(2000, 2000)) if fmt == "ICNS" else _encoded(fmt)
    t0 = time.monotonic()
    r = client.post("/predict", files=files(data, names=[f"x.{fmt.lower()}"]))
    assert r.status_code == 415, r.text
    assert r.json()["detail"] == (
        f"image 1 (x.{fmt.lower()}): {fmt} images are not accepted, only JPEG, PNG, WebP, BMP, "
        "GIF (formats whose header gives the size that is decoded)"
    )
    assert time.monotonic() - t0 < 2
    assert client.get("/health").json()["internal_errors"] == 0


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF"])
def test_accepted_formats_are_served(client, fmt):
    r = client.post("/predict", files=files(_encoded(fmt)))
    assert r.status_code == 200, r.text


def test_a_flood_of_header_chunks_is_stopped_by_the_header_budget(client):
    png = flat_png(8, 8)
    empty_chunk = struct.pack(">I4sI", 0, b"teXx", zlib.crc32(b"teXx"))  # unknown, ancillary
    assert Image.open(io.BytesIO(png[:33] + empty_chunk + png[33:])).size == (8, 8)
    flood = png[:33] + empty_chunk * 200_000 + png[33:]  # after IHDR: 2.4 MB, 7 s to open
    t0 = time.monotonic()
    r = client.post("/predict", files=files(flood, names=["flood.png"]))
    assert r.status_code == 413, r.text
    assert r.json()["detail"] == (
        "image 1 (flood.png): reading its header took more than 0.25 CPU seconds, the "
        "server's budget for the headers of a request"
    )
    assert time.monotonic() - t0 < 3


def test_a_request_over_its_cpu_budget_is_refused(tiny_ckpt):  # noqa: F811
    config = make_config(tiny_ckpt, max_upload_mb=1, decode_s_per_mp=0.002)  # 2 ms per MP
    with TestClient(create_app(config)) as c:
        slow = progressive_jpeg(1000, 1000, 90)  # 100 scans: tens of ms, far over 2 ms
        r = c.post("/predict", files=files(slow, names=["slow.jpg"]))
        assert r.status_code == 413, r.text
        assert r.json()["detail"] == (
            "image 1 (slow.jpg): decoding took more than the request's budget of 0.002 CPU "
            "seconds (--decode-s-per-mp)"
        )
        assert c.post("/predict", files=files(_encoded("PNG"))).status_code == 200


def test_the_cpu_budget_stops_a_decode_midway(monkeypatch):
    stopped_at = []

    class Spy(decode._BudgetedReader):
        def check(self):
            try:
                super().check()
            except decode._OverBudget:
                stopped_at.append(self.tell())
                raise

    monkeypatch.setattr(decode, "_BudgetedReader", Spy)
    # 16 groups of 200 empty scans, each then a 64 KiB comment: Pillow reads 64 KiB at a
    # time, so the decode meets a read after every group or two
    comment = b"\xff\xfe\xff\xfe" + bytes(0xFFFE - 2)
    data = progressive_jpeg(1000, 1000, (EMPTY_SCAN * 200 + comment) * 16)
    with pytest.raises(decode.DecodeBudgetError, match="--decode-s-per-mp"):
        decode.decode([(None, data)], 32, budget_s=0.001)
    assert stopped_at and stopped_at[0] < len(data) / 4
