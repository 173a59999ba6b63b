"""The hybrid with retrieval: the nearest training photos join the cells' distribution.

The k training photos nearest in the trunk's embedding space add a second part to the mixture:

    p(x) = (1 - lambda) * p_cells(x) + lambda * sum_j w_j vMF(x; neighbour_j, kernel_r)

Three ways to weigh it are fitted on the validation split (:func:`fit_retrieval`):
"uniform": w_j = 1/k, lambda a constant; "softmax": w_j = softmax(s_j / tau) over the neighbours'
cosine similarities s_j; "gated": softmax weights, and lambda = sigmoid(a + b * s_1) depends on
how similar the nearest photo is, so an image whose neighbours are all unlike it keeps the
cells. It stays a probability distribution, so its credible regions keep their meaning. The
fitted parameters are a :class:`geocell.model.records.HybridFit`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from geocell._internal.geometry import latlng_to_unit, unit_to_latlng
from geocell.cells import EARTH_RADIUS_KM
from geocell.infer.metrics import accuracy_table, mean_accuracy
from geocell.infer.mixture import Mixture, mixture_log_density
from geocell.model.records import HYBRID_KINDS, TEMPERATURE_RANGE, HybridFit

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


def mix_weights(fit: HybridFit, sims) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarities (B, k), most similar first -> (lambda (B,), neighbour weights (B, k))."""
    logit, log_w = _mix_torch(torch.as_tensor(np.asarray(sims, dtype=np.float64)), fit.kind,
                              *(torch.tensor(v, dtype=torch.float64) for v in _raw(fit)))
    return torch.sigmoid(logit).numpy(), torch.exp(log_w).numpy()


def _raw(fit: HybridFit):
    lam = min(max(fit.weight, 1e-12), 1 - 1e-12)
    return (math.log(lam / (1 - lam)), fit.gate[0], fit.gate[1], math.log(fit.temperature))


def neighbour_kernels(fit: HybridFit, sims_row, neighbour_latlng) -> NeighbourKernels:
    """The retrieval part of one image's mixture (its k similarities and neighbour locations)."""
    lam, w = mix_weights(fit, np.asarray(sims_row)[None])
    return NeighbourKernels(weight=float(lam[0]), q=w[0], means=latlng_to_unit(neighbour_latlng),
                            kernel_km=neighbour_kernels_km(fit, sims_row))


def neighbour_kernels_km(fit: HybridFit, sims) -> np.ndarray:
    """The kernel width around each neighbour, from its similarity (any shape)."""
    return _neighbour_kernel(torch.tensor(math.log(fit.kernel_km), dtype=torch.float64),
                             torch.tensor(fit.kernel_slope, dtype=torch.float64),
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
    nb_unit = torch.as_tensor(latlng_to_unit(np.asarray(neighbour_latlng).reshape(-1, 2)).reshape(n, -1, 3))
    true_unit = torch.as_tensor(latlng_to_unit(true_latlng))
    with torch.no_grad():
        cell_ll = mixture_log_density(log_q, latlng_to_unit(centroids), true_latlng,
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

def best_guess(fit: HybridFit, mixture: Mixture, log_q: np.ndarray, fine_unit: np.ndarray, kernels,
               top_similarity: float) -> tuple[float, float, str]:
    """The prediction's (lat, lng, source): the hybrid's guess by the fit's rule, or the top
    cell's centroid (source "cells") when the most similar training photo is less similar than
    the fit trusts (:attr:`HybridFit.fallback_similarity`): there retrieval is blind and the
    neighbours it finds are anywhere."""
    if not fit.trusts(top_similarity):
        lat, lng = unit_to_latlng(fine_unit[int(np.argmax(log_q))][None])
        return float(lat[0]), float(lng[0]), "cells"
    lat, lng = hybrid_mode(mixture, log_q, fine_unit, kernels, fit.point_radius_km)
    return lat, lng, "hybrid"


# Candidate thresholds of the fallback: these quantiles of the validation images' top similarity.
FALLBACK_QUANTILES = tuple(np.linspace(0.0, 1.0, 21)[1:].tolist())
FALLBACK_CHECKED_KM = (750.0, 2500.0)  # where the default must not lose to the cells, in every band
MIN_BAND_IMAGES = 20  # a band with fewer validation images is not checked (too noisy to decide by)


def choose_fallback(hybrid_latlng, cells_latlng, top_similarity, true_latlng, bands) -> tuple[float, dict]:
    """The top similarity below which the best guess is the cells' (:func:`best_guess`): among
    -1 (never), the FALLBACK_QUANTILES of ``top_similarity`` and 2 (always), those whose guesses
    are within FALLBACK_CHECKED_KM at least as often as the cells' in every distance band
    (``bands``: each image's band, by its distance to the nearest training photo), the one with
    the best mean accuracy over the five radii (ties: the lower threshold). "Always" passes by
    construction, so the rule never does worse than the cells on these images. (threshold,
    {threshold: mean accuracy or None where a band loses})."""
    hybrid_latlng, cells_latlng = np.asarray(hybrid_latlng, np.float64), np.asarray(cells_latlng, np.float64)
    top_similarity, bands = np.asarray(top_similarity, np.float64), np.asarray(bands)
    cells_table = {b: accuracy_table(cells_latlng[bands == b], true_latlng[bands == b]) for b in np.unique(bands)
                   if np.sum(bands == b) >= MIN_BAND_IMAGES}
    candidates = sorted({-1.0, 2.0, *(float(v) for v in np.quantile(top_similarity, FALLBACK_QUANTILES))})
    scores = {}
    for t in candidates:
        guess = np.where((top_similarity < t)[:, None], cells_latlng, hybrid_latlng)
        holds = all(accuracy_table(guess[bands == b], true_latlng[bands == b])[f"acc_{km:g}km"]
                    >= table[f"acc_{km:g}km"] - 1e-12 for b, table in cells_table.items() for km in FALLBACK_CHECKED_KM)
        scores[t] = mean_accuracy(accuracy_table(guess, true_latlng)) if holds else None
    best = max((t for t in candidates if scores[t] is not None), key=lambda t: (scores[t], -t))
    return best, scores


def choose_point_radius(points: dict, true_latlng: np.ndarray) -> tuple[float, dict]:
    """(the radius whose best guesses have the highest mean accuracy over the five radii, the
    scores by radius); ties go to the smaller radius."""
    scores = {r: mean_accuracy(accuracy_table(p, true_latlng)) for r, p in points.items()}
    return max(scores, key=lambda r: (scores[r], -r)), scores

def describe_point_rule(radius_km: float) -> str:
    return "densest point" if radius_km <= 0 else f"most mass within {radius_km:g} km"
