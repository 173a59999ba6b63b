"""make_loader: DALI (CPU pipeline) and torchvision backends agree, evaluation covers every
sample exactly once across shards, bad images are skipped and counted, training batches."""

import numpy as np
import pytest
import torch
from PIL import Image

from geocell.loading.labels import LabelTable
from geocell.loading.base import check_image_file
from geocell.loading.loaders import make_loader
from geocell.loading.preprocess import IMAGENET_MEAN as MEAN, IMAGENET_STD as STD, Preprocess, default_resize_size
from geocell.data.manifest import read_manifest

N = 37  # not a multiple of the batch size nor of the shard count


class _Bands:
    def __init__(self, k):
        self.k = k

    def assign(self, lat, lng):
        return np.floor((np.asarray(lat) + 90) / 180 * self.k).clip(0, self.k - 1).astype(np.int64)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(1)
    lines = ["path,lat,lng,scene"]
    for i in range(N):
        w, h = (96, 72) if i % 3 else (60, 90)
        yy, xx = np.mgrid[0:h, 0:w]
        arr = np.stack([(xx * 3 + i * 7) % 256, (yy * 2 + i * 11) % 256,
                        rng.integers(0, 256, (h, w))], -1).astype(np.uint8)
        if i == 4:
            Image.fromarray(arr).save(folder / f"{i}.png")
            lines.append(f"{i}.png,{-80 + 4 * i},{-175 + 9 * i},{i % 3}")
            continue
        Image.fromarray(arr).save(folder / f"{i}.jpg", quality=85)
        lines.append(f"{i}.jpg,{-80 + 4 * i},{-175 + 9 * i},{i % 3}")
    (folder / "m.csv").write_text("\n".join(lines) + "\n")
    m = read_manifest(folder / "m.csv")
    return folder, m, LabelTable.from_manifest(m, [_Bands(3), _Bands(12)])


def _run(loader):
    idx, geo, imgs = [], [], []
    for x, t in loader:
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32)
        assert t["geo"].dtype == torch.int64 and t["latlng"].dtype == torch.float64
        idx += t["index"].tolist()
        geo.append(t["geo"])
        imgs.append(x)
    return idx, torch.cat(geo), torch.cat(imgs)


