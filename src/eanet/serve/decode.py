"""Decoding uploads for the server: a decode budget checked before and during decoding, and two
decode lanes.

A small compressed file can cost far more to decode than its size says: a one-colour
9000x9000 PNG is 315 KB and decodes to about 2 GB; a 3.6 MB progressive JPEG of one megapixel
with 300,000 empty scans took 47 s (each scan is a pass over the image); a 265 KB ICNS whose
header says 128x128 made Pillow decode an embedded 64-megapixel PNG. So every image is
inspected before any pixel is decoded (`measure`), from its bytes and Pillow's header:

- its format must be one whose header size is what gets decoded: JPEG, PNG, WebP, BMP and
  GIF (of an animation, the first frame). Containers of several images (ICNS, ICO, TIFF, ...)
  and every other format are refused (415);
- a JPEG's scans are counted from its markers, as libjpeg reads them: more than
  `MAX_JPEG_SCANS`, or more than `MAX_JPEG_MARKERS` markers, are refused (413);
- an image above `max_image_pixels`, or a request above `max_request_pixels` in all, is
  refused (413);
- Pillow parses headers in Python (a PNG's chunks before its pixels, ...): reading the
  headers of a request may take `MEASURE_CPU_S` (413 beyond).

While decoding, the budget is CPU time too: a request may take `decode_s_per_mp` seconds per
megapixel of its images' header sizes (at least one megapixel's worth), counted in the
decoding thread (`time.thread_time`, so other work on a busy machine does not count). Pillow
reads a file in blocks of 64 KiB; a read after the budget is spent stops the decode, and a
request over budget is refused (413) even if its last block finished.

What passes is decoded as `eanet.data.images.load_image` decodes bytes (the one preprocessing
path; only the reading is watched) in one of two thread pools, both apart from the model's
forward thread:

- small requests (at most `LARGE_PIXELS` in all: thumbnails, CIFAR-sized pictures) in a pool of
  `SMALL_THREADS` threads of their own, so that large uploads never make them wait;
- larger requests in a pool of `max_large_decodes` threads; more of them queue (as coroutines,
  holding only their encoded bytes) until a thread is free.

Memory: decoding takes at most `DECODE_BYTES_PER_PIXEL` bytes per pixel at its peak (the
decoded frame, the RGBA composite of transparent images, an EXIF rotation, the RGB copy), so
the decodes in flight hold at most `decode_memory_bound(...)` bytes.
"""

import asyncio
import concurrent.futures
import io
import os
import re
import time

import torch
from PIL import Image, ImageOps

from eanet.data import images as imgs
from eanet.errors import DataError, one_line

LARGE_PIXELS = 1_000_000  # a request above this (all its images) takes the large lane
SMALL_THREADS = min(4, os.cpu_count() or 1)
# Peak resident memory of load_image per pixel, measured (VmHWM) on 2000x2000 images with
# Pillow 13: RGB PNG/JPEG 8, palette with transparency 18, 16-bit grey 17, RGBA/LA PNG 24,
# RGBA WebP with an EXIF rotation 35.4. Rounded up.
DECODE_BYTES_PER_PIXEL = 40
# Pillow's format -> the name users know. Each decodes what its header measures (an
# animation: its first frame; MPO is a camera JPEG with a second picture after the first).
ACCEPTED_FORMATS = {
    "JPEG": "JPEG",
    "MPO": "JPEG",
    "PNG": "PNG",
    "WEBP": "WebP",
    "BMP": "BMP",
    "GIF": "GIF",
}
# libjpeg's progressive scripts write about 10 scans; each scan costs a pass over all the
# image's blocks (a fraction of a millisecond per megapixel: 100 scans of 16 MP take about a
# second).
MAX_JPEG_SCANS = 100
MEASURE_CPU_S = 0.25  # for Pillow to read the headers of a request (a real one: a few ms)
MAX_JPEG_MARKERS = 500  # a real JPEG has a few dozen (restart markers are not counted)
# A marker, or a fill byte before one: 0xFF and a code that is neither a stuffed zero nor a
# restart marker (those two belong to a scan's entropy-coded data), as libjpeg finds them.
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7]")
_PARAMETERLESS = frozenset({0x01, 0xD8})  # TEM, SOI

Items = list[tuple[str | None, bytes]]  # (file name or None, encoded bytes) per image


class DecodeBudgetError(DataError):
    """An image, or a request, costs more to decode than the server allows (answered 413)."""


