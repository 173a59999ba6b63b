"""The resampling step of the training loader alone, one thread, on the same crops: geocell's
kernel (antialiased bilinear to 224, mirror, normalize into float32 CHW; the DALI CPU loader's
last step) against torchvision's uint8 ``resized_crop(antialias=True)`` + flip + normalize (the
torch loader's), and each vector path of the kernel.

    python -m pytest bench/bench_resample.py --benchmark-only -s

512 random-resized crops (torchvision's crop distribution) of 320x320 images, batch 64.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = pytest.importorskip("torchvision.transforms.v2.functional")

from geocell import _core  # noqa: E402
from geocell.loading.base import crop_params, sample_rng  # noqa: E402
from geocell.loading.preprocess import IMAGENET_MEAN as MEAN, IMAGENET_STD as STD  # noqa: E402
from geocell.loading.resample import BatchWriter  # noqa: E402

N, BATCH, SIZE = 512, 64, 224
RATES = {}


@pytest.fixture(scope="module")
def crops():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:320, 0:320]
    out = []
    for k in range(N):
        img = np.stack([(xx + k) % 256, (yy * 2) % 256, rng.integers(0, 256, (320, 320))], -1).astype(np.uint8)
        top, left, h, w = crop_params(320, 320, sample_rng(0, 0, k))
        out.append((img, top, left, h, w))
    return out


def _torchvision(crops):
    chw = [(torch.from_numpy(img).permute(2, 0, 1), t, l, h, w) for img, t, l, h, w in crops]
    mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD).view(1, 3, 1, 1) * 255

    def run():
        for b in range(0, N, BATCH):
            batch = torch.stack([F.horizontal_flip(F.resized_crop(x, t, l, h, w, [SIZE, SIZE], antialias=True))
                                 for x, t, l, h, w in chw[b:b + BATCH]])
            batch.float().sub_(mean).div_(std)
    return run


def _geocell(crops):
    views = [img[t:t + h, l:l + w] for img, t, l, h, w in crops]
    writer = BatchWriter(SIZE, MEAN, STD, threads=1)
    flip = np.ones(BATCH, dtype=np.uint8)

    def run():
        for b in range(0, N, BATCH):
            writer(views[b:b + BATCH], flip=flip)
    return run


@pytest.mark.parametrize("impl", ["torchvision"] + [f"geocell-{lv}" for lv in _core.image_simd_levels()])
def test_resample_throughput(benchmark, crops, impl):
    torch.set_num_threads(1)
    if impl == "torchvision":
        run = _torchvision(crops)
    else:
        _core.set_image_simd_level(impl.split("-")[1])
        run = _geocell(crops)
    benchmark.group = "resample 512 crops to 224 (1 thread)"
    try:
        benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    finally:
        _core.set_image_simd_level(_core.image_simd_levels()[0])
    rate = N / benchmark.stats.stats.min
    RATES[impl] = rate
    benchmark.extra_info["images_per_s"] = round(rate, 1)
    if "torchvision" in RATES and len(RATES) == 1 + len(_core.image_simd_levels()):
        base = RATES["torchvision"]
        print("\nresampling step             images/s   x torchvision")
        for name, r in sorted(RATES.items(), key=lambda kv: -kv[1]):
            print(f"{name:26s} {r:9.0f} {r / base:10.2f}")
