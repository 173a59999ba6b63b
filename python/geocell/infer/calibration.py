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
the kernel width. Which mixture mass is reported as "X %" is fitted by split conformal
prediction on the validation images; with retrieval, separately for the images whose nearest
training photo looks alike and for the rest (:func:`region_groups`), so that the promise holds
whatever share of a test set lies near places the model has seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from geocell._internal.geometry import unit_to_latlng, unit_vectors
from geocell.cells import EARTH_RADIUS_KM
from geocell.infer.metrics import accuracy_table, hierarchical_log_probs, mean_accuracy

REGION_GROUPS = 2           # conformal groups by the top neighbour's similarity (split at validation quantiles)
MIN_GROUP_IMAGES = 100      # fewer validation images per group: one group for all
MAX_GRID_LEVEL = 12  # the finest cells a region is drawn with (about 2 km)
KERNEL_START_KM = 300.0  # where the fit of the kernel width starts (it is fitted on a log scale)
# the candidate weightings of the hierarchy: each partitioning weighs g times the next finer one
HIERARCHY_FACTORS = (1.0, 1.5, 2.0, 3.0, 4.0)
MIXTURE_TOP = 64     # the most probable fine cells that make up the mixture (the rest is renormalised away)
# the background's candidate shares of the mixture and widths (chosen on the validation split)
BACKGROUND_WEIGHTS = (0.0, 0.02, 0.05, 0.1, 0.2)
BACKGROUND_KERNELS_KM = (1000.0, 2000.0, 4000.0, 8000.0)


