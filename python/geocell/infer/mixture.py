"""The predictive distribution over the sphere: cells' probabilities spread by a kernel.

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
(about the standard deviation in km). The weights and the width are fitted together on held-out
validation images by maximising the likelihood of their true locations
(:func:`fit_calibration`); a broad background (:class:`Background`) keeps places far from every
guess possible. The credible region of mass X is the highest-density region of the mixture:
where its density exceeds the level that leaves mass X above it, drawn as S2 cells of one level
chosen from the kernel width. Which mass is reported as "X %" is fitted by split conformal
prediction (:mod:`geocell.infer.conformal`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from geocell._internal.geometry import latlng_to_unit, unit_to_latlng
from geocell.cells import EARTH_RADIUS_KM, cell_to_latlng, latlng_to_cell
from geocell.infer.metrics import hierarchical_log_probs
from geocell.model.records import Calibration

MAX_GRID_LEVEL = 12  # the finest cells a region is drawn with (about 2 km)

KERNEL_START_KM = 300.0  # where the fit of the kernel width starts (it is fitted on a log scale)

# the candidate weightings of the hierarchy: each partitioning weighs g times the next finer one
HIERARCHY_FACTORS = (1.0, 1.5, 2.0, 3.0, 4.0)

MIXTURE_TOP = 64     # the most probable fine cells that make up the mixture (the rest is renormalised away)

# the background's candidate shares of the mixture and widths (chosen on the validation split)
BACKGROUND_WEIGHTS = (0.0, 0.02, 0.05, 0.1, 0.2)

BACKGROUND_KERNELS_KM = (1000.0, 2000.0, 4000.0, 8000.0)


def combined_log_probs(logits, hierarchy, calibration: Calibration) -> torch.Tensor:
    """Per-partitioning logits [(B, C_p)] -> (B, n_fine) log-probabilities of the fine cells
    (:func:`geocell.infer.metrics.hierarchical_log_probs` with the fitted weights, renormalised)."""
    log_probs = [torch.log_softmax(z.double(), dim=1) for z in logits]
    return torch.log_softmax(hierarchical_log_probs(log_probs, hierarchy, calibration.weights), dim=1)

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

def _sample_vmf(means: np.ndarray, kappa, rng: np.random.Generator) -> np.ndarray:
    """One unit vector per row of ``means`` from a von Mises-Fisher distribution (exact on S²:
    the cosine to the mean is 1 + log(u + (1 - u) e^(-2 kappa)) / kappa); ``kappa`` is one
    number or one per row."""
    n = len(means)
    kappa = np.broadcast_to(np.asarray(kappa, dtype=np.float64), (n,))
    u = rng.random(n)
    w = 1.0 + np.log(u + (1.0 - u) * np.exp(-2.0 * kappa)) / kappa
    phi = rng.random(n) * 2 * math.pi
    # an orthonormal frame around each mean
    helper = np.where(np.abs(means[:, :1]) < 0.9, [[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]])
    e1 = np.cross(means, helper)
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    e2 = np.cross(means, e1)
    r = np.sqrt(np.maximum(0.0, 1.0 - w * w))[:, None]
    return w[:, None] * means + r * (np.cos(phi)[:, None] * e1 + np.sin(phi)[:, None] * e2)

def _kappa(kernel_km):
    return (EARTH_RADIUS_KM / np.asarray(kernel_km, dtype=np.float64)) ** 2

def _log_norm(kappa):
    """log of the vMF normalising constant per km² (numpy, any shape)."""
    return np.log(kappa) - math.log(2 * math.pi) - np.log1p(-np.exp(-2 * kappa)) - 2 * math.log(EARTH_RADIUS_KM)

def _vmf_mixture_density(unit, means, kappas, q, log_norm=None) -> np.ndarray:
    """Density per km² at unit vectors (N, 3) of vMF kernels at ``means`` (M, 3) with
    concentrations ``kappas`` and weights ``q``."""
    dots = np.clip(np.asarray(unit) @ means.T, -1.0, 1.0)
    return np.exp((_log_norm(kappas) if log_norm is None else log_norm) + kappas * (dots - 1.0)) @ q

@dataclass(frozen=True)
class Background:
    """Where photos are taken at all: the training photos' density (the coarsest partitioning's
    cells weighted by their photo counts, at their mean locations) spread by a broad kernel, and
    its share ``weight`` of every image's mixture. Without it a photo far from every guess has
    a density of almost 0: its likelihood is ruinous, and the conformal region that must hold
    it is the whole sphere."""

    weight: float
    q: np.ndarray        # (C,) the cells' shares of the training photos
    means: np.ndarray    # (C, 3) their mean locations, unit vectors
    kernel_km: float

def background_for(calibration: "Calibration", centroids, counts) -> Background | None:
    """The calibration's background over a partitioning's cells (``centroids`` (C, 2), photo
    ``counts`` (C,)); None when it has none."""
    if calibration.background_weight <= 0:
        return None
    counts = np.asarray(counts, dtype=np.float64)
    return Background(float(calibration.background_weight), counts / counts.sum(), latlng_to_unit(centroids),
                      float(calibration.background_kernel_km))

def fit_background(truth_density: np.ndarray, true_latlng: np.ndarray, centroids, counts,
                   weights=BACKGROUND_WEIGHTS, kernels_km=BACKGROUND_KERNELS_KM) -> tuple[float, float, dict]:
    """(weight, kernel_km, {(weight, kernel_km): mean log density}): the background share and
    width that maximise the validation images' mean log density at their true locations, given
    ``truth_density``, the density there of each image's mixture without a background (per
    km²). Weight 0 is a candidate, and ties go to the smaller weight."""
    truth = latlng_to_unit(true_latlng)
    counts = np.asarray(counts, dtype=np.float64)
    means, q = latlng_to_unit(centroids), counts / counts.sum()
    density = np.asarray(truth_density, dtype=np.float64)
    scores = {}
    for kernel in kernels_km:
        spread = _vmf_mixture_density(truth, means, _kappa(kernel), q)
        for w in weights:
            scores[(float(w), float(kernel))] = float(np.mean(np.log((1.0 - w) * density + w * spread + 1e-300)))
    w, kernel = max(scores, key=lambda key: (scores[key], -key[0], -key[1]))
    return w, (kernel if w > 0 else 0.0), scores

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
    density exceeds its (1 - X) quantile over draws from the mixture). ``neighbours``: the
    hybrid's retrieval part (:class:`geocell.infer.hybrid.NeighbourKernels`), ``background``:
    the training photos' broad density; each takes its share of the mass."""

    def __init__(self, log_q: np.ndarray, centroids_unit: np.ndarray, kernel_km: float, *,
                 samples: int = 4000, seed: int = 0, neighbours=None,
                 background: Background | None = None):
        log_q = np.asarray(log_q, dtype=np.float64)
        k = min(MIXTURE_TOP, log_q.size)
        top = np.argpartition(-log_q, k - 1)[:k]
        q = np.exp(log_q[top] - log_q[top].max())
        q = q / q.sum()
        means = centroids_unit[top]
        kappas = np.full(k, _kappa(kernel_km))
        self.kernel_km = kernel_km
        if neighbours is not None and neighbours.weight > 0:
            # the hybrid: (1 - weight) of the mass on the cells, weight on the retrieved photos
            q = np.concatenate([(1.0 - neighbours.weight) * q, neighbours.weight * neighbours.q])
            means = np.concatenate([means, neighbours.means])
            widths = np.broadcast_to(np.asarray(neighbours.kernel_km, dtype=np.float64), np.shape(neighbours.q))
            kappas = np.concatenate([kappas, _kappa(widths)])
            if neighbours.weight >= 0.05:  # the grid the region is drawn on: the weightiest neighbour's
                self.kernel_km = min(kernel_km, float(widths[int(np.argmax(neighbours.q))]))
        if background is not None and background.weight > 0:
            q = np.concatenate([(1.0 - background.weight) * q, background.weight * background.q])
            means = np.concatenate([means, background.means])
            kappas = np.concatenate([kappas, np.full(len(background.q), _kappa(background.kernel_km))])
        self.q, self.means, self.kappas = q, means, kappas
        self._log_norm = _log_norm(kappas)
        rng = np.random.default_rng(seed)
        pick = rng.choice(len(q), size=samples, p=q)
        draws = _sample_vmf(means[pick], kappas[pick], rng)
        self.draws = draws
        self.draw_density = self.density_at(draws)

    @property
    def kappa(self) -> float:
        """The cells' kernel concentration."""
        return float(self.kappas[0])

    def density_at(self, unit: np.ndarray) -> np.ndarray:
        """Density per km² at unit vectors (N, 3)."""
        return _vmf_mixture_density(unit, self.means, self.kappas, self.q, self._log_norm)

    def mode(self, candidates_unit: np.ndarray) -> int:
        """Index of the candidate (rows of unit vectors) where the density is highest."""
        return int(np.argmax(self.density_at(candidates_unit)))

    def threshold(self, mass: float) -> float:
        return float(np.quantile(self.draw_density, 1.0 - mass))

    def mass_at(self, latlng) -> float:
        """The mass of the smallest highest-density region that holds (lat, lng): the share of
        draws at least as dense as the location."""
        return float(np.mean(self.draw_density >= self.density_at(latlng_to_unit(latlng))[0]))

    def holds(self, latlng, mass: float) -> bool:
        """Whether the region of ``mass`` holds the location (lat, lng) (the region of mass 1 is
        the whole sphere)."""
        return self.mass_at(latlng) <= mass

    def region_area_km2(self, mass: float) -> float:
        """Area of the region of ``mass``: E[1{p(Y) >= t} / p(Y)] over draws Y of the mixture
        (importance sampling)."""
        return float(np.mean((self.draw_density >= self.threshold(mass)) / self.draw_density))

    def region(self, mass: float = 0.9) -> MixtureRegion:
        if not 0.0 < mass <= 1.0:
            raise ValueError(f"credible mass must be in (0, 1], got {mass}")
        t = self.threshold(mass)
        inside = self.draw_density >= t
        area = self.region_area_km2(mass)
        # the region's cells: those the inside draws fall in, whose centre is inside too
        level = grid_level_for(self.kernel_km)
        lat, lng = unit_to_latlng(self.draws[inside])
        cells = np.unique(latlng_to_cell(lat, lng, level))
        clat, clng = cell_to_latlng(cells)
        centre_density = self.density_at(latlng_to_unit(np.stack([clat, clng], 1)))
        keep = centre_density >= t
        cells, centre_density = cells[keep], centre_density[keep]
        order = np.argsort(-centre_density, kind="stable")
        covered = float(np.mean(np.isin(latlng_to_cell(*unit_to_latlng(self.draws), level), cells)))
        return MixtureRegion(mass=float(mass), threshold=t, area_km2=area, cells=cells[order], covered=covered)

