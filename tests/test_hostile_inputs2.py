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

# Imports done: from here on the child has 1.5 GiB more address space at most.
_LIMIT_AS = textwrap.dedent("""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (used + (3 << 29), hard))
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
