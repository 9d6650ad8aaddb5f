"""Decoding uploads for the server: a pixel budget read from the headers, and two decode lanes.

A small compressed file can hold a huge picture (a one-colour 9000x9000 PNG is 315 KB and
decodes to about 2 GB), so the size of the body says nothing about the cost of decoding it.
Pillow's `Image.open` reads only the header, where the width and height are: every image is
measured there first, and one above `max_image_pixels`, or a request above
`max_request_pixels` in all, is refused before any pixel is decoded.

What passes is decoded by `eanet.data.images.load_image` (the one preprocessing path) in one
of two thread pools, both apart from the model's forward thread:

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

import torch
from PIL import Image

from eanet.data import images as imgs
from eanet.errors import DataError, one_line

LARGE_PIXELS = 1_000_000  # a request above this (all its images) takes the large lane
SMALL_THREADS = min(4, os.cpu_count() or 1)
# Peak resident memory of load_image per pixel, measured (VmHWM) on 2000x2000 images with
# Pillow 13: RGB PNG/JPEG 8, palette with transparency 18, 16-bit grey 17, RGBA/LA PNG 24,
# RGBA WebP with an EXIF rotation 35.4. Rounded up.
DECODE_BYTES_PER_PIXEL = 40

Items = list[tuple[str | None, bytes]]  # (file name or None, encoded bytes) per image


class PixelBudgetError(DataError):
    """An image, or a request, has more pixels than the server decodes (answered 413)."""


def _label(i: int, name: str | None) -> str:
    return f"image {i + 1}" + (f" ({name})" if name else "")


def measure(items: Items, max_image_pixels: int, max_request_pixels: int) -> int:
    """Pixels of all images together, from their headers; PixelBudgetError above a limit.

    An image Pillow cannot identify counts 0 here: decoding it fails with the usual reason.
    """
    limit_mp = max_image_pixels / 1e6
    total = 0
    for i, (name, data) in enumerate(items):
        try:
            with Image.open(io.BytesIO(data)) as img:  # the header only
                w, h = img.size
        except Image.DecompressionBombError as exc:  # Pillow's own limit, from the header too
            raise PixelBudgetError(
                f"{_label(i, name)}: {one_line(exc)}; the serving limit is {limit_mp:g} "
                "megapixels per image (--max-image-mp)"
            ) from exc
        except Exception:
            continue
        if w * h > max_image_pixels:
            raise PixelBudgetError(
                f"{_label(i, name)}: {w}x{h} = {w * h / 1e6:.1f} megapixels, above the serving "
                f"limit of {limit_mp:g} megapixels per image (--max-image-mp)"
            )
        total += w * h
    if total > max_request_pixels:
        raise PixelBudgetError(
            f"{len(items)} images of {total / 1e6:.1f} megapixels in all, above the serving "
            f"limit of {max_request_pixels / 1e6:g} megapixels per request (--max-request-mp)"
        )
    return total


def decode(items: Items, size: int) -> torch.Tensor:
    """Encoded images -> uint8 [n, 3, size, size]; a DataError names the image and why."""
    out = []
    for i, (name, data) in enumerate(items):
        try:
            out.append(imgs.load_image(data, size))
        except DataError as exc:
            reason = str(exc).removeprefix(f"<{len(data)} bytes>: ")
            raise DataError(f"{_label(i, name)}: {reason}") from exc
    return torch.stack(out)


def decode_memory_bound(max_image_pixels: int, max_large_decodes: int) -> int:
    """Bytes the decodes in flight hold at most: the large lane's and the small lane's."""
    large = max_large_decodes * max_image_pixels
    small = SMALL_THREADS * LARGE_PIXELS
    return (large + small) * DECODE_BYTES_PER_PIXEL


class ImageDecoder:
    """Measure, then decode in the small or the large lane (see the module docstring)."""

    def __init__(self, max_image_pixels: int, max_request_pixels: int, max_large_decodes: int):
        self.max_image_pixels = max_image_pixels
        self.max_request_pixels = max_request_pixels
        self._small = concurrent.futures.ThreadPoolExecutor(
            SMALL_THREADS, thread_name_prefix="eanet-decode"
        )
        self._large = concurrent.futures.ThreadPoolExecutor(
            max_large_decodes, thread_name_prefix="eanet-decode-large"
        )
        self.large_requests = 0  # requests decoded in the large lane

    async def decode(self, items: Items, size: int) -> torch.Tensor:
        """Encoded images -> uint8 [n, 3, size, size], or PixelBudgetError / DataError."""
        loop = asyncio.get_running_loop()
        budget = (self.max_image_pixels, self.max_request_pixels)
        pixels = await loop.run_in_executor(self._small, measure, items, *budget)
        lane = self._small
        if pixels > LARGE_PIXELS:
            lane = self._large
            self.large_requests += 1
        return await loop.run_in_executor(lane, decode, items, size)

    def close(self) -> None:
        """Drop queued decodes; running ones finish in their threads."""
        for pool in (self._small, self._large):
            pool.shutdown(wait=False, cancel_futures=True)
