"""A bounded soak test of `eanet serve`: normal clients among hostile ones, for a fixed time.

Starts the server on 127.0.0.1 (a free port) with its default limits and timeouts, then for
`--duration` seconds runs together:

- normal clients: POST /predict of one real 32x32 CIFAR-100 test image, one after another;
- stalled clients: connections that send nothing, or half their headers, or their headers
  and half a body, then wait; each reconnects once the server has closed it;
- disconnecting clients: half an upload, then the socket closed;
- huge-pixel clients: a 315 KB one-colour 9000x9000 RGBA PNG (81 MP, refused from its header
  with 413) and a 3000x3000 one (9 MP, decoded in the large lane), in turn.

Reports the normal requests' errors and latency percentiles, the hostile clients' outcomes,
the server's counters, its peak resident memory (VmHWM) against the stated bound, and whether
its log holds a traceback; writes benchmarks/results/serve/soak.json and soak.md:

    python benchmarks/serve_soak.py --duration 40

The clients run on the same machine as the server and take CPU from it.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from eanet import __version__
from eanet.fileio import write_json, write_text
from eanet.runtime import environment

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the real-server helpers the tests use
from serve_helpers import flat_png, process_memory_kb, server_process  # noqa: E402
from serve_load import reference_checkpoint, sample_pngs  # noqa: E402

SERVER_COUNTERS = (
    "internal_errors",
    "client_disconnects",
    "body_timeouts",
    "requests_refused",
    "large_decodes",
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="run directory or checkpoint (default: reference EANet)")
    p.add_argument("--duration", type=float, default=40.0, help="seconds of load")
    p.add_argument("--normal", type=int, default=4, help="normal clients")
    p.add_argument("--stalled", type=int, default=30, help="stalled connections")
    p.add_argument("--disconnecting", type=int, default=2, help="clients that leave mid-upload")
    p.add_argument("--huge", type=int, default=2, help="huge-pixel clients")
    p.add_argument("--threads", type=int, default=1, help="server torch threads")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve")
    return p.parse_args()


class Soak:
    """The clients of one soak run and what they saw."""

    def __init__(self, url: str, args: argparse.Namespace) -> None:
        self.url, self.args = url, args
        host, port = url.removeprefix("http://").split(":")
        self.address = (host, int(port))
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.normal_errors: list[str] = []
        self.outcomes: dict[str, int] = {}
        self.pngs = sample_pngs(16)
        self.huge = flat_png(9000, 9000)
        self.large = flat_png(3000, 3000)

    def count(self, key: str) -> None:
        with self.lock:
            self.outcomes[key] = self.outcomes.get(key, 0) + 1

    def normal(self, i: int) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as c:
            while not self.stop.is_set():
                png = self.pngs[i % len(self.pngs)]
                t0 = time.perf_counter()
                try:
                    r = c.post("/predict", files=[("file", ("x.png", png, "image/png"))])
                except httpx.HTTPError as exc:
                    self.normal_errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                if r.status_code != 200:
                    self.normal_errors.append(f"{r.status_code} {r.text[:100]}")
                    continue
                self.latencies.append(time.perf_counter() - t0)
                i += 1

    def stalled(self, i: int) -> None:
        heads = [
            b"",
            b"POST /predict HTTP/1.1\r\nHost: soak\r\n",
            b"POST /predict HTTP/1.1\r\nHost: soak\r\nContent-Type: image/png\r\n"
            b"Content-Length: 5000\r\n\r\n" + bytes(100),
        ]
        kind = ("silent", "half headers", "half body")[i % 3]
        while not self.stop.is_set():
            with socket.create_connection(self.address) as s:
                s.sendall(heads[i % 3])
                s.settimeout(0.5)
                while not self.stop.is_set():
                    try:
                        if not s.recv(65536):
                            self.count(f"stalled ({kind}) closed by the server")
                            break
                    except TimeoutError:
                        continue
                    except OSError:
                        self.count(f"stalled ({kind}) closed by the server")
                        break

    def disconnecting(self, i: int) -> None:
        head = (
            b"POST /predict HTTP/1.1\r\nHost: soak\r\nContent-Type: image/png\r\n"
            b"Content-Length: 200000\r\n\r\n"
        )
        while not self.stop.is_set():
            with socket.create_connection(self.address) as s:
                s.sendall(head + self.pngs[0])
                time.sleep(0.1)
            self.count("disconnected mid-upload")
            self.stop.wait(0.2)

    def huge_pixels(self, i: int) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as c:
            while not self.stop.is_set():
                body, name = (self.huge, "81 MP") if i % 2 == 0 else (self.large, "9 MP")
                i += 1
                try:
                    r = c.post("/predict", content=body, headers={"Content-Type": "image/png"})
                    self.count(f"{name} image answered {r.status_code}")
                except httpx.HTTPError as exc:
                    self.count(f"{name} image: {type(exc).__name__}")

    def run(self) -> float:
        roles = [(self.normal, self.args.normal), (self.stalled, self.args.stalled)]
        roles += [(self.disconnecting, self.args.disconnecting), (self.huge_pixels, self.args.huge)]
        threads = [
            threading.Thread(target=role, args=(i,), daemon=True)
            for role, n in roles
            for i in range(n)
        ]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        self.stop.wait(self.args.duration)
        self.stop.set()
        for t in threads:
            t.join(timeout=130)
        return time.perf_counter() - t0


def soak(ckpt: Path, args: argparse.Namespace, log: Path) -> dict:
    with server_process(
        ckpt,
        "--device",
        "cpu",
        "--threads",
        str(args.threads),
        "--max-connections-per-ip",  # stalled and normal clients all come from 127.0.0.1
        "1000",
        log_path=log,
    ) as url:
        info = httpx.get(f"{url}/info").json()
        pid = info["server"]["pid"]
        client = Soak(url, args)
        httpx.post(f"{url}/predict", content=client.large, headers={"Content-Type": "image/png"})
        with open(f"/proc/{pid}/clear_refs", "w") as f:  # the peak from here on
            f.write("5")
        rss_before = process_memory_kb(pid)["VmRSS"] / 1024
        seconds = client.run()
        peak = process_memory_kb(pid)["VmHWM"] / 1024
        health = httpx.get(f"{url}/health").json()
    lat = sorted(client.latencies)
    q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else [0.0] * 99
    text = log.read_text(errors="replace")
    return {
        "seconds": round(seconds, 1),
        "normal_ok": len(lat),
        "normal_errors": len(client.normal_errors),
        "normal_error_samples": client.normal_errors[:5],
        "p50_ms": round(q[49] * 1000, 1),
        "p95_ms": round(q[94] * 1000, 1),
        "p99_ms": round(q[98] * 1000, 1),
        "max_ms": round(lat[-1] * 1000, 1) if lat else 0.0,
        "hostile": dict(sorted(client.outcomes.items())),
        "server": {k: health[k] for k in ("internal_errors", "client_disconnects", "body_timeouts")}
        | {
            "requests_refused": health["requests_refused"],
            "large_decodes": health["large_decodes"],
        },
        "rss_before_mb": round(rss_before),
        "peak_rss_mb": round(peak),
        "decode_memory_bound_mb": info["server"]["decode_memory_bound_mb"],
        "tracebacks_in_log": text.count("Traceback"),
        "settings": info["server"],
    }


def table(r: dict, args: argparse.Namespace, env: dict, model: str) -> str:
    cpu = env.get("cpu_model", env["processor"])
    lines = [
        f"`eanet serve` soak: {r['seconds']} s; {args.normal} normal, {args.stalled} stalled, "
        f"{args.disconnecting} disconnecting, {args.huge} huge-pixel clients; {model}; "
        f"server defaults, {args.threads} torch thread(s); {cpu}, {env['cpu_count']} cores, "
        f"torch {env['torch']} CPU, eanet {__version__}; clients on the same machine.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| normal requests ok / errors | {r['normal_ok']} / {r['normal_errors']} |",
        f"| normal latency p50 / p95 / p99 / max ms | {r['p50_ms']} / {r['p95_ms']} / "
        f"{r['p99_ms']} / {r['max_ms']} |",
    ]
    lines += [f"| {k} | {v} |" for k, v in r["hostile"].items()]
    lines += [f"| server {k} | {v} |" for k, v in r["server"].items()]
    lines += [
        f"| server RSS before / peak (VmHWM) MB | {r['rss_before_mb']} / {r['peak_rss_mb']} |",
        f"| stated bound: RSS before + decode bound MB | {r['rss_before_mb']} + "
        f"{r['decode_memory_bound_mb']} = {r['rss_before_mb'] + r['decode_memory_bound_mb']} |",
        f"| tracebacks in the server log | {r['tracebacks_in_log']} |",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.checkpoint) if args.checkpoint else reference_checkpoint(Path(tmp))
        model = str(args.checkpoint or "eanet-cifar (reference, random weights)")
        r = soak(ckpt, args, Path(tmp) / "server.log")
    env = environment()
    md = table(r, args, env, model)
    result = {
        "settings": vars(args) | {"out": str(args.out)},
        "model": model,
        "result": r,
        "environment": env,
        "eanet_version": __version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    write_json(args.out / "soak.json", result)
    write_text(args.out / "soak.md", md)
    print(md)
    print(f"wrote {args.out / 'soak.json'} and soak.md")
    bad = r["normal_errors"] or r["server"]["internal_errors"] or r["tracebacks_in_log"]
    over = r["peak_rss_mb"] > r["rss_before_mb"] + r["decode_memory_bound_mb"]
    return 1 if bad or over else 0


if __name__ == "__main__":
    sys.exit(main())
