"""The memory figures behind `eanet serve`'s stated bound (docs/serving.md).

Each measurement runs in a fresh Python process, resets its peak resident memory
(/proc/self/clear_refs, 5) and reads VmHWM after the work:

- decode: peak bytes per pixel of `eanet.data.images.load_image` on a 2000x2000 image of each
  kind (the constant `eanet.serve.decode.DECODE_BYTES_PER_PIXEL` must stay above them all);
- forward: peak MB of one inference forward pass of the reference EANet, fp32, 1 thread, at
  batch sizes 1, 8 and 64 (the server's --max-batch default).

    python benchmarks/serve_memory.py

Writes benchmarks/results/serve/memory.json and memory.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from eanet import __version__
from eanet.fileio import write_json, write_text
from eanet.runtime import environment
from eanet.serve.decode import DECODE_BYTES_PER_PIXEL

ROOT = Path(__file__).resolve().parents[1]
SIDE = 2000

DECODE = r"""
import io, json, sys
import numpy as np
from PIL import Image
from eanet.data import images
mode, fmt, exif = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
side = int(sys.argv[4])
rng = np.random.default_rng(0)
if mode == "I;16":
    img = Image.fromarray(rng.integers(0, 65535, (side, side), dtype=np.uint16))
elif mode == "P":
    img = Image.fromarray(rng.integers(0, 255, (side, side), dtype=np.uint8), "L").convert("P")
else:
    ch = {"RGBA": 4, "RGB": 3, "L": 1, "LA": 2}[mode]
    a = rng.integers(0, 255, (side, side, ch), dtype=np.uint8)
    img = Image.fromarray(a[:, :, 0] if ch == 1 else a, mode)
kw = {"transparency": 0} if mode == "P" else {}
if exif:
    e = Image.Exif()
    e[0x0112] = 6  # rotated 90 degrees: exif_transpose makes a copy
    kw["exif"] = e
buf = io.BytesIO()
img.save(buf, format=fmt, **kw)
data = buf.getvalue()
del img, buf
def kb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])
open("/proc/self/clear_refs", "w").write("5")
base = kb("VmHWM")
images.load_image(data, 32)
peak = (kb("VmHWM") - base) * 1024 / side**2
print(json.dumps({"bytes_per_pixel": peak, "file_kb": len(data) // 1024}))
"""

FORWARD = r"""
import json, sys
import torch
torch.set_num_threads(1)
from eanet.models.registry import create_model
m = create_model("eanet-cifar").eval()
def kb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])
with torch.inference_mode():
    m(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
x = torch.randint(0, 255, (int(sys.argv[1]), 3, 32, 32), dtype=torch.uint8)
open("/proc/self/clear_refs", "w").write("5")
base = kb("VmRSS")
with torch.inference_mode():
    m(x)
print(json.dumps({"peak_mb": (kb("VmHWM") - base) / 1024}))
"""

KINDS = [  # (mode, format, EXIF rotation)
    ("RGB", "PNG", False),
    ("RGB", "JPEG", False),
    ("L", "PNG", False),
    ("P", "PNG", False),
    ("I;16", "PNG", False),
    ("LA", "PNG", False),
    ("RGBA", "PNG", False),
    ("RGBA", "WEBP", True),
    ("RGBA", "TIFF", True),
]


def run(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    decode = []
    for mode, fmt, exif in KINDS:
        r = run(DECODE, mode, fmt, "1" if exif else "0", str(SIDE))
        decode.append({"mode": mode, "format": fmt, "exif_rotation": exif, **r})
        print(json.dumps(decode[-1]), file=sys.stderr)
    forward = [{"batch": b, **run(FORWARD, str(b))} for b in (1, 8, 64)]
    env = environment()
    lines = [
        f"Peak resident memory (VmHWM) of `load_image` on {SIDE}x{SIDE} images and of one "
        f"reference EANet forward pass (fp32, 1 thread); {env.get('cpu_model')}, torch "
        f"{env['torch']}, eanet {__version__}.",
        "",
        "| image | file KB | peak bytes/pixel |",
        "|---|---|---|",
    ]
    for d in decode:
        name = f"{d['mode']} {d['format']}" + (" + EXIF rotation" if d["exif_rotation"] else "")
        lines.append(f"| {name} | {d['file_kb']} | {d['bytes_per_pixel']:.1f} |")
    lines += ["", "| forward batch | peak MB |", "|---|---|"]
    lines += [f"| {f['batch']} | {f['peak_mb']:.1f} |" for f in forward]
    md = "\n".join(lines) + "\n"
    out = ROOT / "benchmarks" / "results" / "serve"
    date = time.strftime("%Y-%m-%d %H:%M:%S")
    write_json(out / "memory.json", {"decode": decode, "forward": forward, "environment": env})
    write_text(out / "memory.md", md + f"\n{date}\n")
    print(md)
    worst = max(d["bytes_per_pixel"] for d in decode)
    if worst > DECODE_BYTES_PER_PIXEL:
        print(f"DECODE_BYTES_PER_PIXEL = {DECODE_BYTES_PER_PIXEL} is below {worst:.1f}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
