"""Your own images as a data set: one subfolder per class, decoded once and cached.

Layouts (class names are the folder names, sorted; images anywhere below a class folder):

- `DIR/CLASS/*.png` (flat): a stratified split puts `FOLDER_TEST_FRACTION` (20%) of every
  class (at least one image of each class that has two) into the test set. Which images go
  there is fixed by a hash of each file's relative path and the split seed (0), not by the
  training seed or the order of the listing, so `eanet evaluate` sees the same test set as
  training did.
- `DIR/train/CLASS/...`, with `DIR/test/CLASS/...` and/or `DIR/val/CLASS/...` (also `valid`,
  `validation`): the split folders are used as they are. Without `test/` the test set is split
  off `train/` as above. Without `val/` training holds out the last `--val-fraction` of the
  (shuffled) training images, as for CIFAR.

Every image goes through `eanet.images` (RGB, whole image resized to image_size x image_size)
and the result is cached as a uint8 safetensors file under
`default_cache_dir()/folders/<key>/`, the key a hash of the folder's listing (relative paths,
sizes, modification times) and the image size: a second run skips decoding. Files that cannot
be decoded, or that have no image extension, are logged (count and first names) and skipped.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as serialize
from tqdm.auto import tqdm

from eanet.data import images as imgs
from eanet.data.dataset import ImageData
from eanet.data.download import default_cache_dir
from eanet.errors import ConfigError, DataError, EANetError
from eanet.fileio import atomic_path, write_bytes, write_json

log = logging.getLogger(__name__)

FOLDER_TEST_FRACTION = 0.2
SPLIT_SEED = 0
SPLIT_FOLDERS = {
    "train": "train",
    "test": "test",
    "val": "val",
    "valid": "val",
    "validation": "val",
}
CACHE_VERSION = 1
_SHOW = 5  # names listed when reporting skipped files


@dataclass(frozen=True)
class _Entry:
    """One image file: where it is and what the layout says about it."""

    path: Path
    rel: str  # POSIX relative path, the cache's and the split's name for the file
    split: str  # "train", "val", "test" or "" (flat layout: decided by the stratified split)
    cls: str
    size: int = 0  # of the file (or the file a link points to), for the cache key
    mtime_ns: int = 0


def _few(items: list[str]) -> str:
    return ", ".join(items[:_SHOW]) + (
        f", ... ({len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    )


def _utf8(name: str) -> bool:
    """Whether a file name decoded from the disk is valid UTF-8 (Python keeps undecodable
    bytes as lone surrogates, which cannot be written to JSON, a hash or a checkpoint)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _class_names(class_root: Path) -> list[str]:
    """The class folders' names, sorted; a name that is not UTF-8, or two names that differ
    only in their Unicode form (NFC/NFD), is a one-line error."""
    names = sorted(
        d.name for d in class_root.iterdir() if d.is_dir() and not d.name.startswith(".")
    )
    bad = [n for n in names if not _utf8(n)]
    if bad:
        shown = os.fsencode(bad[0]).decode("utf-8", "backslashreplace")
        raise DataError(
            f"{class_root}: class folder name {shown!r} is not valid UTF-8; rename it "
            "(class names are stored in checkpoints as text)"
        )
    seen: dict[str, str] = {}
    for name in names:
        other = seen.setdefault(unicodedata.normalize("NFC", name), name)
        if other != name:
            raise DataError(
                f"{class_root}: class folders {other!r} and {name!r} have the same name in "
                "different Unicode forms (NFC/NFD); merge or rename one"
            )
    return names


