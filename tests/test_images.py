"""The one preprocessing path: decoding, colour modes, resizing, bad files, array inputs."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from eanet.data import images
from eanet.errors import DataError


@pytest.fixture(scope="module")
def cifar(sample_data) -> torch.Tensor:
    """Eight real 32x32 CIFAR-100 images, uint8 [8, 3, 32, 32]."""
    return sample_data.test_images[:8]


def _pil(t: torch.Tensor) -> Image.Image:
    return Image.fromarray(t.permute(1, 2, 0).numpy(), "RGB")


def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


@pytest.mark.parametrize("fmt", ["png", "bmp", "webp", "tiff", "ppm"])
def test_lossless_formats_decode_bit_exact(tmp_path, cifar, fmt):
    kw = {"lossless": True} if fmt == "webp" else {}
    path = _save(_pil(cifar[0]), tmp_path / f"x.{fmt}", **kw)
    out = images.decode_image(path)
    assert out.dtype == torch.uint8 and torch.equal(out, cifar[0])
    assert torch.equal(images.load_image(path, 32), cifar[0])  # 32x32 is not resampled


def test_jpeg_decodes_close_to_the_original(tmp_path, cifar):
    path = _save(_pil(cifar[1]), tmp_path / "x.jpg", quality=95)
    out = images.decode_image(path)
    assert out.shape == (3, 32, 32)
    assert (out.float() - cifar[1].float()).abs().mean() < 6


def test_encoded_bytes_decode_like_the_file(tmp_path, cifar):
    path = _save(_pil(cifar[2]), tmp_path / "x.png")
    assert torch.equal(images.decode_image(path.read_bytes()), cifar[2])


def test_grey_expands_to_three_equal_channels():
    grey = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8), "L")
    out = images.pil_to_tensor(grey)
    assert out.shape == (3, 8, 8)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    assert out[0, 0, 5] == 5


def test_rgba_is_composited_on_black(tmp_path):
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[..., 3] = [[0, 255], [128, 255]]
    path = _save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png")
    out = images.decode_image(path)
    assert out[:, 0, 0].tolist() == [0, 0, 0]  # fully transparent -> black
    assert out[:, 0, 1].tolist() == [200, 100, 50]  # opaque -> unchanged
    assert out[:, 1, 0].tolist() == pytest.approx([100, 50, 25], abs=1)  # half -> halved


def test_la_and_palette_transparency_are_composited_on_black():
    la = Image.fromarray(np.array([[[255, 0], [255, 255]]], dtype=np.uint8), "LA")
    assert images.pil_to_tensor(la)[:, 0, :].tolist() == [[0, 255]] * 3
    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0
    assert images.pil_to_tensor(pal)[:, 0, :].tolist() == [[0, 0], [0, 255], [0, 0]]


def test_palette_image_without_transparency(tmp_path, cifar):
    path = _save(_pil(cifar[3]).convert("P", palette=Image.Palette.ADAPTIVE), tmp_path / "p.gif")
    out = images.decode_image(path)
    assert out.shape == (3, 32, 32)
    assert (out.float() - cifar[3].float()).abs().mean() < 12  # 256-colour quantisation


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_sixteen_bit_grey_is_scaled_to_eight_bits(tmp_path, mode):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16 if mode == "I;16" else np.int32)
    img = Image.fromarray(values)
    assert img.mode == mode
    if mode == "I;16":
        img = Image.open(_save(img, tmp_path / "g16.png"))
        assert img.mode == "I;16"
    out = images.pil_to_tensor(img)
    assert out[0, 0].tolist() == [0, 1, 128, 255]


def test_cmyk_jpeg_becomes_rgb(tmp_path, cifar):
    path = _save(_pil(cifar[4]).convert("CMYK"), tmp_path / "c.jpg")
    assert images.decode_image(path).shape == (3, 32, 32)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _save(img, tmp_path / "o.jpg", exif=exif)
    assert images.decode_image(path).shape == (3, 40, 20)


def test_resize_keeps_the_whole_image_no_crop():
    arr = np.zeros((50, 100, 3), dtype=np.uint8)
    arr[:, :50] = (255, 0, 0)
    arr[:, 50:] = (0, 0, 255)
    out = images.load_image(arr, 32)
    assert out.shape == (3, 32, 32)
    assert out[:, :, 0].float().mean(dim=1).tolist() == pytest.approx([255, 0, 0], abs=1)
    assert out[:, :, -1].float().mean(dim=1).tolist() == pytest.approx([0, 0, 255], abs=1)


def test_downscaling_is_antialiased():
    checker = ((np.indices((256, 256)).sum(0) % 2) * 255).astype(np.uint8)
    out = images.load_image(checker, 32).float()
    assert out.mean() == pytest.approx(127.5, abs=2) and out.std() < 3  # not aliased


def test_prepare_stacks_mixed_inputs(tmp_path, cifar):
    path = _save(_pil(cifar[0]), tmp_path / "x.png")
    batch = images.prepare(
        [path, str(path), _pil(cifar[0]), cifar[0].permute(1, 2, 0).numpy(), cifar[0]], 32
    )
    assert batch.shape == (5, 3, 32, 32) and batch.dtype == torch.uint8
    assert all(torch.equal(b, cifar[0]) for b in batch)
    assert images.prepare([], 16).shape == (0, 3, 16, 16)


def test_float_arrays_are_pixel_values_and_0_to_1_warns(cifar, caplog):
    hwc = cifar[0].permute(1, 2, 0).numpy()
    assert torch.equal(images.load_image(hwc.astype(np.float32), 32), cifar[0])
    assert torch.equal(images.load_image(cifar[0].float(), 32), cifar[0])
    with caplog.at_level("WARNING", logger="eanet.data.images"):
        images.load_image(hwc.astype(np.float32) / 255, 32)
    assert "multiply by 255" in caplog.text


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((4, 4, 2), np.uint8), "1, 3 or 4 channels"),
        (np.zeros((2, 4, 4, 3), np.uint8), "not an image"),
        (np.zeros((0, 4, 3), np.uint8), "not an image"),
        (np.zeros((4, 4, 3), bool), "bool pixels"),
        ({"not": "an image"}, "dict is not an image"),
    ],
)
def test_bad_arrays_are_clear_errors(array, message):
    with pytest.raises(DataError, match=message):
        images.load_image(array, 32)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels and holds almost nothing: a bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(100_000, 100_000))
    with pytest.raises(
        DataError, match=r"bomb\.png: refused as a possible decompression bomb .*10000000000 pixels"
    ):
        images.decode_image(path)


def test_bomb_limit_is_read_at_call_time(tmp_path, cifar, monkeypatch):
    path = _save(_pil(cifar[0]), tmp_path / "x.png")
    # 32x32 = 1024 pixels: between 1x and 2x the limit Pillow only warns; eanet refuses.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with (
        pytest.warns(Image.DecompressionBombWarning),
        pytest.raises(DataError, match="decompression bomb .*1024 pixels"),
    ):
        images.decode_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert images.decode_image(path).shape == (3, 32, 32)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty file"),
        (b"this is not an image at all", "not an image Pillow can read"),
        ("truncated", "cannot decode it"),
    ],
)
def test_bad_files_name_the_file_and_the_reason(tmp_path, cifar, content, message):
    if content == "truncated":
        buf = io.BytesIO()
        _pil(cifar[0]).save(buf, "PNG")
        content = buf.getvalue()[: len(buf.getvalue()) // 2]
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(DataError, match=f"bad.png: {message}"):
        images.decode_image(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DataError, match="nope.png: cannot read it"):
        images.decode_image(tmp_path / "nope.png")
    with pytest.raises(DataError, match="a directory, not an image"):
        images.decode_image(tmp_path)


def test_list_images_recursive_sorted_hidden_skipped(tmp_path):
    for rel in ["b/2.png", "b/10.JPG", "a.webp", "a/z/1.bmp", ".hidden.png", "b/._x.jpg"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "c.png").write_bytes(b"x")
    (tmp_path / "b" / "loop").symlink_to(tmp_path)  # must not recurse forever
    found, others = images.list_images(tmp_path)
    rels = ["/".join(p.relative_to(tmp_path).parts) for p in found]
    assert rels == ["a/z/1.bmp", "a.webp", "b/10.JPG", "b/2.png"]  # sorted by path parts
    assert [p.name for p in others] == ["notes.txt"]
