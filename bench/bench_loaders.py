"""Loader throughput: the DALI CPU pipeline vs the torchvision DataLoader on the same JPEGs and
the same two cores (num_threads=2 for DALI, num_workers=2 for torch).

    python -m pytest bench/bench_loaders.py --benchmark-only -s

2000 Earth patches at 320x320 (the packed shorter side), training augmentation (random-resized
crop to 224 + flip + normalize), batch 64. Each round is one full epoch; images/s and the
DALI/torch ratio are printed at the end and stored in the benchmark's extra_info.
"""

import os
import time

import numpy as np
import pytest

pytest.importorskip("torch")

from geocell.train.labels import LabelTable  # noqa: E402
from geocell.train.loaders import dali_available, make_loader  # noqa: E402
from geocell.train.manifest import read_manifest  # noqa: E402

N_IMAGES = int(os.environ.get("GEOCELL_BENCH_IMAGES", 2000))
BATCH = 64
CORES = 2
RATES = {}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from geocell.train.earth import build_earth

    folder = tmp_path_factory.mktemp("earth_bench")
    path = build_earth(folder, n=N_IMAGES, size=320, seed=0, progress=False, workers=CORES)
    m = read_manifest(path)
    labels = LabelTable(geo=np.zeros((len(m), 1), dtype=np.int64), scene=m.scene,
                        latlng=np.stack([m.lat, m.lng], 1))
    return m, labels


def _epoch(loader):
    n = 0
    for images, targets in loader:
        n += images.shape[0]
    return n


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_loader_throughput(benchmark, dataset, backend):
    if backend == "dali" and not dali_available():
        pytest.skip("DALI is not installed")
    m, labels = dataset
    loader = make_loader(m, labels, train=True, batch_size=BATCH, image_size=224, backend=backend,
                         num_workers=CORES, seed=0)
    _epoch(loader)  # warm-up: worker start, first allocations
    benchmark.group = "loaders: images/s = batches*64 / time"
    seen = []

    def run():
        t = time.perf_counter()
        seen.append(_epoch(loader))
        return time.perf_counter() - t

    benchmark.pedantic(run, rounds=3, iterations=1)
    images = seen[-1]
    rate = images / benchmark.stats.stats.min
    RATES[backend] = rate
    benchmark.extra_info["images_per_s"] = round(rate, 1)
    benchmark.extra_info["images_per_epoch"] = images
    if len(RATES) == 2:
        ratio = RATES["dali"] / RATES["torch"]
        benchmark.extra_info["dali_over_torch"] = round(ratio, 2)
        print(f"\nDALI CPU {RATES['dali']:.0f} img/s, torchvision {RATES['torch']:.0f} img/s, "
              f"ratio {ratio:.2f}x")
