"""`eanet serve`: the HTTP API, dynamic batching, limits and bad input, a real uvicorn server."""

import asyncio
import io
import json
import shutil
import threading
import warnings

import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="eanet serve needs the [serve] extra")
httpx = pytest.importorskip("httpx", reason="the serve tests need httpx")

with warnings.catch_warnings():  # starlette 1.x prefers httpx2; httpx works
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient

from docs_helpers import python_block  # noqa: E402
from serve_helpers import server_process  # noqa: E402

from eanet import checkpoint  # noqa: E402
from eanet.api import Classifier  # noqa: E402
from eanet.cli.main import main  # noqa: E402
from eanet.errors import ConfigError  # noqa: E402
from eanet.models.registry import count_parameters, create_model  # noqa: E402
from eanet.serve.app import create_app  # noqa: E402
from eanet.serve.batcher import Batcher  # noqa: E402
from eanet.serve.config import ServeConfig  # noqa: E402


def png_bytes(image: torch.Tensor) -> bytes:
    """A uint8 [3, H, W] tensor as PNG file contents."""
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, sample_data):
    """A 1-block EANet with the slice's 100 real class names (random weights, normalised)."""
    torch.manual_seed(0)
    model = create_model("eanet-cifar", depth=1, num_classes=len(sample_data.class_names))
    x = sample_data.train_images.float()
    model.normalize.set_stats(x.mean((0, 2, 3)), x.var((0, 2, 3)), len(x))
    path = tmp_path_factory.mktemp("serve") / "tiny.safetensors"
    meta = {"class_names": sample_data.class_names, "model_name": "eanet-cifar"}
    checkpoint.save(path, model, meta)
    return path


@pytest.fixture(scope="module")
def pngs(sample_data):
    return [png_bytes(sample_data.test_images[i]) for i in range(6)]


def make_config(path, **kw) -> ServeConfig:
    kw = {"max_wait_ms": 2, "max_upload_mb": 0.05, "max_images": 4, "device": "cpu", **kw}
    return ServeConfig(str(path), **kw)


@pytest.fixture(scope="module")
def client(tiny_ckpt):
    with TestClient(create_app(make_config(tiny_ckpt))) as c:
        yield c


def files(*blobs: bytes, names=None):
    names = names or [f"img{i}.png" for i in range(len(blobs))]
    return [("file", (n, b, "image/png")) for n, b in zip(names, blobs, strict=True)]


def test_predict_several_images_multipart(client, pngs, sample_data):
    r = client.post("/predict?top_k=3", files=files(*pngs[:3]))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"]["name"] == "eanet-cifar"
    assert body["model"]["version"].startswith("sha256:")
    assert len(body["model"]["checkpoint_sha256"]) == 64
    assert body["model"]["eanet_version"]
    assert [p["file"] for p in body["predictions"]] == ["img0.png", "img1.png", "img2.png"]
    for p in body["predictions"]:
        preds = p["predictions"]
        assert len(preds) == 3
        assert all(q["class"] in sample_data.class_names for q in preds)
        probs = [q["probability"] for q in preds]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5


