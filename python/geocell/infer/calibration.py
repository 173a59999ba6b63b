"""Calibrated predictions: from the heads' logits to a distribution over the Earth.

The network gives one classification per partitioning. They are combined hierarchically: the
score of a fine cell r is a weighted sum of each partitioning's log-probability of the cell that
contains r,

    log q(r) = sum_p w_p * log softmax(z_p)[h(r, p)]   (renormalised over the fine cells).

Since each log-softmax differs from the logits by a constant per image, which the
renormalisation removes, w_p is exactly an inverse temperature of head p's logits: fitting the
weights is temperature scaling of each head and of their product at once. With every w_p = 1
this is the plain product of the 2018 method; that product counts a cell several times when it
appears in several partitionings (a level-2 cell kept by all three multiplies its own
probability three times), which makes it over-confident.

A cell is not a place: a photo can come from anywhere, also where no training photo was. So the
predictive distribution over the sphere is a mixture: each fine cell spreads its probability
around its mean training location with a von Mises-Fisher kernel of width ``kernel_km``
(about the standard deviation in km). The weights and the width are fitted together
on held-out validation images by maximising the likelihood of their true locations
(:func:`fit_calibration`); that is what makes a "90 % credible region" hold the truth about
90 % of the time on places the model has not seen.

The credible region of mass X is the highest-density region of the mixture: where its density
exceeds the level that leaves mass X above it. It is drawn as S2 cells of one level, chosen from
the kernel width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from geocell._internal.geometry import unit_to_latlng, unit_vectors
from geocell.cells import EARTH_RADIUS_KM
from geocell.infer.metrics import hierarchical_log_probs

MAX_GRID_LEVEL = 12  # the finest cells a region is drawn with (about 2 km)
KERNEL_START_KM = 300.0  # where the fit of the kernel width starts (it is fitted on a log scale)
MIXTURE_TOP = 64     # the most probable fine cells that make up the mixture (the rest is renormalised away)


@dataclass(frozen=True)
class Calibration:
    """How logits become a distribution; stored in checkpoints as :meth:`to_dict`.

    ``kernel_km == 0`` means uncalibrated (checkpoints without a calibration): the region is
    then the fewest fine cells holding the mass, as the plain 2018 method has it."""

    weights: tuple = ()           # one per partitioning, coarsest first: inverse temperatures
    kernel_km: float = 0.0        # spread of a cell's probability around its centroid
    fitted_on: str = ""           # what it was fitted on, for people reading the checkpoint
    metrics: dict = field(default_factory=dict)  # the fit's held-out figures

    @classmethod
    def identity(cls, n_partitions: int) -> "Calibration":
        return cls(weights=(1.0,) * n_partitions)

    @property
    def calibrated(self) -> bool:
        return self.kernel_km > 0

    def check(self, n_partitions: int) -> "Calibration":
        if len(self.weights) != n_partitions:
            raise ValueError(f"calibration has {len(self.weights)} weights for {n_partitions} partitionings")
        if not all(math.isfinite(w) and w >= 0 for w in self.weights) or not any(self.weights):
            raise ValueError(f"calibration weights must be finite, >= 0 and not all 0, got {self.weights}")
        if not (math.isfinite(self.kernel_km) and self.kernel_km >= 0):
            raise ValueError(f"calibration kernel_km must be finite and >= 0, got {self.kernel_km}")
        return self

    def to_dict(self) -> dict:
        return {"weights": [float(w) for w in self.weights],
                "kernel_km": float(self.kernel_km),
                "fitted_on": str(self.fitted_on), "metrics": {k: float(v) for k, v in self.metrics.items()}}

    @classmethod
    def from_dict(cls, d: dict | None, n_partitions: int) -> "Calibration":
        if not d:
            return cls.identity(n_partitions)
        unknown = set(d) - {"weights", "kernel_km", "fitted_on", "metrics"}
        if unknown:
            raise ValueError(f"calibration: unknown fields {sorted(unknown)}")
        return cls(weights=tuple(float(w) for w in d["weights"]), kernel_km=float(d.get("kernel_km", 0.0)),
                   fitted_on=str(d.get("fitted_on", "")),
                   metrics=dict(d.get("metrics", {}))).check(n_partitions)


# ----------------------------------------------------------------------------- the combination


def combined_log_probs(logits, hierarchy, calibration: Calibration) -> torch.Tensor:
    """Per-partitioning logits [(B, C_p)] -> (B, n_fine) log-probabilities of the fine cells
    (:func:`geocell.infer.metrics.hierarchical_log_probs` with the fitted weights, renormalised)."""
    log_probs = [torch.log_softmax(z.double(), dim=1) for z in logits]
    return torch.log_softmax(hierarchical_log_probs(log_probs, hierarchy, calibration.weights), dim=1)


# ----------------------------------------------------------------------------- the mixture over the sphere


def _unit(latlng) -> np.ndarray:
    latlng = np.asarray(latlng, dtype=np.float64).reshape(-1, 2)
    return unit_vectors(latlng[:, 0], latlng[:, 1])


def _log_vmf(dots: torch.Tensor, kernel_km: float) -> torch.Tensor:
    """log density per km² of a von Mises-Fisher kernel at cos(angle) = ``dots``; its angular
    standard deviation per axis is kernel_km / R."""
    kappa = (EARTH_RADIUS_KM / kernel_km) ** 2
    log_norm = math.log(kappa) - math.log(2 * math.pi) - math.log1p(-math.exp(-2 * kappa))
    return log_norm + kappa * (dots - 1.0) - 2 * math.log(EARTH_RADIUS_KM)


def grid_level_for(kernel_km: float) -> int:
    """The coarsest S2 level whose cells are at most about half the kernel width across."""
    for level in range(MAX_GRID_LEVEL + 1):
        edge = math.sqrt(4 * math.pi * EARTH_RADIUS_KM ** 2 / (6 * 4 ** level))
        if edge <= kernel_km / 2:
            return level
    return MAX_GRID_LEVEL


def _sample_vmf(means: np.ndarray, kappa: float, rng: np.random.Generator) -> np.ndarray:
    """One unit vector per row of ``means`` from a von Mises-Fisher distribution (exact on S²:
    the cosine to the mean is 1 + log(u + (1 - u) e^(-2 kappa)) / kappa)."""
    n = len(means)
    u = rng.random(n)
    w = 1.0 + np.log(u + (1.0 - u) * math.exp(-2.0 * kappa)) / kappa
    phi = rng.random(n) * 2 * math.pi
    # an orthonormal frame around each mean
    helper = np.where(np.abs(means[:, :1]) < 0.9, [[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]])
    e1 = np.cross(means, helper)
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    e2 = np.cross(means, e1)
    r = np.sqrt(np.maximum(0.0, 1.0 - w * w))[:, None]
    return w[:, None] * means + r * (np.cos(phi)[:, None] * e1 + np.sin(phi)[:, None] * e2)


@dataclass
class MixtureRegion:
    """The highest-density credible region of one image's mixture."""

    mass: float
    threshold: float          # density (per km²) at the region's edge
    area_km2: float           # its area
    cells: np.ndarray         # S2 cells (uint64, one level) that make it up, most probable first
    covered: float            # the mixture's mass in those cells (the discretised region)


