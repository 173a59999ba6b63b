"""What both loader backends share: the :class:`Loader` base (targets, normalisation, the
up-front file checks), the epoch order and the per-sample randomness. The factory that picks a
backend is :func:`geocell.loading.loaders.make_loader`.

A loader yields ``(images, targets)`` with images float32 (B, 3, S, S) normalized with its
:class:`~geocell.loading.preprocess.Preprocess`'s ``mean``/``std`` on ``device`` and targets a
dict of tensors on ``device``: ``geo`` int64 (B, P), ``scene`` int64 (B,), ``latlng`` float64
(B, 2), ``index`` int64 (B,) (row in the manifest).

Training: random-resized crop + horizontal flip (ranges and probability from the
``Preprocess``). Evaluation: shorter side resized to ``resize_size`` + centre crop, and every
sample of the shard exactly once.

Reproducibility (what makes ``--resume`` exact): a training epoch's order is
``epoch_rows(rows, seed, epoch, shard_id, num_shards)`` (a permutation drawn from (seed, epoch);
rank ``shard_id`` takes its equal-sized slice) and every sample's augmentation parameters come
from ``sample_rng(seed, epoch, row)``, so batch ``k`` of epoch ``e`` is the same whatever the
number of worker processes / DALI threads, and ``loader.skip_batches(k)`` starts the next
iteration at batch ``k`` without loading the batches before it.

Bad samples never stop an epoch and are always counted: files that are missing, empty or not
JPEG/PNG (magic bytes, JPEG end marker) are excluded up front, images that fail to decode are
skipped at run time; both show in ``loader.skipped`` / ``loader.skipped_paths``.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np

log = logging.getLogger("geocell.loading.base")

from geocell.loading.preprocess import RATIO, SCALE, Preprocess
from geocell.data.images import ImageTooLarge, open_checked

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _jpeg_has_end(f, size: int) -> bool:
    """Whether a JPEG file has an end-of-image marker after its first scan starts. The last 64
    bytes are looked at first; data some cameras append after the image (a preview, a video)
    makes the slow path read the file: marker segments up to the first SOS, then the scan data
    (where a 0xFF byte is always followed by 0x00 or a marker, so FFD9 is the end)."""
    f.seek(max(0, size - 64))
    if b"\xff\xd9" in f.read():
        return True
    f.seek(2)
    while True:
        marker = f.read(4)
        if len(marker) < 4 or marker[0] != 0xFF:
            return False
        if marker[1] == 0xFF:  # fill byte before a marker
            f.seek(-3, os.SEEK_CUR)
            continue
        length = int.from_bytes(marker[2:4], "big")
        if length < 2:
            return False
        f.seek(length - 2, os.SEEK_CUR)
        if marker[1] == 0xDA:  # SOS: scan data follows its header
            break
    carry = b""
    while True:
        chunk = f.read(1 << 20)
        if not chunk:
            return False
        if b"\xff\xd9" in carry + chunk:
            return True
        carry = chunk[-1:]


def check_image_file(path: str) -> Optional[str]:
    """Cheap structural check: None if the file looks like a complete JPEG/PNG whose declared
    size is within the pixel limit (``geocell.data.images``), else why not."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if not head:
                return "empty file"
            f.seek(0, os.SEEK_END)
            size = f.tell()
            if head.startswith(_JPEG_MAGIC):
                if not _jpeg_has_end(f, size):
                    return "truncated JPEG (no end-of-image marker)"
            elif head == _PNG_MAGIC:
                f.seek(max(0, size - 12))
                if b"IEND" not in f.read():
                    return "truncated PNG (no IEND chunk)"
            else:
                return "not a JPEG or PNG file"
            f.seek(0)
            return _declared_size_problem(f)
    except FileNotFoundError:
        return "missing file"
    except OSError as e:
        return f"unreadable file ({e.strerror or e})"


def _declared_size_problem(f) -> Optional[str]:

    try:
        open_checked(f).close()
    except ImageTooLarge as e:
        return str(e)
    except Exception:  # a header Pillow cannot parse: the decode fails, is skipped and counted
        return None
    return None


def validate_files(paths, threads: int = 8) -> list:
    """Reasons (None = fine) for each path, checked in a thread pool (I/O bound)."""
    if len(paths) < 256:
        return [check_image_file(p) for p in paths]
    with ThreadPoolExecutor(threads) as ex:
        return list(ex.map(check_image_file, paths, chunksize=256))


def shard_range(n: int, shard_id: int, num_shards: int) -> tuple:
    """Contiguous [start, stop) of ``shard_id`` — the same split DALI's readers make."""
    return (n * shard_id) // num_shards, (n * (shard_id + 1)) // num_shards


def epoch_rows(rows: np.ndarray, seed: int, epoch: int, shard_id: int = 0, num_shards: int = 1) -> np.ndarray:
    """Training rows of ``shard_id`` for ``epoch``, in order: a permutation of ``rows`` drawn
    from (seed, epoch), cut into ``num_shards`` equal slices (the remainder sits out the epoch,
    so data-parallel ranks run the same number of steps)."""
    rng = np.random.default_rng([int(seed), int(epoch)])
    per = len(rows) // num_shards
    order = rng.permutation(len(rows))[shard_id * per:(shard_id + 1) * per]
    return rows[order]