class UnsupportedFormatError(DataError):
    """An image in a format the server does not decode (answered 415)."""


def _label(i: int, name: str | None) -> str:
    return f"image {i + 1}" + (f" ({name})" if name else "")


def jpeg_markers(data: bytes) -> tuple[int, int]:
    """(scans, markers) of a JPEG, found as libjpeg reads it; stops above the limits."""
    scans = markers = 0
    pos = 2  # after SOI
    while scans <= MAX_JPEG_SCANS and markers <= MAX_JPEG_MARKERS:
        found = _JPEG_MARKER.search(data, pos)
        if found is None:
            break
        markers += 1
        code, pos = data[found.start() + 1], found.end()
        if code == 0xFF:  # a fill byte: the marker follows
            pos -= 1
        elif code == 0xD9:  # EOI: what follows (an MPO's second picture) is not decoded
            break
        elif code not in _PARAMETERLESS:  # a segment: skip it, its length included
            scans += code == 0xDA
            pos += int.from_bytes(data[pos : pos + 2], "big")
    return scans, markers


def _check_jpeg(label: str, data: bytes) -> None:
    scans, markers = jpeg_markers(data)
    if scans > MAX_JPEG_SCANS:
        raise DecodeBudgetError(
            f"{label}: a JPEG of more than {MAX_JPEG_SCANS} scans; the server decodes at most "
            f"{MAX_JPEG_SCANS} (each scan is a pass over the whole image)"
        )
    if markers > MAX_JPEG_MARKERS:
        raise DecodeBudgetError(
            f"{label}: a JPEG of more than {MAX_JPEG_MARKERS} markers; the server decodes at "
            f"most {MAX_JPEG_MARKERS}"
        )


class _OverBudget(Exception):
    """The CPU budget was spent."""


class _BudgetedReader(io.BytesIO):
    """Encoded bytes for Pillow; a read after `deadline` (of `time.thread_time`) raises."""

    def __init__(self, data: bytes, deadline: float) -> None:
        super().__init__(data)
        self.deadline = deadline

    def check(self) -> None:
        if time.thread_time() > self.deadline:
            raise _OverBudget

    def read(self, size: int | None = -1) -> bytes:
        self.check()
        return super().read(size)


def _measure_one(label: str, data: bytes, max_image_pixels: int, deadline: float) -> int:
    """One image's pixels from its header, after its format and (JPEG) scans are checked."""
    limit_mp = max_image_pixels / 1e6
    if data[:2] == b"\xff\xd8":  # before Pillow parses its markers in Python
        _check_jpeg(label, data)
    try:
        with Image.open(_BudgetedReader(data, deadline)) as img:  # the header only
            kind, (w, h) = img.format, img.size
    except Image.DecompressionBombError as exc:  # Pillow's own limit, from the header too
        raise DecodeBudgetError(
            f"{label}: {one_line(exc)}; the serving limit is {limit_mp:g} megapixels per image "
            "(--max-image-mp)"
        ) from exc
    except _OverBudget:
        raise DecodeBudgetError(
            f"{label}: reading its header took more than {MEASURE_CPU_S:g} CPU seconds, the "
            "server's budget for the headers of a request"
        ) from None
    except Exception:
        return 0  # not an image Pillow can read: decoding says so
    if kind not in ACCEPTED_FORMATS:
        names = ", ".join(dict.fromkeys(ACCEPTED_FORMATS.values()))
        raise UnsupportedFormatError(
            f"{label}: {kind} images are not accepted, only {names} (formats whose header "
            "gives the size that is decoded)"
        )
    bomb = Image.MAX_IMAGE_PIXELS  # read now, as load_image reads it
    if bomb is not None and w * h > bomb:
        raise DecodeBudgetError(
            f"{label}: refused as a possible decompression bomb ({w}x{h} pixels, above "
            f"PIL.Image.MAX_IMAGE_PIXELS = {int(bomb)})"
        )
    if w * h > max_image_pixels:
        raise DecodeBudgetError(
            f"{label}: {w}x{h} = {w * h / 1e6:.1f} megapixels, above the serving limit of "
            f"{limit_mp:g} megapixels per image (--max-image-mp)"
        )
    return w * h


