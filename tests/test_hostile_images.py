"""Hostile images: 16-bit and other Pillow modes, header size claims, data after the end marker.
Every file is made here; memory cases run in a child process under an address-space limit."""

import io
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

from geocell.data.images import MAX_PIXELS, ImageTooLarge, decode_rgb, to_rgb8  # noqa: E402
from geocell.data.manifest import read_manifest  # noqa: E402
from geocell.loading.base import check_image_file  # noqa: E402
from geocell.loading.loaders import make_loader  # noqa: E402
from geocell.loading.preprocess import IMAGENET_MEAN as MEAN, IMAGENET_STD as STD, Preprocess  # noqa: E402
from geocell.loading.labels import LabelTable  # noqa: E402


def _labels(m):
    n = len(m)
    return LabelTable(np.zeros((n, 1), np.int64), np.full(n, -1), np.stack([m.lat, m.lng], 1))


def _pixels(x):
    """Normalized float images -> 0..255 values."""
    return x * torch.tensor(STD).view(1, 3, 1, 1) * 255 + torch.tensor(MEAN).view(1, 3, 1, 1) * 255


# Uniform images of each mode, with the RGB each must become (16-bit: v / 257, not clipped).
def _mode_images():
    g16 = Image.fromarray(np.full((40, 48), 30000, dtype=np.uint16))
    assert g16.mode.startswith("I;16")
    pal = Image.new("P", (48, 40))
    pal.putpalette([200, 30, 60] + [0] * 765)
    return {
        "grey16.png": (g16, (117, 117, 117)),      # 30000 / 257 = 116.7
        "grey.png": (Image.new("L", (48, 40), 77), (77, 77, 77)),
        "palette.png": (pal, (200, 30, 60)),
        "rgba.png": (Image.new("RGBA", (48, 40), (10, 200, 90, 100)), (10, 200, 90)),
        "cmyk.jpg": (Image.new("CMYK", (48, 40), (0, 255, 255, 0)), None),  # Pillow's conversion
        "grey.jpg": (Image.new("L", (48, 40), 140), (140, 140, 140)),
    }


@pytest.fixture(scope="module")
def mode_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("modes")
    lines = ["path,lat,lng"]
    expected = []
    for k, (name, (img, rgb)) in enumerate(_mode_images().items()):
        img.save(folder / name, **({"quality": 95} if name.endswith(".jpg") else {}))
        if rgb is None:
            with Image.open(folder / name) as im:
                rgb = tuple(int(v) for v in np.asarray(im.convert("RGB")).reshape(-1, 3).mean(0).round())
        expected.append(rgb)
        lines.append(f"{name},{k},{k}")
    (folder / "m.csv").write_text("\n".join(lines) + "\n")
    return folder, read_manifest(folder / "m.csv"), np.array(expected, dtype=np.float64)


def test_pillow_modes_become_the_right_8_bit_rgb():
    for name, (img, rgb) in _mode_images().items():
        if rgb is not None:
            out = np.asarray(to_rgb8(img))
            assert out.dtype == np.uint8 and out.shape == (40, 48, 3)
            assert (out == np.array(rgb, dtype=np.uint8)).all(), name
    ramp = Image.fromarray(np.array([[0, 128, 129, 257, 65535]], dtype=np.uint16))
    assert np.asarray(to_rgb8(ramp))[0, :, 0].tolist() == [0, 0, 1, 1, 255]
    with pytest.raises(ValueError, match="mode F"):
        to_rgb8(Image.new("F", (4, 4)))


def test_torch_loader_decodes_16_bit_and_other_modes(mode_folder):
    """A 16-bit PNG used to end the epoch (uint16 next to uint8 in the collate)."""
    _, m, expected = mode_folder
    ld = make_loader(m, _labels(m), train=False, batch_size=len(m), preprocess=Preprocess(32, 32),
                     backend="torch", num_workers=0)
    (x, t), = list(ld)
    assert ld.skipped == 0 and t["index"].tolist() == list(range(len(m)))
    got = _pixels(x).mean(dim=(2, 3)).numpy()
    np.testing.assert_allclose(got, expected, atol=2.0)  # JPEG rounding of flat colours


def test_pack_converts_16_bit_and_other_modes(mode_folder, tmp_path):
    from geocell.data.shards import pack, read_shards, sample_locations

    _, m, expected = mode_folder
    summary = pack(m, tmp_path / "packed", workers=1, progress=False)
    assert summary["count"] == len(m) and summary["skipped"] == 0
    packed = read_shards(tmp_path / "packed")
    tars, tar_of, offset, size = sample_locations(packed)
    for r in range(len(packed)):
        with open(tars[tar_of[r]], "rb") as f:
            f.seek(offset[r])
            data = f.read(size[r])
        mean = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).reshape(-1, 3).mean(0)
        np.testing.assert_allclose(mean, expected[m.paths.index(packed.paths[r])], atol=3.0)


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A small valid JPEG whose frame header (SOF0) is patched to claim width x height."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 120, 150)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 7] = height.to_bytes(2, "big")
    data[sof + 7:sof + 9] = width.to_bytes(2, "big")
    return bytes(data)


