"""The stored records of a fitted model: how its logits become a distribution over the Earth.

:class:`Calibration` (the hierarchy's weights, the cells' kernel, the background, the conformal
regions) and :class:`HybridFit` (how retrieved training photos join the cells) are what a
checkpoint carries besides the network. Training writes them (:mod:`geocell.infer.fitting`),
inference reads them; every field is checked on reading, so a damaged record is refused rather
than predicting NaN. The maths that uses them: :mod:`geocell.infer.mixture`,
:mod:`geocell.infer.hybrid`, :mod:`geocell.infer.conformal`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

# Ranges of stored parameters: a kernel between 10 m and half the Earth's circumference (a
# vMF's concentration (R / kernel)^2 stays finite and positive); other fitted numbers bounded.
KERNEL_KM_RANGE = (0.01, 20_016.0)

MAX_PARAMETER = 1e3
# The hybrid's kinds (geocell.infer.hybrid) and its neighbours per image.
HYBRID_KINDS = ("uniform", "softmax", "gated")

RETRIEVAL_K = 16

MAX_NEIGHBOURS = 10_000  # a stored k beyond this is damage, not a fit

# Where the hybrid's parameters act: past these the likelihood is flat or meaningless
# (similarities closer than 1e-4 differ by float16 noise; a sigmoid past +-30 is 0 or 1), and
# unbounded, LBFGS could run off to infinity on a small fold (the gated kind's did).
TEMPERATURE_RANGE = (1e-4, 1e3)


def partition_names(n: int) -> list[str]:
    """Default row names for n partitionings, coarsest first."""
    return {1: ["fine"], 2: ["coarse", "fine"], 3: ["coarse", "middle", "fine"]}.get(
        n, [f"p{i}" for i in range(n)]
    )


@dataclass(frozen=True)
class HybridFit:
    """How the neighbours join the cell mixture; stored in :class:`Calibration` ``hybrid``."""

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
    # Below this top similarity the retrieved photos say little and the best guess is the cells'
    # (the hierarchy's top cell); chosen on the validation split. -1: never (older fits).
    fallback_similarity: float = -1.0

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
        if not (math.isfinite(self.fallback_similarity) and -1.0 <= self.fallback_similarity <= 2.0):
            raise ValueError(f"retrieval: fallback_similarity must be in [-1, 2], got {self.fallback_similarity}")
        return self

    def to_dict(self) -> dict:
        return {"kind": self.kind, "weight": float(self.weight), "gate": [float(v) for v in self.gate],
                "temperature": float(self.temperature), "kernel_km": float(self.kernel_km),
                "kernel_slope": float(self.kernel_slope), "k": int(self.k),
                "fitted_on": str(self.fitted_on), "metrics": {k: float(v) for k, v in self.metrics.items()},
                "point_radius_km": float(self.point_radius_km),
                "fallback_similarity": float(self.fallback_similarity)}

    @classmethod
    def from_dict(cls, d: dict) -> "HybridFit":
        # region_scores (and its groups): the conformal fit made apart from the checkpoint (geocell
        # index build --fit-split), which belongs to the calibration and is read by Geolocator
        unknown = set(d) - {"kind", "weight", "gate", "temperature", "kernel_km", "kernel_slope", "k",
                            "fitted_on", "metrics",
                            "region_scores", "region_edges", "region_group_scores", "point_radius_km",
                            "fallback_similarity"}
        if unknown:
            raise ValueError(f"retrieval: unknown fields {sorted(unknown)}")
        return cls(kind=str(d["kind"]), weight=float(d.get("weight", 0.0)),
                   gate=tuple(float(v) for v in d.get("gate", (0.0, 0.0))),
                   temperature=float(d.get("temperature", 1.0)), kernel_km=float(d["kernel_km"]),
                   kernel_slope=float(d.get("kernel_slope", 0.0)),
                   k=int(d.get("k", RETRIEVAL_K)), fitted_on=str(d.get("fitted_on", "")),
                   metrics=dict(d.get("metrics", {})),
                   point_radius_km=float(d.get("point_radius_km", 0.0)),
                   fallback_similarity=float(d.get("fallback_similarity", -1.0))).check()

    def trusts(self, top_similarity: float) -> bool:
        """Whether the best guess is the hybrid's for an image whose most similar training photo
        has ``top_similarity`` (else it is the cells')."""
        return float(top_similarity) >= self.fallback_similarity

@dataclass(frozen=True)
class Calibration:
    """How logits become a distribution; stored in checkpoints as :meth:`to_dict`.

    ``kernel_km == 0`` means uncalibrated (checkpoints without a calibration): the region is
    then the fewest fine cells holding the mass, as the plain 2018 method has it."""

    weights: tuple = ()           # one per partitioning, coarsest first: inverse temperatures
    kernel_km: float = 0.0        # spread of a cell's probability around its centroid
    fitted_on: str = ""           # what it was fitted on, for people reading the checkpoint
    metrics: dict = field(default_factory=dict)  # the fit's held-out figures
    hybrid: HybridFit | None = None  # how retrieved training photos join the cells, if fitted
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
        if len(scores) == 0:
            return float(mass)
        return min(1.0, max(conformal_mass(scores, mass), 1e-6))

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
        if self.hybrid is not None:
            out["retrieval"] = self.hybrid.to_dict()  # its stored name
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
                   hybrid=HybridFit.from_dict(d["retrieval"]) if d.get("retrieval") else None,
                   region_scores=tuple(float(v) for v in d.get("region_scores", ())),
                   background_weight=float(d.get("background_weight", 0.0)),
                   background_kernel_km=float(d.get("background_kernel_km", 0.0)),
                   **region_groups_from_dict(d)).check(n_partitions)

def conformal_mass(sorted_scores, level: float) -> float:
    """Split conformal prediction's rule: the ceil((n + 1) * level)-th smallest of n sorted
    scores, or the whole mixture (1.0) where that rank passes n."""
    n = len(sorted_scores)
    rank = max(1, math.ceil((n + 1) * float(level)))
    return 1.0 if rank > n else float(sorted_scores[rank - 1])


def region_group(edges, top_similarity):
    """The conformal group of each top similarity (array or scalar): the number of edges at or
    below it, so group 0 holds the least similar images."""
    return np.searchsorted(np.asarray(edges, dtype=np.float64), top_similarity, side="right")

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
