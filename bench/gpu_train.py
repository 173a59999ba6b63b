"""End-to-end training throughput on one GPU: ResNet-50 (geocell's GeoModel), bf16, channels_last.

Three measurements in one run, same model and optimiser step:
  model-only  synthetic input already on the GPU (the ceiling);
  gpu-decode  JPEG bytes read by threads, decoded in batches with nvJPEG
              (torchvision.io.decode_jpeg(list, device="cuda")), random-resized-crop + flip +
              normalize on the GPU, prepared one batch ahead on a side stream;
  dataloader  the plain torchvision DataLoader: PIL decode + RandomResizedCrop in worker processes.

It writes its own JPEG dataset (random smooth images, ~400x300) to a temporary folder and prints a
JSON summary. Only torch, torchvision, PIL and numpy are needed; the model is loaded from
python/geocell/model/network.py of this checkout.

    python bench/gpu_train.py                       # on the GPU machine
    python bench/gpu_train.py --compile
    python bench/gpu_train.py --device cpu --steps 2 --warmup 1 --image-size 64 --batch-size 8 --num-images 64
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import queue
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
NUM_CLASSES = (3298, 7202, 12893)  # the paper's MP-16 partitionings
NUM_SCENES = 3


def load_geomodel():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python", "geocell", "training", "model.py")
    spec = importlib.util.spec_from_file_location("geocell_train_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.GeoModel


# ---------------------------------------------------------------------------------------------
# A synthetic JPEG dataset


def _write_images(args):
    folder, start, count, seed = args
    rng = np.random.default_rng(seed + start)
    for i in range(start, start + count):
        w, h = int(rng.integers(360, 440)), int(rng.integers(270, 330))
        small = (rng.random((6, 8, 3)) * 255).astype(np.uint8)  # a coarse random field, smoothly upsampled
        img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
        noise = rng.normal(0, 12, (h, w, 3))
        img = Image.fromarray(np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8))
        img.save(os.path.join(folder, f"{i:06d}.jpg"), quality=90)
    return count


def make_dataset(folder: str, n: int, workers: int) -> list[str]:
    chunk = max(1, n // max(1, workers * 4))
    tasks = [(folder, s, min(chunk, n - s), 0) for s in range(0, n, chunk)]
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            pool.map(_write_images, tasks)
    else:
        for t in tasks:
            _write_images(t)
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".jpg"))


# ---------------------------------------------------------------------------------------------
# The GPU pipeline: nvJPEG batch decode, then crop/flip/normalize on the GPU


def random_resized_boxes(sizes, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision RandomResizedCrop boxes (x1, y1, x2, y2) for images of sizes [(h, w)]."""
    boxes = []
    log_r = (np.log(ratio[0]), np.log(ratio[1]))
    for h, w in sizes:
        area = h * w
        for _ in range(10):
            target = area * rng.uniform(*scale)
            aspect = np.exp(rng.uniform(*log_r))
            cw, ch = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
            if 0 < cw <= w and 0 < ch <= h:
                x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                boxes.append((x, y, x + cw, y + ch))
                break
        else:  # fall back to a central crop
            side = min(h, w)
            boxes.append(((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2))
    return boxes


def gpu_augment(images, size, rng, device, mean, std):
    """List of uint8 (3,H,W) GPU images -> normalized float (B,3,size,size), channels_last.

    The images (of any sizes) are copied into one padded half-precision canvas so that a single
    roi_align call does every bilinear crop-and-resize: a fixed, small number of kernel launches
    per batch whatever the mix of image sizes."""
    from torchvision.ops import roi_align

    sizes = [tuple(im.shape[1:]) for im in images]
    boxes = random_resized_boxes(sizes, rng)
    h_max, w_max = max(h for h, _ in sizes), max(w for _, w in sizes)
    canvas = torch.zeros((len(images), 3, h_max, w_max), dtype=torch.float16, device=device)
    for i, im in enumerate(images):
        canvas[i, :, : im.shape[1], : im.shape[2]] = im
    rois = torch.from_numpy(np.array([[i, *b] for i, b in enumerate(boxes)], dtype=np.float32))
    if device.type == "cuda":
        rois = rois.pin_memory().to(device, non_blocking=True)
    out = roi_align(canvas, rois.to(canvas.dtype), output_size=(size, size), spatial_scale=1.0,
                    sampling_ratio=2, aligned=True).float()
    flip = torch.from_numpy(rng.random(len(images)) < 0.5)
    flip = flip.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else flip
    out = torch.where(flip[:, None, None, None], out.flip(3), out)
    out = (out - mean) / std
    return out.contiguous(memory_format=torch.channels_last)


class GpuDecodeLoader:
    """Yields (images, labels) batches; a background thread reads and decodes one batch ahead."""

    def __init__(self, paths, batch_size, size, device, readers=16, depth=3, seed=0):
        self.paths, self.batch_size, self.size, self.device = paths, batch_size, size, torch.device(device)
        self.pool = ThreadPoolExecutor(readers)
        self.rng = np.random.default_rng(seed)
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.mean = torch.tensor([m * 255 for m in MEAN], device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor([s * 255 for s in STD], device=self.device).view(1, 3, 1, 1)
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        from torchvision.io import decode_jpeg, read_file

        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        order = np.array([], dtype=np.int64)
        while not self.stop:
            if len(order) < self.batch_size:
                order = np.concatenate([order, self.rng.permutation(len(self.paths))])
            pick, order = order[: self.batch_size], order[self.batch_size:]
            data = list(self.pool.map(read_file, [self.paths[i] for i in pick]))
            with torch.cuda.stream(stream) if stream is not None else _null():
                if self.device.type == "cuda":
                    decoded = decode_jpeg(data, device=self.device)
                else:
                    decoded = list(self.pool.map(decode_jpeg, data))
                images = gpu_augment(decoded, self.size, self.rng, self.device, self.mean, self.std)
                labels = torch.from_numpy(pick % 1000).to(self.device, non_blocking=True)
                event = torch.cuda.Event() if stream is not None else None
                if event is not None:
                    event.record(stream)
            self.queue.put((images, labels, event))

    def __iter__(self):
        while True:
            images, labels, event = self.queue.get()
            if event is not None:
                torch.cuda.current_stream(self.device).wait_event(event)
                images.record_stream(torch.cuda.current_stream(self.device))
                labels.record_stream(torch.cuda.current_stream(self.device))
            yield images, labels

    def close(self):
        self.stop = True
        try:
            while True:
                self.queue.get_nowait()
        except queue.Empty:
            pass
        self.thread.join(timeout=10)
        self.pool.shutdown(wait=False)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------------------------------
# The plain torchvision DataLoader


class PilDataset(torch.utils.data.Dataset):
    def __init__(self, paths, size):
        from torchvision import transforms

        self.paths = paths
        self.transform = transforms.Compose([
            transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(), transforms.PILToTensor()])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as img:
            return self.transform(img.convert("RGB")), i % 1000


def dataloader_batches(paths, batch_size, size, device, workers):
    dl = torch.utils.data.DataLoader(
        PilDataset(paths, size), batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers,
        pin_memory=torch.device(device).type == "cuda", persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None)
    mean = torch.tensor([m * 255 for m in MEAN], device=device).view(1, 3, 1, 1)
    std = torch.tensor([s * 255 for s in STD], device=device).view(1, 3, 1, 1)
    while True:
        for images, labels in dl:
            x = images.to(device, non_blocking=True).float().sub_(mean).div_(std)
            yield x.contiguous(memory_format=torch.channels_last), labels.to(device, non_blocking=True)


def synthetic_batches(batch_size, size, device):
    x = torch.randn(batch_size, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch_size,), device=device)
    while True:
        yield x, y


# ---------------------------------------------------------------------------------------------
# The timed training step


def measure(step, batches, warmup, steps, batch_size, device):
    it = iter(batches)
    for _ in range(warmup):
        step(*next(it))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(*next(it))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps * batch_size / (time.perf_counter() - t0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=40, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=15)
    ap.add_argument("--num-images", type=int, default=4096)
    ap.add_argument("--workers", type=int, default=16, help="DataLoader worker processes")
    ap.add_argument("--readers", type=int, default=16, help="file-reading threads of the GPU pipeline")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--only", nargs="+", choices=["model-only", "gpu-decode", "dataloader"])
    ap.add_argument("--json", help="also write the summary here")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    GeoModel = load_geomodel()
    model = GeoModel(args.arch, list(NUM_CLASSES), NUM_SCENES).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    forward = torch.compile(model) if args.compile else model
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _null()

    def step(x, y):
        with amp:
            geo, scene = forward(x)
            # Stand-in targets: the class ids reduced into each head's range.
            loss = sum(F.cross_entropy(g.float(), y % g.shape[1]) for g in geo)
            loss = loss + F.cross_entropy(scene.float(), y % NUM_SCENES)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    folder = tempfile.mkdtemp(prefix="geocell-gpu-bench-")
    summary = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "torchvision": torchvision.__version__, "arch": args.arch,
               "image_size": args.image_size, "batch_size": args.batch_size, "compile": args.compile,
               "amp": "bf16" if device.type == "cuda" else "none", "channels_last": True}
    which = args.only or ["model-only", "gpu-decode", "dataloader"]
    try:
        t0 = time.perf_counter()
        paths = make_dataset(folder, args.num_images, min(16, os.cpu_count() or 1))
        summary["dataset"] = {"images": len(paths), "seconds": round(time.perf_counter() - t0, 1),
                              "mean_bytes": int(np.mean([os.path.getsize(p) for p in paths]))}
        common = dict(warmup=args.warmup, steps=args.steps, batch_size=args.batch_size, device=device)
        results = {}
        if "model-only" in which:
            results["model_only"] = measure(step, synthetic_batches(args.batch_size, args.image_size, device), **common)
            print(f"model only: {results['model_only']:.0f} images/s", flush=True)
        if "gpu-decode" in which:
            loader = GpuDecodeLoader(paths, args.batch_size, args.image_size, device, readers=args.readers)
            try:
                results["gpu_decode_loader_only"] = measure(lambda x, y: None, loader, **common)
                results["gpu_decode"] = measure(step, loader, **common)
            finally:
                loader.close()
            print(f"GPU decode (nvJPEG) + GPU augmentation: {results['gpu_decode']:.0f} images/s "
                  f"(pipeline alone {results['gpu_decode_loader_only']:.0f} images/s)", flush=True)
        if "dataloader" in which:
            results["dataloader"] = measure(
                step, dataloader_batches(paths, args.batch_size, args.image_size, device, args.workers), **common)
            print(f"DataLoader (PIL, {args.workers} workers): {results['dataloader']:.0f} images/s", flush=True)
        summary["images_per_s"] = {k: round(v, 1) for k, v in results.items()}
        if device.type == "cuda":
            summary["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    text = json.dumps(summary, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
