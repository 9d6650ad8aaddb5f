"""Pictures -> uint8 RGB tensors at the model's input size: THE preprocessing path.

Training on folders, prediction, the Python API and export all call these functions, so an
image becomes model input in exactly one way:

1. **Decode** with Pillow: any format it reads (PNG, JPEG, BMP, GIF, WebP, TIFF, ...); the
   first frame of an animation; the EXIF orientation of camera JPEGs applied. Files larger
   than Pillow's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`, 89.5 megapixels by
   default, read at call time) are refused before they are decoded.
2. **To RGB**: grey and palette images expand to three equal channels; transparency (RGBA,
   LA, PA, a palette or grey image with a transparent colour) is composited on black, i.e.
   colour times alpha, so colour hidden under fully transparent pixels cannot leak in;
   16-bit grey ("I;16", "I") is scaled from 0..65535 to 0..255, 32-bit float grey ("F") is
   clipped to 0..255; CMYK, YCbCr and the rest go through Pillow's `convert("RGB")`.
3. **Resize** the WHOLE image to size x size with Pillow's bilinear filter, which is
   antialiased when shrinking. No crop: nothing is cut off, and the aspect ratio is not
   kept (a 2:1 picture is squeezed), as CIFAR's 32x32 images were made from whole pictures.
   Images already size x size are not touched, so a PNG of a CIFAR image is bit-exact.

The model normalises inside, so the result is raw uint8 pixels, [3, size, size].
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from eanet.errors import DataError

log = logging.getLogger(__name__)

# Extensions taken as images when a directory is walked; files named on the command line are
# tried whatever their name.
IMAGE_EXTENSIONS = frozenset(
    {
        ".png",
        ".jpg",
        ".jpeg",
        ".jpe",
        ".jfif",
        ".bmp",
        ".dib",
        ".gif",
        ".webp",
        ".tif",
        ".tiff",
        ".ppm",
        ".pgm",
        ".pbm",
        ".pnm",
        ".tga",
    }
)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")

ImageSource = str | os.PathLike | bytes | bytearray
ImageLike = ImageSource | Image.Image | np.ndarray | torch.Tensor


def is_image_file(path: Path) -> bool:
    """True for a visible file whose extension is an image format's."""
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(root: str | Path) -> tuple[list[Path], list[Path]]:
    """Image files under `root` (recursive, sorted by path parts) and the other files.

    Hidden files and folders (".DS_Store", "._x.jpg" of macOS) are neither: they are not
    pictures anyone put there. Symbolic links are followed, each real folder visited once.
    """
    root = Path(root)
    images: list[Path] = []
    others: list[Path] = []
    seen: set[tuple[int, int]] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:  # a link loop or a second link to the same folder
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            path = Path(folder) / name
            if name.startswith("."):
                continue
            (images if is_image_file(path) else others).append(path)
    key = lambda p: p.relative_to(root).parts  # noqa: E731
    return sorted(images, key=key), sorted(others, key=key)


def _label(source: object) -> str:
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    return str(source)


def _check_pixels(img: Image.Image, label: str) -> None:
    """Refuse images above the decompression-bomb limit (read at call time) before decoding."""
    limit = Image.MAX_IMAGE_PIXELS
    w, h = img.size
    if limit is not None and w * h > limit:
        raise DataError(
            f"{label}: refused as a possible decompression bomb ({w}x{h} = {w * h} pixels, "
            f"above PIL.Image.MAX_IMAGE_PIXELS = {int(limit)}); shrink the image, or raise "
            "the limit if you trust it"
        )


def open_image(source: ImageSource) -> Image.Image:
    """Decode a file path or encoded bytes into an RGB PIL image (steps 1-2 of the module doc)."""
    label = _label(source)
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise DataError(f"{label}: empty, not an image")
        stream: Any = io.BytesIO(source)
    else:
        path = Path(source)
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise DataError(f"{label}: cannot read it ({exc.strerror or exc})") from exc
        if path.is_dir():
            raise DataError(f"{label}: a directory, not an image file")
        if size == 0:
            raise DataError(f"{label}: empty file (0 bytes), not an image")
        stream = path
    try:
        with Image.open(stream) as img:  # Pillow refuses above 2x the limit from the header
            _check_pixels(img, label)  # and only warns between 1x and 2x: refuse those too
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(
            f"{label}: refused as a possible decompression bomb ({exc}); shrink the image, or "
            "raise PIL.Image.MAX_IMAGE_PIXELS if you trust it"
        ) from exc
    except Image.UnidentifiedImageError as exc:
        raise DataError(f"{label}: not an image Pillow can read") from exc
    except Exception as exc:
        # Pillow's format plugins raise a zoo of types on damaged input (OSError, ValueError,
        # SyntaxError, struct.error, EOFError, ...); each is the file's fault, never a crash.
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"{label}: cannot decode it ({reason}); the file is corrupt") from exc


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: 16-bit scaled, transparency composited on black (see module doc)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _SIXTEEN_BIT:
        grey = np.asarray(img).astype(np.float32) * (255.0 / 65535.0)
        return Image.fromarray(_to_uint8(grey), "L").convert("RGB")
    if mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(img)), "L").convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", img.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return img.convert("RGB")


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.nan_to_num(values)), 0, 255).astype(np.uint8)


