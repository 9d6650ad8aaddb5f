"""Serve a checkpoint over HTTP: `eanet serve` (FastAPI + uvicorn, the optional extra [serve]).

    POST /predict   one or several images -> top-k classes each (JSON)
    GET  /health    liveness and counters (batches_run, images_served, ...)
    GET  /info      model config, classes, parameter count, server settings, counters
    GET  /          a small self-contained page: upload an image, see the top-5 as bars

Images go through `eanet.images`, the one preprocessing path. Requests arriving together are
grouped by a `Batcher` into one forward pass (up to `max_batch` images, waiting at most
`max_wait_ms` for company), which runs in a worker thread so the event loop keeps accepting
requests. Bad input is answered with a status and a one-line `detail`, never a traceback, and
the server keeps serving.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at
# runtime, and `Request` is imported inside create_app (fastapi is an optional extra).
import asyncio
import concurrent.futures
import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import signal
import time
import traceback
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from eanet import __version__, checkpoint
from eanet import images as imgs
from eanet.errors import ConfigError, DataError, EANetError
from eanet.models import count_parameters
from eanet.predict import top_k_predictions
from eanet.runtime import resolve_device, set_threads

log = logging.getLogger(__name__)

CONFIG_ENV = "EANET_SERVE_CONFIG"  # how `--workers N` hands the settings to each worker
RAW_TYPES = ("application/octet-stream",)  # accepted besides image/*
_DEPENDENCIES = {"fastapi": "fastapi", "uvicorn": "uvicorn", "python_multipart": "python-multipart"}


@dataclass
class ServeConfig:
    """Everything `eanet serve` is started with."""

    checkpoint: str
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 64  # images per forward pass
    max_wait_ms: float = 5.0  # how long a request waits for others to share its forward pass
    workers: int = 1  # uvicorn worker processes, each with its own copy of the model
    max_upload_mb: float = 10.0  # request body limit
    max_images: int = 64  # images per request
    device: str = "auto"
    threads: int | None = None  # torch threads per worker (default: `default_threads`)

    def __post_init__(self) -> None:
        self.checkpoint = str(self.checkpoint)
        rules = {  # option: (allowed, what it must be)
            "--port": (0 <= self.port <= 65535, "0..65535"),
            "--max-batch": (self.max_batch >= 1, ">= 1"),
            "--max-wait-ms": (self.max_wait_ms >= 0, ">= 0"),
            "--workers": (self.workers >= 1, ">= 1"),
            "--max-upload-mb": (self.max_upload_mb > 0, "> 0"),
            "--max-images": (self.max_images >= 1, ">= 1"),
            "--threads": (self.threads is None or self.threads >= 1, ">= 1"),
        }
        for name, (ok, rule) in rules.items():
            if not ok:
                value = getattr(self, name[2:].replace("-", "_"))
                raise ConfigError(f"{name} {value} is out of range; it must be {rule}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ServeConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def check_dependencies() -> None:
    """Raise a one-line EANetError naming the extra when fastapi/uvicorn/multipart are missing."""
    missing = [pip for mod, pip in _DEPENDENCIES.items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise EANetError(
            f"eanet serve needs {', '.join(missing)}, not installed; "
            "install them with: pip install 'eanet[serve]'"
        )


# --------------------------------------------------------------------------- the model


class ServedModel:
    """A checkpoint loaded for serving: model, class names, name and version, forward pass."""

    def __init__(self, path: str | Path, device: str = "auto") -> None:
        path = checkpoint.resolve(path)
        self.path = path
        self.model, ckpt = checkpoint.load_model(path, resolve_device(device))
        self.meta = ckpt.meta
        self.class_names = ckpt.class_names
        self.config = self.model.config
        self.device = next(self.model.parameters()).device
        self.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        fallback = "eanet" if self.config.attention == "external" else "vit"
        self.name = str(self.meta.get("model_name") or fallback)
        self.parameters = count_parameters(self.model)

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def describe(self) -> dict:
        """Name and version, as every /predict response carries them."""
        return {
            "name": self.name,
            "version": f"sha256:{self.sha256[:12]}",
            "checkpoint_sha256": self.sha256,
            "eanet_version": __version__,
            "trained_with_eanet": self.meta.get("eanet_version"),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images [B, 3, S, S] -> float logits [B, classes] on the CPU."""
        with torch.inference_mode():
            return self.model(x.to(self.device)).float().cpu()


# --------------------------------------------------------------------------- batching


@dataclass
class _Job:
    images: torch.Tensor  # [n, 3, S, S]
    future: asyncio.Future