def test_dali_and_torch_agree_on_eval(data):
    pytest.importorskip("nvidia.dali")
    _, m, lt = data
    out = {}
    for backend in ("dali", "torch"):
        ld = make_loader(m, lt, train=False, batch_size=8, preprocess=Preprocess(32, 40),
                         backend=backend, num_workers=1 if backend == "dali" else 0)
        assert ld.backend == backend and len(ld) == 5
        out[backend] = _run(ld)
    (i_d, g_d, x_d), (i_t, g_t, x_t) = out["dali"], out["torch"]
    assert i_d == i_t == list(range(N))
    assert torch.equal(g_d, g_t) and torch.equal(g_d, torch.from_numpy(lt.geo))
    # The same resize (antialiased bilinear) and crop: what differs is the JPEG decoders' last
    # bit and torchvision's rounding to 8 bits between its two passes (about 1/255 at most).
    diff = (x_d - x_t).abs()
    assert diff.mean() < 0.01 and diff.max() < 0.05
    # Normalization: undo it and land back in [0, 255].
    pixels = x_d * torch.tensor(STD).view(1, 3, 1, 1) * 255 + torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    assert pixels.min() > -1 and pixels.max() < 256


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_eval_shards_cover_every_sample_once(data, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    _, m, lt = data
    seen = []
    for shard in range(2):
        ld = make_loader(m, lt, train=False, batch_size=5, preprocess=Preprocess(32), backend=backend,
                         shard_id=shard, num_shards=2, num_workers=1 if backend == "dali" else 0)
        for epoch in range(2):  # shards must not rotate between epochs
            idx = _run(ld)[0]
            assert len(idx) == len(set(idx)) and len(ld) == -(-len(idx) // 5)
            if epoch == 0:
                seen += idx
            else:
                assert sorted(idx) == sorted(seen[-len(idx):])
    assert sorted(seen) == list(range(N))


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_bad_images_are_skipped_and_counted(data, tmp_path, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    folder, m, lt = data
    good = (folder / "0.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "text.jpg").write_text("hello")
    (tmp_path / "empty.jpg").write_bytes(b"")
    # Passes the cheap check (magic + end marker) but does not decode.
    (tmp_path / "garbled.jpg").write_bytes(good[:20] + b"\x00" * (len(good) - 22) + good[-2:])
    m = m.subset(np.arange(len(m)))
    bad = {3: "trunc.jpg", 7: "text.jpg", 8: "empty.jpg", 11: "garbled.jpg", 20: "gone.jpg"}
    for row, name in bad.items():
        m.paths[row] = str(tmp_path / name)
    ld = make_loader(m, lt, train=False, batch_size=8, preprocess=Preprocess(32), backend=backend,
                     num_workers=1 if backend == "dali" else 2)
    idx = _run(ld)[0]
    assert sorted(idx) == sorted(set(range(N)) - set(bad))
    assert ld.skipped == len(bad)
    reasons = {p.split("/")[-1]: r for p, r in ld.skipped_paths}
    assert set(reasons) == set(bad.values())
    assert "missing" in reasons["gone.jpg"] and "empty" in reasons["empty.jpg"]
    assert "truncated" in reasons["trunc.jpg"]
    assert check_image_file(str(tmp_path / "garbled.jpg")) is None


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_train_batches(data, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    _, m, lt = data
    ld = make_loader(m, lt, train=True, batch_size=8, preprocess=Preprocess(32), backend=backend, seed=5,
                     num_workers=1 if backend == "dali" else 0)
    assert len(ld) == N // 8
    orders = []
    for epoch in range(2):
        ld.set_epoch(epoch)
        idx, geo, x = _run(ld)
        assert len(idx) == 8 * len(ld) and len(set(idx)) == len(idx)
        assert torch.equal(geo, torch.from_numpy(lt.geo)[idx])
        assert x.std() > 0.1
        orders.append(idx)
    assert orders[0] != orders[1]
    # Two data-parallel ranks get equally many batches.
    lens = [len(make_loader(m, lt, train=True, batch_size=4, preprocess=Preprocess(32), backend=backend,
                            shard_id=s, num_shards=2, num_workers=1 if backend == "dali" else 0))
            for s in range(2)]
    assert lens[0] == lens[1] == (N // 2) // 4


def test_torch_train_order_is_seeded(data):
    _, m, lt = data

    def order(seed, epoch):
        ld = make_loader(m, lt, train=True, batch_size=8, preprocess=Preprocess(32), backend="torch",
                         seed=seed, num_workers=0)
        ld.set_epoch(epoch)
        return _run(ld)[0]

    assert order(1, 0) == order(1, 0) != order(1, 1)


def test_auto_backend(data):
    pytest.importorskip("nvidia.dali")
    _, m, lt = data
    assert make_loader(m, lt, train=False, batch_size=8, preprocess=Preprocess(32), num_workers=1).backend == "dali"



def test_dali_eval_pass_after_an_abandoned_one(data):
    """Leaving an evaluation pass early must not shift the next one: it starts at the first
    sample and still covers each exactly once."""
    pytest.importorskip("nvidia.dali")
    _, m, lt = data
    ld = make_loader(m, lt, train=False, batch_size=8, preprocess=Preprocess(32, 40), backend="dali",
                     num_workers=1)
    first = next(iter(ld))[1]["index"].tolist()
    assert first == list(range(8))
    for _ in range(2):
        idx, _, _ = _run(ld)
        assert idx == list(range(N))


def test_predictor_input_equals_the_evaluation_loaders(data):
    # One preprocessing description: what Geolocator feeds the network for an image is what the
    # evaluation loader fed it during training (a lossless PNG, so both decoders agree exactly).
    from geocell.infer.predict import make_transform

    folder, m, labels = data
    spec = Preprocess(image_size=32, resize_size=40)
    loader = make_loader(m, labels, train=False, batch_size=8, preprocess=spec, backend="torch", num_workers=0)
    batches = {int(i): x for xs, t in loader for i, x in zip(t["index"], xs)}
    row = [i for i, p in enumerate(m.paths) if p.endswith(".png")][0]
    mine = make_transform(spec.to_dict())(Image.open(m.paths[row]))
    assert mine.shape == (3, 32, 32)
    torch.testing.assert_close(mine, batches[row], rtol=0, atol=1e-5)


def test_preprocess_rules():
    assert default_resize_size(224) == 256 and Preprocess(224).resize_size == 256
    assert Preprocess.from_dict(Preprocess(96, 120).to_dict()) == Preprocess(96, 120)
    for bad in (dict(image_size=0), dict(image_size=64, resize_size=32), dict(image_size=8, std=(0, 1, 1))):
        with pytest.raises(ValueError, match="preprocess"):
            Preprocess(**bad)