@dataclass(frozen=True)
class Calibration:
    """How logits become a distribution; stored in checkpoints as :meth:`to_dict`.

    ``kernel_km == 0`` means uncalibrated (checkpoints without a calibration): the region is
    then the fewest fine cells holding the mass, as the plain 2018 method has it."""

    weights: tuple = ()           # one per partitioning, coarsest first: inverse temperatures
    kernel_km: float = 0.0        # spread of a cell's probability around its centroid
    fitted_on: str = ""           # what it was fitted on, for people reading the checkpoint
    metrics: dict = field(default_factory=dict)  # the fit's held-out figures
    retrieval: dict = field(default_factory=dict)  # the hybrid's fit (HybridFit.to_dict), if any
    # Split-conformal regions: the sorted masses of the smallest regions that held each validation
    # image's true location. The region reported as X % is the one of mass region_mass(X), which
    # held the truth for X % of the validation images; empty: X itself.
    region_scores: tuple = ()
    # With retrieval (Mondrian conformal): the validation images grouped by their top neighbour's
    # similarity, ``region_edges`` between the groups, each group's sorted scores; an image's
    # region is fitted on the images of its own group. Empty: region_scores for every image.
    region_edges: tuple = ()
    region_group_scores: tuple = ()
    # The background (:class:`Background`): its share of every image's mixture and its width;
    # 0: none (older fits).
    background_weight: float = 0.0
    background_kernel_km: float = 0.0

    @classmethod
    def identity(cls, n_partitions: int) -> "Calibration":
        return cls(weights=(1.0,) * n_partitions)

    @property
    def calibrated(self) -> bool:
        return self.kernel_km > 0

    def region_mass(self, mass: float, top_similarity: float | None = None) -> float:
        """The mixture mass whose region holds the truth for ``mass`` of the validation images
        (of the group of ``top_similarity``, the image's most similar training photo, when the
        fit has groups): the ceil((n + 1) * mass)-th smallest of their n scores (split conformal
        prediction; with exchangeable images it holds for at least ``mass`` of new ones)."""
        scores = self.region_scores
        if self.region_group_scores and top_similarity is not None:
            scores = self.region_group_scores[int(region_group(self.region_edges, top_similarity))]
        n = len(scores)
        if n == 0:
            return float(mass)
        rank = math.ceil((n + 1) * float(mass))
        return 1.0 if rank > n else float(min(1.0, max(scores[rank - 1], 1e-6)))

    def check(self, n_partitions: int) -> "Calibration":
        """Every stored field within its range (a stored kernel of 1e300 km made lat = nan)."""
        if len(self.weights) != n_partitions:
            raise ValueError(f"calibration has {len(self.weights)} weights for {n_partitions} partitionings")
        if not all(math.isfinite(w) and 0 <= w <= MAX_PARAMETER for w in self.weights) or not any(self.weights):
            raise ValueError(f"calibration weights must be in [0, {MAX_PARAMETER:g}] and not all 0, got {self.weights}")
        if self.kernel_km != 0:
            _check_kernel("calibration kernel_km (0: none)", self.kernel_km)
        if self.region_scores and not _sorted_masses(self.region_scores):
            raise ValueError("calibration region_scores must be sorted masses in [0, 1]")
        check_region_groups(self.region_edges, self.region_group_scores)
        w, k = self.background_weight, self.background_kernel_km
        if not (math.isfinite(w) and 0 <= w < 1) or (w > 0 and not (math.isfinite(k) and k > 0)):
            raise ValueError(f"calibration background: weight must be in [0, 1) and its kernel_km > 0, got {w}, {k}")
        if w > 0:
            _check_kernel("calibration background_kernel_km", k)
        return self

    def to_dict(self) -> dict:
        out = {"weights": [float(w) for w in self.weights],
               "kernel_km": float(self.kernel_km),
               "fitted_on": str(self.fitted_on), "metrics": {k: float(v) for k, v in self.metrics.items()}}
        if self.retrieval:
            out["retrieval"] = dict(self.retrieval)
        if self.region_scores:
            out["region_scores"] = [round(float(v), 5) for v in self.region_scores]
        if self.region_group_scores:
            out["region_edges"] = [float(v) for v in self.region_edges]
            out["region_group_scores"] = [[round(float(v), 5) for v in g] for g in self.region_group_scores]
        if self.background_weight > 0:
            out["background_weight"] = float(self.background_weight)
            out["background_kernel_km"] = float(self.background_kernel_km)
        return out

    @classmethod
    def from_dict(cls, d: dict | None, n_partitions: int) -> "Calibration":
        if not d:
            return cls.identity(n_partitions)
        unknown = set(d) - {"weights", "kernel_km", "fitted_on", "metrics", "retrieval", "region_scores",
                            "region_edges", "region_group_scores", "background_weight", "background_kernel_km"}
        if unknown:
            raise ValueError(f"calibration: unknown fields {sorted(unknown)}")
        return cls(weights=tuple(float(w) for w in d["weights"]), kernel_km=float(d.get("kernel_km", 0.0)),
                   fitted_on=str(d.get("fitted_on", "")),
                   metrics=dict(d.get("metrics", {})),
                   retrieval=HybridFit.from_dict(d["retrieval"]).to_dict() if d.get("retrieval") else {},
                   region_scores=tuple(float(v) for v in d.get("region_scores", ())),
                   background_weight=float(d.get("background_weight", 0.0)),
                   background_kernel_km=float(d.get("background_kernel_km", 0.0)),
                   **region_groups_from_dict(d)).check(n_partitions)


def region_group(edges, top_similarity):
    """The conformal group of each top similarity (array or scalar): the number of edges at or
    below it, so group 0 holds the least similar images."""
    return np.searchsorted(np.asarray(edges, dtype=np.float64), top_similarity, side="right")


def region_groups(masses: np.ndarray, top_similarity: np.ndarray, groups: int = REGION_GROUPS) -> dict:
    """The conformal fit of validation images' truth ``masses``: all sorted (``region_scores``)
    and, with ``top_similarity`` (their most similar training photo's), per group of equal size
    cut at its quantiles (``region_edges``, ``region_group_scores``). Why groups: a test set far
    from the training photos needs larger regions than one near them; fitted over all validation
    images at once, the X % region over-covers near images and under-covers far ones, and the
    share that holds moves with the test set's mix. Fewer than MIN_GROUP_IMAGES per group: one."""
    masses = np.asarray(masses, dtype=np.float64)
    out = {"region_scores": tuple(np.sort(masses).tolist()), "region_edges": (), "region_group_scores": ()}
    if top_similarity is None or groups < 2 or len(masses) < groups * MIN_GROUP_IMAGES:
        return out
    top_similarity = np.asarray(top_similarity, dtype=np.float64)
    edges = np.quantile(top_similarity, np.arange(1, groups) / groups)
    member = region_group(edges, top_similarity)
    if np.bincount(member, minlength=groups).min() < MIN_GROUP_IMAGES:  # ties at an edge
        return out
    out["region_edges"] = tuple(float(e) for e in edges)
    out["region_group_scores"] = tuple(tuple(np.sort(masses[member == g]).tolist()) for g in range(groups))
    return out


