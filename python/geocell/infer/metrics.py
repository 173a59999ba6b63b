"""Geolocation metrics: hierarchical prediction, great-circle accuracy at fixed radii, evaluation loop.

The predicted coordinate of a class is its cell's mean training location (Partition.centroids).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from geocell.cells import great_circle_km

THRESHOLDS_KM = (1, 25, 200, 750, 2500)
BASELINE_ROW = "most frequent cell"
HIERARCHY_ROW = "hierarchy"


def partition_names(n: int) -> list[str]:
    """Default row names for n partitionings, coarsest first."""
    return {1: ["fine"], 2: ["coarse", "fine"], 3: ["coarse", "middle", "fine"]}.get(
        n, [f"p{i}" for i in range(n)]
    )


def hierarchical_log_probs(log_probs: Sequence[torch.Tensor], hierarchy) -> torch.Tensor:
    """log p_fine(r) + sum over coarser partitions p of log p_p(hierarchy[r, p]); -1 adds 0."""
    h = torch.as_tensor(np.asarray(hierarchy), dtype=torch.int64, device=log_probs[-1].device)
    out = log_probs[-1].clone()
    for p in range(h.shape[1] - 1):
        col = h[:, p]
        gathered = log_probs[p][:, col.clamp(min=0)]
        out += torch.where(col >= 0, gathered, torch.zeros_like(gathered))
    return out


def hierarchical_probs(probs, hierarchy):
    """The product of :func:`hierarchical_log_probs` for probabilities: list of (B, C_p) tensors or
    arrays (the last is the finest) -> (B, n_fine) of the same kind."""
    as_numpy = isinstance(probs[-1], np.ndarray)
    logs = [torch.log(torch.as_tensor(np.asarray(p) if as_numpy else p)) for p in probs]
    out = torch.exp(hierarchical_log_probs(logs, hierarchy))
    return out.numpy() if as_numpy else out


def great_circle_errors_km(pred_latlng, true_latlng) -> np.ndarray:
    pred = np.asarray(pred_latlng, dtype=np.float64).reshape(-1, 2)
    true = np.asarray(true_latlng, dtype=np.float64).reshape(-1, 2)
    return great_circle_km(pred[:, 0], pred[:, 1], true[:, 0], true[:, 1])


def accuracy_from_errors(errors_km) -> dict:
    errors = np.asarray(errors_km, dtype=np.float64)
    row = {f"acc_{t}km": float((errors <= t).mean()) if errors.size else float("nan") for t in THRESHOLDS_KM}
    row["median_km"] = float(np.median(errors)) if errors.size else float("nan")
    row["n"] = int(errors.size)
    return row


def accuracy_table(pred_latlng, true_latlng) -> dict:
    """{"acc_1km": fraction within 1 km, ..., "acc_2500km": ..., "median_km": ..., "n": count}."""
    return accuracy_from_errors(great_circle_errors_km(pred_latlng, true_latlng))


def format_table(rows: dict) -> str:
    """Plain-text table: one line per row name, accuracies in percent, median error in km."""
    names = list(rows)
    width = max([len("prediction")] + [len(n) for n in names])
    head = f"{'prediction':<{width}}" + "".join(f"{str(t) + ' km':>9}" for t in THRESHOLDS_KM) + f"{'median km':>11}"
    lines = [head, "-" * len(head)]
    for name in names:
        r = rows[name]
        accs = "".join(f"{100 * r[f'acc_{t}km']:>8.1f}%" for t in THRESHOLDS_KM)
        lines.append(f"{name:<{width}}{accs}{r['median_km']:>11.0f}")
    return "\n".join(lines)


def _gather_concat(array: np.ndarray) -> np.ndarray:
    # Evaluation shards differ in length; all_gather_object handles that (both gloo and NCCL).
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return array
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, array)
    return np.concatenate(parts, axis=0)


@torch.no_grad()
def evaluate_full(model, loader, partitions, hierarchy, device, amp=False, names=None, channels_last=False):
    """Evaluation pass. Returns (rows, extras): rows as in :func:`evaluate`, extras with the scene
    accuracy ("scene_acc", if the model has a scene head and the data scene labels) and "n".
    Under torch.distributed every rank evaluates its shard and all ranks get the full result."""
    device = torch.device(device)
    names = list(names) if names is not None else partition_names(len(partitions))
    centroids = [torch.tensor(np.array(p.centroids, dtype=np.float64), device=device) for p in partitions]
    amp_dtype = amp if isinstance(amp, torch.dtype) else (torch.bfloat16 if amp else None)
    was_training = model.training
    model.eval()
    errors = {n: [] for n in names}
    if len(partitions) > 1:
        errors[HIERARCHY_ROW] = []
    truths = []
    scene_hits = scene_total = 0
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        true = targets["latlng"].to(device=device, dtype=torch.float64)
        ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
        with ctx:
            geo_logits, scene_logits = model(images)
        true_np = true.cpu().numpy()
        log_probs = [torch.log_softmax(g.float(), dim=1) for g in geo_logits]
        for name, lp, cents in zip(names, log_probs, centroids):
            pred = cents[lp.argmax(dim=1)]
            errors[name].append(great_circle_errors_km(pred.cpu().numpy(), true_np))
        if len(partitions) > 1:
            pred = centroids[-1][hierarchical_log_probs(log_probs, hierarchy).argmax(dim=1)]
            errors[HIERARCHY_ROW].append(great_circle_errors_km(pred.cpu().numpy(), true_np))
        truths.append(true_np)
        if scene_logits is not None and "scene" in targets:
            scene = targets["scene"].to(device)
            mask = scene >= 0
            scene_hits += int((scene_logits.argmax(dim=1)[mask] == scene[mask]).sum())
            scene_total += int(mask.sum())
    if was_training:
        model.train()

    rows = {}
    for name, chunks in errors.items():
        rows[name] = accuracy_from_errors(_gather_concat(np.concatenate(chunks) if chunks else np.zeros(0)))
    true_all = _gather_concat(np.concatenate(truths) if truths else np.zeros((0, 2)))
    rows[BASELINE_ROW] = baseline_row(partitions[-1], true_all)
    extras = {"n": int(true_all.shape[0])}
    if dist.is_available() and dist.is_initialized():
        counts = torch.tensor([scene_hits, scene_total], dtype=torch.int64)
        counts = counts.to(device) if dist.get_backend() == "nccl" else counts
        dist.all_reduce(counts)
        scene_hits, scene_total = (int(v) for v in counts.cpu())
    if scene_total:
        extras["scene_acc"] = scene_hits / scene_total
    return rows, extras


def baseline_row(finest_partition, true_latlng) -> dict:
    """Always predict the finest partition's most frequent training cell."""
    true_latlng = np.asarray(true_latlng, dtype=np.float64).reshape(-1, 2)
    top = int(np.argmax(np.asarray(finest_partition.counts)))
    pred = np.repeat(np.asarray(finest_partition.centroids, dtype=np.float64)[top][None], len(true_latlng), axis=0)
    return accuracy_table(pred, true_latlng)


def evaluate(model, loader, partitions, hierarchy, device, amp=False) -> dict:
    """Geolocation accuracy of ``model`` over ``loader``.

    Returns {row name: {"acc_1km", "acc_25km", "acc_200km", "acc_750km", "acc_2500km", "median_km", "n"}}
    with one row per partitioning (coarse, middle, fine for three), "hierarchy" (more than one
    partitioning) and "most frequent cell" (the baseline). ``amp``: False, True (bf16) or a dtype.
    """
    rows, _ = evaluate_full(model, loader, partitions, hierarchy, device, amp)
    return rows
