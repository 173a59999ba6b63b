"""Validation and test splits of places the model has not seen.

Photo locations cluster: a random split of them puts most validation photos a few km from a
training photo, and measures memorisation. ``held_out_split`` instead draws whole S2 blocks
(level ``block_level``; level 3 cells are about 1,000 km across) into the validation and test
splits, then drops every validation or test location that lies within ``buffer_km`` of any
training location (the blocks' borders). The guarantee, checked by the tests on random sets with
duplicates, poles and the antimeridian: no val/test location is within ``buffer_km`` of a
training location. Dropped rows get the split name ``""`` (used by nothing).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from geocell._internal.geometry import unit_vectors
from geocell.cells import EARTH_RADIUS_KM, cell_to_parent, latlng_to_cell


# A held-out block may hold at most this share of what its split draws at its level, while smaller
# blocks remain: photos crowd into a few cities, and without it one dense block drawn first can
# make up a third of a test split, whose figures then describe that one region (on the Earth
# dataset's pool the test split was as informative as 6 equal blocks; with it, 36 to 40).
MAX_BLOCK_SHARE = 0.1

# The names a manifest's split column may give its validation rows.
VAL_SPLITS = ("val", "valid", "validation")


def validation_rows(manifest) -> np.ndarray:
    """(N,) bool: the manifest's rows in a validation split (none without a split column)."""
    if manifest.split is None:
        return np.zeros(len(manifest), dtype=bool)
    return np.isin(manifest.split, VAL_SPLITS)


def nearest_km(query_unit, ref_unit, chunk: int = 1024, ref_chunk: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """For each query unit vector (N, 3), (index of the nearest reference unit vector (M, 3),
    its great-circle distance in km); M must be > 0. Exact, O(N x M) in blocks of
    chunk x ref_chunk (128 MiB by default), so memory stays bounded for millions of points."""
    q, r = np.asarray(query_unit, dtype=np.float64), np.asarray(ref_unit, dtype=np.float64)
    idx = np.zeros(len(q), dtype=np.int64)
    best = np.full(len(q), -np.inf)
    for s in range(0, len(q), chunk):
        # the largest dot product is the nearest point; the chord gives an angle without acos' error
        for t in range(0, len(r), ref_chunk):
            dots = q[s:s + chunk] @ r[t:t + ref_chunk].T
            arg = dots.argmax(axis=1)
            top = dots[np.arange(len(arg)), arg]
            better = top > best[s:s + chunk]
            idx[s:s + chunk][better] = arg[better] + t
            best[s:s + chunk][better] = top[better]
    chord = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * best))
    return idx, 2.0 * EARTH_RADIUS_KM * np.arcsin(np.minimum(1.0, chord / 2.0))


def min_distance_km(lat, lng, ref_lat, ref_lng, chunk: int = 1024, ref_chunk: int = 16384) -> np.ndarray:
    """For each (lat, lng), the great-circle distance in km to the nearest reference point
    (inf when there are none); see :func:`nearest_km`."""
    q, r = unit_vectors(lat, lng), unit_vectors(ref_lat, ref_lng)
    if len(r) == 0:
        return np.full(len(q), np.inf)
    return nearest_km(q, r, chunk, ref_chunk)[1]


def held_out_split(lat, lng, *, fractions: dict | None = None, block_level: int | Sequence[int] = 3,
                   buffer_km: float = 450.0, seed: int = 0, max_block_share: float = MAX_BLOCK_SHARE) -> np.ndarray:
    """Split names ("train", "val", "test" or "" for dropped rows) for locations (lat, lng).

    Blocks are drawn at random (from ``seed``) into each held-out split until it holds about its
    fraction of the locations (with several levels, coarsest first, each level an equal part of
    the fraction, finer blocks drawn among the locations still in train); a block holding more
    than ``max_block_share`` of that part is passed over while smaller blocks remain (with finer
    levels, its places can still be drawn as finer blocks); the rest is train; held-out rows
    within ``buffer_km`` of a train row are dropped."""
    fractions = {"val": 0.1, "test": 0.1} if fractions is None else dict(fractions)
    if sum(fractions.values()) >= 1 or any(f < 0 for f in fractions.values()):
        raise ValueError(f"held-out fractions must be >= 0 and sum to less than 1, got {fractions}")
    if buffer_km < 0:
        raise ValueError(f"buffer_km must be >= 0, got {buffer_km}")
    levels = sorted({int(block_level)} if np.isscalar(block_level) else {int(v) for v in block_level})
    if not levels or levels[0] < 0 or levels[-1] > 30:
        raise ValueError(f"block levels must be S2 levels 0..30, got {block_level}")
    lat, lng = np.asarray(lat, dtype=np.float64), np.asarray(lng, dtype=np.float64)
    n = len(lat)
    split = np.full(n, "train", dtype=object)
    if n == 0:
        return split.astype(str)
    leaf = latlng_to_cell(lat, lng, 30)
    rng = np.random.default_rng(seed)
    for level in levels:
        free = np.flatnonzero(split == "train")
        uniq, inverse, counts = np.unique(cell_to_parent(leaf[free], level), return_inverse=True, return_counts=True)
        order = list(rng.permutation(len(uniq)))
        block_split = np.full(len(uniq), "train", dtype=object)
        for name, frac in fractions.items():
            target, held = frac * n / len(levels), 0
            # small blocks first, in the drawn order; a big one only when the small ones run out
            small = [b for b in order if counts[b] <= max_block_share * target]
            for b in small + [b for b in order if counts[b] > max_block_share * target]:
                if held >= target:
                    break
                block_split[b] = name
                held += counts[b]
            order = [b for b in order if block_split[b] == "train"]
        split[free] = block_split[inverse.reshape(-1)]
    train = split == "train"
    held_out = np.flatnonzero(~train)
    if len(held_out) and buffer_km > 0:
        d = min_distance_km(lat[held_out], lng[held_out], lat[train], lng[train])
        split[held_out[d < buffer_km]] = ""
    return split.astype(str)