def resize(img: Image.Image, size: int) -> Image.Image:
    """The whole image to size x size, bilinear (antialiased when shrinking), no crop."""
    if img.size == (size, size):
        return img
    return img.resize((size, size), Image.Resampling.BILINEAR)


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> uint8 tensor [3, H, W]."""
    return torch.from_numpy(np.array(to_rgb(img), dtype=np.uint8)).permute(2, 0, 1).contiguous()


def decode_image(source: ImageSource) -> torch.Tensor:
    """A file path or encoded bytes -> uint8 RGB tensor [3, H, W] at the file's own size."""
    return pil_to_tensor(open_image(source))


def to_pil(image: ImageLike, label: str = "image") -> Image.Image:
    """Any supported input -> RGB PIL image.

    Paths and bytes are decoded; PIL images converted; numpy arrays are HWC or (H, W); torch
    tensors are CHW or (H, W). Channels: 1 grey, 3 RGB, 4 RGBA (composited on black). Integer
    and float arrays alike hold pixel values 0..255 (the model's scale, not 0..1).
    """
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, (str, os.PathLike, bytes, bytearray)):
        return open_image(image)
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.dim() == 3:
            t = t.permute(1, 2, 0)  # CHW -> HWC
        array = t.numpy()
    elif isinstance(image, np.ndarray):
        array = image
    else:
        raise DataError(
            f"{label}: a {type(image).__name__} is not an image; pass a file path, bytes, a PIL "
            "image, an HWC numpy array or a CHW tensor"
        )
    return _array_to_pil(array, label)


def _array_to_pil(array: np.ndarray, label: str) -> Image.Image:
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or 0 in array.shape:
        raise DataError(
            f"{label}: array of shape {tuple(array.shape)} is not an image; expected HWC numpy "
            "or CHW tensor with 1, 3 or 4 channels"
        )
    if array.dtype == np.bool_ or array.dtype.kind not in "uif":
        raise DataError(f"{label}: {array.dtype} pixels; expected integers or floats 0..255")
    if array.dtype.kind == "f":
        finite = array[np.isfinite(array)]
        if finite.size and 0 < finite.max() <= 1.0:
            log.warning(
                "%s: float pixels all within 0..1; eanet takes 0..255 (multiply by 255)", label
            )
    pixels = array if array.dtype == np.uint8 else _to_uint8(array.astype(np.float64))
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[pixels.shape[2]]
    img = Image.fromarray(np.ascontiguousarray(pixels[:, :, 0] if mode == "L" else pixels), mode)
    return to_rgb(img)


def load_image(image: ImageLike, size: int, label: str | None = None) -> torch.Tensor:
    """Any supported input -> uint8 [3, size, size], the model's input for one image."""
    return pil_to_tensor(resize(to_pil(image, label or _label(image)), size))


def prepare(images: Iterable[ImageLike], size: int) -> torch.Tensor:
    """Images (paths, bytes, PIL, arrays, [3, H, W] tensors) -> uint8 [B, 3, size, size]."""
    tensors = [load_image(img, size, f"image {i}") for i, img in enumerate(images)]
    if not tensors:
        return torch.empty(0, 3, size, size, dtype=torch.uint8)
    return torch.stack(tensors)


def to_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 images [B, C, H, W] for a model of `channels` inputs: as they are, or RGB as grey.

    Grey is Pillow's "L" (ITU-R 601 luma, 0.299 R + 0.587 G + 0.114 B, rounded), so a grey
    picture, which step 2 expanded to three equal channels, comes back bit-exact.
    """
    if images.shape[1] == channels:
        return images
    if channels != 1 or images.shape[1] != 3:
        raise ValueError(f"{images.shape[1]}-channel images cannot feed {channels} channels")
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    grey = (images.float() * weights).sum(dim=1, keepdim=True)
    return grey.round().clamp(0, 255).to(torch.uint8)  # (B, 1, H, W)
