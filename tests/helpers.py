"""Shared test helpers: a tiny random-init checkpoint, synthetic photo locations and JPEGs, and a
CLI runner. Import them with ``from helpers import ...`` (``tests/conftest.py`` puts this folder
on ``sys.path``); the fixtures built on them are in ``conftest.py``. Needs torch and torchvision,
so test files that use it skip first when they are missing."""

from __future__ import annotations

import io
import os
from contextlib import redirect_stderr, redirect_stdout

import numpy as np

import geocell

IMAGE_SIZE = 32
PREPROCESS = {"image_size": IMAGE_SIZE, "resize_size": 36,
              "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
TINY_SCENES = ["indoor", "natural", "urban"]


def synthetic_locations(n: int = 400, seed: int = 0):
    """Clustered points (Europe, North America, Japan) plus scattered ones, like photo locations."""
    rng = np.random.default_rng(seed)
    k = n // 4
    lat = np.concatenate([rng.normal(48, 5, k), rng.normal(40, 4, k), rng.normal(36, 2, k),
                          rng.uniform(-50, 65, n - 3 * k)])
    lng = np.concatenate([rng.normal(8, 8, k), rng.normal(-95, 12, k), rng.normal(139, 2, k),
                          rng.uniform(-180, 180, n - 3 * k)])
    return np.clip(lat, -89, 89), (lng + 180) % 360 - 180


def tiny_partitions(seed: int = 0):
    lat, lng = synthetic_locations(seed=seed)
    parts = geocell.partitions(lat, lng, [(10, 200), (5, 50)])
    return parts, geocell.hierarchy(parts)


def make_tiny_checkpoint(path, seed: int = 0, scene_names=TINY_SCENES) -> str:
    """A random-init resnet18 with two tiny partitionings and a scene head over ``scene_names``
    (none when it is empty)."""
    import torch

    from geocell.model.checkpoint import save_checkpoint
    from geocell.model.network import GeoModel

    parts, hier = tiny_partitions(seed)
    torch.manual_seed(seed)
    model = GeoModel("resnet18", [len(p) for p in parts], len(scene_names))
    save_checkpoint(path, arch="resnet18", model=model.state_dict(),
                    num_classes=[len(p) for p in parts], scene_names=list(scene_names),
                    partitions=parts, partition_names=["coarse", "fine"], hierarchy=hier,
                    preprocess=PREPROCESS)
    return os.fspath(path)


def write_jpegs(folder, n: int, seed: int = 0) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(n):
        path = os.path.join(folder, f"img_{i}.jpg")
        Image.fromarray(rng.integers(0, 256, (40 + 4 * i, 48, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def run_cli(argv, main=None):
    """Runs a command's ``main(argv)`` (``geocell predict``'s by default) capturing its output:
    (exit code, stdout, stderr)."""
    if main is None:
        from geocell.commands.predict import main
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()
