"""The package as installed, not as checked out: a wheel built from this tree, installed
into a fresh virtual environment, compiles and loads every native kernel from its own
package data (kernels/*.c and the headers they include) and matches the plain model; the
trained model and the photos shipped beside it load from the package and classify.

An editable install reads the kernels from the source tree, so it cannot see package data
that is missing from the wheel (common.h was, once: every kernel then failed to compile).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Run inside the new environment: where eanet comes from, which kernels load, and the
# applied model against the plain one (fp32 tightly; bf16 autocast, which runs the
# LayerNorm kernel, within test_precision's tolerance), and the dropout kernel's masks.
CHECK = textwrap.dedent(
    """
    import copy, json, torch, eanet
    from eanet import accel, runtime
    from eanet.accel import fused, native
    from eanet.models import create_model

    torch.manual_seed(0)
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    gaps = {}
    for name in ("eanet-cifar", "vit-cifar"):  # ViT's bf16 inference runs the softmax kernel
        plain = create_model(name, depth=1).eval()
        for precision in ("fp32", "bf16"):
            fast = copy.deepcopy(plain)
            accel.apply(fast, "cpu", precision)
            with torch.no_grad(), runtime.autocast(precision, torch.device("cpu")):
                a, b = fast(x).float(), plain(x).float()
            gap = ((a - b).abs().max() / b.abs().max()).item()
            gaps[precision] = max(gaps.get(precision, 0.0), gap)
    y = fused.masked(torch.ones(100_000), 0.5)
    from eanet.data.fashion import shipped_test_photos  # the trained model and photos shipped
    from eanet.fileio import SHIPPED_MODELS
    clf = eanet.load("eanet-fashion-mnist", device="cpu")
    images, labels = shipped_test_photos()
    got = [p.label for p in clf.predict(images[:200])]
    shipped = sum(g == clf.class_names[int(t)] for g, t in zip(got, labels[:200])) / 200
    print(json.dumps({
        "eanet": eanet.__file__,
        "sources": str(native.SOURCES),
        "status": native.status(),
        "gaps": gaps,
        "kept": (y == 1).float().mean().item(),
        "values": sorted(set(y.tolist())),
        "shipped_model": str(SHIPPED_MODELS["eanet-fashion-mnist"]),
        "shipped_top1": shipped,
    }))
    """
)


def _build_wheel(tmp: Path) -> Path:
    """A wheel of this tree, built from a copy of it (the build writes beside its sources)."""
    tree = tmp / "tree"
    tree.mkdir()
    for path in ROOT.iterdir():
        if path.is_file():
            shutil.copy2(path, tree)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(ROOT / "src", tree / "src", ignore=ignore)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp, tree], check=True
    )
    (wheel,) = tmp.glob("eanet-*.whl")
    return wheel


def _fresh_venv(tmp: Path, wheel: Path) -> Path:
    """A new environment holding the wheel; torch and the other dependencies come from this
    one's site-packages through a .pth line (whose own .pth files, such as the editable
    install of eanet, are not processed: the wheel's eanet is the only one)."""
    env = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", env], check=True)
    python = env / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run([*pip, "--python", python, "install", "--no-deps", wheel], check=True)
    query = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(
        subprocess.run([python, "-c", query], capture_output=True, text=True).stdout.strip()
    )
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


@pytest.mark.slow
def test_the_installed_wheel_builds_loads_and_matches_with_every_kernel(tmp_path):
    python = _fresh_venv(tmp_path, _build_wheel(tmp_path))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CC")}
    env["EANET_KERNELS"] = str(tmp_path / "kernels")
    run = subprocess.run(
        [python, "-c", CHECK], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout.splitlines()[-1])
    venv = str(python.parent.parent)
    assert found["eanet"].startswith(venv) and found["sources"].startswith(venv)
    kernels = ["double_normalize", "dropout", "gelu", "layer_norm", "softmax"]
    assert sorted(found["status"]["on"]) == kernels, run.stderr  # the warning says why not
    assert len(list((tmp_path / "kernels").glob("*.so"))) == len(kernels)
    assert found["gaps"]["fp32"] < 1e-5 and found["gaps"]["bf16"] < 2e-2, found["gaps"]
    assert abs(found["kept"] - 0.5) < 0.01 and found["values"] == [0.0, 1.0]
    assert found["shipped_model"].startswith(venv) and found["shipped_top1"] >= 0.85
