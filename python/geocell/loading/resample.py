"""Decoded images -> a normalized float batch, with the core's resampling kernel
(``geocell._core.resample_normalize``: antialiased bilinear, the filter of torchvision's
``antialias=True`` resize, computed in float).

The DALI loader's CPU pipeline decodes (the training crop straight from the JPEG) and hands the
uint8 images to ``BatchWriter``; on the CPU the kernel costs a fraction of DALI's own resize.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from geocell import _core


def centre_crop_boxes(heights, widths, resize_size: int, image_size: int) -> np.ndarray:
    """Boxes (left, top, width, height) in source pixels that make "shorter side resized to
    ``resize_size``, then the centre ``image_size`` square" one resampling step; the same
    sizes and offsets torchvision's ``resize`` + ``center_crop`` compute."""
    h = np.asarray(heights, dtype=np.int64)
    w = np.asarray(widths, dtype=np.int64)
    short, long_ = np.minimum(h, w), np.maximum(h, w)
    scaled_long = (resize_size * long_ / short).astype(np.int64)  # torchvision truncates
    new_h = np.where(h <= w, resize_size, scaled_long)
    new_w = np.where(h <= w, scaled_long, resize_size)
    top = np.round((new_h - image_size) / 2.0)
    left = np.round((new_w - image_size) / 2.0)
    sy, sx = h / new_h, w / new_w
    return np.stack([left * sx, top * sy, image_size * sx, image_size * sy], axis=1)


class BatchWriter:
    """Writes batches of (n, 3, S, S) float32 normalized with ``mean``/``std``.

    Output arrays are reused once nothing refers to them any more (their reference count says
    so: a live tensor or view keeps its array alive), which spares the page faults of a fresh
    38 MB allocation per batch of 64."""

    def __init__(self, image_size: int, mean, std, threads: int = 0, keep: int = 4):
        self.size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.threads = int(threads)
        self.keep = int(keep)
        self._buffers: list = []
        self._largest = 0

    def _array(self, n: int) -> np.ndarray:
        """An (n, 3, S, S) float32 array at a 64-byte boundary (the kernel then streams its
        stores past the caches), a view of a byte buffer this writer keeps."""
        per_image = 3 * self.size * self.size * 4
        raw = None
        for buf in self._buffers:
            # Every view (and tensor over a view) refers to the buffer itself, since numpy
            # points views at the array that owns the memory; unused, the references are the
            # list, the loop variable and getrefcount's argument.
            if len(buf) >= n * per_image + 64 and sys.getrefcount(buf) <= 3:
                raw = buf
                break
        if raw is None:
            # Sized for the largest batch so far: a short last batch must not take a slot.
            self._largest = max(self._largest, n)
            raw = np.empty(self._largest * per_image + 64, dtype=np.uint8)
            if len(self._buffers) < self.keep:
                self._buffers.append(raw)
        skip = -raw.ctypes.data % 64
        return raw[skip:skip + n * per_image].view(np.float32).reshape(n, 3, self.size, self.size)

    def __call__(self, images, boxes=None, flip=None) -> torch.Tensor:
        """``images``: HxWx3 uint8 arrays (or objects numpy can view as such); ``boxes``:
        (n, 4) (left, top, width, height) in source pixels, None for whole images; ``flip``:
        n booleans, mirror left-right."""
        if not all(type(im) is np.ndarray for im in images):
            images = [np.asarray(im) for im in images]
        n = len(images)
        if boxes is None:
            boxes = np.array([[0.0, 0.0, im.shape[1], im.shape[0]] for im in images]).reshape(n, 4)
        boxes = np.ascontiguousarray(boxes, dtype=np.float64)
        if flip is not None:
            flip = np.ascontiguousarray(np.asarray(flip).reshape(n), dtype=np.uint8)
        out = self._array(n)
        _core.resample_normalize(images, boxes, flip, out, self.mean, self.std, self.threads)
        return torch.from_numpy(out)