class Batcher:
    """Group concurrent requests into forward passes of up to `max_batch` images.

    `submit` puts a job on an asyncio queue and awaits its future. One runner task takes the
    first job, then waits up to `max_wait_ms` for more until `max_batch` images are together
    (a job that would overflow waits for the next pass; a single job larger than `max_batch`
    is split), runs `forward` in a single worker thread and hands each job its rows. While a
    pass runs, new jobs queue up and form the next one.
    """

    def __init__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        max_batch: int = 64,
        max_wait_ms: float = 5.0,
    ) -> None:
        if max_batch < 1 or max_wait_ms < 0:
            raise ConfigError(
                f"a Batcher needs max_batch >= 1 and max_wait_ms >= 0, not {max_batch} and "
                f"{max_wait_ms}"
            )
        self.forward = forward
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.batches_run = 0  # forward passes
        self.images_served = 0
        self.largest_batch = 0
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="eanet-infer")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task | None = None

    async def submit(self, images: torch.Tensor) -> torch.Tensor:
        """Run `forward` on `images` [n, ...] together with whatever else is queued."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop or self._task is None or self._task.done():
            self._start(loop)
        assert self._queue is not None
        future = loop.create_future()
        self._queue.put_nowait(_Job(images, future))
        return await future

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if loop is not self._loop:  # a new event loop (tests): the old queue belongs to the old
            self._loop, self._queue = loop, asyncio.Queue()
        self._task = loop.create_task(self._run(), name="eanet-batcher")

    async def close(self) -> None:
        """Stop the runner task and the worker thread."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _run(self) -> None:
        assert self._queue is not None
        carry: _Job | None = None
        while True:
            jobs = [carry or await self._queue.get()]
            carry = None
            try:
                carry = await self._collect(jobs)
                await self._run_jobs([j for j in jobs if not j.future.done()])
            except asyncio.CancelledError:
                waiting = [*jobs, carry] if carry is not None else jobs
                self._fail(waiting, RuntimeError("the server is shutting down"))
                raise
            except Exception as exc:  # never let one batch kill the runner
                log.exception("batcher: unexpected error")
                self._fail(jobs, exc)

    async def _collect(self, jobs: list[_Job]) -> _Job | None:
        """Add queued jobs to `jobs` until max_batch or the deadline; return an overflow job."""
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        count = len(jobs[0].images)
        while count < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            if count + len(job.images) > self.max_batch:
                return job
            jobs.append(job)
            count += len(job.images)
        return None

    async def _run_jobs(self, jobs: list[_Job]) -> None:
        if not jobs:  # every client went away
            return
        loop = asyncio.get_running_loop()
        x = torch.cat([j.images for j in jobs])
        outputs = []
        for start in range(0, len(x), self.max_batch):
            chunk = x[start : start + self.max_batch]
            outputs.append(await loop.run_in_executor(self._executor, self.forward, chunk))
            self.batches_run += 1
            self.images_served += len(chunk)
            self.largest_batch = max(self.largest_batch, len(chunk))
        out = torch.cat(outputs)
        offset = 0
        for job in jobs:
            n = len(job.images)
            if not job.future.done():
                job.future.set_result(out[offset : offset + n])
            offset += n

    @staticmethod
    def _fail(jobs: list[_Job], exc: BaseException) -> None:
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(exc)

    def stats(self) -> dict:
        return {
            "batches_run": self.batches_run,
            "images_served": self.images_served,
            "largest_batch": self.largest_batch,
            "queued_requests": self._queue.qsize() if self._queue is not None else 0,
        }


# --------------------------------------------------------------------------- HTTP