class Mixture:
    """One image's predictive distribution over the sphere: the fine cells' probabilities, each
    spread by the kernel around its centroid. Regions and the density of a location come from
    it (highest-density regions by Monte Carlo, Hyndman 1996: the region of mass X is where the
    density exceeds its (1 - X) quantile over draws from the mixture)."""

    def __init__(self, log_q: np.ndarray, centroids_unit: np.ndarray, kernel_km: float, *,
                 samples: int = 4000, seed: int = 0):
        log_q = np.asarray(log_q, dtype=np.float64)
        k = min(MIXTURE_TOP, log_q.size)
        top = np.argpartition(-log_q, k - 1)[:k]
        q = np.exp(log_q[top] - log_q[top].max())
        self.q = q / q.sum()
        self.means = centroids_unit[top]
        self.kappa = (EARTH_RADIUS_KM / kernel_km) ** 2
        self.kernel_km = kernel_km
        rng = np.random.default_rng(seed)
        draws = _sample_vmf(self.means[rng.choice(k, size=samples, p=self.q)], self.kappa, rng)
        self.draws = draws
        self.draw_density = self.density_at(draws)

    def density_at(self, unit: np.ndarray) -> np.ndarray:
        """Density per km² at unit vectors (N, 3)."""
        kappa = self.kappa
        log_norm = math.log(kappa) - math.log(2 * math.pi) - math.log1p(-math.exp(-2 * kappa)) \
            - 2 * math.log(EARTH_RADIUS_KM)
        dots = np.clip(np.asarray(unit) @ self.means.T, -1.0, 1.0)
        return np.exp(log_norm + kappa * (dots - 1.0)) @ self.q

    def threshold(self, mass: float) -> float:
        return float(np.quantile(self.draw_density, 1.0 - mass))

    def holds(self, latlng, mass: float) -> bool:
        """Whether the region of ``mass`` holds the location (lat, lng)."""
        return bool(self.density_at(_unit(latlng))[0] >= self.threshold(mass))

    def region_area_km2(self, mass: float) -> float:
        """Area of the region of ``mass``: E[1{p(Y) >= t} / p(Y)] over draws Y of the mixture
        (importance sampling)."""
        return float(np.mean((self.draw_density >= self.threshold(mass)) / self.draw_density))

    def region(self, mass: float = 0.9) -> MixtureRegion:
        import geocell

        if not 0.0 < mass <= 1.0:
            raise ValueError(f"credible mass must be in (0, 1], got {mass}")
        t = self.threshold(mass)
        inside = self.draw_density >= t
        area = self.region_area_km2(mass)
        # the region's cells: those the inside draws fall in, whose centre is inside too
        level = grid_level_for(self.kernel_km)
        lat, lng = unit_to_latlng(self.draws[inside])
        cells = np.unique(geocell.latlng_to_cell(lat, lng, level))
        clat, clng = geocell.cell_to_latlng(cells)
        centre_density = self.density_at(_unit(np.stack([clat, clng], 1)))
        keep = centre_density >= t
        cells, centre_density = cells[keep], centre_density[keep]
        order = np.argsort(-centre_density, kind="stable")
        covered = float(np.mean(np.isin(geocell.latlng_to_cell(*unit_to_latlng(self.draws), level), cells)))
        return MixtureRegion(mass=float(mass), threshold=t, area_km2=area, cells=cells[order], covered=covered)


