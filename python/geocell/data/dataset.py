"""Opening a dataset by its path: a manifest file (:mod:`geocell.data.manifest`) or a folder
written by ``geocell data pack`` (:mod:`geocell.data.shards`).

This module sits above both so that neither imports the other's reader: shards are written
with a manifest inside, the manifest module knows nothing of shards."""

from __future__ import annotations

from pathlib import Path

from geocell.data.manifest import Manifest, ManifestError, read_manifest
from geocell.data.shards import is_shard_dir, read_shards


def read_dataset(path, image_root=None, check_files: bool = True) -> Manifest:
    """The rows of a manifest file (see :func:`~geocell.data.manifest.read_manifest` for
    ``image_root`` and ``check_files``) or of a packed folder (a shard-backed manifest:
    ``manifest.shards`` is the folder, ``manifest.ids`` each row's sample id)."""
    path = Path(path)
    if path.is_dir():
        if is_shard_dir(path):
            return read_shards(path)
        raise ManifestError(f"{path} is a folder but not a packed dataset (no shards.json)")
    return read_manifest(path, image_root=image_root, check_files=check_files)
