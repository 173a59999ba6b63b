"""Images/s of ``geocell data download`` against a local HTTP server, beside its peers on the same
photos: ``geocell data pack`` of the photos already on disk (decode, resize, encode, write
shards: no network), and a plain threaded fetch of the same URLs (network only, nothing decoded).
Download ≈ fetch + pack + img2dataset's own work (process start-up, status tables); the table at
the end says how far each peer is from the whole.

    python -m pytest bench/bench_download.py --benchmark-only -s

200 synthetic 800x600 JPEGs (the size of a Flickr "z" photo), served from 127.0.0.1, packed to a
shorter side of 320 px; 4 connections and 2 pack workers, the defaults.
"""

from __future__ import annotations

import concurrent.futures
import io
import shutil
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

pytest.importorskip("img2dataset")
Image = pytest.importorskip("PIL.Image")

from geocell.data.download import download  # noqa: E402
from geocell.data.manifest import read_manifest  # noqa: E402
from geocell.data.shards import pack  # noqa: E402

N, W, H = 200, 800, 600
RATES: dict[str, float] = {}


def _photo(i: int) -> bytes:
    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[0:H, 0:W]
    arr = np.stack([(xx + 7 * i) % 256, (yy + 3 * i) % 256, (xx + yy) % 256], -1)
    arr = (arr + rng.integers(0, 40, arr.shape)).clip(0, 255).astype(np.uint8)  # some texture
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """(folder with the photos and manifest.csv, urls.csv, base URL); the server runs meanwhile."""
    base = tmp_path_factory.mktemp("bench_download")
    bodies = {i: _photo(i) for i in range(N)}
    (base / "disk").mkdir()
    rows = ["path,lat,lng"]
    for i, body in bodies.items():
        (base / "disk" / f"{i}.jpg").write_bytes(body)
        rows.append(f"{i}.jpg,{-60 + i * 0.6:.2f},{-170 + i * 1.7:.2f}")
    (base / "disk" / "manifest.csv").write_text("\n".join(rows) + "\n")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            body = bodies[int(self.path[1:-4])]
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    urls = ["id,url,lat,lng"] + [f"p{i},{url}/{i}.jpg,{-60 + i * 0.6:.2f},{-170 + i * 1.7:.2f}" for i in range(N)]
    (base / "urls.csv").write_text("\n".join(urls) + "\n")
    yield base, url
    httpd.shutdown()
    httpd.server_close()


def _fresh(folder):
    shutil.rmtree(folder, ignore_errors=True)
    return folder


def _record(benchmark, name: str) -> None:
    rate = N / benchmark.stats.stats.min
    benchmark.extra_info["images_per_s"] = rate
    RATES[name] = rate


def test_geocell_data_download(benchmark, photos):
    base, _ = photos
    out = base / "shards_download"

    def run():
        summary = download(base / "urls.csv", _fresh(out), threads=4, workers=2, progress=False)
        assert summary["downloaded"] == N, summary

    benchmark.pedantic(run, rounds=3, iterations=1)
    _record(benchmark, "geocell data download (127.0.0.1)")


def test_geocell_data_pack_from_disk(benchmark, photos):
    base, _ = photos
    manifest = read_manifest(base / "disk" / "manifest.csv")
    out = base / "shards_pack"

    def run():
        summary = pack(manifest, _fresh(out), workers=2, progress=False)
        assert summary["count"] == N, summary

    benchmark.pedantic(run, rounds=3, iterations=1)
    _record(benchmark, "geocell data pack (same photos on disk)")


def test_threaded_fetch_only(benchmark, photos):
    _, url = photos

    def fetch(i):
        with urllib.request.urlopen(f"{url}/{i}.jpg", timeout=10) as r:
            return len(r.read())

    def run():
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            assert all(n > 0 for n in pool.map(fetch, range(N)))

    benchmark.pedantic(run, rounds=3, iterations=1)
    _record(benchmark, "fetch only (4 threads, no decode)")


def teardown_module(module):
    if not RATES:
        return
    ref = RATES.get("geocell data download (127.0.0.1)")
    print(f"\n{'images/s, same run, best of 3':<42} {'images/s':>9} {'x download':>11}")
    for name, rate in sorted(RATES.items(), key=lambda kv: -kv[1]):
        ratio = f"{rate / ref:11.2f}" if ref else f"{'-':>11}"
        print(f"{name:<42} {rate:9.1f} {ratio}")
