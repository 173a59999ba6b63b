"""Geolocation metrics: the hierarchical combiner, great-circle accuracy at fixed radii, the table.
The evaluation loop that uses them is :mod:`geocell.infer.evaluate`.

The predicted coordinate of a class is its cell's mean training location (Partition.centroids).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from geocell.cells import great_circle_km, latlng_to_cell

THRESHOLDS_KM = (1, 25, 200, 750, 2500)
BASELINE_ROW = "most frequent cell"
HIERARCHY_ROW = "hierarchy"
HYBRID_ROW = "hybrid (retrieval)"  # the hierarchy's cells mixed with the retrieved training photos
# The blocks an evaluation's intervals resample: S2 level-3 cells (about 1,000 km across), the
# scale of the held-out split's largest blocks. Photos of one region share their geography and
# are not independent draws; resampling single images would make the intervals too narrow.
INTERVAL_BLOCK_LEVEL = 3


def hierarchical_log_probs(log_probs: Sequence[torch.Tensor], hierarchy, weights=None) -> torch.Tensor:
    """The one hierarchical combiner: sum over partitionings p of w_p * log p_p(hierarchy[r, p])
    for each fine cell r (w_p = 1 unless ``weights`` are given, e.g. a fitted
    :class:`~geocell.model.records.Calibration`); -1 (no containing cell) adds 0. Not
    renormalised."""
    h = torch.as_tensor(np.asarray(hierarchy), dtype=torch.int64, device=log_probs[-1].device)
    out = None
    for p in range(h.shape[1]):
        col = h[:, p]
        gathered = log_probs[p][:, col.clamp(min=0)]
        term = torch.where(col >= 0, gathered, torch.zeros_like(gathered))
        if weights is not None:
            # A head weighted 0 contributes nothing, also where its probability underflowed (0 * -inf).
            w = weights[p]
            fixed_zero = not (torch.is_tensor(w) and w.requires_grad) and float(w) == 0.0
            term = torch.zeros_like(term) if fixed_zero else term * w
        out = term if out is None else out + term
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


def location_blocks(latlng, level: int = INTERVAL_BLOCK_LEVEL) -> np.ndarray:
    """The S2 cell at ``level`` of each (lat, lng): the unit a block bootstrap resamples."""
    latlng = np.asarray(latlng, dtype=np.float64).reshape(-1, 2)
    return latlng_to_cell(latlng[:, 0], latlng[:, 1], level)


class _Resampler:
    """Bootstrap replicates of n images: n images drawn with replacement, or, with ``blocks``
    (one label per image), as many blocks drawn with replacement as there are, each with all
    its images (the cluster bootstrap)."""

    def __init__(self, n: int, blocks=None, seed: int = 0):
        self.n, self.rng = n, np.random.default_rng(seed)
        self.members = None
        if blocks is not None:
            blocks = np.asarray(blocks).reshape(-1)
            if len(blocks) != n:
                raise ValueError(f"blocks: one label per image needed, got {len(blocks)} for {n} images")
            _, inverse, counts = np.unique(blocks, return_inverse=True, return_counts=True)
            self.members = np.split(np.argsort(inverse.reshape(-1), kind="stable"), np.cumsum(counts)[:-1])

    @property
    def units(self) -> int:
        return self.n if self.members is None else len(self.members)

    def draw(self) -> np.ndarray:
        if self.members is None:
            return self.rng.integers(0, self.n, self.n)
        return np.concatenate([self.members[j] for j in self.rng.integers(0, len(self.members), len(self.members))])


def _percentiles(draws, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(np.asarray(draws, dtype=np.float64), [tail, 100.0 - tail])
    return float(lo), float(hi)


def bootstrap_interval(errors_by_seed, *, blocks=None, replicates: int = 2000, level: float = 0.95,
                       seed: int = 0) -> dict:
    """Mean and percentile-bootstrap interval of each accuracy and of the median error over
    training seeds and test images: ``errors_by_seed`` is (seeds, images), every seed's errors
    on the same images in the same order. Each replicate draws seeds and images with replacement
    (the same images for every drawn seed: the pairing is kept) and averages over the drawn
    seeds; with ``blocks`` (one label per image, e.g. :func:`location_blocks`) it draws blocks of
    images instead. Returns {"acc_25km": (mean, low, high), ..., "median_km": (...), "seeds": S,
    "n": N, "units": images or blocks}."""
    e = np.asarray(errors_by_seed, dtype=np.float64)
    if e.ndim != 2 or e.size == 0:
        raise ValueError(f"errors_by_seed must be (seeds, images) with both > 0, got shape {e.shape}")
    s, n = e.shape
    images = _Resampler(n, blocks, seed)
    rng = images.rng
    stats = {f"acc_{t}km": lambda x, t=t: (x <= t).mean(axis=-1) for t in THRESHOLDS_KM}
    stats["median_km"] = lambda x: np.median(x, axis=-1)
    out = {name: [float(f(e).mean())] for name, f in stats.items()}
    draws = {name: np.empty(replicates) for name in stats}
    for b in range(replicates):
        sample = e[rng.integers(0, s, s)][:, images.draw()]
        for name, f in stats.items():
            draws[name][b] = f(sample).mean()
    for name in stats:
        out[name] = (out[name][0], *_percentiles(draws[name], level))
    out["seeds"], out["n"], out["units"] = s, n, images.units
    return out


def best_row_difference(errors_km: dict, row: str, others: Sequence[str], *, blocks=None,
                        radii=(200, 750, 2500), replicates: int = 2000, level: float = 0.95,
                        seed: int = 0) -> dict:
    """{radius: (d, low, high)}: d = the accuracy of ``row`` minus the best accuracy among
    ``others`` (all on the same images), with its paired bootstrap interval (``blocks``: see
    :func:`bootstrap_interval`); the best of the others is chosen again in each replicate."""
    e = {name: np.asarray(errors_km[name], dtype=np.float64) for name in (row, *others)}
    n = len(e[row])
    images = _Resampler(n, blocks, seed)

    def diff(t, idx):
        return (e[row][idx] <= t).mean() - max((e[o][idx] <= t).mean() for o in others)

    everyone = np.arange(n)
    draws = {t: [] for t in radii}
    for _ in range(replicates):
        idx = images.draw()
        for t in radii:
            draws[t].append(diff(t, idx))
    return {t: (float(diff(t, everyone)), *_percentiles(draws[t], level)) for t in radii}


def bootstrap_share(flags, *, blocks=None, replicates: int = 2000, level: float = 0.95,
                    seed: int = 0) -> tuple[float, float, float]:
    """(share of true ``flags``, low, high): the percentile-bootstrap interval of a share (e.g.
    of images whose credible region held the truth); ``blocks``: see :func:`bootstrap_interval`."""
    f = np.asarray(flags, dtype=np.float64).reshape(-1)
    images = _Resampler(len(f), blocks, seed)
    return (float(f.mean()), *_percentiles([f[images.draw()].mean() for _ in range(replicates)], level))


def format_interval_table(rows: dict) -> str:
    """Plain-text table of :func:`bootstrap_interval` rows: mean [low, high] per column."""
    names = list(rows)
    cols = [(f"acc_{t}km", f"{t} km") for t in (25, 200, 750, 2500)]
    width = max([len("prediction")] + [len(n) for n in names])
    head = f"{'prediction':<{width}}" + "".join(f"{c:>22}" for _, c in cols) + f"{'median km':>24}"
    lines = [head, "-" * len(head)]
    for name in names:
        r = rows[name]
        cells = "".join(f"{f'{100 * r[k][0]:.1f}% [{100 * r[k][1]:.1f}, {100 * r[k][2]:.1f}]':>22}" for k, _ in cols)
        m = r["median_km"]
        lines.append(f"{name:<{width}}{cells}{f'{m[0]:.0f} [{m[1]:.0f}, {m[2]:.0f}]':>24}")
    return "\n".join(lines)


def accuracy_table(pred_latlng, true_latlng) -> dict:
    """{"acc_1km": fraction within 1 km, ..., "acc_2500km": ..., "median_km": ..., "n": count}."""
    return accuracy_from_errors(great_circle_errors_km(pred_latlng, true_latlng))


def mean_accuracy(row: dict) -> float:
    """The selection score of a row of accuracy_table: its mean accuracy over the five radii."""
    return float(np.mean([row[f"acc_{t}km"] for t in THRESHOLDS_KM]))


def format_table(rows: dict) -> str:
    """Plain-text table: one line per row name, accuracies in percent, median error in km."""
    names = list(rows)
    width = max([len("prediction")] + [len(n) for n in names])
    country = any("acc_country" in r for r in rows.values())
    head = (f"{'prediction':<{width}}" + "".join(f"{str(t) + ' km':>9}" for t in THRESHOLDS_KM)
            + f"{'median km':>11}" + (f"{'country':>9}" if country else ""))
    lines = [head, "-" * len(head)]
    for name in names:
        r = rows[name]
        accs = "".join(f"{100 * r[f'acc_{t}km']:>8.1f}%" for t in THRESHOLDS_KM)
        tail = f"{100 * r.get('acc_country', float('nan')):>8.1f}%" if country else ""
        lines.append(f"{name:<{width}}{accs}{r['median_km']:>11.0f}{tail}")
    return "\n".join(lines)


def gather_concat(array: np.ndarray) -> np.ndarray:
    # Evaluation shards differ in length; all_gather_object handles that (both gloo and NCCL).
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return array
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, array)
    return np.concatenate(parts, axis=0)


def reduce_counts(*counts: int) -> tuple:
    """Integer counts summed over the ranks (as they are without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return tuple(int(c) for c in counts)
    t = torch.tensor(counts, dtype=torch.int64)
    t = t.cuda() if dist.get_backend() == "nccl" else t
    dist.all_reduce(t)
    return tuple(int(v) for v in t.cpu())


def baseline_latlng(finest_partition, n: int) -> np.ndarray:
    """The baseline's prediction for n images: the finest partition's most frequent training
    cell's centroid, always."""
    top = int(np.argmax(np.asarray(finest_partition.counts)))
    return np.repeat(np.asarray(finest_partition.centroids, dtype=np.float64)[top][None], n, axis=0)


def baseline_row(finest_partition, true_latlng) -> dict:
    """Always predict the finest partition's most frequent training cell."""
    true_latlng = np.asarray(true_latlng, dtype=np.float64).reshape(-1, 2)
    return accuracy_table(baseline_latlng(finest_partition, len(true_latlng)), true_latlng)


def expected_calibration_error(confidence, correct, bins: int = 15) -> float:
    """The usual ECE: |accuracy - mean confidence| per equal-width confidence bin, weighted by
    the bin's share of images."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if confidence.size == 0:
        return float("nan")
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - confidence[sel].mean())
    return float(ece)


def select_score(rows: dict) -> float:
    """Model selection score: mean accuracy over the five radii of the final prediction row."""
    return mean_accuracy(rows.get(HIERARCHY_ROW) or next(v for k, v in rows.items() if k != BASELINE_ROW))
