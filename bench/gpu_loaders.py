"""GPU loader check and throughput for machines with a GPU (DALI optional).

Runs with only torch, torchvision, Pillow and numpy installed: geocell's loading modules
are pure Python and are imported from this checkout without building the C++ core.

    python bench/gpu_loaders.py                      # generates 4096 JPEGs (427x320) in a temp dir
    python bench/gpu_loaders.py --manifest m.csv     # or any manifest (path,lat,lng,...)
    python bench/gpu_loaders.py --out results/       # also writes results.json there

Checks (on the GPU): the nvJPEG decode path (torch backend, gpu_decode) gives the same
indices and labels as the CPU decode path on an evaluation pass, images agree within
resampling differences, two evaluation shards cover every sample exactly once, and a corrupt
image is skipped and counted. Then measures images/s of: torch + CPU decode (DataLoader
workers), torch + nvJPEG decode, and DALI with device='mixed' when DALI is importable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import types
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def _import_train_modules():
    """Imports geocell's loading modules from this checkout, also where the core is not built
    (they are pure Python; only the package's __init__ needs the compiled core)."""
    try:
        import geocell.loading.loaders  # noqa: F401
        return "installed geocell"
    except Exception:
        pass
    for name in [m for m in sys.modules if m == "geocell" or m.startswith("geocell.")]:
        del sys.modules[name]
    pkg = types.ModuleType("geocell")
    pkg.__path__ = [str(REPO / "python" / "geocell")]
    sys.modules["geocell"] = pkg
    import geocell.loading.loaders  # noqa: F401
    return "checkout (core not built)"


def _make_image(args):
    path, seed = args
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = 320, 427
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(0, 255, 3)
    freq = rng.uniform(0.01, 0.08, 3)
    arr = np.stack([base[c] * 0.5 + 60 * np.sin(xx * freq[c] + yy * freq[(c + 1) % 3])
                    for c in range(3)], -1)
    arr += rng.normal(0, 12, arr.shape)  # texture, so JPEGs are photo-sized (~40 KB)
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, quality=90)
    return path