# Ranges of stored parameters: a kernel between 10 m and half the Earth's circumference (a
# vMF's concentration (R / kernel)^2 stays finite and positive); other fitted numbers bounded.
KERNEL_KM_RANGE = (0.01, 20_016.0)
MAX_PARAMETER = 1e3


def _check_kernel(name: str, km: float) -> None:
    lo, hi = KERNEL_KM_RANGE
    if not (math.isfinite(km) and lo <= km <= hi):
        raise ValueError(f"{name} must be in [{lo:g}, {hi:g}] km, got {km}")


def check_region_groups(edges, group_scores) -> None:
    if not group_scores and not edges:
        return
    e = np.asarray(edges, dtype=np.float64)
    if len(group_scores) != len(e) + 1 or not np.all(np.isfinite(e)) or np.any(np.diff(e) < 0):
        raise ValueError(f"calibration: {len(group_scores)} region groups need {len(group_scores) - 1} "
                         f"sorted finite edges, got {list(edges)}")
    if not all(len(g) and _sorted_masses(g) for g in group_scores):
        raise ValueError("calibration region_group_scores must be non-empty sorted masses in [0, 1]")


def _sorted_masses(scores) -> bool:
    """Whether conformal scores are masses in [0, 1], sorted ascending."""
    s = np.asarray(scores, dtype=np.float64)
    return bool(np.all((s >= 0) & (s <= 1)) and np.all(np.diff(s) >= 0))


def region_groups_from_dict(d: dict) -> dict:
    """``region_edges`` and ``region_group_scores`` of a stored fit (absent in older ones)."""
    return {"region_edges": tuple(float(v) for v in d.get("region_edges", ())),
            "region_group_scores": tuple(tuple(float(v) for v in g) for g in d.get("region_group_scores", ()))}


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
    return Background(float(calibration.background_weight), counts / counts.sum(), _unit(centroids),
                      float(calibration.background_kernel_km))


def fit_background(truth_density: np.ndarray, true_latlng: np.ndarray, centroids, counts,
                   weights=BACKGROUND_WEIGHTS, kernels_km=BACKGROUND_KERNELS_KM) -> tuple[float, float, dict]:
    """(weight, kernel_km, {(weight, kernel_km): mean log density}): the background share and
    width that maximise the validation images' mean log density at their true locations, given
    ``truth_density``, the density there of each image's mixture without a background (per
    km²). Weight 0 is a candidate, and ties go to the smaller weight."""
    truth = _unit(true_latlng)
    counts = np.asarray(counts, dtype=np.float64)
    means, q = _unit(centroids), counts / counts.sum()
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
    density exceeds its (1 - X) quantile over draws from the mixture)."""

    def __init__(self, log_q: np.ndarray, centroids_unit: np.ndarray, kernel_km: float, *,
                 samples: int = 4000, seed: int = 0, neighbours: "NeighbourKernels | None" = None,
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
        return float(np.mean(self.draw_density >= self.density_at(_unit(latlng))[0]))

    def holds(self, latlng, mass: float) -> bool:
        """Whether the region of ``mass`` holds the location (lat, lng) (the region of mass 1 is
        the whole sphere)."""
        return self.mass_at(latlng) <= mass

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
    cu = _unit(centroids)
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


# ----------------------------------------------------------------------------- the hybrid with retrieval
#
# The k training photos nearest in the trunk's embedding space add a second part to the mixture:
#
#     p(x) = (1 - lambda) * p_cells(x) + lambda * sum_j w_j vMF(x; neighbour_j, kernel_r)
#
# Three ways to weigh it were fitted on the validation split (see fit_retrieval):
#   "uniform": w_j = 1/k, lambda a constant;
#   "softmax": w_j = softmax(s_j / tau) over the neighbours' cosine similarities s_j;
#   "gated":   softmax weights, and lambda = sigmoid(a + b * s_1) depends on how similar the
#              nearest photo is, so an image whose neighbours are all unlike it keeps the cells.
# It stays a probability distribution, so its credible regions keep their meaning.

HYBRID_KINDS = ("uniform", "softmax", "gated")
RETRIEVAL_K = 16
MAX_NEIGHBOURS = 10_000  # a stored k beyond this is damage, not a fit
# Where the hybrid's parameters act: past these the likelihood is flat or meaningless
# (similarities closer than 1e-4 differ by float16 noise; a sigmoid past +-30 is 0 or 1), and
# unbounded, LBFGS could run off to infinity on a small fold (the gated kind's did).
TEMPERATURE_RANGE = (1e-4, 1e3)
GATE_LOGIT_LIMIT = 30.0
NEIGHBOUR_KERNEL_RANGE_KM = (1.0, 20000.0)
KERNEL_SLOPE_UNIT = 20.0  # the fit's unit of the kernel's slope (per 0.05 of similarity: conditioning)


@dataclass(frozen=True)
class NeighbourKernels:
    """One image's retrieval part of the mixture: its share ``weight`` of the mass, spread over
    the neighbours' locations (unit vectors ``means``) with weights ``q`` (summing to 1)."""

    weight: float
    q: np.ndarray
    means: np.ndarray
    kernel_km: float | np.ndarray  # one width, or one per neighbour


