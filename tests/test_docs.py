"""Every command in README.md and docs/*.md runs as typed.

The rule: each line of a fenced ```bash block (continuation lines joined, `# comments`
dropped, `&&`/`;` chains split) that runs eanet -- `eanet ...`, `time eanet ...`,
`torchrun ... -m eanet ...` -- is parsed by eanet's own argument parser, so a flag, a
choice or a command that does not exist fails here. The fast, offline ones also run:
`eanet --help`/`--version`, any `... --help`, `eanet models`, `eanet info` of a registered
model name, and `eanet sample-images` (in a temporary directory). The rest (training,
serving, reading run directories that the docs' earlier commands make) are only parsed;
their behaviour is what the other tests check.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from docs_helpers import python_block

from eanet.cli.main import build_parser
from eanet.models.registry import MODELS

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```bash\n(.*?)^```", re.M | re.S)


def bash_lines(text: str) -> list[str]:
    """The command lines of every ```bash block: continuations joined, comments dropped."""
    lines = []
    for block in FENCE.findall(text):
        joined = re.sub(r"\s*\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            if line:
                lines.append(line)
    return lines


def eanet_argv(line: str) -> list[list[str]]:
    """The eanet argument lists in one shell line (after `eanet` / `-m eanet`)."""
    found = []
    for part in re.split(r"&&|;|\|\|", line):
        words = shlex.split(part)
        if words[:1] == ["time"]:
            words = words[1:]
        if words[:1] == ["eanet"]:
            found.append(words[1:])
        elif words[:1] == ["torchrun"] and "-m" in words:
            i = words.index("-m")
            if words[i + 1 : i + 2] == ["eanet"]:
                found.append(words[i + 2 :])
    return found


def documented_commands() -> list[tuple[str, list[str]]]:
    return [
        (f"{page.relative_to(ROOT)}: {line}", argv)
        for page in PAGES
        for line in bash_lines(page.read_text(encoding="utf-8"))
        for argv in eanet_argv(line)
    ]


def runs_offline(argv: list[str]) -> bool:
    """The fast, offline commands that the docs' rule says are run, not only parsed."""
    if not argv or "--help" in argv or "-h" in argv or argv == ["--version"]:
        return True
    command, rest = argv[0], argv[1:]
    if command == "models":
        return True
    if command == "info":
        return any(a in MODELS for a in rest)
    return command == "sample-images"


COMMANDS = documented_commands()


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 40, [c for c, _ in COMMANDS]
    assert any(runs_offline(argv) for _, argv in COMMANDS)
    assert {p.name for p in PAGES} >= {"README.md", "usage.md", "own-images.md", "interop.md"}


def test_the_line_reader_joins_continuations_and_splits_chains():
    text = "```bash\neanet train \\\n  --epochs 2  # two\n# a comment\ncd x && eanet models\n```\n"
    lines = bash_lines(text)
    assert lines == ["eanet train --epochs 2", "cd x && eanet models"]
    assert [a for line in lines for a in eanet_argv(line)] == [
        ["train", "--epochs", "2"],
        ["models"],
    ]
    assert eanet_argv("torchrun --standalone -m eanet train --out r") == [["train", "--out", "r"]]


@pytest.mark.parametrize("where, argv", COMMANDS, ids=[c for c, _ in COMMANDS])
def test_every_documented_command_parses(where, argv, capsys):
    parser = build_parser()
    try:
        parser.parse_args(argv)
    except SystemExit as exc:  # --help and --version exit 0; a bad flag exits 2
        assert exc.code == 0, f"{where}\n{capsys.readouterr().err}"


OFFLINE = [(where, argv) for where, argv in COMMANDS if runs_offline(argv)]


@pytest.mark.slow  # a fresh interpreter (torch import) per command
@pytest.mark.parametrize("where, argv", OFFLINE, ids=[c for c, _ in OFFLINE])
def test_offline_documented_commands_run(where, argv, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    run = subprocess.run(
        [sys.executable, "-m", "eanet", *argv],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, f"{where}\n{run.stderr}"
    assert run.stdout.strip() or any(tmp_path.iterdir()), where


def test_no_page_or_module_cites_a_file_that_is_not_in_the_repository():
    """SPEC.md is not shipped: docs/reference.md holds the reference's facts."""
    texts = [*PAGES, *sorted((ROOT / "src").rglob("*.py")), *(ROOT / "src").rglob("*.yaml")]
    citing = [str(p.relative_to(ROOT)) for p in texts if "SPEC.md" in p.read_text("utf-8")]
    assert citing == [] and not (ROOT / "SPEC.md").exists()


@pytest.mark.slow  # exports a tiny model to ONNX and TorchScript
def test_the_onnx_example_runs_on_real_images_with_eanets_preprocessing(
    tiny_run, image_folder, tmp_path, monkeypatch, capsys
):
    pytest.importorskip("onnxruntime")
    import torch

    import eanet
    from eanet.data.images import load_image
    from eanet.interop.export import export

    for fmt, name in (("onnx", "model.onnx"), ("torchscript", "model.pt")):
        export(tiny_run, fmt, tmp_path / "runs" / "demo" / name)
    shutil.copytree(image_folder, tmp_path / "images")  # what `eanet sample-images` writes
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    example = python_block("interop.md", "## Export to ONNX or TorchScript")
    exec(compile(example, "docs/interop.md", "exec"), scope)
    files, pixels, probs = scope["files"], scope["pixels"], scope["probs"]
    assert len(files) == 4
    # The page's preprocessing is eanet's own, and so are the answers.
    torch.testing.assert_close(
        torch.from_numpy(pixels), torch.stack([load_image(f, 32) for f in files]).float()
    )
    want = eanet.load(tiny_run, device="cpu").predict(files, top_k=1)
    assert capsys.readouterr().out.strip() == str([p.label for p in want])
    top = probs.max(dim=1)
    assert [scope["names"][i] for i in top.indices] == [p.label for p in want]
    torch.testing.assert_close(
        top.values, torch.tensor([p.probability for p in want]), atol=1e-5, rtol=0
    )
