"""Credible regions over fine cells and the area they cover.

A prediction is a probability distribution over the cells of the finest partitioning.
The 90 % credible region is the smallest set of those cells holding 90 % of it; its
area (in km² on the sphere of radius 6371 km) says how sure the model is, in a unit
people understand.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EARTH_RADIUS_KM = 6371.0


def _unit_vectors(lat_deg: np.ndarray, lng_deg: np.ndarray) -> np.ndarray:
    lat = np.radians(lat_deg)
    lng = np.radians(lng_deg)
    cos_lat = np.cos(lat)
    return np.stack([cos_lat * np.cos(lng), cos_lat * np.sin(lng), np.sin(lat)], axis=-1)


def spherical_triangle_area(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Area (steradians) of the spherical triangles with unit-vector corners a, b, c (..., 3).

    Van Oosterom & Strackee: tan(E/2) = |a·(b×c)| / (1 + a·b + b·c + c·a).
    The triple product is taken over the edge vectors (b-a)×(c-a), which is the same
    number algebraically but keeps its precision for cells a few metres across, where
    b×c would cancel almost entirely.
    """
    triple = np.einsum("...i,...i->...", a, np.cross(b - a, c - a))
    denom = 1.0 + np.einsum("...i,...i->...", a, b) + np.einsum("...i,...i->...", b, c) \
        + np.einsum("...i,...i->...", c, a)
    return 2.0 * np.arctan2(np.abs(triple), denom)


def quad_area_sr(boundary: np.ndarray) -> np.ndarray:
    """Area (steradians) of spherical quadrilaterals given as (N, 4, 2) (lat, lng) vertices.

    S2 cell edges are great-circle arcs, so two triangles over one diagonal are exact.
    """
    boundary = np.asarray(boundary, dtype=np.float64)
    v = _unit_vectors(boundary[..., 0], boundary[..., 1])
    return (spherical_triangle_area(v[:, 0], v[:, 1], v[:, 2])
            + spherical_triangle_area(v[:, 0], v[:, 2], v[:, 3]))


def cell_area_km2(cells, radius_km: float = EARTH_RADIUS_KM) -> np.ndarray:
    """Exact area of S2 cells (uint64 ids) in km² on a sphere of radius ``radius_km``."""
    import geocell

    cells = np.atleast_1d(np.asarray(cells, dtype=np.uint64))
    if cells.size == 0:
        return np.zeros(0, dtype=np.float64)
    return quad_area_sr(geocell.cell_to_boundary(cells)) * radius_km * radius_km


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