@dataclass(frozen=True)
class HybridFit:
    """How the neighbours join the cell mixture; stored in :class:`Calibration` ``retrieval``."""

    kind: str = "gated"
    weight: float = 0.0          # lambda ("uniform", "softmax")
    gate: tuple = (0.0, 0.0)     # (a, b) of lambda = sigmoid(a + b * s_1) ("gated")
    temperature: float = 1.0     # tau of the neighbours' softmax weights
    kernel_km: float = 25.0      # spread around the location of a neighbour of similarity 1
    # ... and around one of similarity s: kernel_km * exp(kernel_slope * (1 - s)); a less similar
    # photo is a vaguer witness of where the query was taken (0: one width for all, older fits)
    kernel_slope: float = 0.0
    k: int = RETRIEVAL_K
    fitted_on: str = ""
    metrics: dict = field(default_factory=dict)
    point_radius_km: float = 0.0  # the best guess's rule (hybrid_points), chosen on the validation split

    def check(self) -> "HybridFit":
        if self.kind not in HYBRID_KINDS:
            raise ValueError(f"retrieval: unknown kind {self.kind!r} (one of {', '.join(HYBRID_KINDS)})")
        numbers = (self.weight, *self.gate, self.temperature, self.kernel_km, self.kernel_slope)
        if not all(math.isfinite(v) for v in numbers) or len(self.gate) != 2:
            raise ValueError(f"retrieval: parameters must be finite numbers, got {self.to_dict()}")
        t_lo, t_hi = TEMPERATURE_RANGE
        if not 0.0 <= self.weight <= 1.0 or not t_lo * (1 - 1e-9) <= self.temperature <= t_hi * (1 + 1e-9) \
                or not 1 <= self.k <= MAX_NEIGHBOURS or not 0 <= self.kernel_slope <= MAX_PARAMETER \
                or not all(abs(g) <= MAX_PARAMETER for g in self.gate):
            raise ValueError(f"retrieval: needs 0 <= weight <= 1, temperature in [{t_lo:g}, {t_hi:g}], "
                             f"kernel_slope in [0, {MAX_PARAMETER:g}], |gate| <= {MAX_PARAMETER:g}, "
                             f"1 <= k <= {MAX_NEIGHBOURS}, got {self.to_dict()}")
        _check_kernel("retrieval kernel_km", self.kernel_km)
        if not (math.isfinite(self.point_radius_km) and 0.0 <= self.point_radius_km <= 20000.0):
            raise ValueError(f"retrieval: point_radius_km must be in [0, 20000], got {self.point_radius_km}")
        return self

    def to_dict(self) -> dict:
        return {"kind": self.kind, "weight": float(self.weight), "gate": [float(v) for v in self.gate],
                "temperature": float(self.temperature), "kernel_km": float(self.kernel_km),
                "kernel_slope": float(self.kernel_slope), "k": int(self.k),
                "fitted_on": str(self.fitted_on), "metrics": {k: float(v) for k, v in self.metrics.items()},
                "point_radius_km": float(self.point_radius_km)}

    @classmethod
    def from_dict(cls, d: dict) -> "HybridFit":
        # region_scores (and its groups): the conformal fit made apart from the checkpoint (geocell
        # index build --fit-split), which belongs to the calibration and is read by Geolocator
        unknown = set(d) - {"kind", "weight", "gate", "temperature", "kernel_km", "kernel_slope", "k",
                            "fitted_on", "metrics",
                            "region_scores", "region_edges", "region_group_scores", "point_radius_km"}
        if unknown:
            raise ValueError(f"retrieval: unknown fields {sorted(unknown)}")
        return cls(kind=str(d["kind"]), weight=float(d.get("weight", 0.0)),
                   gate=tuple(float(v) for v in d.get("gate", (0.0, 0.0))),
                   temperature=float(d.get("temperature", 1.0)), kernel_km=float(d["kernel_km"]),
                   kernel_slope=float(d.get("kernel_slope", 0.0)),
                   k=int(d.get("k", RETRIEVAL_K)), fitted_on=str(d.get("fitted_on", "")),
                   metrics=dict(d.get("metrics", {})),
                   point_radius_km=float(d.get("point_radius_km", 0.0))).check()

    def mix(self, sims) -> tuple[np.ndarray, np.ndarray]:
        """Cosine similarities (B, k), most similar first -> (lambda (B,), neighbour weights (B, k))."""
        logit, log_w = _mix_torch(torch.as_tensor(np.asarray(sims, dtype=np.float64)), self.kind,
                                  *(torch.tensor(v, dtype=torch.float64) for v in self._raw()))
        return torch.sigmoid(logit).numpy(), torch.exp(log_w).numpy()

    def _raw(self):
        lam = min(max(self.weight, 1e-12), 1 - 1e-12)
        return (math.log(lam / (1 - lam)), self.gate[0], self.gate[1], math.log(self.temperature))

    def kernels(self, sims_row, neighbour_latlng) -> NeighbourKernels:
        """The retrieval part for one image (its k similarities and neighbour locations)."""
        lam, w = self.mix(np.asarray(sims_row)[None])
        return NeighbourKernels(weight=float(lam[0]), q=w[0], means=_unit(neighbour_latlng),
                                kernel_km=self.neighbour_kernels_km(sims_row))

    def neighbour_kernels_km(self, sims) -> np.ndarray:
        """The kernel width around each neighbour, from its similarity (any shape)."""
        return _neighbour_kernel(torch.tensor(math.log(self.kernel_km), dtype=torch.float64),
                                 torch.tensor(self.kernel_slope, dtype=torch.float64),
                                 torch.as_tensor(np.asarray(sims, dtype=np.float64))).numpy()


