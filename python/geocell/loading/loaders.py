"""The loader factory: :func:`make_loader` picks NVIDIA DALI when it is importable
(``backend="auto"``) and the torchvision DataLoader otherwise. What the loaders yield, and why a
resumed epoch is exact, is in :mod:`geocell.loading.base`; the backends are
:mod:`geocell.loading.dali_backend` and :mod:`geocell.loading.torch_backend`. This module sits
above all three, so the base never imports a backend."""

from __future__ import annotations

import logging
from typing import Optional

from geocell.loading.base import Loader
from geocell.loading.preprocess import Preprocess

log = logging.getLogger("geocell.loading.loaders")


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def make_loader(manifest, labels, *, train: bool, batch_size: int, preprocess: Optional[Preprocess] = None,
                backend: str = "auto", device="cpu", num_workers: int = 2, shard_id: int = 0,
                num_shards: int = 1, seed: int = 0, validate: bool = True,
                gpu_decode: Optional[bool] = None) -> Loader:
    """A loader over ``manifest`` rows with targets from ``labels`` (see :mod:`geocell.loading.base`).

    ``preprocess``: crop sizes, the training crop's ranges and flip, and the normalisation
    (default ``Preprocess()``: 224 px, ImageNet's mean and std).
    ``num_workers``: DALI threads or DataLoader worker processes. For a shard-backed manifest
    (``geocell.data.dataset.read_dataset(packed_folder)``) DALI reads the tar shards with its
    webdataset reader and the torch path reads the same samples through the shard index files.
    ``gpu_decode`` (torch backend only): decode JPEGs with nvJPEG via
    ``torchvision.io.decode_jpeg(device="cuda")``; default: when ``device`` is a GPU.
    """
    if backend not in ("auto", "dali", "torch"):
        raise ValueError(f"backend must be 'auto', 'dali' or 'torch', not {backend!r}")
    if backend == "auto":
        backend = "dali" if dali_available() else "torch"
    kwargs = dict(train=train, batch_size=batch_size, preprocess=preprocess if preprocess is not None else Preprocess(),
                  device=device, num_workers=num_workers, shard_id=shard_id, num_shards=num_shards,
                  seed=seed, validate=validate)
    if backend == "dali":
        import nvidia.dali  # noqa: F401  (asked for by name: a missing DALI says so here, not mid-epoch)
        from geocell.loading.dali_backend import DaliLoader

        loader = DaliLoader(manifest, labels, **kwargs)
    else:
        from geocell.loading.torch_backend import TorchLoader

        loader = TorchLoader(manifest, labels, gpu_decode=gpu_decode, **kwargs)
    log.info("data loader: %s backend (%s), %d samples, %d batches per epoch", loader.backend,
             getattr(loader, "detail", ""), len(loader.rows), len(loader))
    return loader