def _scan(root: Path) -> tuple[bool, list[str], list[_Entry]]:
    """The layout (split folders or flat), the class folders, and the image files."""
    found, others = imgs.list_images(root)
    split_layout = (root / "train").is_dir()
    classes = _class_names(root / "train" if split_layout else root)
    entries: list[_Entry] = []
    stray: list[str] = []
    broken: list[str] = []
    for path in found:
        parts = path.relative_to(root).parts
        rel = "/".join(parts)
        if not _utf8(rel):
            broken.append(f"{os.fsencode(rel).decode('utf-8', 'backslashreplace')} (not UTF-8)")
            continue
        try:
            st = path.stat()  # a broken link, a link to itself: unreadable, skipped
        except OSError as exc:
            broken.append(f"{rel} ({exc.strerror or exc})")
            continue
        if split_layout:
            split = SPLIT_FOLDERS.get(parts[0])
            if split is None or len(parts) < 3:
                stray.append(rel)
                continue
            entries.append(_Entry(path, rel, split, parts[1], st.st_size, st.st_mtime_ns))
        elif len(parts) < 2:
            stray.append(rel)
        else:
            entries.append(_Entry(path, rel, "", parts[0], st.st_size, st.st_mtime_ns))
    if broken:
        log.warning("%s: skipped %d unreadable file(s): %s", root, len(broken), _few(broken))
    if others:
        rels = ["/".join(p.relative_to(root).parts) for p in others]
        log.warning(
            "%s: skipped %d file(s) without an image extension: %s", root, len(rels), _few(rels)
        )
    if stray:
        where = "train/CLASS/, val/CLASS/ or test/CLASS/" if split_layout else "a class folder"
        log.warning(
            "%s: skipped %d image(s) not inside %s: %s", root, len(stray), where, _few(stray)
        )
    return split_layout, classes, entries