def make_dataset(folder: Path, n: int, workers: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    names = [str(folder / f"{i:06d}.jpg") for i in range(n)]
    with ProcessPoolExecutor(workers) as ex:
        list(ex.map(_make_image, [(p, i) for i, p in enumerate(names)], chunksize=64))
    rng = np.random.default_rng(0)
    lines = ["path,lat,lng,scene"]
    for p in names:
        lines.append(f"{p},{rng.uniform(-80, 80):.5f},{rng.uniform(-180, 180):.5f},{rng.integers(0, 3)}")
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    return folder / "manifest.csv"


class _Bands:
    """A stand-in partitioning (latitude bands) so no S2 core is needed."""

    def __init__(self, k):
        self.k = k

    def assign(self, lat, lng):
        return np.floor((np.asarray(lat) + 90) / 180 * self.k).clip(0, self.k - 1).astype(np.int64)


def _epoch(loader, sync):
    n = 0
    for images, targets in loader:
        n += images.shape[0]
    sync()
    return n


def _rate(loader, epochs, sync):
    _epoch(loader, sync)  # warm-up: worker start, cuDNN/nvJPEG handles, allocations
    best = 0.0
    for _ in range(epochs):
        t = time.perf_counter()
        n = _epoch(loader, sync)
        best = max(best, n / (time.perf_counter() - t))
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--manifest", default=None)
    ap.add_argument("--n", type=int, default=4096, help="images to generate without --manifest")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--workers", type=int, nargs="+", default=[4, 8, 14])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args(argv)

    origin = _import_train_modules()
    import torch
    import torchvision

    from geocell.loading.labels import LabelTable
    from geocell.loading.loaders import dali_available, make_loader
    from geocell.loading.preprocess import Preprocess
    from geocell.data.dataset import read_dataset

    if not torch.cuda.is_available():
        print("no CUDA device: this script is for GPU machines", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    sync = torch.cuda.synchronize
    results = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "torchvision": torchvision.__version__, "cpus": os.cpu_count(),
               "geocell_modules": origin, "dali": dali_available(), "checks": {}, "images_per_s": {}}
    print(json.dumps({k: results[k] for k in ("gpu", "torch", "torchvision", "cpus", "dali")}))

    tmp = tempfile.TemporaryDirectory()
    if args.manifest:
        manifest_path = Path(args.manifest)
    else:
        t = time.perf_counter()
        manifest_path = make_dataset(Path(tmp.name) / "imgs", args.n, min(16, os.cpu_count() or 1))
        print(f"generated {args.n} JPEGs in {time.perf_counter() - t:.1f}s")
    m = read_dataset(manifest_path)
    labels = LabelTable.from_manifest(m, [_Bands(8), _Bands(64)])
    S = args.image_size
    kw = dict(batch_size=args.batch, preprocess=Preprocess(S), device=dev)

    # --- correctness on the GPU -------------------------------------------------------------
    sub = m.subset(np.arange(min(len(m), 1000)))
    sub_labels = labels.take(np.arange(len(sub)))

    def eval_pass(**extra):
        idx, geo, imgs = [], [], []
        ld = make_loader(sub, sub_labels, train=False, backend="torch", num_workers=4, **{**kw, **extra})
        for x, t in ld:
            assert x.device.type == "cuda" and t["geo"].device.type == "cuda"
            idx += t["index"].tolist()
            geo.append(t["geo"].cpu())
            imgs.append(x.float().cpu())
        return ld, idx, torch.cat(geo), torch.cat(imgs)

    _, i_cpu, g_cpu, x_cpu = eval_pass(gpu_decode=False)
    ld_gpu, i_gpu, g_gpu, x_gpu = eval_pass(gpu_decode=True)
    checks = results["checks"]
    checks["same_indices"] = i_cpu == i_gpu == list(range(len(sub)))
    checks["same_labels"] = bool(torch.equal(g_cpu, g_gpu))
    checks["mean_abs_image_diff"] = float((x_cpu - x_gpu).abs().mean())
    checks["loader_detail"] = ld_gpu.detail
    covered = []
    for shard in range(2):
        ld = make_loader(sub, sub_labels, train=False, backend="torch", num_workers=4,
                         shard_id=shard, num_shards=2, gpu_decode=True, **kw)
        covered += [i for _, t in ld for i in t["index"].tolist()]
    checks["two_shards_cover_once"] = sorted(covered) == list(range(len(sub)))
    bad = sub.subset(np.arange(min(64, len(sub))))
    good = Path(bad.paths[1]).read_bytes()
    garbled = Path(tmp.name) / "garbled.jpg"
    garbled.write_bytes(good[:20] + b"\x00" * (len(good) - 22) + good[-2:])
    bad.paths[1] = str(garbled)
    ld = make_loader(bad, sub_labels.take(np.arange(len(bad))), train=False, backend="torch",
                     num_workers=2, gpu_decode=True, **kw)
    seen = [i for _, t in ld for i in t["index"].tolist()]
    checks["corrupt_skipped_and_counted"] = ld.skipped == 1 and 1 not in seen and len(seen) == len(bad) - 1
    print("checks:", json.dumps(checks))

    # --- throughput (training augmentation) -------------------------------------------------
    rates = results["images_per_s"]
    for w in args.workers:
        for gpu_decode in (False, True):
            name = f"torch_{'nvjpeg' if gpu_decode else 'cpu_decode'}_workers{w}"
            ld = make_loader(m, labels, train=True, backend="torch", num_workers=w,
                             gpu_decode=gpu_decode, **kw)
            rates[name] = round(_rate(ld, args.epochs, sync), 1)
            ld.close()
            del ld
            print(f"{name:36s} {rates[name]:9.1f} images/s", flush=True)
    if results["dali"]:
        for w in args.workers:
            name = f"dali_mixed_threads{w}"
            ld = make_loader(m, labels, train=True, backend="dali", num_workers=w, **kw)
            rates[name] = round(_rate(ld, args.epochs, sync), 1)
            print(f"{name:36s} {rates[name]:9.1f} images/s", flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps(results, indent=1))
    ok = all(v for k, v in checks.items() if isinstance(v, bool)) and checks["mean_abs_image_diff"] < 0.1
    print("OK" if ok else "CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