def _mix_torch(sims, kind, logit_lam, gate_a, gate_b, log_tau):
    """(logit of lambda (B,), log neighbour weights (B, k)) for similarities (B, k); log-space,
    so that a weight that underflows to 0 keeps a finite gradient."""
    if kind == "uniform":
        log_w = torch.full_like(sims, -math.log(sims.shape[1]))
    else:
        log_w = torch.log_softmax(sims / _temperature(log_tau), dim=1)
    if kind == "gated":
        logit = (gate_a + gate_b * sims[:, 0]).clamp(-GATE_LOGIT_LIMIT, GATE_LOGIT_LIMIT)
    else:
        logit = logit_lam.expand(sims.shape[0])
    return logit, log_w


def _temperature(log_tau: torch.Tensor) -> torch.Tensor:
    """The neighbours' softmax temperature from its log, within TEMPERATURE_RANGE."""
    return torch.exp(log_tau.clamp(*(math.log(t) for t in TEMPERATURE_RANGE)))


def neighbour_log_density(neighbour_unit, log_w, true_unit, kernel_km) -> torch.Tensor:
    """log sum_j w_j vMF(x; n_j) per image: (N, k, 3) neighbours, (N, k) log-weights, (N, 3);
    ``kernel_km`` one width or (N, k)."""
    dots = torch.einsum("nkd,nd->nk", neighbour_unit, true_unit).clamp(-1.0, 1.0)
    kappa = (EARTH_RADIUS_KM / kernel_km) ** 2
    log_norm = torch.log(kappa) - math.log(2 * math.pi) - torch.log1p(-torch.exp(-2 * kappa)) \
        - 2 * math.log(EARTH_RADIUS_KM)
    return torch.logsumexp(log_w + log_norm + kappa * (dots - 1.0), dim=1)


