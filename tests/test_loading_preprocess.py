"""The loaders take a whole Preprocess: its mean/std normalise the batches of both backends (not
module constants), its crop ranges and flip drive the training crops, and a run's Preprocess is
built once from its configuration."""

import numpy as np
import pytest
import torch
from PIL import Image

from geocell.loading.labels import LabelTable
from geocell.loading.loaders import make_loader
from geocell.loading.preprocess import Preprocess
from geocell.data.manifest import read_manifest

N = 10
# far from ImageNet's, so a loader that ignores them is off by whole units
CUSTOM = dict(mean=(0.2, 0.5, 0.8), std=(0.5, 0.25, 0.125))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pre")
    rng = np.random.default_rng(7)
    lines = ["path,lat,lng"]
    for i in range(N):
        h, w = (48, 64) if i % 2 else (70, 50)
        yy, xx = np.mgrid[0:h, 0:w]
        arr = np.stack([(xx * 4 + i * 9) % 256, (yy * 3 + i * 5) % 256, rng.integers(0, 256, (h, w))], -1)
        Image.fromarray(arr.astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)
        lines.append(f"{i}.jpg,{i * 5 - 20},{i * 10 - 50}")
    (folder / "m.csv").write_text("\n".join(lines) + "\n")
    m = read_manifest(folder / "m.csv")
    return m, LabelTable(np.zeros((N, 1), np.int64), np.full(N, -1), np.stack([m.lat, m.lng], 1))


def _images(m, lt, spec, backend, train=False):
    ld = make_loader(m, lt, train=train, batch_size=4 if train else N, preprocess=spec, backend=backend,
                     num_workers=1 if backend == "dali" else 0, seed=2)
    xs, rows = [], []
    for x, t in ld:
        xs.append(x)
        rows += t["index"].tolist()
    x = torch.cat(xs)
    return x[np.argsort(rows)] if not train else x


def _renormalised(x, a: Preprocess, b: Preprocess):
    """Images normalised with ``a``'s mean/std, expressed in ``b``'s."""
    mean_a, std_a = torch.tensor(a.mean).view(1, 3, 1, 1), torch.tensor(a.std).view(1, 3, 1, 1)
    mean_b, std_b = torch.tensor(b.mean).view(1, 3, 1, 1), torch.tensor(b.std).view(1, 3, 1, 1)
    return (x * std_a + mean_a - mean_b) / std_b


def test_dali_cpu_and_torch_normalise_with_the_given_mean_and_std(photos):
    pytest.importorskip("nvidia.dali")
    m, lt = photos
    default, custom = Preprocess(32, 40), Preprocess(32, 40, **CUSTOM)
    out = {(b, s): _images(m, lt, spec, b) for b in ("dali", "torch") for s, spec in
           (("default", default), ("custom", custom))}
    # The two backends agree within the JPEG decoders' last bit and 8-bit rounding (one step of
    # 255 is 1 / (255 * std): 0.03 for the smallest std here).
    diff = (out["dali", "custom"] - out["torch", "custom"]).abs()
    assert diff.mean() < 0.02 and diff.max() < 0.35, (float(diff.mean()), float(diff.max()))
    for backend in ("dali", "torch"):
        _assert_renormalised(out[backend, "custom"], out[backend, "default"], default, custom)


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_training_batches_are_normalised_with_the_given_mean_and_std(photos, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    m, lt = photos
    default, custom = Preprocess(32, crop_scale=(0.5, 1), hflip=0.5), Preprocess(32, crop_scale=(0.5, 1), hflip=0.5,
                                                                                 **CUSTOM)
    # the same seed draws the same crops and flips: only the normalisation differs
    _assert_renormalised(_images(m, lt, custom, backend, train=True), _images(m, lt, default, backend, train=True),
                         default, custom)


def _assert_renormalised(x_custom, x_default, default, custom):
    # the custom batches are the default ones, renormalised: the given mean/std were used ...
    torch.testing.assert_close(x_custom, _renormalised(x_default, default, custom), rtol=0, atol=1e-4)
    # ... and they are not the ImageNet-normalised ones
    assert (x_custom - x_default).abs().mean() > 0.5


def test_torch_training_crops_follow_the_preprocess(photos):
    m, lt = photos
    narrow = _images(m, lt, Preprocess(32, crop_scale=(0.1, 0.1)), "torch", train=True)
    whole = _images(m, lt, Preprocess(32, crop_scale=(1, 1), crop_ratio=(1e-3, 1e3)), "torch", train=True)
    again = _images(m, lt, Preprocess(32, crop_scale=(0.1, 0.1)), "torch", train=True)
    assert torch.equal(narrow, again)  # the same Preprocess, the same batches
    assert not torch.allclose(narrow, whole, atol=0.1)


def test_make_loader_refuses_the_unpacked_fields_and_a_dict(photos):
    m, lt = photos
    with pytest.raises(TypeError):
        make_loader(m, lt, train=False, batch_size=4, image_size=32, backend="torch", num_workers=0)
    with pytest.raises(TypeError, match="Preprocess"):
        make_loader(m, lt, train=False, batch_size=4, preprocess=Preprocess(32).to_dict(), backend="torch",
                    num_workers=0)


def test_a_run_builds_its_preprocess_once_from_the_config():
    from geocell.training.config import TrainConfig, preprocess_from_config

    cfg = TrainConfig(image_size=48, resize_size=60, crop_scale=[0.5, 0.9], hflip=0.25)
    spec = preprocess_from_config(cfg)
    assert (spec.image_size, spec.resize_size, spec.crop_scale, spec.hflip) == (48, 60, (0.5, 0.9), 0.25)
    assert spec.mean == Preprocess().mean and spec.crop_ratio == Preprocess().crop_ratio
    assert preprocess_from_config(TrainConfig(image_size=64)).resize_size == 73  # the 256/224 rule
