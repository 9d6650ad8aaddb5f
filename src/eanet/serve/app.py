"""Serve a checkpoint over HTTP: `eanet serve` (FastAPI + uvicorn, the optional extra [serve]).

    POST /predict   one or several images -> top-k classes each (JSON)
    GET  /health    liveness and counters (batches_run, images_served, ...)
    GET  /info      model config, classes, parameter count, server settings, counters
    GET  /          a small self-contained page: upload an image, see the top-5 as bars

Images go through `eanet.data.images`, the one preprocessing path. Requests arriving together are
grouped by a `Batcher` into one forward pass (up to `max_batch` images, waiting at most
`max_wait_ms` for company), which runs in a worker thread so the event loop keeps accepting
requests. Bad input is answered with a status and a one-line `detail`, never a traceback, and
the server keeps serving.
"""

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import time
import traceback
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any

import torch

from eanet import __version__
from eanet.data import images as imgs
from eanet.errors import DataError, one_line
from eanet.predict import top_k_predictions
from eanet.serve.batcher import Batcher
from eanet.serve.config import ServeConfig, check_dependencies
from eanet.serve.model import ServedModel

log = logging.getLogger(__name__)


RAW_TYPES = ("application/octet-stream",)  # accepted besides image/*


class _TooLarge(Exception):
    """The request body passed the upload limit."""


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
        served = ServedModel(config.checkpoint, config.device, config.precision)
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
        return HTTPException(code, one_line(detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        counters["requests_refused"] += 1
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        return JSONResponse({"detail": one_line(f"{where}: {first.get('msg')}")}, 422)

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
