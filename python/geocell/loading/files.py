"""Image files for inference: the evaluation transform of a checkpoint's preprocessing and a
loader that streams files in order, reporting the unreadable ones instead of failing.

Used by ``Geolocator``, ``geocell evaluate`` and the retrieval index builder alike, so that a
photo becomes the same tensor wherever it is located."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from geocell.data.images import decode_rgb
from geocell.loading.preprocess import Preprocess

TTA_MODES = ("none", "five")


def make_transform(preprocess, tta: str = "none"):
    """PIL image -> the network's input: :class:`~geocell.loading.preprocess.Preprocess`'s
    evaluation crop (tta="none", a (3, S, S) tensor) or its five crops (tta="five", (5, 3, S, S)),
    normalized: the same steps as the evaluation loaders'."""
    if tta not in TTA_MODES:
        raise ValueError(f"unknown tta {tta!r}; choose one of {', '.join(TTA_MODES)}")
    spec = preprocess if isinstance(preprocess, Preprocess) else Preprocess.from_dict(preprocess)
    crop = spec.eval_crop if tta == "none" else spec.five_crops

    def transform(pil_image):
        chw = torch.from_numpy(np.asarray(pil_image.convert("RGB")).copy()).permute(2, 0, 1).contiguous()
        return spec.normalize(crop(chw))

    return transform


class ImageFiles(torch.utils.data.Dataset):
    """Images by path; an unreadable file yields its error instead of failing the batch."""

    def __init__(self, paths: Sequence[str], transform):
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return self.transform(decode_rgb(self.paths[i])), i, None
        except Exception as exc:  # a corrupt/missing/unsupported file: report, don't abort
            return None, i, f"{type(exc).__name__}: {exc}"


def _collate(items):
    good = [(x, i) for x, i, err in items if err is None]
    failed = [(i, err) for _, i, err in items if err is not None]
    images = torch.stack([x for x, _ in good]) if good else None
    return images, [i for _, i in good], failed


def stream_files(paths: Sequence[str], transform, *, batch_size: int = 16, num_workers: int = 2
                 ) -> Iterator[tuple[torch.Tensor | None, list[int], list[tuple[int, str]]]]:
    """Batches (images, indices into paths, [(index, error), ...]) in the order of ``paths``."""
    if len(paths) <= batch_size:
        num_workers = 0  # one batch: starting worker processes would cost more than decoding
    loader = torch.utils.data.DataLoader(
        ImageFiles(paths, transform), batch_size=batch_size, shuffle=False,
        num_workers=num_workers, collate_fn=_collate,
        persistent_workers=False, pin_memory=torch.cuda.is_available())
    yield from loader
