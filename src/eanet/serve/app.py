"""Serve a checkpoint over HTTP: `eanet serve` (FastAPI + uvicorn, the optional extra [serve]).

    POST /predict   one or several images -> top-k classes each (JSON)
    GET  /health    liveness and counters (batches_run, images_served, ...)
    GET  /info      model config, classes, parameter count, server settings, counters
    GET  /          a small self-contained page: upload an image, see the top-5 as bars

Images go through `eanet.data.images`, the one preprocessing path, after a pixel budget read
from their headers (`serve.decode`). Requests arriving together are grouped by a `Batcher`
into one forward pass (up to `max_batch` images, waiting at most `max_wait_ms` for company),
which runs in a worker thread so the event loop keeps accepting requests. Bad input is
answered with a status and a one-line `detail`, never a traceback, and the server keeps
serving. `ServeState` holds what the handlers share; `create_app` only wires it to routes.
"""

import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

import torch

from eanet import __version__
from eanet.data.images import to_channels
from eanet.errors import DataError, one_line, printable
from eanet.predict import top_k_predictions
from eanet.serve.batcher import Batcher
from eanet.serve.config import ServeConfig, check_dependencies
from eanet.serve.decode import (
    DecodeBudgetError,
    ImageDecoder,
    Items,
    UnsupportedFormatError,
    decode_memory_bound,
)
from eanet.serve.guard import RequestGuard
from eanet.serve.model import ServedModel

log = logging.getLogger(__name__)

RAW_TYPES = ("application/octet-stream",)  # accepted besides image/*


def _page() -> str:
    return resources.files("eanet").joinpath("static/index.html").read_text(encoding="utf-8")


class ServeState:
    """What the handlers share: settings, model, batcher, decoder, counters."""

    def __init__(self, config: ServeConfig, served: ServedModel | None = None) -> None:
        self.config = config
        self.served = served or ServedModel(
            config.checkpoint,
            config.device,
            config.precision,
            config.compile,
            config.accel,
            config.max_batch,
        )
        self.batcher = Batcher(self.served.forward, config.max_batch, config.max_wait_ms)
        self.decoder = ImageDecoder(
            config.max_image_pixels,
            config.max_request_pixels,
            config.max_large_decodes,
            config.decode_s_per_mp,
        )
        self.counters = {"requests_served": 0, "requests_refused": 0, "internal_errors": 0}
        self.counters |= {"client_disconnects": 0, "body_timeouts": 0}
        self.started = time.time()
        self.page = _page()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        """Log what is served; on shutdown stop the batcher and the decode threads."""
        c, s = self.config, self.served
        log.info(
            "serving %s (%s, %d classes, %s, %s) on http://%s:%d: max batch %d, max wait %g ms",
            *(s.name, s.describe()["version"], len(s.class_names), s.device, s.precision),
            *(c.host, c.port, c.max_batch, c.max_wait_ms),
        )
        yield
        await self.batcher.close()
        self.decoder.close()

    def refuse(self, code: int, detail: str) -> Exception:
        """An HTTPException answering `code` with a one-line detail, counted as refused."""
        from fastapi import HTTPException

        self.counters["requests_refused"] += 1
        return HTTPException(code, one_line(detail))

    async def validation_error(self, request: Any, exc: Any) -> Any:
        """A bad query parameter: 422 with one line naming it."""
        from fastapi.responses import JSONResponse

        self.counters["requests_refused"] += 1
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        return JSONResponse({"detail": one_line(f"{where}: {first.get('msg')}")}, 422)

    def stats(self) -> dict:
        """The counters, the batcher's and the decoder's, uptime."""
        extra = {"large_decodes": self.decoder.large_requests}
        uptime = round(time.time() - self.started, 1)
        return {**self.counters, **self.batcher.stats(), **extra, "uptime_s": uptime}

    async def health(self) -> dict:
        """GET /health."""
        return {"status": "ok", "model": self.served.describe()["version"], **self.stats()}

    async def info(self) -> dict:
        """GET /info."""
        s = self.served
        return {
            "model": s.describe(),
            "config": s.config.to_dict(),
            "parameters": s.parameters,
            "image_size": s.image_size,
            "num_classes": len(s.class_names),
            "class_names": s.class_names,
            "device": str(s.device),
            "precision": s.precision,
            "bf16_from_images": s.bf16_from,
            "compiled": s.compiled,
            "server": self.server_info(),
            "stats": self.stats(),
        }

    def server_info(self) -> dict:
        """The server's settings and limits, as /info reports them."""
        c = self.config
        keys = ("max_batch", "max_wait_ms", "max_upload_mb", "max_images", "workers")
        limits = ("max_image_mp", "max_request_mp", "max_large_decodes", "header_timeout_s")
        limits += ("body_timeout_s", "keep_alive_s", "max_header_kb", "max_connections")
        limits += ("max_connections_per_ip", "max_connection_s", "decode_s_per_mp")
        bound = decode_memory_bound(c.max_image_pixels, c.max_large_decodes)
        return {
            **{k: getattr(c, k) for k in keys + limits},
            "decode_memory_bound_mb": round(bound / 2**20),
            "pid": os.getpid(),
            "torch_threads": torch.get_num_threads(),
        }

    async def index(self) -> str:
        """GET /: the upload page."""
        return self.page

    async def read_images(self, request: Any) -> Items:
        """The images of a request: a multipart form's files, or one raw image body."""
        from starlette.datastructures import UploadFile
        from starlette.exceptions import HTTPException as StarletteHTTPException

        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media.startswith("image/") or media in RAW_TYPES:
            return [(None, await request.body())]
        if media != "multipart/form-data":
            raise self.refuse(
                415,
                f"content type {media or '(none)'!r} not accepted; send multipart/form-data "
                "with image files, or the raw bytes of one image with an image/* content type",
            )
        n = self.config.max_images
        try:
            form = await request.form(max_files=n, max_fields=1000)
        except StarletteHTTPException as exc:  # what request.form raises on bad input
            if "Too many files" in str(exc.detail):
                msg = f"more than {n} images in one request (--max-images)"
                raise self.refuse(413, msg) from exc
            raise self.refuse(400, f"malformed multipart body: {exc.detail}") from exc
        try:
            files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
            return [(v.filename, await v.read()) for v in files]
        finally:
            await form.close()

    async def predict(self, request: Any, top_k: int) -> dict:
        """POST /predict: read, measure, decode, batch, answer the top-k of each image."""
        items = await self.read_images(request)
        if not items:
            raise self.refuse(
                400,
                "no image in the request; send each image as a file field of a multipart "
                "form (curl -F file=@photo.jpg)",
            )
        n = self.config.max_images
        if len(items) > n:
            msg = f"{len(items)} images in one request, at most {n} (--max-images)"
            raise self.refuse(413, msg)
        try:
            x = await self.decoder.decode(items, self.served.image_size)
            x = to_channels(x, self.served.config.in_chans)  # grey for a 1-channel model
        except DecodeBudgetError as exc:
            raise self.refuse(413, str(exc)) from exc
        except UnsupportedFormatError as exc:
            raise self.refuse(415, str(exc)) from exc
        except DataError as exc:
            raise self.refuse(400, str(exc)) from exc
        request.state.images = len(items)
        logits = await self.batcher.submit(x)
        names = [name for name, _ in items]
        preds = top_k_predictions(logits, self.served.class_names, top_k, names)
        self.counters["requests_served"] += 1
        return {"model": self.served.describe(), "predictions": [p.to_dict() for p in preds]}