class _TooLarge(Exception):
    """The request body passed the upload limit."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _decode(items: list[tuple[str | None, bytes]], size: int) -> torch.Tensor:
    """Encoded images -> uint8 [n, 3, size, size]; a DataError names the image and why."""
    out = []
    for i, (name, data) in enumerate(items):
        try:
            out.append(imgs.load_image(data, size))
        except DataError as exc:
            reason = str(exc).removeprefix(f"<{len(data)} bytes>: ")
            label = f"image {i + 1}" + (f" ({name})" if name else "")
            raise DataError(f"{label}: {reason}") from exc
    return torch.stack(out)


class _Guard:
    """Outermost ASGI layer: body-size limit, catch-all 500, one log line per request."""

    def __init__(self, app: Any, max_bytes: int, counters: dict | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.counters = counters if counters is not None else {}

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = {"code": 0}
        received = {"bytes": 0}

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        async def limited_receive() -> dict:
            message = await receive()
            received["bytes"] += len(message.get("body", b""))
            if received["bytes"] > self.max_bytes:
                raise _TooLarge
            return message

        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").decode("latin-1")
        try:
            if declared.isdigit() and int(declared) > self.max_bytes:
                raise _TooLarge
            await self.app(scope, limited_receive, send_status)
        except _TooLarge:
            self._count("requests_refused")
            await self._error(send_status, status, 413, self._too_large())
        except Exception as exc:
            self._count("internal_errors")
            log.error(
                "%s %s: unhandled error\n%s", scope["method"], scope["path"], traceback.format_exc()
            )
            await self._error(
                send_status,
                status,
                500,
                f"internal server error ({type(exc).__name__}); the server log has the details",
            )
        ms = (time.perf_counter() - t0) * 1000
        images = (scope.get("state") or {}).get("images", 0)
        log.info(
            "%s %s %d %.1f ms images=%d", scope["method"], scope["path"], status["code"], ms, images
        )

    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    def _too_large(self) -> str:
        return (
            f"request body larger than the upload limit of {self.max_bytes / 2**20:g} MB "
            "(--max-upload-mb)"
        )

    @staticmethod
    async def _error(send: Callable, status: dict, code: int, detail: str) -> None:
        if status["code"]:  # the response has begun: too late to change it
            return
        body = json.dumps({"detail": detail}, separators=(",", ":")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": code, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _page() -> str:
    return resources.files("eanet").joinpath("static/index.html").read_text(encoding="utf-8")


def create_app(config: ServeConfig, served: ServedModel | None = None) -> Any:
    """The FastAPI application for `config` (loads the checkpoint unless `served` is given)."""
    check_dependencies()
    from fastapi import FastAPI, HTTPException, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException as StarletteHTTPException

    if served is None:
        served = ServedModel(config.checkpoint, config.device)
    batcher = Batcher(served.forward, config.max_batch, config.max_wait_ms)
    counters = {"requests_served": 0, "requests_refused": 0, "internal_errors": 0}
    # Decoding runs beside the event loop, a few images at a time: a burst of large uploads
    # queues here instead of decoding all at once into memory.
    decoder = concurrent.futures.ThreadPoolExecutor(
        min(4, os.cpu_count() or 1), thread_name_prefix="eanet-decode"
    )
    started = time.time()
    page = _page()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log.info(
            "serving %s (%s, %d classes, %s) on %s: max batch %d, max wait %g ms",
            served.name,
            served.describe()["version"],
            len(served.class_names),
            served.device,
            f"http://{config.host}:{config.port}",
            config.max_batch,
            config.max_wait_ms,
        )
        yield
        await batcher.close()
        decoder.shutdown(wait=False, cancel_futures=True)

    # No /docs or /redoc: FastAPI's pages load their scripts from a CDN, and the server may be
    # offline. The OpenAPI schema stays at /openapi.json.
    app = FastAPI(
        title="eanet", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None
    )
    app.state.batcher = batcher
    app.state.served = served

    def refuse(code: int, detail: str) -> HTTPException:
        counters["requests_refused"] += 1
        return HTTPException(code, _one_line(detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        counters["requests_refused"] += 1
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        return JSONResponse({"detail": _one_line(f"{where}: {first.get('msg')}")}, 422)

    def stats() -> dict:
        return {**counters, **batcher.stats(), "uptime_s": round(time.time() - started, 1)}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": served.describe()["version"], **stats()}

    @app.get("/info")
    async def info() -> dict:
        return {
            "model": served.describe(),
            "config": served.config.to_dict(),
            "parameters": served.parameters,
            "image_size": served.image_size,
            "num_classes": len(served.class_names),
            "class_names": served.class_names,
            "device": str(served.device),
            "server": {
                "max_batch": config.max_batch,
                "max_wait_ms": config.max_wait_ms,
                "max_upload_mb": config.max_upload_mb,
                "max_images": config.max_images,
                "workers": config.workers,
                "pid": os.getpid(),
                "torch_threads": torch.get_num_threads(),
            },
            "stats": stats(),
        }

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    async def read_images(request: Request) -> list[tuple[str | None, bytes]]:
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media.startswith("image/") or media in RAW_TYPES:
            body = await request.body()
            return [(None, body)]
        if media != "multipart/form-data":
            raise refuse(
                415,
                f"content type {media or '(none)'!r} not accepted; send multipart/form-data "
                "with image files, or the raw bytes of one image with an image/* content type",
            )
        try:
            form = await request.form(max_files=config.max_images, max_fields=1000)
        except StarletteHTTPException as exc:  # what request.form raises on bad input
            if "Too many files" in str(exc.detail):
                raise refuse(
                    413, f"more than {config.max_images} images in one request (--max-images)"
                ) from exc
            raise refuse(400, f"malformed multipart body: {exc.detail}") from exc
        try:
            return [
                (value.filename, await value.read())
                for _, value in form.multi_items()
                if isinstance(value, UploadFile)
            ]
        finally:
            await form.close()

    @app.post("/predict")
    async def predict(
        request: Request, top_k: int = Query(5, ge=1, description="classes per image")
    ) -> dict:
        items = await read_images(request)
        if not items:
            raise refuse(
                400,
                "no image in the request; send each image as a file field of a multipart "
                "form (curl -F file=@photo.jpg)",
            )
        if len(items) > config.max_images:
            raise refuse(
                413,
                f"{len(items)} images in one request, at most {config.max_images} (--max-images)",
            )
        try:
            loop = asyncio.get_running_loop()
            x = await loop.run_in_executor(decoder, _decode, items, served.image_size)
        except DataError as exc:
            raise refuse(400, str(exc)) from exc
        request.state.images = len(items)
        logits = await batcher.submit(x)
        names = [name for name, _ in items]
        preds = top_k_predictions(logits, served.class_names, top_k, names)
        counters["requests_served"] += 1
        return {"model": served.describe(), "predictions": [p.to_dict() for p in preds]}

    app.add_middleware(_Guard, max_bytes=config.max_upload_bytes, counters=counters)
    return app


def default_threads(workers: int = 1) -> int:
    """Torch threads per worker: its share of the cores, less one for HTTP and decoding.

    Measured on the 2-core machine under other load (benchmarks/serve_load.py, README): one
    torch thread served several times the requests/s of two, which waited for the busy cores.
    """
    return max(1, (os.cpu_count() or 1) // workers - 1)


def _set_threads(config: ServeConfig) -> None:
    """In the serving process only: the app factory leaves the caller's torch alone."""
    set_threads(config.threads or default_threads(config.workers))