def sample_rng(seed: int, epoch: int, row: int) -> np.random.Generator:
    """The generator of one sample's augmentation in one epoch: a function of (seed, epoch, row)
    only, never of worker processes, threads or global RNG state."""
    return np.random.default_rng([int(seed), int(epoch), int(row)])


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer on uint64 arrays (wrapping arithmetic)."""
    z = z + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def sample_uniforms(key, ids, k: int) -> np.ndarray:
    """(len(ids), k) uniform floats in [0, 1), each a hash of (key, id, column): the
    vectorized counterpart of ``sample_rng`` for a whole batch at once (``key``: a tuple of
    non-negative ints such as (seed, epoch))."""
    h = np.zeros(1, dtype=np.uint64)
    for part in key:
        h = _splitmix64(h ^ np.uint64(int(part) & 0xFFFFFFFFFFFFFFFF))
    ids = np.asarray(ids, dtype=np.int64).astype(np.uint64).reshape(-1, 1)
    z = _splitmix64(_splitmix64(h ^ ids) + np.arange(k, dtype=np.uint64))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def crop_params(height: int, width: int, rng: np.random.Generator, scale=SCALE, ratio=RATIO) -> tuple:
    """(top, left, h, w) of a random-resized crop: torchvision's ``RandomResizedCrop.get_params``
    algorithm (area fraction in ``scale``, log-uniform aspect ratio in ``ratio``, 10 attempts,
    then a centre crop) drawing from ``rng``."""
    import math

    area = height * width
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(lo, hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class Loader:
    """Shared state and target lookup of both backends."""
    backend = "none"

    def __init__(self, manifest, labels, *, train, batch_size, preprocess: Preprocess, device,
                 num_workers, shard_id, num_shards, seed, validate):
        import torch

        if len(labels) != len(manifest):
            raise ValueError(f"label table has {len(labels)} rows, manifest {len(manifest)}")
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id {shard_id} not in [0, {num_shards})")
        if not isinstance(preprocess, Preprocess):
            raise TypeError(f"preprocess must be a geocell.loading.preprocess.Preprocess, not {type(preprocess).__name__}")
        self.manifest = manifest
        self.labels = labels
        self.train = bool(train)
        self.batch_size = int(batch_size)
        self.preprocess = preprocess
        self.device = torch.device(device)
        self.num_workers = int(num_workers)
        self.shard_id, self.num_shards = int(shard_id), int(num_shards)
        self.seed = int(seed)
        self.epoch = 0
        self.skipped_paths: list = []  # (path, reason)
        self._geo = torch.from_numpy(np.ascontiguousarray(labels.geo, dtype=np.int64))
        self._scene = torch.from_numpy(np.ascontiguousarray(labels.scene, dtype=np.int64))
        self._latlng = torch.from_numpy(np.ascontiguousarray(labels.latlng, dtype=np.float64))
        self._mean255 = torch.tensor([m * 255 for m in preprocess.mean], dtype=torch.float32).view(1, 3, 1, 1)
        self._std255 = torch.tensor([s * 255 for s in preprocess.std], dtype=torch.float32).view(1, 3, 1, 1)
        self.rows = self._usable_rows(validate)

    def _usable_rows(self, validate) -> np.ndarray:
        rows = np.arange(len(self.manifest), dtype=np.int64)
        if not validate or getattr(self.manifest, "shards", None):
            return rows  # packed shards hold only images that decoded while packing
        reasons = validate_files(self.manifest.paths)
        bad = [i for i, r in enumerate(reasons) if r is not None]
        for i in bad:
            self.skipped_paths.append((self.manifest.paths[i], reasons[i]))
        if bad:
            log.warning("%d of %d images excluded before loading (first: %s: %s)", len(bad),
                        len(rows), self.manifest.paths[bad[0]], reasons[bad[0]])
        keep = np.ones(len(rows), dtype=bool)
        keep[bad] = False
        return rows[keep]

    @property
    def skipped(self) -> int:
        return len(self.skipped_paths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _targets(self, index):
        """Targets of manifest rows ``index`` (int64 CPU tensor) on the loader's device."""
        nb = self.device.type == "cuda"
        return {
            "geo": self._geo[index].to(self.device, non_blocking=nb),
            "scene": self._scene[index].to(self.device, non_blocking=nb),
            "latlng": self._latlng[index].to(self.device, non_blocking=nb),
            "index": index.to(self.device, non_blocking=nb),
        }

    def _normalize(self, images_uint8):
        """uint8 (B,3,H,W) -> normalized float32 on the device (converting after the copy keeps
        the host-to-device transfer 4x smaller)."""
        nb = self.device.type == "cuda"
        x = images_uint8.to(self.device, non_blocking=nb).float()
        return x.sub_(self._mean255.to(x.device)).div_(self._std255.to(x.device))

    def __repr__(self):
        return (f"{type(self).__name__}(backend={self.backend!r}, samples={len(self.rows)}, "
                f"train={self.train}, batch_size={self.batch_size}, shard={self.shard_id}/{self.num_shards}, "
                f"device={self.device})")