def mixture_log_density(log_q: torch.Tensor, centroids_unit, true_latlng, kernel_km) -> torch.Tensor:
    """log density (per km²) of the true locations under each row's mixture; differentiable in
    ``log_q`` and ``kernel_km`` (a tensor)."""
    c = torch.as_tensor(np.asarray(centroids_unit), dtype=torch.float64)
    x = torch.as_tensor(latlng_to_unit(true_latlng), dtype=torch.float64)
    dots = (x @ c.T).clamp(-1.0, 1.0)                                                 # (B, n_fine)
    kappa = (EARTH_RADIUS_KM / kernel_km) ** 2
    log_norm = torch.log(kappa) - math.log(2 * math.pi) - torch.log1p(-torch.exp(-2 * kappa))
    log_k = log_norm + kappa * (dots - 1.0) - 2 * math.log(EARTH_RADIUS_KM)
    return torch.logsumexp(log_q + log_k, dim=1)

def level_ratios(n_partitions: int, factor: float) -> tuple:
    """Relative weights in which each partitioning counts ``factor`` times the next finer one
    (1: the plain product's)."""
    return tuple(float(factor) ** (n_partitions - 1 - p) for p in range(n_partitions))

def fit_calibration(logits, hierarchy, centroids, true_latlng, *, fitted_on: str = "",
                    steps: int = 200, ratios=None) -> Calibration:
    """Weights and kernel width maximising the mean log-likelihood of the true
    locations ``true_latlng`` (N, 2) of held-out images under the mixture, from their logits
    [(N, C_p)] (float tensors or arrays). ``centroids``: (n_fine, 2) lat, lng of the fine cells.
    ``ratios``: fixed relative weights, one per partitioning, times one fitted scale (a
    temperature of the product weighted by them, whose most probable cell it keeps), instead of
    one free weight each."""
    logits = [torch.as_tensor(np.asarray(z) if not isinstance(z, torch.Tensor) else z).double().cpu()
              for z in logits]
    n_parts = len(logits)
    if logits[0].shape[0] < 2:
        raise ValueError("calibration needs at least two held-out images")
    cu = latlng_to_unit(centroids)
    h = torch.as_tensor(np.asarray(hierarchy), dtype=torch.int64)
    log_probs = [torch.log_softmax(z, dim=1) for z in logits]
    # log-parameters keep the weights and the width positive
    if ratios is not None:
        ratios = torch.as_tensor(np.asarray(ratios, dtype=np.float64))
        if ratios.shape != (n_parts,) or not bool(torch.all(torch.isfinite(ratios) & (ratios >= 0))) \
                or not bool(ratios.any()):
            raise ValueError(f"calibration ratios must be {n_parts} finite values >= 0, not all 0, got {ratios.tolist()}")
        ratios = ratios / ratios.max()
    log_w = torch.zeros(1 if ratios is not None else n_parts, dtype=torch.float64, requires_grad=True)
    log_k = torch.tensor(math.log(KERNEL_START_KM), dtype=torch.float64, requires_grad=True)

    def weights():
        return torch.exp(log_w) * ratios if ratios is not None else torch.exp(log_w)

    def nll():
        log_q = torch.log_softmax(hierarchical_log_probs(log_probs, h, weights()), dim=1)
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
    return Calibration(weights=tuple(float(v) for v in weights().detach()), kernel_km=kernel_km,
                       fitted_on=fitted_on,
                       metrics={"nll_before": before, "nll_after": after}).check(n_parts)
