"""Training images/s of each path the default run can take on this machine: loader (geocell's
torch backend / the DALI CPU pipeline) x precision (float32 / bf16 autocast) x memory format
(NCHW / channels_last), end to end (loader feeding ResNet-18 steps, the default recipe: 128 px
Earth patches, 64 px crops, batch 64, three geo heads and a scene head).

    python -m pytest bench/bench_train_paths.py --benchmark-only -s

Each round is one epoch of GEOCELL_BENCH_IMAGES images (default 1280: 20 steps). The table at the
end gives images/s and the ratio to torch / float32 / NCHW measured in the same run, with the CPU
flags it ran on. bf16 is measured only where the CPU multiplies bf16 natively: emulated, it runs
at a small fraction of float32 (which is why the trainer never chooses it there). With
ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 an AVX-512 machine runs the AVX2 kernels.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from geocell._internal.torch_util import autocast_context, cpu_has_native_bf16  # noqa: E402
from geocell.data.manifest import read_manifest  # noqa: E402
from geocell.loading.loaders import dali_available, make_loader  # noqa: E402
from geocell.loading.preprocess import Preprocess  # noqa: E402
from geocell.loading.labels import LabelTable  # noqa: E402
from geocell.training import engine  # noqa: E402
from geocell.training.losses import MultitaskLoss  # noqa: E402
from geocell.model.network import GeoModel  # noqa: E402

N_IMAGES = int(os.environ.get("GEOCELL_BENCH_IMAGES", 1280))
BATCH, CROP, CLASSES = 64, 64, [106, 235, 443]  # the default run's partitionings
RATES: dict = {}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from geocell.data.earth import build_earth

    path = build_earth(tmp_path_factory.mktemp("earth_paths"), n=N_IMAGES, size=128, seed=0, progress=False,
                       workers=2)
    m = read_manifest(path)
    n = len(m)
    labels = LabelTable(geo=np.stack([np.arange(n) % c for c in CLASSES], 1).astype(np.int64),
                        scene=np.maximum(m.scene, 0), latlng=np.stack([m.lat, m.lng], 1))
    return m, labels


def _cpu_flags() -> str:
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        return "unknown CPU"
    return " ".join(f for f in ("avx2", "avx512f", "avx512_bf16") if f in flags)


PATHS = [(backend, precision, cl) for backend in ("torch", "dali") for precision in ("float32", "bf16")
         for cl in (False, True)]


@pytest.mark.parametrize("backend,precision,channels_last", PATHS,
                         ids=[f"{b}-{p}-{'cl' if c else 'nchw'}" for b, p, c in PATHS])
def test_training_path(benchmark, dataset, backend, precision, channels_last):
    if backend == "dali" and not dali_available():
        pytest.skip("DALI is not installed")
    if precision == "bf16" and not cpu_has_native_bf16():
        pytest.skip("no native bf16 on this CPU (emulated bf16 is not a path the trainer takes)")
    m, labels = dataset
    torch.manual_seed(0)
    model = GeoModel("resnet18", CLASSES, 6)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = engine.build_optimizer(model, 0.01, 0.9, 1e-4)
    criterion = MultitaskLoss()
    loader = make_loader(m, labels, train=True, batch_size=BATCH, preprocess=Preprocess(CROP, crop_scale=(0.66, 1.0), hflip=0.0),
                         backend=backend, num_workers=2, seed=0)
    amp = torch.bfloat16 if precision == "bf16" else None
    epoch = [0]

    def one_epoch():
        loader.set_epoch(epoch[0])
        epoch[0] += 1
        for images, targets in loader:
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast_context(torch.device("cpu"), amp):
                geo, scene = model(images)
            loss, _ = criterion(geo, scene, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    one_epoch()  # warm-up: worker start, oneDNN kernel selection
    benchmark.pedantic(one_epoch, rounds=2, iterations=1)
    rate = len(loader) * BATCH / benchmark.stats.stats.min
    benchmark.extra_info.update(images_per_s=rate, cpu=_cpu_flags(),
                                isa_cap=os.environ.get("ONEDNN_MAX_CPU_ISA", ""))
    RATES[backend, precision, channels_last] = rate


def teardown_module(module):
    if not RATES:
        return
    peer = RATES.get(("torch", "float32", False))
    print(f"\ntraining images/s by path (CPU: {_cpu_flags()}"
          + (f", ONEDNN_MAX_CPU_ISA={os.environ['ONEDNN_MAX_CPU_ISA']}" if os.environ.get("ONEDNN_MAX_CPU_ISA") else "")
          + "; best of 2 epochs):")
    for (backend, precision, cl), rate in sorted(RATES.items(), key=lambda kv: -kv[1]):
        ratio = f"{rate / peer:5.2f}x torch/float32/NCHW" if peer else ""
        print(f"  {backend:<6} {precision:<8} {'channels_last' if cl else 'NCHW':<14} {rate:7.0f}  {ratio}")
