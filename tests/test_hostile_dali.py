"""DALI (CPU pipeline) with images that pass the up-front check but do not decode: a damaged
sample inside a packed shard is skipped and counted, and with image files a resumed epoch is
exact (the bad row keeps its place in the permutation; its sample is dropped)."""


import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from geocell.data.manifest import read_manifest  # noqa: E402
from geocell.loading.base import epoch_rows  # noqa: E402
from geocell.loading.loaders import make_loader  # noqa: E402
from geocell.loading.preprocess import Preprocess  # noqa: E402
from geocell.loading.labels import LabelTable  # noqa: E402

B = 4


def _labels(m):
    n = len(m)
    return LabelTable(np.arange(n, dtype=np.int64)[:, None] % 3, np.full(n, -1),
                      np.stack([m.lat, m.lng], 1))


def _photos(folder, n):
    rng = np.random.default_rng(3)
    lines = ["path,lat,lng"]
    for i in range(n):
        arr = rng.integers(0, 256, (36 + 2 * i, 44, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"{i}.jpg", quality=90)
        lines.append(f"{i}.jpg,{i - 40},{2 * i}")
    (folder / "m.csv").write_text("\n".join(lines) + "\n")
    return read_manifest(folder / "m.csv")


def _garble(path):
    """Keeps the JPEG magic and end marker (the up-front check passes), zeroes the rest."""
    good = path.read_bytes()
    path.write_bytes(good[:20] + b"\x00" * (len(good) - 22) + good[-2:])


def _epoch(ld, skip=0):
    ld.set_epoch(0)
    if skip:
        ld.skip_batches(skip)
    return [(t["index"].tolist(), x.clone()) for x, t in ld]


@pytest.fixture
def packed(tmp_path):
    from geocell.data.shards import pack, read_shards, sample_locations

    src = tmp_path / "src"
    src.mkdir()
    m = _photos(src, 10)
    pack(m, tmp_path / "packed", shard_size=4, workers=1, progress=False)
    packed = read_shards(tmp_path / "packed")
    tars, tar_of, offset, size = sample_locations(packed)
    bad_row = 5
    with open(tars[tar_of[bad_row]], "r+b") as f:  # bit rot inside one sample's JPEG
        f.seek(int(offset[bad_row]))
        f.write(b"\x00" * int(size[bad_row]))
    return packed, bad_row


def test_damaged_shard_sample_is_skipped_and_counted_in_evaluation(packed):
    m, bad_row = packed
    ld = make_loader(m, _labels(m), train=False, batch_size=B, preprocess=Preprocess(16), backend="dali",
                     num_workers=1)
    rows = [r for r, _ in _epoch(ld) for r in r]
    assert sorted(rows) == sorted(set(range(len(m))) - {bad_row})
    assert ld.skipped == 1 and "sample" in ld.skipped_paths[0][0]
    assert m.paths[bad_row] in ld.skipped_paths[0][0]


def test_damaged_shard_sample_is_skipped_and_counted_in_training(packed):
    m, bad_row = packed
    ld = make_loader(m, _labels(m), train=True, batch_size=B, preprocess=Preprocess(16), backend="dali",
                     num_workers=1, seed=1)
    batches = _epoch(ld)
    rows = [r for r, _ in batches for r in r]
    assert bad_row not in rows and len(set(rows)) == len(rows) and len(batches) == len(ld)
    assert ld.skipped == 1 and m.paths[bad_row] in ld.skipped_paths[0][0]


@pytest.fixture
def files(tmp_path):
    m = _photos(tmp_path, 12)
    # A seed whose epoch 0 puts the bad row in the middle batch of three.
    bad_row = 7
    seed = next(s for s in range(200)
                if list(epoch_rows(np.arange(12), s, 0)).index(bad_row) // B == 1)
    _garble(tmp_path / f"{bad_row}.jpg")
    return m, bad_row, seed


def test_undecodable_file_keeps_the_epoch_permutation_and_resume_is_exact(files):
    m, bad_row, seed = files
    make = lambda: make_loader(m, _labels(m), train=True, batch_size=B, preprocess=Preprocess(16),  # noqa: E731
                               backend="dali", num_workers=1, seed=seed)
    ld = make()
    assert ld.skipped == 0  # passes the up-front check: found only when decoding
    full = _epoch(ld)
    order = epoch_rows(np.arange(12), seed, 0).tolist()
    expected = [[r for r in order[k * B:(k + 1) * B] if r != bad_row] for k in range(3)]
    assert [rows for rows, _ in full] == expected
    assert ld.skipped == 1 and ld.skipped_paths[0][0].endswith(f"{bad_row}.jpg")
    # Resumed after the bad batch (never meets the bad image) and before it (meets it again):
    # the same rows and pixels as the uninterrupted epoch.
    for skip in (2, 1):
        resumed = _epoch(make(), skip=skip)
        assert [rows for rows, _ in resumed] == expected[skip:]
        for (_, a), (_, b) in zip(resumed, full[skip:]):
            assert torch.equal(a, b)
    # The next epoch of the same loader knows the bad row: no second failure, same structure.
    ld.set_epoch(1)
    order1 = epoch_rows(np.arange(12), seed, 1).tolist()
    rows1 = [t["index"].tolist() for _, t in ld]
    assert rows1 == [[r for r in order1[k * B:(k + 1) * B] if r != bad_row] for k in range(3)]
    assert ld.skipped == 1


def test_undecodable_file_in_evaluation_is_skipped_once(files):
    m, bad_row, _ = files
    ld = make_loader(m, _labels(m), train=False, batch_size=B, preprocess=Preprocess(16), backend="dali",
                     num_workers=1)
    rows = [r for r, _ in _epoch(ld) for r in r]
    assert rows == [r for r in range(12) if r != bad_row] and ld.skipped == 1


def test_16_bit_png_decodes_to_the_same_8_bit_values_as_the_torch_loader(tmp_path):
    from geocell.loading.preprocess import IMAGENET_MEAN as MEAN, IMAGENET_STD as STD

    Image.fromarray(np.full((40, 48), 30000, dtype=np.uint16)).save(tmp_path / "g16.png")
    Image.new("RGBA", (48, 40), (10, 200, 90, 100)).save(tmp_path / "rgba.png")
    (tmp_path / "m.csv").write_text("path,lat,lng\ng16.png,1,1\nrgba.png,2,2\n")
    m = read_manifest(tmp_path / "m.csv")
    means = {}
    for backend in ("dali", "torch"):
        ld = make_loader(m, _labels(m), train=False, batch_size=2, preprocess=Preprocess(16, 16),
                         backend=backend, num_workers=1 if backend == "dali" else 0)
        (x, t), = list(ld)
        px = x * torch.tensor(STD).view(1, 3, 1, 1) * 255 + torch.tensor(MEAN).view(1, 3, 1, 1) * 255
        means[backend] = px.mean(dim=(2, 3)).numpy()
        assert ld.skipped == 0 and t["index"].tolist() == [0, 1]
    np.testing.assert_allclose(means["dali"], [[117] * 3, [10, 200, 90]], atol=0.6)
    np.testing.assert_allclose(means["torch"], means["dali"], atol=0.6)