def mixture_log_density(log_q: torch.Tensor, centroids_unit, true_latlng, kernel_km) -> torch.Tensor:
    """log density (per km²) of the true locations under each row's mixture; differentiable in
    ``log_q`` and ``kernel_km`` (a tensor)."""
    c = torch.as_tensor(np.asarray(centroids_unit), dtype=torch.float64)
    x = torch.as_tensor(_unit(true_latlng), dtype=torch.float64)
    dots = (x @ c.T).clamp(-1.0, 1.0)                                                 # (B, n_fine)
    kappa = (EARTH_RADIUS_KM / kernel_km) ** 2
    log_norm = torch.log(kappa) - math.log(2 * math.pi) - torch.log1p(-torch.exp(-2 * kappa))
    log_k = log_norm + kappa * (dots - 1.0) - 2 * math.log(EARTH_RADIUS_KM)
    return torch.logsumexp(log_q + log_k, dim=1)


# ----------------------------------------------------------------------------- fitting


def fit_calibration(logits, hierarchy, centroids, true_latlng, *, fitted_on: str = "",
                    steps: int = 200) -> Calibration:
    """Weights and kernel width maximising the mean log-likelihood of the true
    locations ``true_latlng`` (N, 2) of held-out images under the mixture, from their logits
    [(N, C_p)] (float tensors or arrays). ``centroids``: (n_fine, 2) lat, lng of the fine cells."""
    logits = [torch.as_tensor(np.asarray(z) if not isinstance(z, torch.Tensor) else z).double().cpu()
              for z in logits]
    n_parts = len(logits)
    if logits[0].shape[0] < 2:
        raise ValueError("calibration needs at least two held-out images")
    cu = _unit(centroids)
    h = torch.as_tensor(np.asarray(hierarchy), dtype=torch.int64)
    log_probs = [torch.log_softmax(z, dim=1) for z in logits]
    # log-parameters keep the weights and the width positive
    log_w = torch.zeros(n_parts, dtype=torch.float64, requires_grad=True)
    log_k = torch.tensor(math.log(KERNEL_START_KM), dtype=torch.float64, requires_grad=True)

    def nll():
        log_q = torch.log_softmax(hierarchical_log_probs(log_probs, h, torch.exp(log_w)), dim=1)
        return -mixture_log_density(log_q, cu, true_latlng, torch.exp(log_k)).mean()

    optimizer = torch.optim.LBFGS([log_w, log_k], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = nll()
        loss.backward()
        return loss

    before = float(nll().detach())
    optimizer.step(closure)
    after = float(nll().detach())
    if not math.isfinite(after) or after > before:  # never worse than the uncalibrated start
        raise FloatingPointError(f"calibration fit diverged (mean NLL {before:.3f} -> {after:.3f})")
    kernel_km = float(torch.exp(log_k).detach())
    return Calibration(weights=tuple(float(v) for v in torch.exp(log_w).detach()), kernel_km=kernel_km,
                       fitted_on=fitted_on,
                       metrics={"nll_before": before, "nll_after": after}).check(n_parts)


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
