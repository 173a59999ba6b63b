"""Loader throughput on part of a shard vs whole shards, both backends, in the same run.

    python -m pytest bench/bench_subset_shards.py --benchmark-only -s

Earth patches packed into shards of one split (as ``geocell data download`` writes them); the
"subset" loaders read 4 of every 5 samples of each shard (what the default held-out split draws
inside such a folder: the torch backend seeks to each sample's offset, DALI follows an index
copy listing only the subset), the "whole" loaders every sample. Training augmentation, batch
32, 2 workers / DALI threads. A round is one epoch; the rate is samples per second of the
fastest round (the least disturbed on shared cores), printed at the end with subset/whole.
"""

import os

import numpy as np
import pytest

pytest.importorskip("torch")

from geocell.data.manifest import read_manifest  # noqa: E402
from geocell.data.shards import pack, read_shards  # noqa: E402
from geocell.loading.loaders import dali_available, make_loader  # noqa: E402
from geocell.loading.preprocess import Preprocess  # noqa: E402
from geocell.loading.labels import LabelTable  # noqa: E402

N_IMAGES = int(os.environ.get("GEOCELL_BENCH_IMAGES", 1000))
SIZE = 160
BATCH = 32
WORKERS = 2
RATES = {}


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    from geocell.data.earth import build_earth

    folder = tmp_path_factory.mktemp("subset_bench")
    m = read_manifest(build_earth(folder / "earth", n=N_IMAGES, size=SIZE, seed=0, progress=False,
                                  workers=WORKERS))
    m.split = None  # one split, as a download writes it
    pack(m, folder / "shards", shard_size=500, shorter_side=SIZE, workers=WORKERS, progress=False)
    whole = read_shards(folder / "shards")
    subset = whole.subset(np.flatnonzero(np.arange(len(whole)) % 5 != 2))
    return {"whole": whole, "subset": subset}


def _labels(m):
    return LabelTable(geo=np.zeros((len(m), 1), dtype=np.int64), scene=m.scene,
                      latlng=np.stack([m.lat, m.lng], 1))


@pytest.mark.parametrize("part", ["whole", "subset"])
@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_shard_loader_throughput(benchmark, packed, backend, part):
    if backend == "dali" and not dali_available():
        pytest.skip("DALI not installed")
    m = packed[part]
    loader = make_loader(m, _labels(m), train=True, batch_size=BATCH, preprocess=Preprocess(128),
                         backend=backend, num_workers=WORKERS, seed=0)
    epoch = [0]

    def run():
        loader.set_epoch(epoch[0])
        epoch[0] += 1
        return sum(len(t["index"]) for _, t in loader)

    n = benchmark.pedantic(run, rounds=8, warmup_rounds=1, iterations=1)
    assert n == len(loader) * BATCH
    rate = n / benchmark.stats.stats.min
    benchmark.extra_info["images_per_s"] = rate
    RATES[(backend, part)] = rate
    if hasattr(loader, "close"):
        loader.close()


def teardown_module(module):
    print("\nshard loader throughput (images/s, best round):")
    for backend in ("torch", "dali"):
        w, s = RATES.get((backend, "whole")), RATES.get((backend, "subset"))
        if w and s:
            print(f"  {backend:6s} whole {w:8.1f}  subset {s:8.1f}  subset/whole {s / w:.3f}")
