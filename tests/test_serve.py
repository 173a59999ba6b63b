"""geocell serve: the JSON API equals Geolocator.predict, refuses bad uploads with 4xx JSON and
keeps serving, keeps concurrent requests apart, serves a self-contained page."""

from __future__ import annotations

import io
import os
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("torchvision")
pytest.importorskip("fastapi")
pytest.importorskip("multipart")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from geocell.commands import serve as serve_command  # noqa: E402
from geocell.infer import serve  # noqa: E402
from geocell.infer.predict import Geolocator  # noqa: E402
from geocell.model.checkpoint import FORMAT_VERSION  # noqa: E402
from helpers import make_tiny_checkpoint, write_jpegs  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    ckpt = make_tiny_checkpoint(root / "tiny.pt")
    images = write_jpegs(root / "images", 8)
    geo = Geolocator.from_checkpoint(ckpt, device="cpu")
    client = TestClient(serve.app(ckpt, device="cpu"))
    return ckpt, images, geo, client


def upload(client, path, endpoint="/api/predict", **fields):
    with open(path, "rb") as f:
        data = f.read()
    return client.post(endpoint, files={"image": (os.path.basename(path), data, "image/jpeg")},
                       data={k: str(v) for k, v in fields.items()})


def expected(geo, path, **kw):
    record = geo.predict(path, **kw).to_dict()
    record["image"] = os.path.basename(path)  # the upload's name, not the server-side path
    return record


def test_predict_equals_geolocator(tiny):
    _, images, geo, client = tiny
    r = upload(client, images[0])
    assert r.status_code == 200, r.text
    assert r.json() == expected(geo, images[0])
    r = upload(client, images[1], top_k=3, mass=0.5)
    assert r.status_code == 200, r.text
    assert r.json() == expected(geo, images[1], top_k=3, mass=0.5)
    assert len(r.json()["top_k"]) == 3 and r.json()["credible_region"]["mass"] == 0.5


