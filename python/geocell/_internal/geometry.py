"""Points on the unit sphere, shared by the splits, the mixture and the hybrid."""

from __future__ import annotations

import numpy as np


def unit_vectors(lat, lng) -> np.ndarray:
    """(N, 3) unit vectors of points given in degrees."""
    la, ln = np.radians(np.asarray(lat, dtype=np.float64)), np.radians(np.asarray(lng, dtype=np.float64))
    return np.stack([np.cos(la) * np.cos(ln), np.cos(la) * np.sin(ln), np.sin(la)], axis=-1).reshape(-1, 3)


def unit_to_latlng(unit) -> tuple[np.ndarray, np.ndarray]:
    """(lat, lng) in degrees of (N, 3) unit vectors."""
    unit = np.asarray(unit, dtype=np.float64).reshape(-1, 3)
    lat = np.degrees(np.arcsin(np.clip(unit[:, 2], -1.0, 1.0)))
    return lat, np.degrees(np.arctan2(unit[:, 1], unit[:, 0]))


def latlng_to_unit(latlng) -> np.ndarray:
    """(N, 3) unit vectors of (N, 2) lat, lng rows (or one (2,) pair) in degrees."""
    latlng = np.asarray(latlng, dtype=np.float64).reshape(-1, 2)
    return unit_vectors(latlng[:, 0], latlng[:, 1])
