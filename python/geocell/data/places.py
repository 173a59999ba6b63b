"""Far places: points drawn uniformly over the land, away from every training photo.

The held-out splits of :mod:`geocell.data.splits` are drawn from the photo pool itself, so every
val/test place lies where photos cluster, near training photos. Users ask about any place.
``land_places`` draws places area-uniformly on the sphere (uniform in sin(latitude) and in
longitude, so equal areas get equal shares) and keeps those whose footprint is at least half
land (``geocell.data.terrain.land_fraction``), optionally at least ``min_km`` from a set of
reference points (the training locations).

Antarctica (south of ``SOUTH_LIMIT_DEG`` = 60 deg S, the Antarctic Treaty's line) is left out:
it is about a tenth of the land's area but holds none of the 100,000 MP-16 photo locations the
project samples, nor a share of the photos users ask about; kept, a tenth of the set would be
near-identical ice-sheet patches that all land in the farthest distance band. Greenland and the
Arctic islands are in.

``split_places`` gives each place "val" or "test" by whole S2 blocks, so that validation (where
all fitting happens) and test share no region.
"""

from __future__ import annotations

import numpy as np

from geocell._internal.geometry import unit_vectors
from geocell.cells import cell_to_parent, latlng_to_cell
from geocell.data.splits import nearest_km
from geocell.data.terrain import FOOTPRINT_KM, land_fraction

SOUTH_LIMIT_DEG = -60.0  # no place south of this (Antarctica; see the module's docstring)
MIN_LAND = 0.5  # the share of a place's footprint that must be land
# val/test are whole S2 level-3 blocks (about 1,000 km across, two footprints): a val place's
# patch and a test place's patch overlap only along a block's border
SPLIT_BLOCK_LEVEL = 3


def sphere_points(n: int, rng: np.random.Generator, south_limit: float = SOUTH_LIMIT_DEG) -> np.ndarray:
    """(n, 2) lat, lng drawn uniformly by area on the sphere north of ``south_limit``."""
    z = rng.uniform(np.sin(np.radians(south_limit)), 1.0, size=n)
    lng = rng.uniform(-180.0, 180.0, size=n)
    return np.stack([np.degrees(np.arcsin(z)), lng], axis=1)


def land_places(n: int, rng: np.random.Generator, *, away_from=None, min_km: float = 0.0,
                footprint_km: float = FOOTPRINT_KM, min_land: float = MIN_LAND,
                south_limit: float = SOUTH_LIMIT_DEG, max_rounds: int = 50) -> np.ndarray:
    """(n, 2) lat, lng: places drawn area-uniformly over the land north of ``south_limit``,
    each with at least ``min_land`` of its ``footprint_km`` square on land and, when
    ``away_from`` ((M, 2) lat, lng) is given, at least ``min_km`` from every one of those points
    (the great-circle distance of :func:`geocell.data.splits.nearest_km`). Rejection sampling in
    batches sized by the acceptance rate so far (the land test reads its raster once a batch);
    deterministic for a given ``rng`` state."""
    n = int(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= min_land <= 1.0:
        raise ValueError(f"min_land must be in [0, 1], got {min_land}")
    if not -90.0 <= south_limit < 90.0:
        raise ValueError(f"south_limit must be in [-90, 90), got {south_limit}")
    ref = None
    if away_from is not None and min_km > 0:
        away = np.asarray(away_from, dtype=np.float64).reshape(-1, 2)
        ref = unit_vectors(away[:, 0], away[:, 1]) if len(away) else None
    out, have, accept = [], 0, 0.25  # about a quarter of the sphere passes the land test
    for _ in range(max_rounds):
        if have >= n:
            break
        batch = int(min(max(256, 1.5 * (n - have) / max(accept, 0.01)), 1_000_000))
        cand = sphere_points(batch, rng, south_limit)
        keep = land_fraction(cand[:, 0], cand[:, 1], footprint_km) >= min_land
        if ref is not None and keep.any():
            d = np.full(batch, np.inf)
            d[keep] = nearest_km(unit_vectors(cand[keep, 0], cand[keep, 1]), ref)[1]
            keep &= d >= min_km
        accept = max(keep.mean(), 1.0 / batch)
        out.append(cand[keep][: n - have])
        have += len(out[-1])
    if have < n:
        raise ValueError(f"only {have} of {n} places found on land at least {min_km:g} km from "
                         f"{len(away_from) if away_from is not None else 0} points in {max_rounds} rounds")
    return np.concatenate(out).reshape(n, 2) if out else np.zeros((0, 2))


def split_places(latlng, rng: np.random.Generator, level: int = SPLIT_BLOCK_LEVEL) -> np.ndarray:
    """(N,) "val" or "test" for each place: whole S2 blocks of ``level`` in a random order go to
    val until it holds half of the places, the rest to test."""
    latlng = np.asarray(latlng, dtype=np.float64).reshape(-1, 2)
    split = np.full(len(latlng), "test", dtype=object)
    if len(latlng) == 0:
        return split.astype(str)
    blocks = cell_to_parent(latlng_to_cell(latlng[:, 0], latlng[:, 1], 30), level)
    uniq, inverse, counts = np.unique(blocks, return_inverse=True, return_counts=True)
    to_val, held = np.zeros(len(uniq), dtype=bool), 0
    for b in rng.permutation(len(uniq)):
        if held >= len(latlng) / 2:
            break
        to_val[b] = True
        held += counts[b]
    split[to_val[inverse.reshape(-1)]] = "val"
    return split.astype(str)
