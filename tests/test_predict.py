"""`eanet predict` and the Python API (`eanet.load`) on real images, good and bad."""

import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from docs_helpers import python_block
from PIL import Image

import eanet
from eanet import checkpoint
from eanet.cli.main import main
from eanet.errors import DataError
from eanet.inference import predict_logits
from eanet.predict import Failure, Prediction, iter_predict_files


@pytest.fixture(scope="module")
def model_and_names(tiny_run):
    model, ckpt = checkpoint.load_model(tiny_run)
    return model, ckpt.class_names


@pytest.fixture
def messy_dir(image_folder, tmp_path):
    """Real test images of 3 classes plus every kind of bad and odd file."""
    root = tmp_path / "pics"
    shutil.copytree(image_folder / "test", root)
    (root / "apple" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "apple" / "empty.jpg").write_bytes(b"")
    (root / "apple" / "readme.txt").write_text("not an image, ignored in directories")
    src = Image.open(next((root / "bicycle").glob("*.png")))
    big = src.resize((300, 200))
    big.convert("RGBA").save(root / "bicycle" / "big-rgba.png")
    big.convert("L").save(root / "bicycle" / "grey.jpg")
    big.save(root / "bicycle" / "photo.webp")
    return root


def _expected(model, names, paths, k=5):
    """Reference: decode -> resize -> model, done by hand with Pillow."""
    size = model.config.image_size
    x = []
    for p in paths:
        img = Image.open(p)
        if img.mode in ("RGBA", "LA", "P"):
            img = Image.alpha_composite(
                Image.new("RGBA", img.size, (0, 0, 0, 255)), img.convert("RGBA")
            )
        img = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        x.append(torch.from_numpy(np.array(img)).permute(2, 0, 1))
    probs = predict_logits(model, torch.stack(x)).softmax(1)
    top = probs.topk(k, dim=1)
    return [[names[i] for i in row] for row in top.indices.tolist()], top.values


def test_iter_predict_files_streams_failures_in_place(model_and_names, messy_dir):
    model, names = model_and_names
    files = sorted(p for p in messy_dir.rglob("*") if p.is_file() and p.suffix != ".txt")
    results = list(iter_predict_files(model, names, files, top_k=3, batch_size=4))
    assert [r.source for r in results] == [str(p) for p in files]  # order kept across batches
    failed = {Path(r.source).name: r.reason for r in results if isinstance(r, Failure)}
    assert set(failed) == {"corrupt.png", "empty.jpg"}
    assert "corrupt" in failed["corrupt.png"] and "empty file" in failed["empty.jpg"]
    good = [r for r in results if isinstance(r, Prediction)]
    classes, probs = _expected(model, names, [Path(r.source) for r in good], k=3)
    assert [r.classes for r in good] == classes
    assert torch.allclose(torch.tensor([r.probabilities for r in good]), probs, atol=1e-6)


def test_cli_table_errors_and_exit_code(tiny_run, messy_dir, capsys, caplog):
    missing = messy_dir / "nope.png"
    rc = main(["predict", str(tiny_run), str(messy_dir), str(missing), "--top-k", "3"])
    out, err = capsys.readouterr()
    assert rc == 1
    lines = out.splitlines()
    assert lines[0].split() == ["file", "top-1", "top-2", "top-3"]
    n_images = len([p for p in messy_dir.rglob("*") if p.suffix in (".png", ".jpg", ".webp")])
    assert len(lines) == 1 + n_images - 2
    assert re.search(r"apple/\d+\.png\s+\S+ \d+\.\d%\s+\S+ \d+\.\d%\s+\S+ \d+\.\d%$", lines[1])
    assert any("big-rgba.png" in line for line in lines)
    errors = [line for line in err.splitlines() if line.startswith("eanet: error:")]
    assert len(errors) == 3
    assert any(f"{missing}: no such file or directory" in e for e in errors)
    assert any("corrupt.png: cannot decode it" in e for e in errors)
    assert any("empty.jpg: empty file" in e for e in errors)
    assert "readme.txt" in caplog.text and "without an image extension" in caplog.text
    assert f"{n_images - 2} image(s) predicted, 3 failed" in err


