"""Training batches are a function of (seed, epoch, position) only: the same for any number of
torch worker processes or DALI threads, and ``skip_batches(k)`` continues exactly where an
uninterrupted epoch would be after k batches (what makes --resume exact)."""

import numpy as np
import pytest
import torch
from PIL import Image

from geocell.loading.labels import LabelTable
from geocell.loading.base import crop_params, epoch_rows, sample_rng
from geocell.loading.loaders import make_loader
from geocell.loading.preprocess import Preprocess
from geocell.data.manifest import read_manifest

N = 29


class _Bands:
    def assign(self, lat, lng):
        return np.floor((np.asarray(lat) + 90) / 180 * 4).clip(0, 3).astype(np.int64)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(2)
    lines = ["path,lat,lng"]
    for i in range(N):
        w, h = (80, 56) if i % 2 else (48, 72)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
        lines.append(f"{i}.jpg,{-80 + 5 * i},{-170 + 11 * i}")
    (folder / "m.csv").write_text("\n".join(lines) + "\n")
    m = read_manifest(folder / "m.csv")
    return m, LabelTable.from_manifest(m, [_Bands()])


def _epoch(m, lt, backend, workers, epoch, skip=0, shard=0, shards=1):
    ld = make_loader(m, lt, train=True, batch_size=4, preprocess=Preprocess(24), backend=backend, seed=3,
                     num_workers=workers, shard_id=shard, num_shards=shards)
    ld.set_epoch(epoch)
    if skip:
        ld.skip_batches(skip)
    idx, imgs = [], []
    for x, t in ld:
        idx.append(t["index"].tolist())
        imgs.append(x)
    assert len(idx) == len(ld) - skip
    return idx, torch.stack(imgs)


def test_augmentation_parameters_are_keyed_by_seed_epoch_row():
    a = crop_params(60, 80, sample_rng(1, 2, 3))
    assert a == crop_params(60, 80, sample_rng(1, 2, 3))
    assert len({crop_params(60, 80, sample_rng(1, e, r)) for e in range(3) for r in range(5)}) > 10
    top, left, h, w = a
    assert 0 <= top <= 60 - h and 0 <= left <= 80 - w
    rows = np.arange(10, 30)
    assert np.array_equal(epoch_rows(rows, 1, 2), epoch_rows(rows, 1, 2))
    halves = [epoch_rows(rows, 1, 2, s, 2) for s in range(2)]
    assert len(halves[0]) == len(halves[1]) == 10 and not set(halves[0]) & set(halves[1])


@pytest.mark.parametrize("backend,workers", [("torch", (0, 2)), ("dali", (1, 2))])
def test_batches_do_not_depend_on_workers_and_skip_is_exact(data, backend, workers):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    m, lt = data
    idx, x = _epoch(m, lt, backend, workers[0], epoch=1)
    idx2, x2 = _epoch(m, lt, backend, workers[1], epoch=1)
    assert idx == idx2 and torch.equal(x, x2)
    # The torch backend's (seed, epoch) order, whatever the backend.
    assert sum(idx, []) == epoch_rows(np.arange(N), 3, 1)[: 4 * len(idx)].tolist()
    # Mid-epoch resume: start at batch 3 of the epoch.
    idx3, x3 = _epoch(m, lt, backend, workers[1], epoch=1, skip=3)
    assert idx3 == idx[3:] and torch.equal(x3, x[3:])
    # Another epoch: another order and other crops of the same images.
    idx0, x0 = _epoch(m, lt, backend, workers[0], epoch=0)
    assert idx0 != idx
    # Data-parallel ranks: disjoint slices of the same permutation, equally many batches.
    ranks = [sum(_epoch(m, lt, backend, workers[0], epoch=1, shard=s, shards=2)[0], []) for s in range(2)]
    assert len(ranks[0]) == len(ranks[1]) and not set(ranks[0]) & set(ranks[1])
