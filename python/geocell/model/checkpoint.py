"""Self-contained checkpoints: weights, partitions, hierarchy, preprocessing, optional training state.

Everything is stored as tensors, numbers, strings, lists and dicts so that
``torch.load(path, weights_only=True)`` can read it; S2 cell ids (uint64) are stored viewed as int64.

``save_checkpoint`` adds ``sha256``, a digest of everything else in the file (``payload_digest``),
and ``load_checkpoint`` verifies it (a checkpoint written before digests existed loads with a
warning) and then checks every table (``validate_checkpoint``), so a damaged or inconsistent file
is refused with a message naming the file and what is wrong, instead of predicting NaN.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket

import numpy as np
import torch

from geocell._internal.atomic import atomic_write
from geocell.model.records import Calibration, partition_names
from geocell.loading.preprocess import Preprocess

FORMAT = "geocell-checkpoint"
FORMAT_VERSION = 1
DIGEST_KEY = "sha256"

log = logging.getLogger("geocell.model.checkpoint")


class CheckpointError(RuntimeError):
    pass


class InvalidCheckpoint(CheckpointError, ValueError):
    """A readable geocell checkpoint whose content is damaged or inconsistent."""


def _geocell_version() -> str:
    try:
        from geocell._version import __version__

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
    from geocell.partition import Partition

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
    from geocell.model.network import strip_wrapper_prefixes

    return {key: value.detach().cpu() for key, value in strip_wrapper_prefixes(state).items()}


def save_checkpoint(path, **fields) -> None:
    """Write a checkpoint atomically (``atomic_write``: a full disk is a ``DiskFull`` naming the
    file, and the previous checkpoint stays).

    Expected fields: arch, model (state_dict), num_classes, scene_names, partitions (list of dicts
    from partition_to_dict, or Partition objects with ``partition_names``), hierarchy, preprocess,
    train_state (optional).
    """
    path = os.fspath(path)
    names = fields.pop("partition_names", None)
    parts = fields.get("partitions", [])
    if parts and not isinstance(parts[0], dict):
        names = names or partition_names(len(parts))
        fields["partitions"] = [partition_to_dict(p, n) for p, n in zip(parts, names)]
    if "model" in fields:
        fields["model"] = clean_state_dict(fields["model"])
    if "hierarchy" in fields:
        h = fields["hierarchy"]
        fields["hierarchy"] = (h.detach().cpu() if isinstance(h, torch.Tensor)
                               else torch.from_numpy(np.asarray(h))).to(torch.int64).clone()
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "geocell_version": _geocell_version()}
    payload.update(to_safe(fields))
    payload[DIGEST_KEY] = payload_digest(payload)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_orphan_temporaries(folder)
    with atomic_write(path, "wb", prefix=f"{_TMP_PREFIX}{_host()}-{os.getpid()}-", suffix=".pt") as f:
        torch.save(payload, f)


# Temporary files of save_checkpoint: .tmp-<host>-<pid>-<random>.pt. A writer killed before its
# os.replace leaves one; the next save in the folder removes those whose process is gone.
_TMP_PREFIX = ".tmp-"
_TMP_NAME = re.compile(r"\.tmp-(.+)-(\d+)-[^-]+\.pt")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:64] or "host"


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_orphan_temporaries(folder) -> list:
    """Removes temporary checkpoint files in ``folder`` left by writers of this host that are no
    longer running (another host's files are left alone: its processes cannot be seen from here).
    Returns the removed paths."""
    removed = []
    host = _host()
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = _TMP_NAME.fullmatch(name)
        if not m or m.group(1) != host or int(m.group(2)) == os.getpid():
            continue
        if not _process_exists(int(m.group(2))):
            try:
                os.unlink(os.path.join(folder, name))
                removed.append(os.path.join(folder, name))
            except OSError:
                pass
    return removed


def _feed(h, obj) -> None:
    """Feeds ``obj`` to hash ``h`` in a canonical form: the same content gives the same bytes
    however the file's zip records are laid out."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for key in sorted(obj, key=lambda k: (type(k).__name__, repr(k))):
            _feed(h, key)
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}".encode())
        for v in obj:
            _feed(h, v)
    elif isinstance(obj, (str, bytes)):
        data = obj.encode("utf-8", "surrogatepass") if isinstance(obj, str) else obj
        h.update(f"{type(obj).__name__}{len(data)}:".encode())
        h.update(data)
    else:  # numbers, bool, None, dtypes: repr is exact and stable
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def model_fingerprint(state_dict: dict, arch: str, preprocess: dict | None) -> str:
    """sha256 of what decides the embeddings: the weights, the architecture and the preprocessing."""
    h = hashlib.sha256()
    _feed(h, {"arch": str(arch), "model": clean_state_dict(state_dict),
              "preprocess": json.dumps(preprocess or {}, sort_keys=True)})
    return h.hexdigest()


def checkpoint_fingerprint(ckpt: dict) -> str:
    return model_fingerprint(ckpt["model"], ckpt["arch"], ckpt.get("preprocess"))


def payload_digest(payload: dict) -> str:
    """sha256 (hex) of a checkpoint's content without its digest entry."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in payload.items() if k != DIGEST_KEY})
    return h.hexdigest()


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a geocell checkpoint with weights_only=True; clear errors for other files, and
    ``InvalidCheckpoint`` (a ValueError) for a damaged or inconsistent one."""
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
    stored = ckpt.pop(DIGEST_KEY, None)
    if stored is None:
        log.warning("%s: no checksum (written by geocell %s, before checkpoints carried one); "
                    "its content is checked but cannot be verified", path, ckpt.get("geocell_version"))
    elif stored != payload_digest(ckpt):
        raise InvalidCheckpoint(f"{path}: checksum mismatch: the file is damaged (its content is "
                                "not what was written)")
    validate_checkpoint(ckpt, path)
    return ckpt