@pytest.mark.parametrize("side", [65500, 9000])  # Pillow's own bomb limit, and only ours
def test_declared_size_over_the_limit_is_refused_before_decoding(tmp_path, side):
    assert side * side > MAX_PIXELS
    data = _jpeg_claiming(side, side)
    with pytest.raises(ImageTooLarge, match="Mpx|too large"):
        decode_rgb(data)
    p = tmp_path / "bomb.jpg"
    p.write_bytes(data)
    assert "Mpx" in check_image_file(str(p)) or "too large" in check_image_file(str(p))


_BOMB_CHILD = textwrap.dedent("""
    import resource, sys
    import numpy as np, torch
    from geocell.data.manifest import read_manifest
    from geocell.loading.loaders import make_loader
    from geocell.loading.labels import LabelTable
    from geocell.loading.preprocess import Preprocess
    # Imports done: from here on 2 GiB more address space at most (the claim is 12.9 GB).
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (used + (2 << 30), hard))
    m = read_manifest(sys.argv[1])
    lt = LabelTable(np.zeros((len(m), 1), np.int64), np.full(len(m), -1), np.stack([m.lat, m.lng], 1))
    for validate in (True, False):
        ld = make_loader(m, lt, train=False, batch_size=4, preprocess=Preprocess(16, 16),
                         backend="torch", num_workers=0, validate=validate)
        rows = [r for _, t in ld for r in t["index"].tolist()]
        assert rows == [0, 2], rows
        assert ld.skipped == 1 and ld.skipped_paths[0][0].endswith("bomb.jpg"), ld.skipped_paths
        print(validate, ld.skipped_paths[0][1])
""")


def test_torch_loader_skips_a_size_bomb_within_bounded_memory(tmp_path):
    Image.new("RGB", (20, 20), (1, 2, 3)).save(tmp_path / "a.jpg")
    (tmp_path / "bomb.jpg").write_bytes(_jpeg_claiming(65500, 65500))
    Image.new("RGB", (20, 20), (4, 5, 6)).save(tmp_path / "c.jpg")
    (tmp_path / "m.csv").write_text("path,lat,lng\na.jpg,1,1\nbomb.jpg,2,2\nc.jpg,3,3\n")
    r = subprocess.run([sys.executable, "-c", _BOMB_CHILD, str(tmp_path / "m.csv")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and all("too large" in ln or "Mpx" in ln for ln in lines), lines


def _jpeg_bytes(seed=0, size=(40, 30)):
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


# Fixed bytes and short ids: every pytest-xdist worker must collect the same test names.
@pytest.mark.parametrize("trailer", [b"\x00" * 65, b"\x00" * 5000,
                                     np.random.default_rng(7).bytes(300_000).replace(b"\xff", b"\x00"),
                                     b"\xff\xd8" + b"MP4 motion photo" * 4096],
                         ids=["zeros-65", "zeros-5000", "random-300k", "motion-photo"])
def test_jpeg_with_data_after_its_end_marker_is_accepted(tmp_path, trailer):
    p = tmp_path / "trailer.jpg"
    p.write_bytes(_jpeg_bytes() + trailer)
    assert check_image_file(str(p)) is None


def test_truncated_jpeg_is_still_refused(tmp_path):
    data = _jpeg_bytes(size=(200, 150))
    # The EXIF thumbnail's own end marker must not count for the main image.
    thumb = _jpeg_bytes(1, (16, 16))
    app1 = b"Exif\x00\x00" + thumb
    with_thumb = data[:2] + b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1 + data[2:]
    for name, blob in (("plain", data), ("thumb", with_thumb)):
        p = tmp_path / f"{name}.jpg"
        p.write_bytes(blob[: len(blob) * 2 // 3])
        assert "truncated" in check_image_file(str(p)), name
        p.write_bytes(blob)
        assert check_image_file(str(p)) is None, name


def test_predict_skips_a_size_bomb_and_predicts_the_rest(tmp_path):
    pytest.importorskip("torchvision")
    from helpers import make_tiny_checkpoint, run_cli

    ckpt = make_tiny_checkpoint(tmp_path / "tiny.pt")
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (40, 40), (10, 20, 30)).save(photos / "a.jpg")
    (photos / "bomb.jpg").write_bytes(_jpeg_claiming(9000, 9000))
    rc, _, err = run_cli([str(photos), "--checkpoint", ckpt, "--workers", "0", "--json"])
    assert rc == 0 and "predicted 1 of 2" in err
    assert "bomb.jpg" in err and "Mpx" in err
