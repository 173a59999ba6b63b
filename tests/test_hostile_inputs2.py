"""Hostile inputs, second round: images whose resize would allocate gigabytes, archives that
inflate, writes that fail on a full disk, packs that fail mid-way or would overwrite their input.
Memory cases run in a child process under an address-space limit (RLIMIT_AS), disk-full cases in
one under a file-size limit (RLIMIT_FSIZE)."""

import os
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")

from geocell.data import images  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

# Imports done: from here on the child has MORE bytes more address space at most (1.5 GiB).
_LIMIT_AS = textwrap.dedent("""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (used + globals().get("MORE", 3 << 29), hard))
""")

# Writes past LIMIT bytes fail with EFBIG (SIGXFSZ ignored, as a full disk fails with ENOSPC).
_LIMIT_FSIZE = textwrap.dedent("""
    import resource, signal
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    def limit_files(n):
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
""")


def _child(code, *args, timeout=300):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE] + sys.path))
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


# ----------------------------------------------------------------------------- memory


def test_aspect_ratio_is_refused_from_the_header():
    images.check_pixels(12 * 400, 400)  # a wide panorama passes
    with pytest.raises(images.ImageTooLarge, match="aspect ratio"):
        images.check_pixels(1, 1000)


_STRIP_CHILD = """
import sys
from test_predict import make_tiny_checkpoint
from geocell.infer.predict import Geolocator
geo = Geolocator.from_checkpoint(make_tiny_checkpoint(sys.argv[1] + "/tiny.pt"), device="cpu")
""" + _LIMIT_AS + """
out = list(geo.predict_files([sys.argv[1] + "/a.jpg", sys.argv[1] + "/strip.png"], num_workers=0))
assert out[0][1] is not None and out[1][1] is None, out
print(out[1][2])
"""


