"""Loader throughput: the DALI CPU pipeline vs the torchvision DataLoaders on the same JPEGs and
the same two cores (num_threads=2 for DALI, num_workers=2 for the others): geocell's torch
backend (torchvision.io.decode_jpeg + tensor transforms) and the classic PIL + transforms recipe.

    python -m pytest bench/bench_loaders.py --benchmark-only -s

2000 Earth patches at 320x320 (the packed shorter side), training augmentation (random-resized
crop to 224 + flip + normalize), batch 64. The DALI CPU pipeline decodes each crop from the JPEG
(ROI decode) and hands it to geocell's resampling kernel; the two DataLoaders decode and
transform in their worker processes. Each round is one full epoch; images/s and the
DALI/torch ratio are printed at the end and stored in the benchmark's extra_info.

On shared cores wall-clock rates swing with other people's load, so the CPU time the loader
spends per image (this process, its threads and its worker processes, from /proc) is reported
too: it is the load-independent cost, and 2 cores / (CPU s per image) is the rate on two idle
cores.
"""

import os
import time

import numpy as np
import pytest

pytest.importorskip("torch")

from geocell.loading.labels import LabelTable  # noqa: E402
from geocell.loading.loaders import dali_available, make_loader  # noqa: E402
from geocell.loading.preprocess import Preprocess  # noqa: E402
from geocell.data.manifest import read_manifest  # noqa: E402

N_IMAGES = int(os.environ.get("GEOCELL_BENCH_IMAGES", 2000))
BATCH = 64
CORES = 2
RATES = {}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from geocell.data.earth import build_earth

    folder = tmp_path_factory.mktemp("earth_bench")
    path = build_earth(folder, n=N_IMAGES, size=320, seed=0, progress=False, workers=CORES)
    m = read_manifest(path)
    labels = LabelTable(geo=np.zeros((len(m), 1), dtype=np.int64), scene=m.scene,
                        latlng=np.stack([m.lat, m.lng], 1))
    return m, labels


def _cpu_seconds() -> float:
    """User+system CPU time of this process and its live children (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    me = os.getpid()
    total = 0.0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(pid) == me or int(fields[1]) == me:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _epoch(loader):
    n = 0
    for images, targets in loader:
        n += images.shape[0]
    return n


class _PilImages:
    """The classic torchvision recipe (PIL decode + transforms in DataLoader workers): the
    loader most training scripts use, measured as a third peer."""

    def __init__(self, paths):
        import torchvision.transforms as T

        from geocell.loading.preprocess import IMAGENET_MEAN as MEAN, IMAGENET_STD as STD

        self.paths = paths
        self.transform = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(),
                                    T.Normalize(MEAN, STD)])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            return self.transform(im.convert("RGB")), i


def _pil_loader(manifest):
    import torch

    return torch.utils.data.DataLoader(_PilImages(manifest.paths), batch_size=BATCH, shuffle=True,
                                       num_workers=CORES, persistent_workers=True, drop_last=True)


@pytest.mark.parametrize("backend", ["dali", "torch", "pil"])
def test_loader_throughput(benchmark, dataset, backend):
    if backend == "dali" and not dali_available():
        pytest.skip("DALI is not installed")
    m, labels = dataset
    if backend == "pil":
        loader = _pil_loader(m)
    else:
        loader = make_loader(m, labels, train=True, batch_size=BATCH, preprocess=Preprocess(224), backend=backend,
                             num_workers=CORES, seed=0)
    _epoch(loader)  # warm-up: worker start, first allocations
    benchmark.group = "loaders: images/s = batches*64 / time"
    seen, cpu = [], []

    def run():
        c = _cpu_seconds()
        seen.append(_epoch(loader))
        cpu.append(_cpu_seconds() - c)

    benchmark.pedantic(run, rounds=3, iterations=1)
    images = seen[-1]
    rate = images / benchmark.stats.stats.min
    cpu_ms = 1000 * min(cpu) / images
    RATES[backend] = (rate, cpu_ms)
    benchmark.extra_info["images_per_s"] = round(rate, 1)
    benchmark.extra_info["cpu_ms_per_image"] = round(cpu_ms, 3)
    benchmark.extra_info["images_per_epoch"] = images
    if len(RATES) == 3:
        (r_d, c_d), (r_t, c_t), (r_p, _) = RATES["dali"], RATES["torch"], RATES["pil"]
        benchmark.extra_info["dali_over_torch"] = round(r_d / r_t, 2)
        benchmark.extra_info["dali_over_torch_by_cpu_time"] = round(c_t / c_d, 2)
        benchmark.extra_info["dali_over_pil"] = round(r_d / r_p, 2)
        print("\nloader                              img/s   CPU ms/img   DALI is x faster (wall / CPU)")
        for name, (r, c) in [("DALI CPU pipeline", RATES["dali"]),
                             ("geocell torch loader (decode_jpeg)", RATES["torch"]),
                             ("PIL + torchvision transforms", RATES["pil"])]:
            print(f"{name:34s} {r:7.0f} {c:12.2f}   {r_d / r:5.2f} / {c / c_d:5.2f}")
