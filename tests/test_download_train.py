"""The path every user takes: ``geocell data download`` from a URL list, then ``geocell train
--manifest <folder>`` with the default split flags. The default held-out split draws val/test
places inside a folder packed as one split, so the loaders read parts of shards (the torch
backend through the index offsets, DALI through index copies listing only the split's samples);
a resumed epoch on such a subset equals the uninterrupted one."""

import io
import json
import os
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("img2dataset")

from geocell.data.dataset import read_dataset  # noqa: E402
from geocell.data.shards import shard_meta  # noqa: E402
from geocell.loading.base import epoch_rows  # noqa: E402
from geocell.loading.loaders import make_loader  # noqa: E402
from geocell.loading.preprocess import Preprocess  # noqa: E402
from geocell.loading.labels import LabelTable  # noqa: E402

N = 120
RUN_LIMIT_S = 300
MAX_REQUESTS = 2 * N  # the server answers no more than this


def _jpeg(i: int) -> bytes:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server():
    images = {i: _jpeg(i) for i in range(N)}
    served = [0]

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            served[0] += 1
            if served[0] > MAX_REQUESTS or not self.path.startswith("/img/"):
                self.send_error(404)
                return
            body = images[int(self.path[5:-4])]
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _geocell(args, env=None) -> tuple:
    """``python -m geocell ARGS`` in its own process group: (exit status, stdout, stderr)."""
    p = subprocess.Popen([sys.executable, "-m", "geocell", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True,
                         env={**os.environ, **(env or {})})
    try:
        out, err = p.communicate(timeout=RUN_LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise
    return p.returncode, out, err


@pytest.fixture(scope="module")
def downloaded(server, tmp_path_factory):
    base = tmp_path_factory.mktemp("dl")
    rng = np.random.default_rng(0)
    lat, lng = rng.uniform(-70, 70, N), rng.uniform(-180, 180, N)
    lines = ["id,url,lat,lng"] + [f"p{i},{server}/img/{i}.jpg,{lat[i]:.4f},{lng[i]:.4f}" for i in range(N)]
    (base / "urls.csv").write_text("\n".join(lines) + "\n")
    code, out, err = _geocell(["data", "download", str(base / "urls.csv"), "-o", str(base / "shards"),
                               "--threads", "4", "--timeout", "5", "--workers", "1", "-q"])
    assert code == 0, err
    assert len(read_dataset(base / "shards")) == N
    # One split in one shard: the default held-out split must read parts of it.
    assert [s["split"] for s in shard_meta(base / "shards")["shards"]] == ["all"]
    return base / "shards"


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_download_then_train_with_default_split(downloaded, tmp_path, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    run = tmp_path / "run"
    code, out, err = _geocell(["train", "--manifest", str(downloaded), "--image-size", "32",
                               "--batch-size", "16", "--epochs", "1", "--workers", "0",
                               "--taus", "1/40", "--backend", backend, "--device", "cpu",
                               "--no-progress", "--no-tensorboard", "-o", str(run)])
    assert code == 0, err[-3000:]
    assert "Traceback" not in err
    assert "held-out split" in out
    results = json.loads((run / "results.json").read_text())
    assert results["split"] == "test"
    # Evaluated on the held-out test photos: part of the one shard, not all of it.
    assert 0 < results["n"] < N


class _Bands:
    def assign(self, lat, lng):
        return np.floor((np.asarray(lat) + 90) / 180 * 4).clip(0, 3).astype(np.int64)


def _subset(folder):
    m = read_dataset(folder)
    keep = np.flatnonzero(np.arange(len(m)) % 5 != 2)  # 96 of the 120 samples of the one shard
    sub = m.subset(keep)
    assert sub.shards == m.shards and len(sub.ids) == len(keep)
    return sub, LabelTable.from_manifest(sub, [_Bands()])


def _epoch(m, lt, backend, epoch, skip=0, workers=0):
    ld = make_loader(m, lt, train=True, batch_size=8, preprocess=Preprocess(24), backend=backend, seed=5,
                     num_workers=workers)
    ld.set_epoch(epoch)
    if skip:
        ld.skip_batches(skip)
    idx, imgs = [], []
    for x, t in ld:
        idx.append(t["index"].tolist())
        imgs.append(x)
    assert len(idx) == len(ld) - skip
    return idx, torch.stack(imgs)


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_resume_inside_an_epoch_on_a_subset_read_shard(downloaded, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    m, lt = _subset(downloaded)
    idx, x = _epoch(m, lt, backend, epoch=1, workers=1)
    assert len(idx) == len(m) // 8
    rows = sum(idx, [])
    assert len(set(rows)) == len(rows) and set(rows) <= set(range(len(m)))
    if backend == "torch":  # the (seed, epoch) permutation of the subset's rows
        assert rows == epoch_rows(np.arange(len(m)), 5, 1)[:len(rows)].tolist()
    idx3, x3 = _epoch(m, lt, backend, epoch=1, skip=3, workers=2)
    assert idx3 == idx[3:] and torch.equal(x3, x[3:])


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_evaluation_reads_exactly_the_subset(downloaded, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    m, lt = _subset(downloaded)
    ld = make_loader(m, lt, train=False, batch_size=16, preprocess=Preprocess(24), backend=backend, num_workers=1)
    rows = sorted(sum((t["index"].tolist() for _, t in ld), []))
    assert rows == list(range(len(m)))