def test_predict_refuses_a_pixel_strip_before_its_resize_allocates_gigabytes(tmp_path):
    # 2 kB of PNG: 1 x 2,000,000 px; its shorter side resized to 37 px would be 37 x 74,000,000.
    Image.new("L", (1, 2_000_000), 128).save(tmp_path / "strip.png")
    Image.new("RGB", (40, 40), (10, 20, 30)).save(tmp_path / "a.jpg")
    r = _child(_STRIP_CHILD, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "aspect ratio" in r.stdout, r.stdout


def _inflating_npz(path, nbytes):
    """An .npz whose 'embeddings' member deflates ``nbytes`` of zeros into a few megabytes."""
    header = {"descr": "<f4", "fortran_order": False, "shape": (nbytes // 4,)}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open("embeddings.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_2_0(f, header)
            chunk = bytes(1 << 24)
            for _ in range(nbytes // len(chunk)):
                f.write(chunk)


_NPZ_CHILD = """
import sys
from geocell.infer.retrieval import RetrievalError, RetrievalIndex
""" + _LIMIT_AS + """
try:
    RetrievalIndex.load(sys.argv[1])
except RetrievalError as exc:
    print(exc)
"""


def test_retrieval_index_that_inflates_is_refused_before_inflating(tmp_path):
    path = tmp_path / "bomb.retrieval.npz"
    _inflating_npz(path, 2 << 30)
    assert path.stat().st_size < 20 << 20
    r = _child(_NPZ_CHILD, path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "inflates" in r.stdout and "embeddings" in r.stdout, r.stdout


# ----------------------------------------------------------------------------- silent data damage


def _photos(folder, n, seed=0, side=40):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["path,lat,lng,licence"]
    for k in range(n):
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / f"p{k}.png")
        lines.append(f"p{k}.png,{seed + k},{-seed - k},cc-by-{k}")
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    return folder / "manifest.csv"


def test_pack_refuses_to_write_over_its_own_input_manifest(tmp_path, capsys):
    from geocell.commands.data import main

    src = _photos(tmp_path / "photos", 3)
    before = src.read_bytes()
    assert main(["pack", str(src), "-o", str(tmp_path / "photos"), "--quiet"]) != 0
    assert "input manifest" in capsys.readouterr().err
    assert src.read_bytes() == before  # the licence column survives


def _sample_labels(folder):
    """{sample id: (lat, lng)} from the JSON members of a packed folder's shards."""
    import json
    import tarfile

    labels = {}
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as t:
            for member in t.getmembers():
                if member.name.endswith(".json"):
                    d = json.load(t.extractfile(member))
                    labels[d["id"]] = (d["lat"], d["lng"])
    return labels


_PACK_CHILD = _LIMIT_FSIZE + """
import sys
from geocell.data.manifest import read_manifest
from geocell.data.shards import pack
m = read_manifest(sys.argv[1])
limit_files(int(sys.argv[3]))
try:
    pack(m, sys.argv[2], shard_size=3, workers=1, progress=False)
except OSError as exc:
    print("failed:", exc)
"""


def test_pack_that_fails_at_the_second_shard_leaves_a_folder_with_the_right_labels(tmp_path):
    from geocell.data.dataset import read_dataset
    from geocell.data.manifest import read_manifest
    from geocell.data.shards import pack

    out = tmp_path / "packed"
    pack(read_manifest(_photos(tmp_path / "old", 6, seed=0)), out, shard_size=3, workers=1,
         progress=False)
    # The new pack's first shard holds small photos, its second large noise: a file-size limit
    # between the two fails the second shard, as a disk filling up there would.
    new = _photos(tmp_path / "new", 6, seed=50)
    rng = np.random.default_rng(1)
    for k in (3, 4, 5):
        Image.fromarray(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)).save(tmp_path / "new" / f"p{k}.png")
    r = _child(_PACK_CHILD, new, out, 40_000)
    assert r.returncode == 0 and "failed:" in r.stdout and "disk full" in r.stdout, (r.stdout, r.stderr[-2000:])
    # Whatever loads, loads with its own photos' labels; no temporary is left behind.
    m = read_dataset(out)
    labels = _sample_labels(out)
    assert len(m) == 6
    for i, sample_id in enumerate(m.ids.tolist()):
        assert labels[int(sample_id)] == (m.lat[i], m.lng[i]), i
    assert not [p for p in os.listdir(out) if p.startswith(".") or p.endswith(".tmp")], os.listdir(out)


_PREDICT_OUT_CHILD = _LIMIT_FSIZE + """
import sys
from test_predict import make_tiny_checkpoint
from geocell.commands.predict import main
ckpt = make_tiny_checkpoint(sys.argv[1] + "/tiny.pt")
limit_files(300)
try:
    main([sys.argv[1] + "/photos", "--checkpoint", ckpt, "--workers", "0", "--out", sys.argv[1] + "/out.csv"])
except OSError as exc:
    print("failed:", exc)
"""


def test_predict_out_on_a_full_disk_keeps_the_previous_file(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for k in range(4):
        Image.new("RGB", (40, 40), (10 * k, 20, 30)).save(photos / f"a{k}.jpg")
    (tmp_path / "out.csv").write_text("image,lat,lng\nprevious.jpg,1,2\n")
    r = _child(_PREDICT_OUT_CHILD, tmp_path)
    assert "failed:" in r.stdout and "disk full" in r.stdout, (r.stdout, r.stderr[-2000:])
    assert (tmp_path / "out.csv").read_text() == "image,lat,lng\nprevious.jpg,1,2\n"
    assert sorted(os.listdir(tmp_path)) == ["out.csv", "photos", "tiny.pt"]


_CHECKPOINT_CHILD = _LIMIT_FSIZE + """
import sys
from test_predict import make_tiny_checkpoint
path = make_tiny_checkpoint(sys.argv[1] + "/best.pt")
limit_files(1_000_000)  # a resnet18 checkpoint is about 45 MB
try:
    make_tiny_checkpoint(path, seed=1)
except OSError as exc:
    print("failed:", type(exc).__name__, exc)
"""


def test_checkpoint_on_a_full_disk_says_disk_full_and_keeps_the_previous_one(tmp_path):
    r = _child(_CHECKPOINT_CHILD, tmp_path)
    assert "failed: DiskFull" in r.stdout and "disk full" in r.stdout and "best.pt" in r.stdout, \
        (r.stdout, r.stderr[-2000:])
    from geocell.model.checkpoint import load_checkpoint

    load_checkpoint(str(tmp_path / "best.pt"))  # the previous checkpoint, whole
    assert os.listdir(tmp_path) == ["best.pt"]


def test_url_list_with_a_byte_order_mark_keeps_its_id_column(tmp_path):
    from geocell.data.download import plan_fetches

    urls = tmp_path / "urls.csv"
    urls.write_bytes("\ufeffid,url,lat,lng\nphoto-a,http://127.0.0.1:9/a.jpg,1,2\n".encode("utf-8"))
    fetches, failures, _ = plan_fetches(urls, tmp_path / "stage")
    assert not failures and [f.source_id for f in fetches] == ["photo-a"]


_SERVE_CHILD = """
import io, socket, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
import httpx, uvicorn
from test_predict import make_tiny_checkpoint
from geocell.infer import serve
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
app = serve.app(make_tiny_checkpoint(sys.argv[1] + "/tiny.pt"), device="cpu")
server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                       lifespan="off"))
thread = threading.Thread(target=server.run, daemon=True)
thread.start()
deadline = time.monotonic() + 30
while not server.started:
    assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
    time.sleep(0.05)
data = open(sys.argv[1] + "/grey.png", "rb").read()
MORE = 5 << 29  # 2.5 GiB: room for two decodes and the threads' stacks and malloc arenas
""" + _LIMIT_AS + """
def post(k):
    with httpx.Client(timeout=240) as http:
        return http.post(f"http://127.0.0.1:{port}/api/predict", files={"image": (f"g{k}.png", data)}).status_code
try:
    with ThreadPoolExecutor(8) as pool:
        print(sorted(pool.map(post, range(8))))
finally:
    server.should_exit = True
    thread.join(timeout=30)
"""


def test_serve_decodes_a_bounded_number_of_uploads_at_once(tmp_path):
    # 7000 x 7000 grey: under the pixel limit, a few kB of PNG, about 600 MB on its way to the
    # network's input. Eight at once within 2.5 GiB: only if decodes wait for a slot.
    Image.new("L", (7000, 7000), 128).save(tmp_path / "grey.png")
    assert (tmp_path / "grey.png").stat().st_size < 200_000
    r = _child(_SERVE_CHILD, tmp_path, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == str([200] * 8), r.stdout


# ----------------------------------------------------------------------------- folders


def test_predict_names_every_file_of_a_folder_it_does_not_predict(tmp_path):
    import threading

    from test_predict import make_tiny_checkpoint, run_cli

    ckpt = make_tiny_checkpoint(tmp_path / "tiny.pt")
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (40, 40), (10, 20, 30)).save(photos / "a.jpg")
    (photos / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))
    (photos / "notes.txt").write_text("not a photo")
    os.mkfifo(photos / "pipe.jpg")
    result = {}
    # a named pipe opened for reading would block this thread forever: bounded by the join
    worker = threading.Thread(target=lambda: result.update(
        out=run_cli([str(photos), "--checkpoint", ckpt, "--workers", "0", "--json"])), daemon=True)
    worker.start()
    worker.join(timeout=120)
    if worker.is_alive():
        with open(photos / "pipe.jpg", "wb"):  # unblocks the reader so the thread ends
            pass
        pytest.fail("predict hung on a named pipe")
    rc, out, err = result["out"]
    assert rc == 0 and "predicted 1 of 4 images" in err, err
    assert "IMG_0001.HEIC" in err and "pillow-heif" in err
    assert "notes.txt" in err and "pipe.jpg" in err and "named pipe" in err
    import json

    assert sorted(os.path.basename(s["image"]) for s in json.loads(out)["skipped"]) == \
        ["IMG_0001.HEIC", "notes.txt", "pipe.jpg"]


def test_a_named_pipe_given_by_path_is_refused_not_opened(tmp_path):
    from geocell.data.images import decode_rgb

    os.mkfifo(tmp_path / "pipe.jpg")
    with pytest.raises(ValueError, match="not a regular file"):
        decode_rgb(str(tmp_path / "pipe.jpg"))


# ----------------------------------------------------------------------------- smaller


@pytest.mark.parametrize("field, value", [("kernel_km", 1e300), ("kernel_km", 1e-300),
                                          ("background_kernel_km", 1e300), ("weights", [1e300, 1.0])])
def test_stored_calibration_values_out_of_range_are_refused_by_name(field, value):
    from geocell.model.records import Calibration

    d = {"weights": [1.0, 1.0], "kernel_km": 50.0, "background_weight": 0.1, "background_kernel_km": 4000.0}
    Calibration.from_dict(d, 2)  # the sane one loads
    d[field] = value
    with pytest.raises(ValueError, match=field.rstrip("s")):
        Calibration.from_dict(d, 2)


@pytest.mark.parametrize("flag, target", [("--out", "EXISTING_DIR"), ("--cdf", "missing/x.png")])
def test_evaluate_checks_its_outputs_before_the_work(tmp_path, capsys, flag, target):
    from geocell.commands.evaluate import main

    target = str(tmp_path) if target == "EXISTING_DIR" else str(tmp_path / target)
    with pytest.raises(SystemExit) as exit_:
        main(["--checkpoint", str(tmp_path / "never-read.pt"), "--manifest", str(tmp_path / "m.csv"),
              flag, target])
    assert exit_.value.code == 2 and f"argument {flag}" in capsys.readouterr().err


def test_msgpack_record_with_an_integer_key_keeps_the_later_records(tmp_path):
    msgpack = pytest.importorskip("msgpack")
    from geocell.data.msgpack_import import read_records

    path = tmp_path / "shard_0.msg"
    with open(path, "wb") as f:
        f.write(msgpack.packb({"id": "a", "image": b"\xff\xd8A"}))
        f.write(msgpack.packb({"id": "b", "image": b"\xff\xd8B", 7: "odd key"}, strict_types=False))
        f.write(msgpack.packb({"id": "c", "image": b"\xff\xd8C"}))
    assert [r[1] for r in read_records(str(path))] == ["a", "b", "c"]


# ----------------------------------------------------------------------------- downloads


def _serve_once(body_writer, requests: int = 1):
    """A server on 127.0.0.1 answering ``requests`` requests with ``body_writer(wfile)``."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.end_headers()
            with _quiet():
                body_writer(self.wfile)

        def log_message(self, *a):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    server.timeout = 30
    thread = threading.Thread(target=lambda: [server.handle_request() for _ in range(requests)], daemon=True)
    thread.start()
    return server, thread


class _quiet:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], OSError)  # the client hung up


def _endless(w):
    chunk = b"\xff" * (1 << 16)
    while True:
        w.write(chunk)


def _drip(w):
    import time

    for _ in range(40):
        w.write(b"\xff")
        w.flush()
        time.sleep(0.3)


@pytest.mark.parametrize("body, limit, why", [(_endless, "bytes", "limit"), (_drip, "seconds", "within")])
def test_download_fetch_is_bounded_in_bytes_and_in_total_seconds(body, limit, why):
    import time

    pytest.importorskip("img2dataset")
    import img2dataset.downloader as downloader

    import geocell.data.fetch as fetch

    server, thread = _serve_once(body)
    url = f"http://127.0.0.1:{server.server_port}/x.jpg"
    start = time.monotonic()
    # what img2dataset's processes call once geocell.data.fetch is imported (they import it to
    # unpickle the BoundedDownloader that geocell data download gives them)
    old = fetch.MAX_URL_BYTES
    fetch.fetch.__defaults__ = (4 << 20, None)
    try:
        key, stream, err = downloader.download_image_with_retry((0, url), 2, 0, None, None)
    finally:
        fetch.fetch.__defaults__ = (old, None)
    took = time.monotonic() - start
    server.server_close()
    assert stream is None and why in err, err
    assert took < 8, took  # the drip sends a byte every 0.3 s for 12 s: an idle timeout never fires