def _hybrid_nll(kind, p, cell_ll, sims, nb_unit, true_unit) -> torch.Tensor:
    """Mean negative log-likelihood of the true locations under the hybrid with raw params ``p``."""
    logit, log_w = _mix_torch(sims, kind, p["logit_lam"], p["gate_a"], p["gate_b"], p["log_tau"])
    kernels = _neighbour_kernel(p["log_kernel"], _kernel_slope(p["kernel_slope"]), sims)
    nb = neighbour_log_density(nb_unit, log_w, true_unit, kernels)
    return -torch.logaddexp(F.logsigmoid(-logit) + cell_ll, F.logsigmoid(logit) + nb).mean()


def _kernel_slope(raw: torch.Tensor) -> torch.Tensor:
    """The fit's raw slope parameter -> the slope (> 0 with a gradient everywhere: a clamp at 0
    would trap the fit there; -inf, a fit without widening, gives exactly 0)."""
    return KERNEL_SLOPE_UNIT * F.softplus(raw)


def _neighbour_kernel(log_kernel: torch.Tensor, slope: torch.Tensor, sims: torch.Tensor) -> torch.Tensor:
    """Kernel widths (km) around neighbours of similarities ``sims``: the width at similarity 1
    times exp(slope * (1 - s)), the slope at least 0, within NEIGHBOUR_KERNEL_RANGE_KM."""
    log_width = log_kernel + slope.clamp(min=0.0) * (1.0 - sims)
    return torch.exp(log_width.clamp(*(math.log(v) for v in NEIGHBOUR_KERNEL_RANGE_KM)))