def _cache_key(entries: list[_Entry], image_size: int) -> str:
    """Hash of the listing (relative path, size, mtime) and the image size."""
    digest = hashlib.sha256(f"eanet-folder-cache {CACHE_VERSION} {image_size}\n".encode())
    for e in entries:
        digest.update(f"{e.rel}\0{e.size}\0{e.mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def _read_cache(path: Path, key: str) -> tuple[torch.Tensor, list[str], list[list[str]]] | None:
    """(images, decoded files, failures) from a cache file, or None if absent or unusable."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["eanet_folder_cache"])
        if meta["key"] != key:
            raise ValueError("key differs")
        images = load_file(str(path))["images"]
        files, failed = list(meta["files"]), list(meta["failed"])
        if images.dtype != torch.uint8 or len(images) != len(files):
            raise ValueError("images do not match the file list")
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("%s: unusable cache (%s); decoding the images again", path, exc)
        return None
    return images, files, failed


def _write_cache(
    folder: Path,
    key: str,
    root: Path,
    images: torch.Tensor,
    files: list[str],
    failed: list[list[str]],
    classes: list[str],
) -> None:
    """Write the decoded images (+ a human-readable JSON); a cache that cannot be written is
    only a warning."""
    meta = {"key": key, "files": files, "failed": failed}
    try:
        # Serialised here, written through atomic_path: safetensors' save_file would leave
        # its own temporary file when killed and make the cache mode 0600.
        data = serialize({"images": images.contiguous()}, {"eanet_folder_cache": json.dumps(meta)})
        write_bytes(folder / "images.safetensors", data)
        write_json(
            folder / "classes.json",
            {"source": str(root), "class_names": classes, "images": len(files)},
        )
    except (EANetError, OSError, SafetensorError) as exc:
        log.warning("cannot write the folder cache in %s (%s); continuing without it", folder, exc)


def _decode_all(
    entries: list[_Entry], image_size: int, progress: bool
) -> tuple[torch.Tensor, list[str], list[list[str]]]:
    """Decode every entry (threads: Pillow releases the GIL while decoding)."""

    def one(entry: _Entry) -> torch.Tensor | str:
        try:
            return imgs.load_image(entry.path, image_size)
        except DataError as exc:
            return str(exc).removeprefix(f"{entry.path}: ")

    workers = min(8, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = list(
            tqdm(
                pool.map(one, entries),
                total=len(entries),
                desc="decoding images",
                unit="img",
                disable=not progress,
                leave=False,
            )
        )
    tensors = [r for r in results if isinstance(r, torch.Tensor)]
    files = [e.rel for e, r in zip(entries, results, strict=True) if isinstance(r, torch.Tensor)]
    failed = [[e.rel, r] for e, r in zip(entries, results, strict=True) if isinstance(r, str)]
    stacked = (
        torch.stack(tensors)
        if tensors
        else torch.empty(0, 3, image_size, image_size, dtype=torch.uint8)
    )
    return stacked, files, failed


def _rank(rel: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{rel}".encode()).hexdigest()


def _stratified_test(rels_by_class: dict[str, list[str]], fraction: float, seed: int) -> set[str]:
    """The files of each class that go to the test set: the lowest hashes, round(n * fraction)
    of them, at least one of a class with two or more, never all."""
    test: set[str] = set()
    for rels in rels_by_class.values():
        n = len(rels)
        k = min(max(round(n * fraction), 1), n - 1) if n >= 2 else 0
        test.update(sorted(rels, key=lambda r: _rank(r, seed))[:k])
    return test


def load_folder(
    data_path: str | Path | None,
    *,
    image_size: int = 32,
    test_fraction: float = FOLDER_TEST_FRACTION,
    seed: int = SPLIT_SEED,
    cache: bool = True,
    progress: bool = True,
    md5: str | None = None,
    verify: bool = True,
) -> ImageData:
    """A folder of class subfolders as ImageData (uint8, image_size x image_size).

    `md5` and `verify` exist so that every loader takes the same options; folders have no
    checksum.
    """
    del verify  # folders are local data, nothing to verify
    if md5:
        log.warning("--md5 applies to CIFAR archives only; ignored for a folder")
    if data_path is None:
        raise DataError("--dataset folder needs --data-path DIR (one subfolder per class)")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"--image-size {image_size!r} must be a positive integer")
    if not 0 < test_fraction < 1:
        raise ConfigError(f"test fraction {test_fraction!r} must be in (0, 1)")
    root = Path(data_path).expanduser()
    if not root.is_dir():
        what = "not a directory" if root.exists() else "no such directory"
        raise DataError(
            f"{root}: {what}; --data-path must be a folder with one subfolder per class"
        )
    split_layout, classes, entries = _scan(root)
    if not entries:
        raise DataError(
            f"{root}: no image files in class folders; put images in DIR/CLASS/ "
            "(or DIR/train/CLASS/ and DIR/test/CLASS/)"
        )
    if len(classes) < 2:
        raise DataError(
            f"{root}: {len(classes)} class folder(s) ({', '.join(classes) or 'none'}); "
            "a classifier needs at least two, one subfolder per class"
        )

    key = _cache_key(entries, image_size)
    cache_dir = default_cache_dir() / "folders" / key
    cached = _read_cache(cache_dir / "images.safetensors", key) if cache else None
    if cached is not None:
        log.info("%s: using cached decoded images from %s", root, cache_dir)
        images, files, failed = cached
    else:
        log.info("%s: decoding %d images to %dx%d", root, len(entries), image_size, image_size)
        images, files, failed = _decode_all(entries, image_size, progress)
        if cache:
            _write_cache(cache_dir, key, root, images, files, failed, classes)
    if failed:
        log.warning(
            "%s: skipped %d unreadable image(s): %s",
            root,
            len(failed),
            _few([f"{rel} ({reason})" for rel, reason in failed]),
        )
    return _assemble(root, split_layout, classes, entries, images, files, test_fraction, seed)


def _assemble(
    root: Path,
    split_layout: bool,
    classes: list[str],
    entries: list[_Entry],
    images: torch.Tensor,
    files: list[str],
    test_fraction: float,
    seed: int,
) -> ImageData:
    """Labels, splits and order from the decoded files."""
    by_rel = {e.rel: e for e in entries}
    index = {c: i for i, c in enumerate(classes)}
    row = {rel: i for i, rel in enumerate(files)}
    for e in entries:
        if e.cls not in index:
            raise DataError(
                f"{root / e.rel}: class {e.cls!r} has no folder in "
                f"{'train/' if split_layout else 'the top folder'}; every class needs training "
                "images"
            )
    split_of = {rel: by_rel[rel].split for rel in files}
    if not split_layout or "test" not in split_of.values():
        pool: dict[str, list[str]] = {}
        for rel in files:
            if split_of[rel] in ("", "train"):
                pool.setdefault(by_rel[rel].cls, []).append(rel)
        test = _stratified_test(pool, test_fraction, seed)
        for rels in pool.values():
            for rel in rels:
                split_of[rel] = "test" if rel in test else "train"
    train_counts = {c: 0 for c in classes}
    for rel in files:
        if split_of[rel] == "train":
            train_counts[by_rel[rel].cls] += 1
    empty = [c for c, n in train_counts.items() if n == 0]
    if empty:
        raise DataError(
            f"{root}: class folder(s) {_few(empty)} hold no usable training image; "
            "add images or remove the folder"
        )

    def take(split: str, shuffle: bool) -> tuple[torch.Tensor, torch.Tensor]:
        rels = [rel for rel in files if split_of[rel] == split]
        if shuffle:
            # Files are listed class by class; the validation split takes the tail, so the
            # training order must be mixed (seeded, independent of the training seed).
            order = torch.randperm(len(rels), generator=torch.Generator().manual_seed(seed))
            rels = [rels[i] for i in order.tolist()]
        rows = torch.tensor([row[r] for r in rels], dtype=torch.int64)
        labels = torch.tensor([index[by_rel[r].cls] for r in rels], dtype=torch.int64)
        return images[rows].contiguous(), labels

    train_x, train_y = take("train", shuffle=True)
    test_x, test_y = take("test", shuffle=False)
    val_x, val_y = take("val", shuffle=False)
    has_val = split_layout and len(val_y) > 0
    log.info(
        "%s: %d classes, %d train, %s%d test images (%dx%d)",
        root,
        len(classes),
        len(train_y),
        f"{len(val_y)} val, " if has_val else "",
        len(test_y),
        images.shape[-1],
        images.shape[-1],
    )
    return ImageData(
        f"folder:{root.resolve().name}",
        classes,
        train_x,
        train_y,
        test_x,
        test_y,
        val_images=val_x if has_val else None,
        val_labels=val_y if has_val else None,
    )


def write_image_folder(
    data: ImageData,
    out: str | Path,
    *,
    classes: list[str] | None = None,
    fmt: str = "png",
) -> dict[str, int]:
    """Write `data` as out/train/CLASS/NNNN.fmt and out/test/CLASS/NNNN.fmt; counts per split.

    The shipped CIFAR-100 slice written this way is a folder of real images to try the
    folder commands on.
    """
    from PIL import Image

    chosen = classes or data.class_names
    unknown = [c for c in chosen if c not in data.class_names]
    if unknown:
        raise ConfigError(
            f"unknown class(es) {_few(unknown)}; choose from {_few(data.class_names)}"
        )
    if fmt not in ("png", "jpg", "bmp", "webp"):
        raise ConfigError(f"image format {fmt!r} must be png, jpg, bmp or webp")
    out = Path(out)
    wanted = {data.class_names.index(c) for c in chosen}
    counts = {}
    for split, x, y in (
        ("train", data.train_images, data.train_labels),
        ("test", data.test_images, data.test_labels),
    ):
        counts[split] = 0
        for i, (img, label) in enumerate(zip(x, y.tolist(), strict=True)):
            if label not in wanted:
                continue
            path = out / split / data.class_names[label] / f"{i:04d}.{fmt}"
            pil = Image.fromarray(img.permute(1, 2, 0).numpy(), "RGB")
            with atomic_path(path) as tmp:
                pil.save(tmp, format={"jpg": "JPEG"}.get(fmt, fmt.upper()))
            counts[split] += 1
    return counts
