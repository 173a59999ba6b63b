"""Self-contained checkpoints: weights, partitions, hierarchy, preprocessing, optional training state.

Everything is stored as tensors, numbers, strings, lists and dicts so that
``torch.load(path, weights_only=True)`` can read it; S2 cell ids (uint64) are stored viewed as int64.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch

FORMAT = "geocell-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    pass


def _geocell_version() -> str:
    try:
        from geocell import __version__

        return str(__version__)
    except Exception:
        return "unknown"


def partition_to_dict(partition, name: str) -> dict:
    cells = np.ascontiguousarray(np.asarray(partition.cells, dtype=np.uint64))
    return {
        "name": str(name),
        "cells": torch.from_numpy(cells.view(np.int64).copy()),
        "counts": torch.tensor(np.array(partition.counts, dtype=np.int64)),
        "centroids": torch.tensor(np.array(partition.centroids, dtype=np.float64).reshape(-1, 2)),
        "tau_min": int(partition.tau_min) if getattr(partition, "tau_min", None) is not None else -1,
        "tau_max": int(partition.tau_max) if getattr(partition, "tau_max", None) is not None else -1,
    }


def partition_from_dict(d: dict):
    from geocell import Partition

    cells = d["cells"].numpy().astype(np.int64, copy=False).view(np.uint64)
    tau_min = d.get("tau_min", -1)
    tau_max = d.get("tau_max", -1)
    return Partition.from_arrays(
        cells,
        d["counts"].numpy().astype(np.int64),
        d["centroids"].numpy().astype(np.float64),
        tau_min=None if tau_min is None or tau_min < 0 else int(tau_min),
        tau_max=None if tau_max is None or tau_max < 0 else int(tau_max),
    )


def to_safe(obj):
    """Turn numpy arrays/scalars and tuples into weights_only-loadable types."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu() if obj.device.type != "cpu" else obj.detach()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: to_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_safe(v) for v in obj]
    return obj


def clean_state_dict(state: dict) -> dict:
    """Weights keyed without DDP (module.) or torch.compile (_orig_mod.) prefixes, on the CPU."""
    from geocell.training.model import strip_wrapper_prefixes

    return {key: value.detach().cpu() for key, value in strip_wrapper_prefixes(state).items()}


def save_checkpoint(path, **fields) -> None:
    """Write a checkpoint atomically (temporary file in the same folder, then os.replace).

    Expected fields: arch, model (state_dict), num_classes, scene_names, partitions (list of dicts
    from partition_to_dict, or Partition objects with ``partition_names``), hierarchy, preprocess,
    train_state (optional).
    """
    path = os.fspath(path)
    names = fields.pop("partition_names", None)
    parts = fields.get("partitions", [])
    if parts and not isinstance(parts[0], dict):
        from geocell.infer.metrics import partition_names

        names = names or partition_names(len(parts))
        fields["partitions"] = [partition_to_dict(p, n) for p, n in zip(parts, names)]
    if "model" in fields:
        fields["model"] = clean_state_dict(fields["model"])
    if "hierarchy" in fields:
        fields["hierarchy"] = torch.tensor(np.array(fields["hierarchy"], dtype=np.int64))
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "geocell_version": _geocell_version()}
    payload.update(to_safe(fields))
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a geocell checkpoint with weights_only=True; clear errors for other files."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable geocell checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a geocell checkpoint (no 'format': '{FORMAT}' entry)")
    version = ckpt.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version} is not supported (this geocell reads {FORMAT_VERSION})"
        )
    return ckpt


def model_from_checkpoint(ckpt):
    """(GeoModel with the stored weights in eval mode, partitions: list[geocell.Partition], hierarchy ndarray)."""
    from geocell.training.model import GeoModel

    if isinstance(ckpt, (str, os.PathLike)):
        ckpt = load_checkpoint(ckpt)
    model = GeoModel(ckpt["arch"], ckpt["num_classes"], len(ckpt.get("scene_names") or []), pretrained="none")
    model.load_state_dict(ckpt["model"])
    model.eval()
    partitions = [partition_from_dict(d) for d in ckpt.get("partitions", [])]
    hierarchy = ckpt["hierarchy"].numpy() if "hierarchy" in ckpt else None
    return model, partitions, hierarchy
