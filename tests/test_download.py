"""geocell data download (img2dataset against a local HTTP server) and the msgpack import:
shards the manifest reader and the loaders read, sample JSON with the source id and location,
failures counted by reason, a second run that fetches nothing, GeoEstimation's URL list +
metadata join, msgpack round trip."""

import csv
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("img2dataset")
msgpack = pytest.importorskip("msgpack")

from geocell.commands.data import main as data_main  # noqa: E402
from geocell.data.download import failure_reason, flickr_sized  # noqa: E402
from geocell.data.dataset import read_dataset  # noqa: E402

SLOW_SECONDS = 3.0
TIMEOUT = "1"
RUN_LIMIT_S = 120  # one download run; a hung one is killed with its processes


def _download(args) -> tuple:
    """Runs ``geocell data download`` in its own process group: (exit status, stdout, stderr)."""
    # The interpreter that runs the tests has geocell installed; no PYTHONPATH is added, since
    # putting site-packages ahead of the standard library lets stray backports shadow it.
    p = subprocess.Popen([sys.executable, "-m", "geocell", "data", "download", *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=RUN_LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise
    return p.returncode, out, err


def _jpeg(i: int, size) -> bytes:
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([(xx * 3 + i * 29) % 256, (yy * 5 + i * 13) % 256,
                    np.full((h, w), (i * 41) % 256)], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=88)
    return buf.getvalue()


# Photo i: large ones are resized to the shorter side 64, small ones kept as they are.
SIZES = {i: ((120, 90) if i % 2 else (40, 56)) for i in range(12)}
IMAGES = {i: _jpeg(i, s) for i, s in SIZES.items()}


class _Server:
    """127.0.0.1 only; counts requests per path; /slow answers after SLOW_SECONDS."""

    def __init__(self):
        hits, lock = {}, threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                with lock:
                    hits[self.path] = hits.get(self.path, 0) + 1
                if self.path.startswith("/img/"):
                    body, ctype = IMAGES[int(self.path[5:-4])], "image/jpeg"
                elif self.path == "/text.jpg":
                    body, ctype = b"<html>this is not an image</html>", "text/html"
                elif self.path == "/slow.jpg":
                    time.sleep(SLOW_SECONDS)
                    body, ctype = IMAGES[0], "image/jpeg"
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:  # the client gave up (the timeout test)
                    pass

        self.hits = hits
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def total(self) -> int:
        return sum(self.hits.values())

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server():
    s = _Server()
    yield s
    s.close()


def _args(out, *extra):
    return ["-o", str(out), "--threads", "4", "--timeout", TIMEOUT, "--shorter-side", "64",
            "--shard-size", "3", "--urls-per-staging-shard", "5", "--workers", "1", "-q", *extra]


def _samples(folder: Path) -> dict:
    """{source_id: (json, jpeg bytes)} of every sample in the folder's tars."""
    out = {}
    for tar_path in sorted(folder.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in members:
            if name.endswith(".json"):
                meta = json.loads(members[name])
                out[meta["source_id"]] = (meta, members[name[:-5] + ".jpg"])
    return out


def _failed(folder: Path) -> list:
    with open(folder / "failed.csv", newline="") as f:
        return list(csv.DictReader(f))


# --- a CSV with url + lat/lng ------------------------------------------------------------

GOOD = list(range(8))


@pytest.fixture(scope="module")
def downloaded(server, tmp_path_factory):
    base = tmp_path_factory.mktemp("download")
    rows = ["id,url,lat,lng,scene,note"]
    for i in GOOD:
        rows.append(f"p{i},{server.url}/img/{i}.jpg,{-60 + 15 * i},{-170 + 40 * i},"
                    f"{['indoor', 'natural', 'urban'][i % 3]},n{i}")
    rows += [
        f"gone,{server.url}/missing.jpg,10,10,urban,x",      # line 10: 404
        f"text,{server.url}/text.jpg,11,11,urban,x",         # line 11: not an image
        f"slow,{server.url}/slow.jpg,12,12,urban,x",         # line 12: timeout
        f"north,{server.url}/img/9.jpg,95,12,urban,x",       # line 13: bad latitude, never fetched
        "nourl,,12,12,urban,x",                              # line 14: no URL
        f"nan,{server.url}/img/10.jpg,nan,12,urban,x",       # line 15: bad coordinate, never fetched
        f"p0,{server.url}/img/11.jpg,1,1,urban,x",           # line 16: an id seen before
    ]
    urls = base / "urls.csv"
    urls.write_text("\n".join(rows) + "\n")
    out = base / "shards"
    code, stdout, stderr = _download([str(urls), *_args(out)])
    assert code == 0, stderr
    return urls, out, dict(server.hits), stdout


def test_download_shards_carry_id_and_location(downloaded, server):
    urls, out, _, stdout = downloaded
    assert stdout.startswith(f"{len(GOOD)} of 15 photos downloaded")
    m = read_dataset(out)  # what geocell train --manifest out/ reads
    assert len(m) == len(GOOD)
    samples = _samples(out)
    assert sorted(samples) == sorted(f"p{i}" for i in GOOD)
    for k, i in enumerate(GOOD):
        meta, jpg = samples[f"p{i}"]
        assert meta["lat"] == -60 + 15 * i and meta["lng"] == -170 + 40 * i
        assert meta["url"] == f"{server.url}/img/{i}.jpg"
        assert meta["source_line"] == i + 2
        assert meta["meta"] == {"id": f"p{i}", "url": meta["url"], "lat": str(-60 + 15 * i),
                                "lng": str(-170 + 40 * i), "scene": m.scene_names[i % 3],
                                "note": f"n{i}"}  # the URL list's row as written
        assert meta["scene"] == i % 3 and m.scene_names == ["indoor", "natural", "urban"]
        # manifest rows in URL-list order; the JSON's id is the sample id of that row
        assert m.lat[k] == meta["lat"] and int(m.ids[k]) == meta["id"]
        with Image.open(io.BytesIO(jpg)) as img:
            w, h = img.size
            assert img.format == "JPEG" and img.mode == "RGB"
        ow, oh = SIZES[i]
        if min(ow, oh) > 64:
            assert min(w, h) == 64 and abs(w / h - ow / oh) < 0.03
        else:  # already small: the downloaded JPEG is stored as it is
            assert jpg == IMAGES[i]
    assert json.loads((out / "shards.json").read_text())["count"] == len(GOOD)
    assert all(p.with_suffix(".idx").is_file() for p in out.glob("*.tar"))


def test_download_failures_are_counted_by_reason(downloaded, server):
    _, out, hits, _ = downloaded
    failed = {row["line"]: row for row in _failed(out)}
    reasons = {line: row["reason"] for line, row in failed.items()}
    assert reasons == {"10": "http 404", "11": "not an image", "12": "timeout",
                       "13": "bad coordinates", "14": "no url", "15": "bad coordinates",
                       "16": "duplicate id"}
    assert failed["10"]["id"] == "gone" and failed["10"]["url"].endswith("/missing.jpg")
    assert "latitude 95.0" in failed["13"]["detail"]
    # Bad coordinates are rejected before fetching; every other URL was asked for once.
    assert not {"/img/9.jpg", "/img/10.jpg", "/img/11.jpg"} & set(hits)
    assert hits == {**{f"/img/{i}.jpg": 1 for i in GOOD}, "/missing.jpg": 1, "/text.jpg": 1,
                    "/slow.jpg": 1}


def test_second_run_fetches_nothing(downloaded, server):
    urls, out, hits, _ = downloaded
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    requests_before = server.total()
    assert _download([str(urls), *_args(out)])[0] == 0
    assert server.total() == requests_before == sum(hits.values())
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == before  # same shards, indexes, manifest and failures


def test_unfinished_staging_shard_is_fetched_again(downloaded, server):
    # As if the run had been interrupted while img2dataset's second shard (5 URLs: photos
    # 5-7, the 404 and the non-image) was being written: only that shard is fetched again.
    urls, out, _, _ = downloaded
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    (out / "_download" / "img2dataset" / "00001_stats.json").unlink()
    state = out / "_download" / "state.json"
    packed_before = json.loads(state.read_text())["packed"]
    hits_before = dict(server.hits)
    assert _download([str(urls), *_args(out)])[0] == 0
    assert json.loads(state.read_text())["packed"] != packed_before  # packed again
    new_hits = {k: v - hits_before.get(k, 0) for k, v in server.hits.items() if v != hits_before.get(k, 0)}
    assert new_hits == {"/img/5.jpg": 1, "/img/6.jpg": 1, "/img/7.jpg": 1, "/missing.jpg": 1,
                        "/text.jpg": 1}
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == before  # repacked to the same bytes


def test_changed_url_list_is_refused(downloaded, tmp_path, capsys):
    urls, out, _, _ = downloaded
    other = tmp_path / "other.csv"
    other.write_text(urls.read_text().replace("/img/7.jpg", "/img/11.jpg"))
    assert data_main(["download", str(other), *_args(out)]) == 2
    assert "another URL list" in capsys.readouterr().err


def _bands(manifest):
    from geocell.loading.labels import LabelTable

    class Bands:
        def assign(self, lat, lng):
            return np.floor((np.asarray(lat) + 90) / 45).clip(0, 3).astype(np.int64)

    return LabelTable.from_manifest(manifest, [Bands()])


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_loaders_read_downloaded_shards(downloaded, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    from geocell.loading.loaders import make_loader
    from geocell.loading.preprocess import Preprocess

    _, out, _, _ = downloaded
    m = read_dataset(out)
    ld = make_loader(m, _bands(m), train=False, batch_size=3, preprocess=Preprocess(32), backend=backend,
                     num_workers=1 if backend == "dali" else 0)
    seen = []
    for x, t in ld:
        assert x.shape[1:] == (3, 32, 32)
        seen += t["index"].tolist()
    assert sorted(seen) == list(range(len(m))) and ld.skipped == 0


# --- GeoEstimation: URL list without a header + metadata ---------------------------------


def test_geoestimation_urls_joined_with_metadata(server, tmp_path):
    ids = [f"a{i}/{1000 + i}.jpg" for i in range(4)]
    # GeoEstimation's URL list has no header; one id has no metadata row, one a bad longitude.
    (tmp_path / "mp16_urls.csv").write_text(
        "".join(f"{ids[i]},{server.url}/img/{8 + i}.jpg\n" for i in range(4))
        + f"zz/9999.jpg,{server.url}/img/11.jpg\n")
    meta_rows = ["IMG_ID,LAT,LON,S3_Label,S16_Label,S365_Label,Prob_indoor,Prob_natural,Prob_urban"]
    for i in range(4):
        lon = "200" if i == 3 else str(5.5 * i)
        meta_rows.append(f"{ids[i]},{10 + i},{lon},{i % 3},{i + 4},{i + 100},0.2,0.3,0.5")
    (tmp_path / "mp16_places365.csv").write_text("\n".join(meta_rows) + "\n")
    out = tmp_path / "shards"
    before = dict(server.hits)
    code, _, stderr = _download([str(tmp_path / "mp16_urls.csv"), "--metadata",
                                 str(tmp_path / "mp16_places365.csv"), *_args(out)])
    assert code == 0, stderr
    new_hits = {k: v - before.get(k, 0) for k, v in server.hits.items() if v != before.get(k, 0)}
    assert new_hits == {"/img/8.jpg": 1, "/img/9.jpg": 1, "/img/10.jpg": 1}  # not 11: no metadata
    samples = _samples(out)
    assert sorted(samples) == ids[:3]
    for i in range(3):
        meta, _ = samples[ids[i]]
        assert (meta["lat"], meta["lng"], meta["scene"]) == (10 + i, 5.5 * i, i % 3)
        assert meta["meta"]["S16_Label"] == str(i + 4) and meta["meta"]["S365_Label"] == str(i + 100)
    m = read_dataset(out)
    assert m.scene_names == ["indoor", "natural", "urban"] and m.scene_probs.shape == (3, 3)
    reasons = {row["id"]: row["reason"] for row in _failed(out)}
    assert reasons == {ids[3]: "bad coordinates", "zz/9999.jpg": "no metadata"}


def test_missing_columns_are_named(tmp_path, capsys):
    (tmp_path / "u.csv").write_text("url,place\nhttp://127.0.0.1:9/a.jpg,x\n")
    assert data_main(["download", str(tmp_path / "u.csv"), "-o", str(tmp_path / "o"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "no lat/lng columns" in err and "u.csv" in err


def test_flickr_size_and_reasons():
    url = "http://farm4.staticflickr.com/3041/2599893547_c3b3b4e8a3.jpg"
    assert flickr_sized(url, "z") == "http://farm4.staticflickr.com/3041/2599893547_c3b3b4e8a3_z.jpg"
    assert flickr_sized(url, "") == url
    assert flickr_sized(flickr_sized(url, "z"), "z").count("_z") == 1
    assert flickr_sized("http://example.org/1_ab.jpg", "z") == "http://example.org/1_ab.jpg"
    assert failure_reason("failed_to_download", "HTTP Error 403: Forbidden") == "http 403"
    assert failure_reason("failed_to_download", "<urlopen error timed out>") == "timeout"
    assert failure_reason("failed_to_download",
                          "<urlopen error [Errno 111] Connection refused>") == "connection error"
    assert failure_reason("failed_to_resize", "Image decoding error") == "not an image"


# --- msgpack ------------------------------------------------------------------------------


def test_msgpack_import_round_trip(tmp_path):
    folder = tmp_path / "mp16"
    folder.mkdir()
    ids = [f"e4/7c/{300 + i}.jpg" for i in range(7)]
    # shard_0: the current format (bin + str); shard_1: the old one (raw strings), a record
    # with no metadata, a record that is not a map, and a truncated tail.
    with open(folder / "shard_0.msg", "wb") as f:
        for i in range(4):
            f.write(msgpack.packb({"image": IMAGES[i], "id": ids[i]}))
    with open(folder / "shard_1.msg", "wb") as f:
        for i in range(4, 7):
            f.write(msgpack.packb({"image": IMAGES[i], "id": ids[i]}, use_bin_type=False))
        f.write(msgpack.packb({"image": IMAGES[7], "id": "no/such.jpg"}))
        f.write(msgpack.packb([1, 2, 3]))
        f.write(msgpack.packb({"image": IMAGES[8], "id": "cut.jpg"})[:-40])
    # shard_2: a good record, then bytes that are not msgpack (0xc1 is never used).
    with open(folder / "shard_2.msg", "wb") as f:
        f.write(msgpack.packb({"image": IMAGES[10], "id": "x/9.jpg"}) + b"\xc1\x00\x00")
    meta_rows = ["IMG_ID,LAT,LON,S3_Label,S16_Label,S365_Label,Prob_indoor,Prob_natural,Prob_urban"]
    meta_rows += [f"{ids[i]},{-30 + 9 * i},{100 - 7 * i},{i % 3},{i},{50 + i},0.1,0.1,0.8" for i in range(7)]
    meta_rows.append("cut.jpg,0,0,0,0,0,0.1,0.1,0.8")
    meta_rows.append("x/9.jpg,45,45,1,0,0,0.1,0.1,0.8")
    (tmp_path / "meta.csv").write_text("\n".join(meta_rows) + "\n")
    out = tmp_path / "shards"
    code = data_main(["pack", "--from-msgpack", str(folder), "--metadata", str(tmp_path / "meta.csv"),
                      "-o", str(out), "--shorter-side", "64", "--shard-size", "3", "--workers", "1", "-q"])
    assert code == 0
    samples = _samples(out)
    assert sorted(samples) == sorted(ids + ["x/9.jpg"])
    assert samples["x/9.jpg"][1] == IMAGES[10] and samples["x/9.jpg"][0]["lat"] == 45
    for i, key in enumerate(ids):
        meta, jpg = samples[key]
        assert (meta["lat"], meta["lng"], meta["scene"]) == (-30 + 9 * i, 100 - 7 * i, i % 3)
        assert meta["meta"]["S365_Label"] == str(50 + i)
        with Image.open(io.BytesIO(jpg)) as img:
            assert min(img.size) == min(64, min(SIZES[i]))
        if min(SIZES[i]) <= 64:
            assert jpg == IMAGES[i]  # small JPEGs are packed byte for byte
    m = read_dataset(out)
    assert len(m) == 8 and list(m.lat) == [-30 + 9 * i for i in range(7)] + [45]
    with open(out / "import_report.csv", newline="") as f:
        report = list(csv.DictReader(f))
    assert sorted(r["reason"] for r in report) == ["no metadata"] + ["unreadable record"] * 3
    details = {(Path(r["file"]).name, r["detail"].split(" (")[0]) for r in report}
    assert details >= {("shard_1.msg", "record is a list, not a map"),
                       ("shard_2.msg", "unreadable from here on")}
    assert any(r["detail"].startswith("truncated record") for r in report)
    assert [r["id"] for r in report if r["reason"] == "no metadata"] == ["no/such.jpg"]


def test_msgpack_import_needs_metadata(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    assert data_main(["pack", "--from-msgpack", str(tmp_path / "m"), "-o", str(tmp_path / "o")]) == 2
    assert "--metadata" in capsys.readouterr().err


def test_no_dataclasses_backport_shadows_the_standard_library():
    """img2dataset declares the Python 3.6 `dataclasses` backport; installed, it replaces the
    standard library's module wherever site-packages comes first on the path (make removes it)."""
    import sysconfig

    site = sysconfig.get_paths()["purelib"]
    probe = "import dataclasses; print(dataclasses.__file__)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=site))
    assert out.returncode == 0, out.stderr
    assert os.path.dirname(out.stdout.strip()) == sysconfig.get_paths()["stdlib"], out.stdout


def _group_members(pgid: int) -> list:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[2]) == pgid:
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return out


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads process groups from /proc (Linux)")
def test_a_rerun_ends_what_a_killed_download_left_running(server, tmp_path):
    # kill -9 of the download leaves img2dataset's logger and resource tracker (and workers)
    # running in its process group; the next run into the same folder ends them.
    urls = tmp_path / "urls.csv"
    urls.write_text("url,lat,lng\n" + "".join(f"{server.url}/slow.jpg,{i},{i}\n" for i in range(8)))
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "geocell", "data", "download", str(urls), *_args(out, "--threads", "1")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(_group_members(p.pid)) < 3:
            time.sleep(0.2)
        assert len(_group_members(p.pid)) >= 3, "img2dataset did not start its processes"
        p.kill()
        p.wait(timeout=10)
        time.sleep(0.5)
        left = _group_members(p.pid)
        assert left, "nothing outlived the killed download (the case this test is about)"
        code, _, err = _download([str(urls), *_args(out, "--threads", "1")])
        assert "ended" in err and "left behind by a download" in err, err
        assert not _group_members(p.pid)
    finally:
        for pid in _group_members(p.pid):
            os.kill(pid, signal.SIGKILL)