def test_predict_raw_bytes_matches_the_python_api(client, pngs, tiny_ckpt):
    r = client.post("/predict", content=pngs[0], headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    (got,) = r.json()["predictions"]
    assert got["file"] is None and len(got["predictions"]) == 5
    model, ckpt = checkpoint.load_model(tiny_ckpt)
    want = Classifier(model, ckpt.class_names).predict(pngs[0], top_k=5)
    assert [q["class"] for q in got["predictions"]] == want.classes
    assert [q["probability"] for q in got["predictions"]] == pytest.approx(
        want.probabilities, abs=1e-5
    )


def test_a_one_channel_model_is_served_grey_as_the_api_predicts(tmp_path, pngs):
    """eanet-fashion takes 28x28 grey images: colour uploads become grey, as in predict."""
    torch.manual_seed(0)
    model = create_model("eanet-fashion", depth=1)
    path = tmp_path / "fashion.safetensors"
    names = [f"class{i}" for i in range(10)]
    checkpoint.save(path, model, {"class_names": names, "model_name": "eanet-fashion"})
    with TestClient(create_app(make_config(path))) as c:
        r = c.post("/predict", content=pngs[0], headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    (got,) = r.json()["predictions"]
    loaded, ckpt = checkpoint.load_model(path)
    want = Classifier(loaded, ckpt.class_names).predict(pngs[0], top_k=5)
    assert [q["class"] for q in got["predictions"]] == want.classes
    assert [q["probability"] for q in got["predictions"]] == pytest.approx(
        want.probabilities, abs=1e-5
    )


def test_info_and_health(client, tiny_ckpt, sample_data):
    info = client.get("/info").json()
    model, _ = checkpoint.load_model(tiny_ckpt)
    assert info["parameters"] == count_parameters(model)
    assert info["class_names"] == sample_data.class_names
    assert info["config"]["depth"] == 1 and info["image_size"] == 32
    assert info["server"]["max_batch"] == 64 and info["server"]["max_images"] == 4
    health = client.get("/health").json()
    assert health["status"] == "ok"
    assert {"batches_run", "images_served", "requests_served"} <= set(health)


def test_page_is_self_contained(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert 'type="file"' in r.text and "predict" in r.text
    assert "http://" not in r.text and "https://" not in r.text  # no CDN: works offline


def test_names_from_the_checkpoint_reach_a_terminal_escaped(tiny_ckpt, tmp_path, pngs):
    hostile = "\x1b[2J\x1b[H\x1b]0;TITLE\x07FAKE: all good\r"  # issue 25's model_name
    model, ckpt = checkpoint.load_model(tiny_ckpt)
    names = [f"\x9b2J{hostile}\u202e{i}" for i in range(len(ckpt.class_names))]  # C1, bidi
    path = tmp_path / "hostile.safetensors"
    checkpoint.save(path, model, {"class_names": names, "model_name": hostile})
    with TestClient(create_app(make_config(path))) as c:
        responses = [c.get("/info"), c.post("/predict", files=files(pngs[0])), c.get("/")]
    for r in responses:
        assert r.status_code == 200
        assert not any(ch in r.text for ch in "\x1b\x07\r\x9b\u202e"), r.text[:200]
    info, predicted = responses[0].json(), responses[1].json()
    assert info["model"]["name"] == hostile and info["class_names"] == names  # exact values
    assert predicted["predictions"][0]["predictions"][0]["class"] in names
    assert "textContent" in responses[2].text and "innerHTML" not in responses[2].text


def _bad_requests(pngs):
    ok = pngs[0]
    return {
        "not an image": (400, {"files": files(b"hello, not a picture\n", names=["a.txt"])}),
        "corrupt": (400, {"files": files(ok[: len(ok) // 2])}),
        "empty": (400, {"content": b"", "headers": {"Content-Type": "image/png"}}),
        "no file field": (400, {"data": {"name": "x"}, "files": [("other", ("", b"", ""))]}),
        "malformed multipart": (
            400,
            {"content": b"junk", "headers": {"Content-Type": "multipart/form-data; boundary=z"}},
        ),
        "wrong content type": (415, {"content": ok, "headers": {"Content-Type": "text/plain"}}),
        "too large": (
            413,
            {"content": b"\x89PNG" + bytes(60_000), "headers": {"Content-Type": "image/png"}},
        ),
        "too many images": (413, {"files": files(*pngs[:5])}),
        "top_k 0": (422, {"files": files(ok), "params": {"top_k": 0}}),
    }


def test_bad_requests_get_one_line_reasons_and_the_server_keeps_serving(client, pngs):
    refused = client.get("/health").json()["requests_refused"]
    cases = _bad_requests(pngs)
    for case, (status, kwargs) in cases.items():
        r = client.post("/predict", **kwargs)
        assert r.status_code == status, (case, r.text)
        detail = r.json()["detail"]
        assert isinstance(detail, str) and "\n" not in detail and detail, case
        assert "Traceback" not in r.text, case
        assert client.post("/predict", files=files(pngs[1])).status_code == 200, case
    assert client.get("/health").json()["requests_refused"] == refused + len(cases)
    detail = client.post("/predict", **cases["not an image"][1]).json()["detail"]
    assert detail == "image 1 (a.txt): not an image Pillow can read"


def test_an_internal_error_is_a_500_line_and_the_server_goes_on(tiny_ckpt, pngs, caplog):
    app = create_app(make_config(tiny_ckpt))
    served = app.state.served
    original = served.forward
    calls = {"n": 0}

    def flaky(x):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom\nsecond line")
        return original(x)

    served.forward = flaky
    app.state.batcher.forward = flaky
    with TestClient(app) as c, caplog.at_level("ERROR", logger="eanet.serve"):
        r = c.post("/predict", files=files(pngs[0]))
        assert r.status_code == 500
        assert r.json()["detail"].startswith("internal server error (RuntimeError)")
        assert "boom" not in r.text and "Traceback" not in r.text
        assert c.post("/predict", files=files(pngs[0])).status_code == 200
        assert c.get("/health").json()["internal_errors"] == 1
    assert "Traceback" in caplog.text and "boom" in caplog.text  # logged server-side


def _post_scope(length: int) -> dict:
    headers = [(b"content-type", b"image/png"), (b"content-length", str(length).encode())]
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/predict",
        "raw_path": b"/predict",
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "state": {},
    }


def _call(app, scope: dict, messages: list[dict]) -> list[dict]:
    """Run one ASGI request: `messages` from the client, then silence; what the app sent."""
    sent = []

    async def receive():
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()  # a client that sends nothing more

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent


def test_a_client_leaving_mid_upload_is_one_info_line_not_an_error(tiny_ckpt, caplog):
    app = create_app(make_config(tiny_ckpt))
    part = {"type": "http.request", "body": b"\x89PNG" + bytes(100), "more_body": True}
    with caplog.at_level("INFO", logger="eanet.serve"):
        sent = _call(app, _post_scope(5000), [part, {"type": "http.disconnect"}])
    assert not [m for m in sent if m["type"] == "http.response.start"]  # nobody to answer
    counters = app.state.serve.counters
    assert counters["client_disconnects"] == 1 and counters["internal_errors"] == 0
    records = [r for r in caplog.records if r.name.startswith("eanet.serve")]
    assert [r.getMessage() for r in records] == [
        "POST /predict: the client disconnected after 104 body bytes"
    ]
    assert records[0].levelname == "INFO"


def test_a_stalled_body_gets_408_and_the_connection_closed(tiny_ckpt):
    app = create_app(make_config(tiny_ckpt, body_timeout_s=0.2))
    part = {"type": "http.request", "body": b"\x89PNG", "more_body": True}
    sent = _call(app, _post_scope(5000), [part])
    start, body = sent
    assert start["status"] == 408 and (b"connection", b"close") in start["headers"]
    detail = json.loads(body["body"])["detail"]
    assert detail == "request body not complete within 0.2 s (4 bytes received; --body-timeout-s)"
    assert app.state.serve.counters["body_timeouts"] == 1


def test_concurrent_requests_share_forward_passes(tiny_ckpt, pngs):
    app = create_app(make_config(tiny_ckpt, max_wait_ms=250, max_images=8))

    async def fire(n: int) -> list:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            rs = await asyncio.gather(
                *(c.post("/predict", files=files(pngs[i % len(pngs)])) for i in range(n))
            )
            health = (await c.get("/health")).json()
        await app.state.batcher.close()
        return rs, health

    rs, health = asyncio.run(fire(8))
    assert [r.status_code for r in rs] == [200] * 8
    assert health["images_served"] == 8 and health["requests_served"] == 8
    assert health["batches_run"] < 8  # grouped: fewer forward passes than requests
    assert health["largest_batch"] > 1


def test_batcher_splits_at_max_batch_and_survives_a_failing_pass():
    calls = []

    def forward(x):
        calls.append(len(x))
        if (x < 0).any():
            raise ValueError("negative")
        return x * 2

    async def scenario():
        b = Batcher(forward, max_batch=4, max_wait_ms=100)
        singles = [torch.full((1, 2), float(i)) for i in range(10)]
        outs = await asyncio.gather(*(b.submit(x) for x in singles))
        assert [o.tolist() for o in outs] == [[[2.0 * i] * 2] for i in range(10)]
        assert calls == [4, 4, 2]
        big = torch.arange(12.0).reshape(6, 2)  # one job above max_batch: split in two passes
        assert torch.equal(await b.submit(big), big * 2) and calls[-2:] == [4, 2]
        with pytest.raises(ValueError, match="negative"):
            await b.submit(-torch.ones(1, 2))
        assert torch.equal(await b.submit(torch.ones(1, 2)), torch.full((1, 2), 2.0))
        assert b.batches_run == 6 and b.images_served == 17
        await b.close()

    asyncio.run(scenario())


def test_config_validation():
    with pytest.raises(ConfigError, match="--max-batch"):
        ServeConfig("x", max_batch=0)
    with pytest.raises(ConfigError, match="--max-upload-mb"):
        ServeConfig("x", max_upload_mb=0)
    with pytest.raises(ConfigError, match="--max-request-mp .* >= --max-image-mp"):
        ServeConfig("x", max_image_mp=8, max_request_mp=4)
    names = ("header_timeout_s", "body_timeout_s", "keep_alive_s", "max_large_decodes")
    names += ("max_connections_per_ip", "max_connection_s", "decode_s_per_mp")
    for name in names:
        flag = "--" + name.replace("_", "-")
        with pytest.raises(ConfigError, match=flag):
            ServeConfig("x", **{name: 0})


def test_pixel_budget_is_read_from_the_header(tiny_ckpt):
    from serve_helpers import flat_png

    over = flat_png(4000, 4001)  # one row above the default 16 MP, in 62 KB of PNG
    with TestClient(create_app(make_config(tiny_ckpt, max_upload_mb=1))) as c:
        r = c.post("/predict", files=files(over))
        assert r.status_code == 413
        assert r.json()["detail"] == (
            "image 1 (img0.png): 4000x4001 = 16.0 megapixels, above the serving limit of 16 "
            "megapixels per image (--max-image-mp)"
        )
        assert c.get("/health").json()["large_decodes"] == 0  # refused before decoding
        assert c.post("/predict", files=files(flat_png(2000, 2000))).status_code == 200
        assert c.get("/health").json()["large_decodes"] == 1  # decoded in the large lane


def test_cli_missing_extra_is_one_line(monkeypatch, capsys, tiny_ckpt):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a)
    )
    assert main(["serve", str(tiny_ckpt)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "uvicorn" in err and "eanet[serve]" in err


def test_cli_bad_checkpoint_is_one_line(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("eanet: error:") and "\n" not in err


def test_cli_port_in_use_is_one_line(tiny_ckpt, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", str(tiny_ckpt), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"cannot listen on 127.0.0.1:{port}" in err and "\n" not in err


@pytest.mark.slow
def test_real_uvicorn_server(
    tiny_ckpt, pngs, tmp_path, sample_data, image_folder, monkeypatch, capsys
):
    log = tmp_path / "server.log"
    opts = ("--max-wait-ms", "300", "--max-upload-mb", "0.05", "--max-images", "4")
    with server_process(tiny_ckpt, *opts, log_path=log) as url, httpx.Client(base_url=url) as c:
        assert c.get("/health").json()["status"] == "ok"
        r = c.post("/predict?top_k=2", files=files(pngs[0], pngs[1]))
        assert r.status_code == 200
        assert all(
            q["class"] in sample_data.class_names
            for p in r.json()["predictions"]
            for q in p["predictions"]
        )
        for case, (status, kwargs) in _bad_requests(pngs).items():
            assert c.post("/predict", **kwargs).status_code == status, case

        # concurrent clients over real sockets share forward passes
        before = c.get("/health").json()["batches_run"]
        codes = []
        start = threading.Barrier(6)

        def one(i):
            with httpx.Client(base_url=url) as ci:
                start.wait()
                codes.append(ci.post("/predict", files=files(pngs[i % 6])).status_code)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        health = c.get("/health").json()
        assert codes == [200] * 6
        assert health["batches_run"] - before < 6
        assert c.get("/").status_code == 200

        # the docs' Python example, against this server
        shutil.copytree(image_folder, tmp_path / "images")
        monkeypatch.chdir(tmp_path)
        example = python_block("serving.md", "## From Python")
        example = example.replace("http://127.0.0.1:8000", url)
        exec(compile(example, "docs/serving.md", "exec"), {})
        out = capsys.readouterr().out.splitlines()
        assert [line.split()[0] for line in out] == ["0009.png", "0008.png"]
        assert all(line.count("%") == 3 for line in out)
    text = log.read_text()
    assert "POST /predict 200" in text and "images=2" in text
    assert "POST /predict 413" in text and "Traceback" not in text
