"""The core's resampling kernel (geocell._core.resample_normalize, used by the DALI loader's CPU
path) against torchvision: its resize of a float image with antialias=True computes the same
filter, so the two agree to float rounding; both vector paths; boxes for resize + centre crop;
errors; BatchWriter's reuse of output arrays."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = pytest.importorskip("torchvision.transforms.v2.functional")

from geocell import _core  # noqa: E402
from geocell.loading.resample import BatchWriter, centre_crop_boxes  # noqa: E402

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@pytest.fixture(params=_core.image_simd_levels())
def simd(request):
    """Every vector path this CPU runs (the scalar one everywhere)."""
    _core.set_image_simd_level(request.param)
    yield request.param
    _core.set_image_simd_level(_core.image_simd_levels()[0])


def _oracle(img_hwc, top, left, h, w, size, flip=False):
    """torchvision on float: crop, antialiased bilinear resize, mirror, normalize."""
    x = torch.from_numpy(img_hwc).permute(2, 0, 1).float() / 255
    x = F.resized_crop(x, top, left, h, w, list(size), antialias=True)
    if flip:
        x = F.horizontal_flip(x)
    return F.normalize(x, MEAN, STD)


def test_crops_match_torchvision(simd):
    rng = np.random.default_rng(0)
    images, boxes, flips, want = [], [], [], []
    for k in range(60):
        hh, ww = rng.integers(5, 150, 2)
        img = rng.integers(0, 256, (hh, ww, 3), dtype=np.uint8)
        h, w = rng.integers(1, hh + 1), rng.integers(1, ww + 1)
        top, left = rng.integers(0, hh - h + 1), rng.integers(0, ww - w + 1)
        flip = bool(k % 2)
        # The kernel gets the crop as a view (row stride of the whole image), as DALI's ROI
        # decode hands it over: filter taps stop at the crop's edges, as after F.crop.
        images.append(img[top:top + h, left:left + w])
        boxes.append((0, 0, w, h))
        flips.append(flip)
        want.append(_oracle(img, int(top), int(left), int(h), int(w), (37, 29), flip))
    out = np.full((60, 3, 37, 29), np.nan, dtype=np.float32)
    _core.resample_normalize(images, np.array(boxes, float), np.array(flips, np.uint8), out, MEAN, STD, 2)
    diff = np.abs(out - torch.stack(want).numpy())
    assert diff.max() < 2e-5, (simd, diff.max())


@pytest.mark.parametrize("hw", [(90, 120), (120, 90), (64, 64), (33, 250), (301, 47)])
def test_centre_crop_boxes_match_resize_then_centre_crop(hw, simd):
    rng = np.random.default_rng(hw[0])
    img = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
    resize, size = 40, 32
    x = torch.from_numpy(img).permute(2, 0, 1).float() / 255
    want = F.normalize(F.center_crop(F.resize(x, [resize], antialias=True), [size, size]), MEAN, STD)
    boxes = centre_crop_boxes([hw[0]], [hw[1]], resize, size)
    out = np.empty((1, 3, size, size), dtype=np.float32)
    _core.resample_normalize([img], boxes, None, out, MEAN, STD, 1)
    # Float rounding only (1e-4 is 0.006 of an 8-bit level; a box off by a hundredth of a
    # pixel shows as 1e-2).
    assert np.abs(out[0] - want.numpy()).max() < 1e-4


def test_paths_agree():
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, (int(h), int(w), 3), dtype=np.uint8) for h, w in rng.integers(8, 300, (20, 2))]
    boxes = np.array([(0, 0, im.shape[1], im.shape[0]) for im in images], float)
    out = {}
    for level in _core.image_simd_levels():
        _core.set_image_simd_level(level)
        out[level] = np.empty((20, 3, 224, 224), dtype=np.float32)
        _core.resample_normalize(images, boxes, None, out[level], MEAN, STD, 2)
    _core.set_image_simd_level(_core.image_simd_levels()[0])
    assert out["scalar"].min() > -3 and out["scalar"].max() < 3
    for level, o in out.items():
        assert np.abs(o - out["scalar"]).max() < 1e-5, level
    with pytest.raises(ValueError, match="image simd level must be one of"):
        _core.set_image_simd_level("sse9")


def test_bad_input_names_the_image():
    good = np.zeros((10, 10, 3), np.uint8)
    out = np.empty((2, 3, 4, 4), np.float32)
    box = np.array([[0, 0, 10, 10]] * 2, float)
    with pytest.raises(ValueError, match="image 1: expected an HxWx3 uint8"):
        _core.resample_normalize([good, np.zeros((10, 10, 4), np.uint8)], box, None, out, MEAN, STD)
    with pytest.raises(ValueError, match="image 1: expected an HxWx3 uint8"):
        _core.resample_normalize([good, np.zeros((10, 10, 3), np.float32)], box, None, out, MEAN, STD)
    with pytest.raises(ValueError, match=r"image 1: box .* not inside the 10x10 image"):
        _core.resample_normalize([good, good], np.array([[0, 0, 10, 10], [2, 0, 10, 10]], float), None,
                                 out, MEAN, STD)
    with pytest.raises(ValueError, match="out must be"):
        _core.resample_normalize([good, good], box, None, np.empty((2, 3, 4, 4), np.float64), MEAN, STD)


def test_batch_writer_reuses_only_unreferenced_arrays():
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (50, 60, 3), dtype=np.uint8) for _ in range(4)]
    writer = BatchWriter(16, MEAN, STD, threads=1)
    a = writer(images)
    b = writer(images[:2])  # `a` is alive: a new array
    assert a.data_ptr() != b.data_ptr() and b.shape == (2, 3, 16, 16)
    a_ptr, a_copy = a.data_ptr(), a.clone()
    view = a[1:]
    del a
    c = writer(images[::-1])  # a view keeps a's array in use
    assert c.data_ptr() not in (a_ptr, b.data_ptr())
    assert torch.equal(view, a_copy[1:])
    del view
    d = writer(images)  # now free: written in place, same values as the first batch
    assert d.data_ptr() == a_ptr and torch.equal(d, a_copy)
    assert a_ptr % 64 == 0 and b.data_ptr() % 64 == 0 and c.data_ptr() % 64 == 0
    assert torch.equal(c, a_copy.flip(0))
