"""Training throughput on the CPU (images/s): the optimiser step alone on synthetic tensors, and a
whole epoch (loader + step) on a small Earth dataset, ResNet-18 with three geo heads and a scene head.

    python -m pytest bench/bench_train.py --benchmark-only -s

Small on purpose (2 shared cores): 64 px images, batch 32. The rates are printed and stored in
each benchmark's extra_info.
"""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from geocell.training import engine  # noqa: E402
from geocell.training.losses import MultitaskLoss  # noqa: E402
from geocell.model.network import GeoModel  # noqa: E402

SIZE = 64
BATCH = 32
CLASSES = [128, 266, 488]  # the default Earth run's partitionings
THREADS = int(os.environ.get("GEOCELL_BENCH_THREADS", 2))


def _setup():
    torch.manual_seed(0)
    torch.set_num_threads(THREADS)
    model = GeoModel("resnet18", CLASSES, 3)
    optimizer = engine.build_optimizer(model, 0.05, 0.9, 1e-4)
    return model, optimizer, MultitaskLoss()


def _targets(n):
    return {"geo": torch.stack([torch.randint(0, c, (n,)) for c in CLASSES], 1),
            "scene": torch.randint(0, 3, (n,)), "latlng": torch.zeros(n, 2, dtype=torch.float64)}


def test_train_step_synthetic(benchmark):
    model, optimizer, criterion = _setup()
    x, t = torch.randn(BATCH, 3, SIZE, SIZE), _targets(BATCH)

    def step():
        geo, scene = model(x)
        loss, _ = criterion(geo, scene, t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()
    benchmark.group = f"train: resnet18 {SIZE}px batch {BATCH}"
    benchmark.pedantic(step, rounds=5, iterations=1)
    rate = BATCH / benchmark.stats.stats.mean
    benchmark.extra_info["images_per_s"] = rate
    print(f"\nsynthetic training step: {rate:.0f} images/s")


@pytest.fixture(scope="module")
def earth(tmp_path_factory):
    from geocell.data.earth import build_earth
    from geocell.loading.labels import LabelTable
    from geocell.data.manifest import read_manifest

    m = read_manifest(build_earth(tmp_path_factory.mktemp("earth"), n=320, size=128, seed=0, progress=False))
    rng = np.random.default_rng(0)
    geo = np.stack([rng.integers(0, c, len(m)) for c in CLASSES], 1)
    return m, LabelTable(geo=geo, scene=m.scene, latlng=np.stack([m.lat, m.lng], 1))


def test_train_epoch_with_loader(benchmark, earth):
    from geocell.loading.loaders import make_loader
    from geocell.loading.preprocess import Preprocess
    from geocell.training.state import TrainState

    model, optimizer, criterion = _setup()
    m, labels = earth
    loader = make_loader(m, labels, train=True, batch_size=BATCH, preprocess=Preprocess(SIZE), num_workers=1, seed=0)
    steps = len(loader)
    scheduler = engine.build_scheduler(optimizer, engine.LRSchedule("step", steps, 100))
    info = engine.DistInfo()
    options = engine.EpochOptions(steps=steps, log_every=0, show_progress=False)

    def epoch():
        state = TrainState(optimizer, scheduler)
        engine.train_one_epoch(model, criterion, loader, state, info, options)

    epoch()  # warm-up
    benchmark.group = f"train: resnet18 {SIZE}px batch {BATCH}"
    benchmark.pedantic(epoch, rounds=2, iterations=1)
    rate = steps * BATCH / benchmark.stats.stats.mean
    benchmark.extra_info["images_per_s"] = rate
    benchmark.extra_info["backend"] = loader.backend
    print(f"\nepoch with the {loader.backend} loader: {rate:.0f} images/s")
