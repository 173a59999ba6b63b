"""Phone photos: one orientation rule (the EXIF Orientation tag applied) for the torch and DALI
loaders, packing, Geolocator and serve. The photo is stored sideways with Orientation 6, as a
phone held upright writes it."""

import io

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")

from geocell.data.manifest import read_manifest  # noqa: E402
from geocell.loading.loaders import make_loader  # noqa: E402
from geocell.loading.labels import LabelTable  # noqa: E402
from geocell.loading.preprocess import Preprocess  # noqa: E402

S, R = 32, 36


def _stored():
    """64 x 48 stored pixels: a horizontal ramp in red, a vertical one in green."""
    x = np.linspace(0, 255, 64)[None, :].repeat(48, 0)
    y = np.linspace(0, 255, 48)[:, None].repeat(64, 1)
    return np.stack([x, y, np.full_like(x, 90)], -1).astype(np.uint8)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phone")
    exif = Image.Exif()
    exif[0x0112] = 6  # the stored pixels are turned 90 degrees counter-clockwise
    Image.fromarray(_stored()).save(folder / "phone.jpg", quality=98, exif=exif)
    (folder / "m.csv").write_text("path,lat,lng\nphone.jpg,10,20\n")
    with Image.open(folder / "phone.jpg") as im:
        stored = np.asarray(im.convert("RGB"))
    upright = np.rot90(stored, k=-1).copy()  # Orientation 6: turn 90 degrees clockwise to view
    return folder, stored, upright


def _reference(pixels):
    spec = Preprocess(S, R)
    return spec.normalize(spec.eval_crop(torch.from_numpy(pixels).permute(2, 0, 1).contiguous()))


def _loader_tensor(folder, backend):
    m = read_manifest(folder / "m.csv")
    labels = LabelTable(np.zeros((1, 1), np.int64), np.full(1, -1), np.stack([m.lat, m.lng], 1))
    ld = make_loader(m, labels, train=False, batch_size=1, preprocess=Preprocess(S, R),
                     backend=backend, num_workers=0 if backend == "torch" else 1)
    (x, _), = list(ld)
    return x[0]


def _close(a, b):
    return float((a - b).abs().mean())


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_loaders_turn_a_phone_photo_upright(photo, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    folder, stored, upright = photo
    x = _loader_tensor(folder, backend)
    up, side = _close(x, _reference(upright)), _close(x, _reference(stored))
    assert up < 0.1 < side, (up, side)


def test_torch_and_dali_loaders_give_the_same_tensor(photo):
    pytest.importorskip("nvidia.dali")
    folder, _, _ = photo
    assert _close(_loader_tensor(folder, "torch"), _loader_tensor(folder, "dali")) < 0.1


def test_geolocator_and_serve_see_the_photo_upright(photo, tmp_path):
    from test_predict import make_tiny_checkpoint

    from geocell.infer.predict import Geolocator
    from geocell.infer.serve import decode_image

    folder, stored, upright = photo
    geo = Geolocator.from_checkpoint(make_tiny_checkpoint(tmp_path / "tiny.pt"), device="cpu")
    from_file = geo.predict(str(folder / "phone.jpg"), keep_probs=True).fine_probs
    as_upright = geo.predict(upright, keep_probs=True).fine_probs
    as_stored = geo.predict(stored, keep_probs=True).fine_probs
    assert np.abs(from_file - as_upright).sum() < 0.25 * np.abs(from_file - as_stored).sum()
    rgb, _ = decode_image((folder / "phone.jpg").read_bytes())
    assert rgb.size == (48, 64)
    assert np.abs(np.asarray(rgb, np.int16) - upright).mean() < 2


def test_pack_stores_the_photo_upright(photo, tmp_path):
    from geocell.data.shards import pack, read_sample, read_shards, sample_locations

    folder, _, upright = photo
    pack(read_manifest(folder / "m.csv"), tmp_path / "packed", workers=1, progress=False,
         shorter_side=None)
    tars, tar_of, offset, size = sample_locations(read_shards(tmp_path / "packed"))
    with Image.open(io.BytesIO(read_sample(tars[tar_of[0]], offset[0], size[0]))) as im:
        assert im.size == (48, 64)
        assert np.abs(np.asarray(im.convert("RGB"), np.int16) - upright).mean() < 3


@pytest.mark.parametrize("orientation", range(1, 9))
def test_the_gpu_decodes_turn_is_pils_exif_transpose(orientation):
    # nvJPEG decodes the stored pixels; the GPU path turns the tensor itself. PIL is the oracle.
    from PIL import ImageOps

    from geocell.loading.torch_backend import upright_tensor

    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(_stored()).save(buf, format="PNG", exif=exif)
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        want = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        stored = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
    got = upright_tensor(stored, orientation).permute(1, 2, 0).numpy()
    assert got.shape == want.shape and np.array_equal(got, want)