def test_bad_uploads_are_4xx_json_and_the_server_keeps_serving(tiny, tmp_path):
    _, images, geo, client = tiny
    with open(images[0], "rb") as f:
        jpeg = f.read()
    bad = {
        "not an image": ({"image": ("a.jpg", b"hello, this is text", "image/jpeg")}, {}),
        "corrupt jpeg": ({"image": ("b.jpg", jpeg[: len(jpeg) // 3], "image/jpeg")}, {}),
        "empty": ({"image": ("c.jpg", b"", "image/jpeg")}, {}),
        "no image field": ({"other": ("d.jpg", jpeg, "image/jpeg")}, {}),
        "top_k zero": ({"image": ("e.jpg", jpeg, "image/jpeg")}, {"top_k": "0"}),
        "top_k text": ({"image": ("e.jpg", jpeg, "image/jpeg")}, {"top_k": "five"}),
        "mass > 1": ({"image": ("e.jpg", jpeg, "image/jpeg")}, {"mass": "1.5"}),
        "mass nan": ({"image": ("e.jpg", jpeg, "image/jpeg")}, {"mass": "nan"}),
    }
    for why, (files, data) in bad.items():
        r = client.post("/api/predict", files=files, data=data)
        assert 400 <= r.status_code < 500, (why, r.status_code, r.text)
        assert isinstance(r.json().get("error"), str) and r.json()["error"], why
        good = upload(client, images[2])  # still serving, still right
        assert good.status_code == 200 and good.json() == expected(geo, images[2]), why
    assert client.post("/api/predict", files=bad["not an image"][0]).status_code == 415
    r = client.post("/api/predict", content=b"x", headers={"content-type": "text/plain"})
    assert r.status_code == 400 and "error" in r.json()


def test_pixel_limit_is_checked_before_decoding(tiny, monkeypatch):
    ckpt, images, _, _ = tiny
    client = TestClient(serve.app(ckpt, device="cpu", max_pixels=40 * 40))
    buf = io.BytesIO()
    Image.new("RGB", (41, 40)).save(buf, format="PNG")

    def no_decoding(self, *a, **k):
        raise AssertionError("decoded an image over the pixel limit")

    monkeypatch.setattr(Image.Image, "convert", no_decoding)
    r = client.post("/api/predict", files={"image": ("big.png", buf.getvalue(), "image/png")})
    assert r.status_code == 413 and "Mpx" in r.json()["error"]
    monkeypatch.undo()
    small = io.BytesIO()
    Image.new("RGB", (40, 40)).save(small, format="PNG")
    r = client.post("/api/predict", files={"image": ("ok.png", small.getvalue(), "image/png")})
    assert r.status_code == 200, r.text


def test_oversized_upload_is_413(tiny):
    _, images, geo, client = tiny
    big = b"\xff\xd8" + b"\0" * (serve.MAX_UPLOAD_BYTES + 1000)
    r = client.post("/api/predict", files={"image": ("big.jpg", big, "image/jpeg")})
    assert r.status_code == 413 and "too large" in r.json()["error"]
    assert upload(client, images[0]).json() == expected(geo, images[0])


def test_oversized_streamed_upload_is_413(tiny):
    """No Content-Length (chunked): the limit applies while the body streams in."""
    ckpt, images, _, _ = tiny
    client = TestClient(serve.app(ckpt, device="cpu", max_upload_bytes=10_000))
    boundary = "geocellboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + b"\0" * 200_000 + f"\r\n--{boundary}--\r\n".encode()
    chunks = (body[i:i + 8192] for i in range(0, len(body), 8192))
    r = client.post("/api/predict", content=chunks,
                    headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413 and "too large" in r.json()["error"]
    # a file just over the limit inside a body within the form slack: refused by the handler
    r = client.post("/api/predict", files={"image": ("b.jpg", b"\0" * 10_001, "image/jpeg")})
    assert r.status_code == 413


def test_concurrent_uploads_get_their_own_records(tiny):
    _, images, geo, client = tiny
    want = {os.path.basename(p): expected(geo, p) for p in images}
    assert len(set(r["hierarchical_top1"]["probability"] for r in want.values())) > 1
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda p: upload(client, p), images))
    assert [r.status_code for r in responses] == [200] * 8
    for path, r in zip(images, responses):
        assert r.json() == want[os.path.basename(path)]


def test_map_is_a_png(tiny, tmp_path):
    _, images, _, client = tiny
    r = upload(client, images[0], "/api/map", mass=0.5)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    im = Image.open(io.BytesIO(r.content))
    assert im.format == "PNG" and im.width > 500
    r = client.post("/api/map", files={"image": ("x$y$.jpg", open(images[1], "rb").read(), "image/jpeg")})
    assert r.status_code == 200  # a "$" in the name is not read as mathtext
    assert client.post("/api/map", files={"image": ("t.txt", b"text", "text/plain")}).status_code == 415


def test_exif_gps_header(tiny, tmp_path):
    _, images, geo, client = tiny
    from geocell.data.exif import gps_exif, read_gps

    path = os.fspath(tmp_path / "gps.jpg")
    Image.open(images[0]).save(path, exif=gps_exif(48.85, 2.35))
    lat, lng = read_gps(path)
    r = upload(client, path)
    assert r.status_code == 200 and r.json() == expected(geo, path)
    got = tuple(float(v) for v in r.headers["x-geocell-exif-gps"].split(","))
    assert got == pytest.approx((lat, lng), abs=1e-5) and got == pytest.approx((48.85, 2.35), abs=1e-3)
    assert "x-geocell-exif-gps" not in upload(client, images[0]).headers


def test_health(tiny):
    ckpt, _, geo, client = tiny
    h = client.get("/api/health").json()
    assert h["checkpoint"] == os.path.basename(ckpt) and h["format_version"] == FORMAT_VERSION
    assert h["partitionings"] == ["coarse", "fine"] and h["fine_cells"] == len(geo.fine)
    assert client.get("/api/nothing").status_code == 404 and "error" in client.get("/api/nothing").json()


def test_page_is_self_contained(tiny):
    ckpt, _, _, client = tiny
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert not re.search(r"https?://", page, re.IGNORECASE)
    assert not re.search(r"""(src|href)\s*=\s*["']?//""", page)  # no protocol-relative assets
    assert not re.search(r"<link\b|@import|url\(", page)
    assert os.path.basename(ckpt) in page and "consent" in page
    assert "api/predict" in page and "api/map" in page
    assert "default-src 'none'" in r.headers["content-security-policy"]


def test_cli_registered_and_host_warning(tiny, monkeypatch, capsys):
    from geocell.commands import COMMANDS

    assert COMMANDS["serve"][0] == "geocell.commands.serve"
    ckpt = tiny[0]
    calls = []
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    assert serve_command.main(["--checkpoint", ckpt, "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert "http://127.0.0.1:7860/" in out and "WARNING" not in err
    assert calls[-1]["host"] == "127.0.0.1" and calls[-1]["port"] == 7860
    assert serve_command.main(["--checkpoint", ckpt, "--device", "cpu", "--host", "0.0.0.0", "--port", "8000"]) == 0
    out, err = capsys.readouterr()
    assert "WARNING" in err and "0.0.0.0" in err and "http://127.0.0.1:8000/" in out
    for host in ("::", "192.168.1.5", "example.org"):
        assert serve_command.main(["--checkpoint", ckpt, "--device", "cpu", "--host", host]) == 0
        err = capsys.readouterr().err
        assert f"WARNING: binding {host} makes this server reachable from other machines" in err
    for host in ("localhost", "::1", "127.0.0.2"):
        assert serve_command.main(["--checkpoint", ckpt, "--device", "cpu", "--host", host]) == 0
        assert "WARNING" not in capsys.readouterr().err
    assert serve_command.main(["--checkpoint", os.fspath(ckpt) + ".missing"]) == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_server_on_localhost(tiny):
    import httpx
    import uvicorn

    ckpt, images, geo, _ = tiny
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(serve.app(ckpt, device="cpu"), host="127.0.0.1",
                                           port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
            time.sleep(0.05)
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(timeout=30) as http:
            assert http.get(base + "/").status_code == 200
            assert http.get(base + "/api/health").json()["checkpoint"] == os.path.basename(ckpt)
            with open(images[3], "rb") as f:
                r = http.post(base + "/api/predict", files={"image": ("img_3.jpg", f.read())})
            assert r.status_code == 200 and r.json() == expected(geo, images[3])
        # 8 uploads at once over real sockets: each answer is its own photo's record
        want = {os.path.basename(p): expected(geo, p) for p in images}

        def post(path):
            with open(path, "rb") as f, httpx.Client(timeout=60) as http:
                return http.post(base + "/api/predict", files={"image": (os.path.basename(path), f.read())})

        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(post, images))
        assert [r.status_code for r in responses] == [200] * 8
        assert [r.json() for r in responses] == [want[os.path.basename(p)] for p in images]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert not thread.is_alive()


def test_factory_reads_the_checkpoint_from_the_environment(tiny, monkeypatch):
    """``GEOCELL_CHECKPOINT=model.pt uvicorn --factory geocell.infer.serve:app``"""
    ckpt = tiny[0]
    monkeypatch.delenv("GEOCELL_CHECKPOINT", raising=False)
    with pytest.raises(ValueError, match="GEOCELL_CHECKPOINT"):
        serve.app()
    monkeypatch.setenv("GEOCELL_CHECKPOINT", ckpt)
    assert TestClient(serve.app(device="cpu")).get("/api/health").json()["checkpoint"] == os.path.basename(ckpt)


def test_an_internal_error_is_json_500_and_the_server_keeps_serving(tiny, monkeypatch):
    ckpt, images, geo, _ = tiny
    asgi = serve.app(ckpt, device="cpu")
    service = asgi.app.state.service
    real = service.geo.predict_inputs  # what the service calls with a prepared upload
    calls = []

    def fails_once(*a, **k):
        if not calls:
            calls.append(1)
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(service.geo, "predict_inputs", fails_once)
    client = TestClient(asgi, raise_server_exceptions=False)
    r = upload(client, images[0])
    assert r.status_code == 500 and r.json() == {"error": "internal error: RuntimeError"}
    assert upload(client, images[0]).json() == expected(geo, images[0])