def measure(items: Items, max_image_pixels: int, max_request_pixels: int) -> int:
    """Pixels of all images together, from their headers; DecodeBudgetError or
    UnsupportedFormatError.

    An image Pillow cannot identify counts 0 here: decoding it fails with the usual reason.
    """
    deadline = time.thread_time() + MEASURE_CPU_S
    total = 0
    for i, (name, data) in enumerate(items):
        total += _measure_one(_label(i, name), data, max_image_pixels, deadline)
    if total > max_request_pixels:
        raise DecodeBudgetError(
            f"{len(items)} images of {total / 1e6:.1f} megapixels in all, above the serving "
            f"limit of {max_request_pixels / 1e6:g} megapixels per request (--max-request-mp)"
        )
    return total


def decode_budget_s(pixels: int, s_per_mp: float) -> float:
    """CPU seconds to decode a request of `pixels` (at least one megapixel's worth)."""
    return s_per_mp * max(pixels, LARGE_PIXELS) / 1e6


def _open_within_budget(data: bytes, deadline: float) -> Image.Image:
    """`imgs.open_image` for bytes (decode, EXIF rotation, RGB), its reads watched."""
    if not data:
        raise DataError("empty, not an image")
    reader = _BudgetedReader(data, deadline)
    try:
        with Image.open(reader) as img:
            img.load()
            reader.check()  # a decoder that took the whole file at once (WebP) is done now
            return imgs.to_rgb(ImageOps.exif_transpose(img))
    except _OverBudget:
        raise
    except Image.UnidentifiedImageError as exc:
        raise DataError("not an image Pillow can read") from exc
    except Exception as exc:  # Pillow's plugins raise a zoo of types on damaged input
        reason = one_line(exc) or type(exc).__name__
        raise DataError(f"cannot decode it ({reason}); the file is corrupt") from exc


def decode(items: Items, size: int, budget_s: float = float("inf")) -> torch.Tensor:
    """Encoded images -> uint8 [n, 3, size, size] within `budget_s` CPU seconds in all;
    a DataError (DecodeBudgetError past the budget) names the image and why."""
    deadline = time.thread_time() + budget_s
    out = []
    for i, (name, data) in enumerate(items):
        try:
            out.append(imgs.load_image(_open_within_budget(data, deadline), size))
        except _OverBudget:
            raise DecodeBudgetError(
                f"{_label(i, name)}: decoding took more than the request's budget of "
                f"{budget_s:.3g} CPU seconds (--decode-s-per-mp)"
            ) from None
        except DataError as exc:
            raise DataError(f"{_label(i, name)}: {exc}") from exc
    return torch.stack(out)


def decode_memory_bound(max_image_pixels: int, max_large_decodes: int) -> int:
    """Bytes the decodes in flight hold at most: the large lane's and the small lane's."""
    large = max_large_decodes * max_image_pixels
    small = SMALL_THREADS * LARGE_PIXELS
    return (large + small) * DECODE_BYTES_PER_PIXEL


class ImageDecoder:
    """Measure, then decode in the small or the large lane (see the module docstring)."""

    def __init__(
        self,
        max_image_pixels: int,
        max_request_pixels: int,
        max_large_decodes: int,
        decode_s_per_mp: float = 0.5,
    ):
        self.max_image_pixels = max_image_pixels
        self.max_request_pixels = max_request_pixels
        self.decode_s_per_mp = decode_s_per_mp
        self._small = concurrent.futures.ThreadPoolExecutor(
            SMALL_THREADS, thread_name_prefix="eanet-decode"
        )
        self._large = concurrent.futures.ThreadPoolExecutor(
            max_large_decodes, thread_name_prefix="eanet-decode-large"
        )
        self.large_requests = 0  # requests decoded in the large lane

    async def decode(self, items: Items, size: int) -> torch.Tensor:
        """Encoded images -> uint8 [n, 3, size, size], or DecodeBudgetError / DataError."""
        loop = asyncio.get_running_loop()
        budget = (self.max_image_pixels, self.max_request_pixels)
        pixels = await loop.run_in_executor(self._small, measure, items, *budget)
        lane = self._small
        if pixels > LARGE_PIXELS:
            lane = self._large
            self.large_requests += 1
        budget_s = decode_budget_s(pixels, self.decode_s_per_mp)
        return await loop.run_in_executor(lane, decode, items, size, budget_s)

    def close(self) -> None:
        """Drop queued decodes; running ones finish in their threads."""
        for pool in (self._small, self._large):
            pool.shutdown(wait=False, cancel_futures=True)
