"""The torchvision DataLoader backend: libjpeg-turbo decode (torchvision.io) in worker processes,
or nvJPEG decode on the GPU (``gpu_decode``) for machines with a GPU but without DALI.

The batch sampler yields ``(epoch, row)`` keys; a sample's crop and flip are drawn from
``sample_rng(seed, epoch, row)`` in whichever process handles it (worker or, with ``gpu_decode``,
the main one), so the batches of an epoch do not depend on ``num_workers``."""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from geocell.loading.preprocess import Preprocess
from geocell.loading.base import Loader, crop_params, epoch_rows, sample_rng, shard_range
from geocell.data.images import decode_rgb, exif_orientation, open_checked
from geocell.data.shards import read_sample, sample_locations


def _read_bytes(source, row) -> bytes:
    kind = source[0]
    if kind == "files":
        with open(source[1][row], "rb") as f:
            return f.read()

    _, tars, tar_of, offset, size = source
    return read_sample(tars[tar_of[row]], offset[row], size[row])


def _quiet():
    """torchvision 0.29 deprecates torchvision.io image decoding (still the fastest CPU path
    here) and warns on every call."""
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("ignore", DeprecationWarning)
    return ctx


def _decode_cpu(data: bytes) -> torch.Tensor:
    """uint8 (3,H,W) RGB. The declared size is checked first (``geocell.data.images``); JPEGs
    decode with libjpeg-turbo through torchvision.io, everything else (and JPEGs where
    torchvision is gone) through Pillow with the shared mode conversion (16-bit scaled to 8)."""
    if data[:3] != b"\xff\xd8\xff":
        arr = np.asarray(decode_rgb(data))
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
    open_checked(data).close()  # header only: refuses a size claim before allocating it
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        arr = np.asarray(decode_rgb(data))
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    ctx = _quiet()
    try:
        # the EXIF orientation, as decode_rgb and DALI apply it (geocell.data.images.ORIENTATION)
        return decode_jpeg(buf, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    finally:
        ctx.__exit__(None, None, None)


def _augment(img: torch.Tensor, rng, spec: Preprocess) -> torch.Tensor:
    """uint8 (3,H,W) -> uint8 (3,S,S), on whatever device ``img`` is on. ``rng``: the sample's
    generator (training: random-resized crop + flip) or None (evaluation: resize + centre crop)."""
    import torchvision.transforms.v2.functional as F

    if rng is not None:
        top, left, h, w = crop_params(img.shape[-2], img.shape[-1], rng, spec.crop_scale, spec.crop_ratio)
        img = F.resized_crop(img, top, left, h, w, [spec.image_size, spec.image_size], antialias=True)
        if rng.random() < spec.hflip:  # always drawn, so the stream does not depend on hflip
            img = F.horizontal_flip(img)
        return img
    return spec.eval_crop(img)


class _Samples(Dataset):
    """Indexed by (epoch, manifest row) (the sampler yields those). Item = (uint8 image or raw
    bytes, row, error or None, epoch); never raises."""

    def __init__(self, source, train, spec: Preprocess, decode, seed):
        self.source, self.train, self.seed = source, train, seed
        self.spec, self.decode = spec, decode

    def __getitem__(self, key):
        epoch, row = key
        try:
            data = _read_bytes(self.source, row)
            if not self.decode:
                return data, row, None, epoch
            rng = sample_rng(self.seed, epoch, row) if self.train else None
            img = _augment(_decode_cpu(data), rng, self.spec)
            return img, row, None, epoch
        except Exception as e:  # one bad image must not end the epoch
            return None, row, f"{type(e).__name__}: {e}", epoch


def _collate(items):
    good = [it for it in items if it[2] is None]
    bad = [(it[1], it[2]) for it in items if it[2] is not None]
    rows = torch.tensor([it[1] for it in good], dtype=torch.int64)
    if good and isinstance(good[0][0], torch.Tensor):
        images = torch.stack([it[0] for it in good])
    else:
        images = [it[0] for it in good]
    return images, rows, bad, (items[0][3] if items else 0)


class _EpochBatches(Sampler):
    """Batches of (epoch, manifest row) keys for this shard; training order ``epoch_rows``
    (from (seed, epoch)); ``start``: a one-shot number of leading batches to leave out.
    Holds its own copy of the settings: a reference back to the loader would make a cycle that
    keeps worker processes alive until a garbage collection (possibly in a forked child)."""

    def __init__(self, rows, train, batch_size, shard_id, num_shards, seed):
        self.rows, self.train, self.batch_size = rows, train, batch_size
        self.shard_id, self.num_shards, self.seed = shard_id, num_shards, seed
        self.epoch = 0
        self.start = 0

    def _positions(self):
        n = len(self.rows)
        if not self.train:
            start, stop = shard_range(n, self.shard_id, self.num_shards)
            return self.rows[start:stop]
        return epoch_rows(self.rows, self.seed, self.epoch, self.shard_id, self.num_shards)

    def __iter__(self):
        rows = self._positions().tolist()
        b, epoch = self.batch_size, self.epoch
        stop = len(rows) - len(rows) % b if self.train else len(rows)
        first, self.start = self.start, 0
        for s in range(first * b, stop, b):
            yield [(epoch, r) for r in rows[s:s + b]]

    def __len__(self):
        n = len(self.rows)
        if self.train:
            return (n // self.num_shards) // self.batch_size
        start, stop = shard_range(n, self.shard_id, self.num_shards)
        return math.ceil((stop - start) / self.batch_size)


class TorchLoader(Loader):
    backend = "torch"

    def __init__(self, manifest, labels, *, gpu_decode=None, **kw):
        super().__init__(manifest, labels, **kw)
        if getattr(manifest, "shards", None):

            tars, tar_of, offset, size = sample_locations(manifest)
            self._source = ("shards", tars, tar_of, offset, size)
        else:
            self._source = ("files", list(manifest.paths))
        self.gpu_decode = (self.device.type == "cuda") if gpu_decode is None else bool(gpu_decode)
        if self.gpu_decode and self.device.type != "cuda":
            raise ValueError("gpu_decode needs a CUDA device")
        self.detail = ("nvJPEG decode on " + str(self.device)) if self.gpu_decode else \
            f"torchvision.io CPU decode, {self.num_workers} workers"
        dataset = _Samples(self._source, self.train, self.preprocess, decode=not self.gpu_decode,
                           seed=self.seed)
        generator = torch.Generator()
        generator.manual_seed(self.seed)
        self._batches = _EpochBatches(self.rows, self.train, self.batch_size, self.shard_id,
                                      self.num_shards, self.seed)
        self._dl = DataLoader(
            dataset, batch_sampler=self._batches, num_workers=self.num_workers,
            collate_fn=_collate, pin_memory=self.device.type == "cuda",
            persistent_workers=self.num_workers > 0, generator=generator,
            prefetch_factor=4 if self.num_workers > 0 else None)

    def __len__(self):
        return len(self._batches)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = self._batches.epoch = int(epoch)

    def skip_batches(self, count: int) -> None:
        if not self.train:
            raise ValueError("skip_batches is for training loaders")
        self._batches.start = int(count)

    def close(self) -> None:
        """Stops the worker processes now rather than when the loader is collected."""
        it = getattr(self._dl, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self._dl._iterator = None

    def __iter__(self):
        for images, rows, bad, epoch in self._dl:
            self._count_bad(bad)
            if self.gpu_decode:
                images, rows = self._decode_on_gpu(images, rows, epoch)
            if len(rows) == 0:
                continue
            yield self._normalize(images), self._targets(rows)

    def _count_bad(self, bad):
        for row, reason in bad:
            self.skipped_paths.append((self._describe(row), reason))

    def _describe(self, row):
        return self.manifest.paths[row]

    def _decode_on_gpu(self, blobs, rows, epoch):
        from torchvision.io import decode_jpeg

        tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        is_jpeg = [b[:3] == b"\xff\xd8\xff" for b in blobs]
        decoded = [None] * len(blobs)
        jpeg_idx, orientation = [], {}
        for i, j in enumerate(is_jpeg):
            if not j:
                continue
            try:
                with open_checked(blobs[i]) as header:  # the declared size, before nvJPEG allocates it
                    orientation[i] = exif_orientation(header)  # nvJPEG decodes the pixels as stored
                jpeg_idx.append(i)
            except Exception as e:
                is_jpeg[i] = None  # neither decoded here nor below
                self._count_bad([(int(rows[i]), f"{type(e).__name__}: {e}")])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                out = decode_jpeg([tensors[i] for i in jpeg_idx], device=self.device, mode=_rgb())
            for i, img in zip(jpeg_idx, out):
                decoded[i] = upright_tensor(img, orientation[i])
        except Exception:
            # Find the bad image(s) one by one so the rest of the batch survives.
            for i in jpeg_idx:
                try:
                    decoded[i] = upright_tensor(decode_jpeg(tensors[i], device=self.device, mode=_rgb()),
                                                orientation[i])
                except Exception as e:
                    self._count_bad([(int(rows[i]), f"{type(e).__name__}: {e}")])
        for i, j in enumerate(is_jpeg):
            if j is False:
                try:
                    decoded[i] = _decode_cpu(blobs[i]).to(self.device)
                except Exception as e:
                    self._count_bad([(int(rows[i]), f"{type(e).__name__}: {e}")])
        keep = [i for i, d in enumerate(decoded) if d is not None]
        if not keep:
            return None, rows[:0]
        rngs = [sample_rng(self.seed, epoch, int(rows[i])) for i in keep] if self.train else None
        images = _augment_batch([decoded[i] for i in keep], rngs, self.preprocess)
        return images, rows[keep]


def upright_tensor(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A (C, H, W) image turned by EXIF ``orientation``: the transposes of
    geocell.data.images.upright (PIL's exif_transpose), on the tensor's device."""
    o = int(orientation)
    if o == 2:
        return image.flip(-1)
    if o == 3:
        return image.flip(-1).flip(-2)
    if o == 4:
        return image.flip(-2)
    if o == 5:
        return image.transpose(-1, -2)
    if o == 6:
        return torch.rot90(image, -1, dims=(-2, -1))
    if o == 7:
        return image.transpose(-1, -2).flip(-1).flip(-2)
    if o == 8:
        return torch.rot90(image, 1, dims=(-2, -1))
    return image


def _augment_batch(images, rngs, spec: Preprocess) -> torch.Tensor:
    """The crops of ``_augment`` (``rngs``: one generator per image, or None for evaluation)
    for a list of (3,H,W) uint8 GPU images in one ``roi_align``
    call (a per-image loop is launch-bound at a few thousand images/s). Returns float32
    (B,3,S,S) in [0, 255]. Bilinear sampling when enlarging; when shrinking, roi_align
    averages ceil(box/S) samples per output pixel, which antialiases like ``resize``."""
    from torchvision.ops import roi_align

    S = spec.image_size
    train = rngs is not None
    boxes, flips = [], []
    for k, img in enumerate(images):
        h, w = img.shape[-2:]
        if train:
            top, left, ch, cw = crop_params(h, w, rngs[k], spec.crop_scale, spec.crop_ratio)
            flips.append(bool(rngs[k].random() < spec.hflip))
        else:
            # Shorter side to resize_size, then the central S x S, expressed in input pixels.
            side = S * min(h, w) / spec.resize_size
            ch = cw = side
            top, left = (h - side) / 2.0, (w - side) / 2.0
        boxes.append([k, left, top, left + cw, top + ch])
    hmax = max(i.shape[-2] for i in images)
    wmax = max(i.shape[-1] for i in images)
    if all(i.shape[-2:] == (hmax, wmax) for i in images):
        batch = torch.stack(images).float()
    else:
        batch = images[0].new_zeros((len(images), 3, hmax, wmax), dtype=torch.float32)
        for k, img in enumerate(images):
            batch[k, :, : img.shape[-2], : img.shape[-1]] = img
    rois = torch.tensor(boxes, dtype=torch.float32, device=batch.device)
    out = roi_align(batch, rois, output_size=(S, S), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    if train:
        flip = torch.tensor(flips, dtype=torch.bool)
        if flip.any():
            idx = flip.nonzero().reshape(-1).to(out.device)
            out[idx] = out[idx].flip(-1)
    return out


def _rgb():
    from torchvision.io import ImageReadMode

    return ImageReadMode.RGB
