"""Per-image training targets: the class in each partitioning, the scene and the location."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass
class LabelTable:
    """Row ``i`` holds the targets of manifest row ``i``.

    geo: (N, P) int64 class per partitioning, -1 where no cell of that partitioning covers the
    point (the loss ignores it); scene: (N,) int64, -1 = none; latlng: (N, 2) float64 degrees.
    """

    geo: np.ndarray
    scene: np.ndarray
    latlng: np.ndarray

    def __post_init__(self):
        self.geo = np.asarray(self.geo, dtype=np.int64)
        if self.geo.ndim == 1:
            self.geo = self.geo[:, None]
        self.scene = np.asarray(self.scene, dtype=np.int64).reshape(-1)
        self.latlng = np.asarray(self.latlng, dtype=np.float64).reshape(-1, 2)
        n = len(self.scene)
        if len(self.geo) != n or len(self.latlng) != n:
            raise ValueError(
                f"LabelTable rows disagree: geo {len(self.geo)}, scene {n}, latlng {len(self.latlng)}")

    def __len__(self) -> int:
        return len(self.scene)

    def take(self, indices) -> "LabelTable":
        idx = np.asarray(indices, dtype=np.int64)
        return LabelTable(self.geo[idx], self.scene[idx], self.latlng[idx])

    @classmethod
    def from_manifest(cls, manifest, partitions: Sequence) -> "LabelTable":
        """Assigns every manifest row to a class of each partitioning (``p.assign(lat, lng)``)."""
        lat = np.asarray(manifest.lat, dtype=np.float64)
        lng = np.asarray(manifest.lng, dtype=np.float64)
        columns = []
        for k, p in enumerate(partitions):
            c = np.asarray(p.assign(lat, lng), dtype=np.int64).reshape(-1)
            if len(c) != len(lat):
                raise ValueError(f"partition {k}.assign returned {len(c)} classes for {len(lat)} points")
            columns.append(c)
        geo = np.stack(columns, axis=1) if columns else np.zeros((len(lat), 0), dtype=np.int64)
        return cls(geo=geo, scene=np.asarray(manifest.scene, dtype=np.int64),
                   latlng=np.stack([lat, lng], axis=1))

    def unlabelled_counts(self) -> np.ndarray:
        """Rows without a class, per partitioning."""
        return (self.geo < 0).sum(axis=0)