def _json_escape(char: str) -> str:
    return json.dumps(char)[1:-1]  # \uXXXX (a surrogate pair beyond the BMP)


def _printable_json_response() -> type:
    """FastAPI's JSONResponse whose text is safe for a terminal (`curl /info`)."""
    from fastapi.responses import JSONResponse

    class PrintableJSONResponse(JSONResponse):
        """Characters that are not printable (C1 controls, bidi overrides; json already
        escapes C0) become \\u escapes: the client decodes the same strings, a terminal
        showing the raw text sees no control sequence."""

        def render(self, content: Any) -> bytes:
            text = super().render(content).decode("utf-8")
            return printable(text, _json_escape).encode("utf-8")

    return PrintableJSONResponse


def create_app(config: ServeConfig, served: ServedModel | None = None) -> Any:
    """The FastAPI application for `config` (loads the checkpoint unless `served` is given)."""
    check_dependencies()
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse

    state = ServeState(config, served)
    # No /docs or /redoc: FastAPI's pages load their scripts from a CDN, and the server may be
    # offline. The OpenAPI schema stays at /openapi.json.
    app = FastAPI(
        title="eanet",
        version=__version__,
        lifespan=state.lifespan,
        docs_url=None,
        redoc_url=None,
        default_response_class=_printable_json_response(),
    )
    app.state.serve, app.state.batcher, app.state.served = state, state.batcher, state.served
    app.add_exception_handler(RequestValidationError, state.validation_error)
    app.add_api_route("/health", state.health, methods=["GET"])
    app.add_api_route("/info", state.info, methods=["GET"])
    app.add_api_route("/", state.index, methods=["GET"], response_class=HTMLResponse)

    async def predict(
        request: Request, top_k: int = Query(5, ge=1, description="classes per image")
    ) -> dict:
        return await state.predict(request, top_k)

    app.add_api_route("/predict", predict, methods=["POST"])
    app.add_middleware(
        RequestGuard,
        max_bytes=config.max_upload_bytes,
        body_timeout_s=config.body_timeout_s,
        counters=state.counters,
    )
    return app