def test_cli_json_lines_and_clean_exit(tiny_run, image_folder, model_and_names, capsys):
    model, names = model_and_names
    folder = image_folder / "test" / "cloud"
    assert main(["predict", str(tiny_run), str(folder), "--json", "--top-k", "500"]) == 0
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    files = sorted(folder.glob("*.png"))
    assert [r["file"] for r in rows] == [str(p) for p in files]
    assert all(len(r["predictions"]) == len(names) for r in rows)  # top-k capped at the classes
    first = rows[0]["predictions"]
    assert sum(p["probability"] for p in first) == pytest.approx(1, abs=1e-4)
    assert first[0]["class"] == names[first[0]["index"]]
    classes, _ = _expected(model, names, files[:1], k=3)
    assert [p["class"] for p in first[:3]] == classes[0]
    assert "error" not in err


def test_decompression_bomb_in_a_directory_is_one_failure(tiny_run, image_folder, tmp_path, capsys):
    from test_images import _png_header_only

    root = tmp_path / "b"
    shutil.copytree(image_folder / "test" / "apple", root)
    (root / "bomb.png").write_bytes(_png_header_only(100_000, 100_000))
    assert main(["predict", str(tiny_run), str(root)]) == 1
    out, err = capsys.readouterr()
    assert "bomb.png: refused as a possible decompression bomb" in err
    assert len(out.splitlines()) == 1 + len(list((image_folder / "test" / "apple").iterdir()))


def test_nothing_to_predict(tiny_run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(tiny_run), str(tmp_path / "empty")]) == 1
    assert "no image files in this directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--top-k", "0"], "--top-k 0 must be a positive integer"),
        (["--batch-size", "0"], "--batch-size 0 must be a positive integer"),
    ],
)
def test_bad_options_are_one_line_errors(tiny_run, image_folder, args, message, capsys):
    assert main(["predict", str(tiny_run), str(image_folder), *args]) == 2
    assert message in capsys.readouterr().err


ORDER = "the order is eanet predict RUN_DIR_OR_CHECKPOINT IMAGE_OR_DIR [IMAGE_OR_DIR ...]"


