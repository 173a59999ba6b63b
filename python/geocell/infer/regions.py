"""Credible regions over fine cells and the area they cover.

A prediction is a probability distribution over the cells of the finest partitioning.
The 90 % credible region is the smallest set of those cells holding 90 % of it; its
area (in km² on the sphere of radius 6371 km) says how sure the model is, in a unit
people understand.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from geocell.cells import EARTH_RADIUS_KM, cell_area_km2  # noqa: F401  (re-exported)

MAX_TOP_K = 100  # the most cells a prediction lists (CLI and web API)


@dataclass
class CredibleRegion:
    """The smallest set of cells holding at least ``mass`` of the probability."""

    indices: np.ndarray      # cell indices (into the finest partitioning), most probable first
    mass: float              # the requested mass, e.g. 0.9
    covered: float           # probability actually held by ``indices`` (>= mass)
    area_km2: float          # summed area of the cells

    def __len__(self) -> int:
        return int(self.indices.size)


def credible_indices(probs: np.ndarray, mass: float = 0.9) -> tuple[np.ndarray, float]:
    """Indices of the fewest cells whose (renormalised) probability reaches ``mass``.

    Taking cells in order of decreasing probability gives the smallest such set: any
    other set of the same size holds at most as much. Returns (indices, covered mass).
    """
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"credible mass must be in (0, 1], got {mass}")
    p = np.asarray(probs, dtype=np.float64).ravel()
    total = p.sum()
    if not np.isfinite(total) or total <= 0:
        raise ValueError("probabilities must be finite and sum to a positive number")
    p = p / total
    order = np.argsort(-p, kind="stable")
    cumulative = np.cumsum(p[order])
    # A tiny tolerance so that mass=1.0 is reachable despite rounding in the sum.
    k = int(np.searchsorted(cumulative, mass - 1e-12, side="left")) + 1
    k = min(k, p.size)
    return order[:k], float(cumulative[k - 1])


def credible_region(probs: np.ndarray, cell_areas_km2: np.ndarray, mass: float = 0.9) -> CredibleRegion:
    """Credible region of one distribution over cells whose areas are ``cell_areas_km2``."""
    idx, covered = credible_indices(probs, mass)
    area = float(np.asarray(cell_areas_km2, dtype=np.float64)[idx].sum())
    return CredibleRegion(indices=idx, mass=float(mass), covered=covered, area_km2=area)
