"""Training losses: geo cross-entropies (optionally haversine-smoothed) plus the weighted scene loss."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from geocell.cells import EARTH_RADIUS_KM


def haversine_km(lat1, lng1, lat2, lng2) -> torch.Tensor:
    """Great-circle distance in km between broadcastable tensors of degrees (R = EARTH_RADIUS_KM); the differentiable torch twin of geocell.great_circle_km."""
    lat1, lng1, lat2, lng2 = (torch.deg2rad(t) for t in (lat1, lng1, lat2, lng2))
    a = torch.sin((lat2 - lat1) / 2) ** 2 + torch.cos(lat1) * torch.cos(lat2) * torch.sin((lng2 - lng1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * torch.asin(torch.sqrt(a.clamp(0.0, 1.0)))


def haversine_soft_targets(latlng: torch.Tensor, centroids: torch.Tensor, tau_km: float) -> torch.Tensor:
    """Soft class targets q_i ∝ exp(-(d_i - d_min) / tau) over cell centroids (PIGEON-style).

    latlng (B, 2) degrees, centroids (C, 2) degrees -> (B, C) rows summing to 1.
    """
    d = haversine_km(latlng[:, None, 0], latlng[:, None, 1], centroids[None, :, 0], centroids[None, :, 1])
    d = d - d.min(dim=1, keepdim=True).values
    return torch.softmax(-d / tau_km, dim=1)


def _masked_mean(per_sample: torch.Tensor, mask: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    # A batch without any labelled sample still has to give a graph-connected zero (DDP needs every
    # parameter to receive a gradient), so never return NaN from an empty mean.
    if mask.any():
        return per_sample[mask].mean()
    return logits.sum() * 0.0


class MultitaskLoss(nn.Module):
    """sum_p CE(geo_p) + scene_weight * CE(scene); labels of -1 are ignored.

    smoothing_tau_km > 0 replaces each geo one-hot target by haversine soft targets over that
    partitioning's centroids (needs ``centroids`` and targets["latlng"]).
    """

    def __init__(
        self,
        centroids: Sequence[torch.Tensor] | None = None,
        smoothing_tau_km: float = 0.0,
        scene_weight: float = 1.0,
    ):
        super().__init__()
        self.smoothing_tau_km = float(smoothing_tau_km or 0.0)
        self.scene_weight = float(scene_weight)
        if self.smoothing_tau_km > 0:
            if centroids is None:
                raise ValueError("haversine label smoothing needs the partitions' centroids")
            for i, c in enumerate(centroids):
                c = c.detach().double().clone() if isinstance(c, torch.Tensor) else torch.tensor(np.array(c, dtype=np.float64))
                self.register_buffer(f"centroids_{i}", c, persistent=False)
        self.num_centroid_sets = len(centroids) if (centroids is not None and self.smoothing_tau_km > 0) else 0

    def geo_term(self, p: int, logits: torch.Tensor, target: torch.Tensor, latlng: torch.Tensor | None):
        mask = target >= 0
        logits = logits.float()
        if self.smoothing_tau_km > 0:
            cents = getattr(self, f"centroids_{p}")
            soft = haversine_soft_targets(latlng.to(cents), cents, self.smoothing_tau_km).to(logits.dtype)
            per_sample = -(soft * F.log_softmax(logits, dim=1)).sum(dim=1)
        else:
            per_sample = F.cross_entropy(logits, target.clamp(min=0), reduction="none")
        return _masked_mean(per_sample, mask, logits)

    def forward(self, geo_logits, scene_logits, targets: dict):
        parts = {}
        geo = targets["geo"]
        latlng = targets.get("latlng")
        total = None
        for p, logits in enumerate(geo_logits):
            term = self.geo_term(p, logits, geo[:, p], latlng)
            parts[f"loss_geo{p}"] = term.detach()
            total = term if total is None else total + term
        if scene_logits is not None and self.scene_weight != 0:
            scene = targets["scene"]
            per_sample = F.cross_entropy(scene_logits.float(), scene.clamp(min=0), reduction="none")
            term = _masked_mean(per_sample, scene >= 0, scene_logits)
            parts["loss_scene"] = term.detach()
            total = self.scene_weight * term if total is None else total + self.scene_weight * term
        parts["loss"] = total.detach()
        return total, parts