def validate_checkpoint(ckpt: dict, where: str = "checkpoint") -> None:
    """Checks every table of a loaded checkpoint; raises InvalidCheckpoint naming ``where`` and
    the first problem: partitions (valid, ascending, disjoint S2 cells; counts >= 0; finite
    centroids in range), hierarchy (shape, indices in range), head sizes against the partitions
    and scene names, the preprocessing and the calibration."""
    def bad(msg):
        raise InvalidCheckpoint(f"{where}: {msg}")

    if not isinstance(ckpt.get("arch"), str) or not ckpt["arch"]:
        bad(f"'arch' must be a model name, got {ckpt.get('arch')!r}")
    state = ckpt.get("model")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        bad("'model' must be a state dict of tensors")
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad(f"model weight {key} holds NaN or infinite values")
    parts = ckpt.get("partitions", [])
    if not isinstance(parts, list) or not all(isinstance(p, dict) for p in parts):
        bad("'partitions' must be a list of partition tables")
    sizes = []
    for k, d in enumerate(parts):
        name = f"partitions[{k}] ({d.get('name', '?')})"
        try:
            cells, counts, centroids = d["cells"], d["counts"], d["centroids"]
            if not all(isinstance(t, torch.Tensor) for t in (cells, counts, centroids)):
                raise ValueError("cells, counts and centroids must be tensors")
            if cells.dtype != torch.int64 or cells.ndim != 1:
                raise ValueError(f"cells must be a 1-D int64 tensor, got {cells.dtype} {tuple(cells.shape)}")
            partition_from_dict(d)  # the partition rule: valid, ascending, disjoint cells ...
        except (KeyError, TypeError, ValueError) as exc:
            bad(f"{name}: {type(exc).__name__ + ': ' if isinstance(exc, KeyError) else ''}{exc}")
        sizes.append(int(cells.shape[0]))
    num_classes = ckpt.get("num_classes")
    if not isinstance(num_classes, list) or [_int_or_none(c) for c in num_classes] != sizes:
        bad(f"num_classes {num_classes!r} does not match the partition sizes {sizes}")
    heads = sorted(int(m.group(1)) for key in state
                   for m in [re.fullmatch(r"geo_heads\.(\d+)\.weight", key)] if m)
    if heads != list(range(len(sizes))):
        bad(f"the model has {len(heads)} geo heads for {len(sizes)} partitionings")
    for k, n in enumerate(sizes):
        for part in ("weight", "bias"):
            t = state.get(f"geo_heads.{k}.{part}")
            if t is None or t.ndim < 1 or t.shape[0] != n:
                bad(f"geo head {k} {part} has {None if t is None else tuple(t.shape)}; its "
                    f"partitioning has {n} cells")
    scene_names = ckpt.get("scene_names") or []
    if not isinstance(scene_names, list) or not all(isinstance(n, str) for n in scene_names):
        bad(f"'scene_names' must be a list of names, got {scene_names!r}")
    scene_w = state.get("scene_head.weight")
    scene_n = 0 if scene_w is None else int(scene_w.shape[0])
    if scene_n != len(scene_names):
        bad(f"the scene head has {scene_n} outputs for {len(scene_names)} scene names")
    if parts:
        h = ckpt.get("hierarchy")
        if not isinstance(h, torch.Tensor) or h.dtype != torch.int64:
            bad("'hierarchy' must be an int64 tensor")
        if tuple(h.shape) != (sizes[-1], len(sizes)):
            bad(f"hierarchy has shape {tuple(h.shape)}, expected ({sizes[-1]}, {len(sizes)}): "
                "one row per fine cell, one column per partitioning")
        for k, n in enumerate(sizes):
            col = h[:, k]
            if col.numel() and (int(col.min()) < -1 or int(col.max()) >= n):
                bad(f"hierarchy column {k} holds indices outside -1..{n - 1}")
        if h.numel() and not torch.equal(h[:, -1], torch.arange(sizes[-1])):
            bad("hierarchy's last column must number the fine cells 0, 1, 2, ...")
    try:
        Preprocess.from_dict(ckpt.get("preprocess"))
    except (TypeError, ValueError) as exc:
        bad(f"preprocess: {exc}")
    if ckpt.get("calibration") is not None:
        try:
            Calibration.from_dict(ckpt["calibration"], len(ckpt.get("partitions") or []))
        except (KeyError, TypeError, ValueError) as exc:
            bad(f"calibration: {exc}")


def _int_or_none(v):
    return int(v) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else None


def model_from_checkpoint(ckpt):
    """(GeoModel with the stored weights in eval mode, partitions: list[geocell.Partition], hierarchy ndarray)."""
    from geocell.model.network import GeoModel

    if isinstance(ckpt, (str, os.PathLike)):
        ckpt = load_checkpoint(ckpt)
    model = GeoModel(ckpt["arch"], ckpt["num_classes"], len(ckpt.get("scene_names") or []), pretrained="none")
    model.load_state_dict(ckpt["model"])
    model.eval()
    partitions = [partition_from_dict(d) for d in ckpt.get("partitions", [])]
    hierarchy = ckpt["hierarchy"].numpy() if "hierarchy" in ckpt else None
    return model, partitions, hierarchy
