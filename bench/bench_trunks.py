"""Training images/s of each trunk on this machine, in the same run: ResNet-18 (the default) and
EfficientNet-Lite0 (timm, ImageNet weights from a local file), at the default recipe's 64 px
crops, batch 64, three geo heads and a scene head, float32, on synthetic tensors (no loader: the
network's own cost).

    python -m pytest bench/bench_trunks.py --benchmark-only -s

Each round is GEOCELL_BENCH_STEPS steps (default 5) after one warm-up round; the table at the end
gives images/s of the best round and the ratio to ResNet-18 NCHW.
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from bench_train_paths import BATCH, CLASSES, CROP, _cpu_flags  # noqa: E402
from geocell.training import engine  # noqa: E402
from geocell.training.losses import MultitaskLoss  # noqa: E402
from geocell.model.network import GeoModel  # noqa: E402

STEPS = int(os.environ.get("GEOCELL_BENCH_STEPS", 5))
RATES: dict = {}
CASES = [(arch, cl) for arch in ("resnet18", "efficientnet_lite0") for cl in (False, True)]


@pytest.mark.parametrize("arch,channels_last", CASES, ids=[f"{a}-{'cl' if c else 'nchw'}" for a, c in CASES])
def test_trunk_training_rate(benchmark, arch, channels_last):
    torch.manual_seed(0)
    model = GeoModel(arch, CLASSES, 6)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = engine.build_optimizer(model, 0.01, 0.9, 1e-4)
    criterion = MultitaskLoss()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(BATCH, 3, CROP, CROP, generator=g)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = {"geo": torch.stack([torch.randint(0, c, (BATCH,), generator=g) for c in CLASSES], 1),
               "scene": torch.randint(0, 6, (BATCH,), generator=g)}

    def steps():
        for _ in range(STEPS):
            geo, scene = model(images)
            loss, _ = criterion(geo, scene, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    steps()  # warm-up: oneDNN kernel selection
    benchmark.pedantic(steps, rounds=3, iterations=1)
    rate = STEPS * BATCH / benchmark.stats.stats.min
    benchmark.extra_info.update(images_per_s=rate, cpu=_cpu_flags())
    RATES[arch, channels_last] = rate


def teardown_module(module):
    if not RATES:
        return
    peer = RATES.get(("resnet18", False))
    print(f"\ntraining images/s by trunk ({CROP} px, batch {BATCH}, float32, synthetic tensors; "
          f"CPU: {_cpu_flags()}; threads {torch.get_num_threads()}; best of 3 rounds of {STEPS} steps):")
    for (arch, cl), rate in sorted(RATES.items(), key=lambda kv: -kv[1]):
        ratio = f"{rate / peer:5.2f}x resnet18/NCHW" if peer else ""
        print(f"  {arch:<20} {'channels_last' if cl else 'NCHW':<14} {rate:7.1f}  {ratio}")