def _fit_hybrid(kind, data, steps, widening: bool = False) -> dict:
    """Raw parameters of one kind maximising the mean log-likelihood of ``data``
    (cell log-densities, similarities, neighbour unit vectors, true unit vectors); ``widening``:
    fit the kernel's slope too (else its raw value stays -inf: one width for all)."""
    def start(v):
        return torch.tensor(v, dtype=torch.float64)

    raw = {"logit_lam": start(-2.0), "gate_a": start(-2.0), "gate_b": start(0.0),
           "log_tau": start(math.log(0.1)), "log_kernel": start(math.log(100.0)),
           "kernel_slope": start(-2.0 if widening else -math.inf)}
    free = {"uniform": ("logit_lam", "log_kernel"), "softmax": ("logit_lam", "log_tau", "log_kernel"),
            "gated": ("gate_a", "gate_b", "log_tau", "log_kernel")}[kind] + (("kernel_slope",) if widening else ())
    for name in free:
        raw[name].requires_grad_(True)
    optimizer = torch.optim.LBFGS([raw[n] for n in free], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = _hybrid_nll(kind, raw, *data)
        loss.backward()
        return loss

    optimizer.step(closure)
    return {k: v.detach() for k, v in raw.items()}


def _to_fit(kind, raw, k, fitted_on, metrics) -> HybridFit:
    return HybridFit(kind=kind, weight=float(torch.sigmoid(raw["logit_lam"])),
                     gate=(float(raw["gate_a"]), float(raw["gate_b"])),
                     temperature=float(_temperature(raw["log_tau"])),
                     kernel_km=float(_neighbour_kernel(raw["log_kernel"], torch.zeros(()), torch.ones(()))),
                     kernel_slope=float(_kernel_slope(raw["kernel_slope"])),
                     k=k, fitted_on=fitted_on, metrics=metrics).check()


def fit_retrieval(log_q, centroids, kernel_km: float, sims, neighbour_latlng, true_latlng, *,
                  kinds=HYBRID_KINDS, fitted_on: str = "", steps: int = 50, seed: int = 0,
                  widening: bool = False) -> HybridFit:
    """The hybrid's parameters from held-out images: ``log_q`` (N, n_fine) their calibrated cell
    log-probabilities, ``kernel_km`` the calibration's kernel, ``sims`` (N, k) and
    ``neighbour_latlng`` (N, k, 2) their retrieved training photos, ``true_latlng`` (N, 2).

    Each kind in ``kinds`` is scored by two-fold cross-validation (fitted on one half of the
    images, its mean negative log-likelihood measured on the other); the best is fitted again on
    all of them. ``metrics`` keeps every kind's held-out NLL and the cells' alone. ``widening``:
    the neighbour kernel also widens as the similarity drops (HybridFit.kernel_slope): a better
    likelihood and tighter regions, but a best guess a little less often right (README,
    Retrieval), so it is not the default."""
    log_q = torch.as_tensor(np.asarray(log_q), dtype=torch.float64)
    n = log_q.shape[0]
    if n < 4:
        raise ValueError("fitting the hybrid needs at least four held-out images")
    sims = torch.as_tensor(np.asarray(sims), dtype=torch.float64)
    nb_unit = torch.as_tensor(_unit(np.asarray(neighbour_latlng).reshape(-1, 2)).reshape(n, -1, 3))
    true_unit = torch.as_tensor(_unit(true_latlng))
    with torch.no_grad():
        cell_ll = mixture_log_density(log_q, _unit(centroids), true_latlng,
                                      torch.tensor(float(kernel_km), dtype=torch.float64))
    halves = np.array_split(np.random.default_rng(seed).permutation(n), 2)
    metrics = {"nll_cells": float(-cell_ll.mean())}
    data = (cell_ll, sims, nb_unit, true_unit)
    for kind in kinds:
        held_out = []
        for a, b in ((0, 1), (1, 0)):
            fit_rows, test_rows = torch.as_tensor(halves[a]), torch.as_tensor(halves[b])
            raw = _fit_hybrid(kind, [t[fit_rows] for t in data], steps, widening)
            held_out.append(float(_hybrid_nll(kind, raw, *[t[test_rows] for t in data])))
        metrics[f"nll_cv_{kind}"] = float(np.mean(held_out))
    scored = [kd for kd in kinds if math.isfinite(metrics[f"nll_cv_{kd}"])]
    if not scored:
        raise FloatingPointError("the hybrid's fit diverged for every kind")
    best = min(scored, key=lambda kd: metrics[f"nll_cv_{kd}"])
    raw = _fit_hybrid(best, data, steps, widening)
    metrics["nll_after"] = float(_hybrid_nll(best, raw, *data))
    if not math.isfinite(metrics["nll_after"]):
        raise FloatingPointError(f"the hybrid's fit ({best}) diverged")
    return _to_fit(best, raw, int(sims.shape[1]), fitted_on, metrics)


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


HYBRID_CELL_CANDIDATES = 1  # cell centroids among the hybrid's mode candidates: the top cell's
# The best guess's radius r, chosen on the validation split (HybridFit.point_radius_km): 0 = the
# mixture's densest candidate; r > 0 = the candidate with the most mass within r km, the best
# point for "within r km" under the predictive distribution.
POINT_RADII_KM = (0.0, 25.0, 100.0, 200.0, 750.0)


def hybrid_points(mixture: Mixture, log_q: np.ndarray, fine_unit: np.ndarray, kernels,
                  radii_km=(0.0,)) -> list[tuple[float, float]]:
    """The hybrid's best guess for each radius in ``radii_km``, among the top cell's centroid and
    the neighbours' locations. Radius 0: the candidate where the mixture's density is highest,
    the neighbours competing only when together they hold at least the top cell's share of the
    mass (with a weight near 0 the hybrid answers what the hierarchy answers). Radius r > 0: the
    candidate with the largest share of the mixture's draws within r km."""
    k = min(HYBRID_CELL_CANDIDATES, log_q.size)
    top = np.argpartition(-log_q, k - 1)[:k]
    cells = fine_unit[top]
    everyone = np.concatenate([cells, kernels.means])
    out = []
    for r in radii_km:
        if r <= 0:
            q_top = float(np.exp(np.max(log_q) - np.logaddexp.reduce(log_q)))
            candidates = everyone if kernels.weight >= (1.0 - kernels.weight) * q_top else cells
            best = candidates[mixture.mode(candidates)]
        else:
            near = (everyone @ mixture.draws.T) >= math.cos(r / EARTH_RADIUS_KM)
            best = everyone[int(near.mean(axis=1).argmax())]
        lat, lng = unit_to_latlng(best[None])
        out.append((float(lat[0]), float(lng[0])))
    return out


def hybrid_mode(mixture: Mixture, log_q: np.ndarray, fine_unit: np.ndarray, kernels,
                radius_km: float = 0.0) -> tuple[float, float]:
    """The hybrid's best guess (see :func:`hybrid_points`) for the fit's radius."""
    return hybrid_points(mixture, log_q, fine_unit, kernels, (radius_km,))[0]


def truth_densities(log_q: np.ndarray, fine_centroids: np.ndarray, kernel_km: float, true_latlng: np.ndarray,
                    hybrid: HybridFit | None = None, neighbours=None) -> np.ndarray:
    """Each image's mixture density at its true location (per km², no background): what
    :func:`fit_background` weighs the background against."""
    fine_unit = _unit(fine_centroids)
    out = np.empty(len(true_latlng))
    for i in range(len(true_latlng)):
        kernels = hybrid.kernels(neighbours[0][i], neighbours[1][i]) if hybrid is not None else None
        mixture = Mixture(log_q[i], fine_unit, kernel_km, samples=1, seed=i, neighbours=kernels)
        out[i] = mixture.density_at(_unit(true_latlng[i]))[0]
    return out


def validation_draws(log_q: np.ndarray, fine_centroids: np.ndarray, kernel_km: float, true_latlng: np.ndarray,
                     hybrid: HybridFit | None = None, neighbours=None, radii_km=(), samples: int = 4000,
                     background: Background | None = None):
    """What the validation images say of each image's mixture (with ``hybrid``: joined by the
    retrieved ``neighbours``, (similarities, locations); with ``background``: its share of the
    photos' density too): (the mass of the smallest
    highest-density region that holds each true location, sorted they are a Calibration's
    ``region_scores``; {radius: the hybrid's best guesses (N, 2) by that rule} for ``radii_km``).
    The same draws as ``geocell.infer.evaluate.Evaluator`` (seed = row)."""
    fine_unit = _unit(fine_centroids)
    masses = np.empty(len(true_latlng))
    points = {float(r): np.empty((len(true_latlng), 2)) for r in (radii_km if hybrid is not None else ())}
    for i in range(len(true_latlng)):
        kernels = hybrid.kernels(neighbours[0][i], neighbours[1][i]) if hybrid is not None else None
        mixture = Mixture(log_q[i], fine_unit, kernel_km, samples=samples, seed=i, neighbours=kernels,
                          background=background)
        masses[i] = mixture.mass_at(true_latlng[i])
        if points:
            for r, point in zip(points, hybrid_points(mixture, log_q[i], fine_unit, kernels, tuple(points))):
                points[r][i] = point
    return masses, points


def choose_point_radius(points: dict, true_latlng: np.ndarray) -> tuple[float, dict]:
    """(the radius whose best guesses have the highest mean accuracy over the five radii, the
    scores by radius); ties go to the smaller radius."""
    scores = {r: mean_accuracy(accuracy_table(p, true_latlng)) for r, p in points.items()}
    return max(scores, key=lambda r: (scores[r], -r)), scores


def describe_point_rule(radius_km: float) -> str:
    return "densest point" if radius_km <= 0 else f"most mass within {radius_km:g} km"