def test_swapped_arguments_say_the_order(tiny_run, image_folder, tmp_path, capsys):
    image = next((image_folder / "test" / "apple").glob("*.png"))
    assert main(["predict", str(image), str(tiny_run)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == [
        f"eanet: error: {image} is an image, not a run or checkpoint: {ORDER}"
    ]
    unnamed = tmp_path / "IMG_0001"  # no extension: known by its first bytes
    for head in (image.read_bytes(), b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"RIFF\0\0\0\0WEBPVP8"):
        unnamed.write_bytes(head)
        assert main(["predict", str(unnamed), str(image)]) == 2
        assert "is an image, not a run or checkpoint" in capsys.readouterr().err
    for other in (tiny_run, tiny_run / "checkpoint.safetensors"):  # a run among the images
        assert main(["predict", str(tiny_run), str(image), str(other)]) == 2
        err = capsys.readouterr().err.splitlines()
        assert err == [
            f"eanet: error: {other} is a run or checkpoint, not an image: {ORDER} (one run)"
        ]


def test_no_table_header_when_every_file_failed(tiny_run, tmp_path, capsys):
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert main(["predict", str(tiny_run), str(bad)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "corrupt.png: cannot decode it" in err and "0 image(s) predicted, 1 failed" in err


def test_bad_checkpoint_is_one_line_error(tmp_path, image_folder):
    result = subprocess.run(
        [sys.executable, "-m", "eanet", "predict", str(tmp_path), str(image_folder)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no checkpoint there" in result.stderr


# --------------------------------------------------------------------------- Python API


def test_import_eanet_is_cheap():
    code = "import sys, eanet; assert 'torch' not in sys.modules; print(eanet.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_api_accepts_every_input_kind_alike(tiny_run, image_folder, model_and_names):
    model, names = model_and_names
    clf = eanet.load(tiny_run, device="cpu")
    assert clf.class_names == names and clf.config.depth == 1 and clf.image_size == 32
    assert isinstance(clf.model, torch.nn.Module) and "Classifier(" in repr(clf)
    path = sorted((image_folder / "test" / "apple").glob("*.png"))[0]
    pil = Image.open(path)
    hwc = np.array(pil)
    chw = torch.from_numpy(hwc).permute(2, 0, 1)
    expected = clf.predict(path, top_k=3)
    assert isinstance(expected, Prediction) and expected.source == str(path)
    singles = [str(path), path.read_bytes(), pil, hwc, hwc.astype(np.float32), chw, chw.float()]
    batches_of_one = [hwc[None], chw[None], [pil], (str(path),)]  # NHWC, NCHW, list, tuple
    for v in singles + batches_of_one:
        got = clf.predict(v, top_k=3)
        if any(v is b for b in batches_of_one):
            assert isinstance(got, list) and len(got) == 1
            got = got[0]
        assert isinstance(got, Prediction), type(v)
        assert got.classes == expected.classes
        assert got.probabilities == pytest.approx(expected.probabilities, abs=1e-6)
    batch = clf.predict(torch.stack([chw, chw.flip(-1)]), top_k=2)
    assert len(batch) == 2 and batch[0].label == expected.label
    assert 0 < batch[0].probability <= 1


def test_api_resizes_any_size_and_reports_bad_input(tiny_run):
    clf = eanet.load(tiny_run, device="cpu")
    big = np.full((300, 500, 3), 128, dtype=np.uint8)
    assert len(clf.predict([big, Image.new("L", (7, 9))])) == 2
    with pytest.raises(DataError, match="not an image"):
        clf.predict(io.BytesIO(b"x"))
    with pytest.raises(DataError, match="no images"):
        clf.predict([])


def test_docs_python_api_example_runs(tiny_run, image_folder, tmp_path, monkeypatch, capsys):
    (tmp_path / "runs").mkdir()
    shutil.copytree(tiny_run, tmp_path / "runs" / "demo")
    shutil.copytree(image_folder, tmp_path / "images")
    monkeypatch.chdir(tmp_path)
    example = python_block("own-images.md", "## Python API")
    exec(compile(example, "docs/own-images.md", "exec"), {})
    out = capsys.readouterr().out
    assert "images/test/apple/" in out and "%" in out


def test_ctrl_c_in_predict_is_one_line_and_exit_130(tiny_run, image_folder, capsys, monkeypatch):
    import eanet.predict

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # what Ctrl-C raises, with no message of its own
        yield  # a generator, as the real one

    monkeypatch.setattr(eanet.predict, "iter_predict_files", interrupted)
    assert main(["predict", str(tiny_run), str(image_folder / "test")]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "eanet: interrupted"


def test_a_class_name_with_a_newline_keeps_the_table_one_line_per_file(
    tiny_run, image_folder, tmp_path, capsys
):
    model, ckpt = checkpoint.load_model(tiny_run)
    names = [f"line\nbreak{i}" if i % 2 else f"tab\t{i}" for i in range(len(ckpt.class_names))]
    checkpoint.save(tmp_path / "m.safetensors", model, {"class_names": names})
    files = sorted((image_folder / "test").rglob("*.png"))[:3]
    assert main(["predict", str(tmp_path / "m.safetensors"), *map(str, files)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 + len(files)  # the header and one line per image
    assert "\\n" in "".join(lines) or "\\t" in "".join(lines)
    assert main(["predict", "--json", str(tmp_path / "m.safetensors"), str(files[0])]) == 0
    row = json.loads(capsys.readouterr().out)  # JSON keeps the names as they are
    assert all(p["class"] in names for p in row["predictions"])