def app_from_env() -> Any:
    """The app for one uvicorn worker process, configured from $EANET_SERVE_CONFIG."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = ServeConfig.from_dict(json.loads(os.environ[CONFIG_ENV]))
    _set_threads(config)
    return create_app(config)


def serve(config: ServeConfig) -> None:
    """Start uvicorn on `config` and serve until interrupted."""
    check_dependencies()
    import uvicorn

    _check_port(config.host, config.port)
    common = {"host": config.host, "port": config.port, "access_log": False, "log_level": "info"}
    if config.workers == 1:
        _set_threads(config)
        uvicorn.run(create_app(config), **common)
        return
    checkpoint.load(config.checkpoint)  # a bad checkpoint: one line now, not N tracebacks
    os.environ[CONFIG_ENV] = json.dumps(config.to_dict())
    uvicorn.run("eanet.serve:app_from_env", factory=True, workers=config.workers, **common)


def _check_port(host: str, port: int) -> None:
    """A one-line error now for a port in use, before the model loads."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ConfigError(f"--host {host}: cannot resolve it ({exc.strerror or exc})") from exc
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(address)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {host}:{port} ({exc.strerror or exc}); another server may "
                "be running there, choose another --port"
            ) from exc


# --------------------------------------------------------------------------- a server process


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (the OS picks it)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_process(
    checkpoint_path: str | Path,
    *options: str,
    port: int | None = None,
    log_path: str | Path | None = None,
    timeout: float = 120.0,
) -> Iterator[str]:
    """Run `python -m eanet serve CHECKPOINT` on 127.0.0.1 and yield its URL; stop it after.

    For tests and benchmarks: waits until GET /health answers, raises with the end of the
    server's log if it exits or does not answer within `timeout` seconds. The server's output
    goes to `log_path` (default: a temporary file, deleted afterwards).
    """
    import subprocess
    import sys
    import tempfile
    import urllib.request

    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "eanet", "serve", str(checkpoint_path), "--port", str(port)]
    temporary = log_path is None
    if temporary:
        fd, log_path = tempfile.mkstemp(prefix="eanet-serve-", suffix=".log")
        os.close(fd)
    log_path = Path(log_path)
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([*cmd, *options], stdout=log_file, stderr=subprocess.STDOUT)
    tail = lambda: log_path.read_text(errors="replace")[-2000:]  # noqa: E731
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{tail()}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not answer in {timeout:.0f} s:\n{tail()}")
            time.sleep(0.2)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if temporary:
            log_path.unlink(missing_ok=True)
