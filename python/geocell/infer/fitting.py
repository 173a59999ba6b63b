"""The one fitting pipeline: outputs on held-out images in, a fitted :class:`Calibration` out.

After training, the validation split's logits (and trunk embeddings) fix everything between the
network and a prediction, in this order:

1. the hierarchy's weights and the cells' kernel (:func:`fit_cells`; the weighting that gives
   the better hierarchy is kept);
2. with a retrieval index, the hybrid: how the nearest training photos join the cells
   (:func:`geocell.infer.hybrid.fit_retrieval`);
3. the background's share and width, the best guess's rule and the conformal regions
   (:func:`fit_regions`), all from the same draws of each image's mixture.

The trainer runs it on the validation split; ``geocell index build --fit-split`` runs steps 2
and 3 on the rows it is given, keeping the checkpoint's cells and background.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from geocell._internal.geometry import latlng_to_unit
from geocell.infer.bands import image_bands
from geocell.infer.conformal import region_groups
from geocell.infer.hybrid import (POINT_RADII_KM, choose_fallback, choose_point_radius, describe_point_rule,
                                  fit_retrieval, hybrid_points, neighbour_kernels)
from geocell.infer.metrics import HIERARCHY_ROW, accuracy_table, great_circle_errors_km, select_score
from geocell.infer.retrieval import forward_with_embeddings
from geocell.infer.mixture import (BACKGROUND_KERNELS_KM, HIERARCHY_FACTORS, Background, Mixture, background_for,
                                   combined_log_probs, fit_background, fit_calibration, level_ratios)
from geocell.model.records import RETRIEVAL_K, Calibration, HybridFit


def _quiet(message: str) -> None:
    pass


@dataclass(frozen=True)
class HeldOut:
    """What one pass over held-out images gives the fit: per-partitioning ``logits`` [(N, C_p)],
    ``true_latlng`` (N, 2), unit trunk ``embeddings`` (N, D) for the hybrid, and ``name``, what
    they are (kept in the fit's ``fitted_on``)."""

    logits: list
    true_latlng: np.ndarray
    embeddings: np.ndarray | None = None
    name: str = "validation split"

    @property
    def fitted_on(self) -> str:
        return f"{self.name}, {len(self.true_latlng)} images"


@dataclass(frozen=True)
class Fitted:
    """The pipeline's result: the ``calibration`` to store (with its hybrid, background and
    regions), each held-out image's conformal score ``truth_mass`` (the mass of the smallest
    region that held it), and the held-out errors of the hybrid's best guess (None without one)."""

    calibration: Calibration
    truth_mass: np.ndarray
    hybrid_errors_km: np.ndarray | None


def fit(held_out: HeldOut, partitions, hierarchy, *, index=None, calibration: Calibration | None = None,
        widening: bool = False, log: Callable[[str], None] = _quiet) -> Fitted | None:
    """The whole pipeline. ``calibration``: keep its cells' fit and background (refit the hybrid
    and the regions only); else they are fitted too. ``index``: a RetrievalIndex of the training
    photos (needs ``held_out.embeddings``). None when the cells cannot be calibrated."""
    refit_cells = calibration is None
    if refit_cells:
        calibration = fit_cells(held_out, hierarchy, partitions[-1].centroids, log=log)
        if calibration is None:
            return None
    hybrid = None
    if index is not None:
        hybrid = fit_hybrid(held_out, calibration, partitions, hierarchy, index, widening=widening, log=log)
    return fit_regions(held_out, dataclasses.replace(calibration, hybrid=hybrid), partitions, hierarchy, index,
                       refit_background=refit_cells, log=log)


def fit_cells(held_out: HeldOut, hierarchy, fine_centroids, *, log: Callable[[str], None] = _quiet
              ) -> Calibration | None:
    """The calibration with the weights that give the better hierarchy on the held-out images
    (select_score): one free weight per partitioning, or weights in which each partitioning
    counts g times the next finer one, g from HIERARCHY_FACTORS (1: the plain product), times one
    fitted scale. The likelihood alone favours the finest head, which costs the hierarchy the
    coarse heads' continental sense. The top cell does not depend on the scale, so each g is
    scored before any fit and only the best is fitted. None when neither fit succeeds."""
    centroids, n = np.asarray(fine_centroids), np.asarray(hierarchy).shape[1]
    logits = [torch.as_tensor(np.asarray(z)) for z in held_out.logits]

    def score(cal):
        top = combined_log_probs(logits, hierarchy, cal).argmax(dim=1).numpy()
        return select_score({HIERARCHY_ROW: accuracy_table(centroids[top], held_out.true_latlng)})

    def fitted(**kw):
        try:
            return fit_calibration(held_out.logits, hierarchy, centroids, held_out.true_latlng,
                                   fitted_on=held_out.fitted_on, **kw)
        except (ValueError, FloatingPointError) as exc:
            log(f"no calibration with {kw or 'free weights'}: {exc}")
            return None

    fits, scores = {}, {}
    free = fitted()
    if free is not None:
        fits["per partitioning"], scores["per partitioning"] = free, score(free)
    if n > 1:
        by_factor = {g: score(Calibration(weights=level_ratios(n, g))) for g in HIERARCHY_FACTORS}
        g = max(by_factor, key=lambda k: (by_factor[k], -k))  # ties: the smaller factor
        log(f"hierarchy on the {held_out.name} with each coarser partitioning weighing g times more: "
            + ", ".join(f"g {k:g} {100 * v:.1f}" for k, v in by_factor.items()))
        tied = fitted(ratios=level_ratios(n, g))
        if tied is not None:
            fits[f"g {g:g}"], scores[f"g {g:g}"] = tied, by_factor[g]
    if not fits:
        return None
    kind = max(scores, key=scores.get)
    log(f"calibration weights on the {held_out.name}: " + ", ".join(
        f"{k} {', '.join(f'{w:.2f}' for w in fits[k].weights)} (hierarchy score {100 * v:.1f})"
        for k, v in scores.items()) + f"; {kind} chosen")
    return fits[kind]


def fit_hybrid(held_out: HeldOut, calibration: Calibration, partitions, hierarchy, index, *, widening=False,
               log: Callable[[str], None] = _quiet) -> HybridFit | None:
    """The hybrid fitted on the held-out images' neighbours in ``index`` (None, said in the log,
    when it cannot be: too few images, or a fit that diverges)."""
    if not calibration.calibrated or len(held_out.true_latlng) < 4:
        log("no hybrid: it needs a calibration and at least four held-out images")
        return None
    sims, nb = index.neighbours(held_out.embeddings, RETRIEVAL_K)
    log_q = combined_log_probs([torch.as_tensor(np.asarray(z)) for z in held_out.logits], hierarchy, calibration)
    try:
        hybrid = fit_retrieval(log_q, partitions[-1].centroids, calibration.kernel_km, sims, nb,
                               held_out.true_latlng, fitted_on=held_out.fitted_on, widening=widening)
    except (ValueError, FloatingPointError) as exc:
        log(f"no hybrid: {exc}")
        return None
    log(f"hybrid fitted on the {held_out.name}: {describe_fit(hybrid, best_guess=False)}")
    return hybrid


def fit_regions(held_out: HeldOut, calibration: Calibration, partitions, hierarchy, index=None, *,
                refit_background: bool = True, log: Callable[[str], None] = _quiet) -> Fitted:
    """The held-out images once more, from their logits (and neighbours): the background's share
    and width (:func:`geocell.infer.mixture.fit_background`; kept as it is without
    ``refit_background``), then the mass of the smallest region that held each true location,
    from which the conformal regions are fitted, and the hybrid's best guesses by each rule
    (POINT_RADII_KM), of which the one with the best mean accuracy is kept."""
    true = held_out.true_latlng
    fine = partitions[-1].centroids
    log_q = combined_log_probs([torch.as_tensor(np.asarray(z)) for z in held_out.logits], hierarchy,
                               calibration).numpy()
    hybrid = calibration.hybrid
    neighbours = index.neighbours(held_out.embeddings, hybrid.k) if hybrid is not None else None
    coarse = partitions[0]
    bands = image_bands(true, index.lat, index.lng) if index is not None else None
    if refit_background:
        weight, kernel, scores = fit_background(
            truth_densities(log_q, fine, calibration.kernel_km, true, hybrid, neighbours),
            true, coarse.centroids, coarse.counts)
        log(f"background (the training photos' density, {len(coarse)} cells) on the {held_out.name}: "
            + (f"{100 * weight:g}% of each mixture, kernel {kernel:g} km" if weight > 0 else "none")
            + f"; mean log density of the true locations {max(scores.values()):.3f}, "
            + f"without it {scores[(0.0, BACKGROUND_KERNELS_KM[0])]:.3f}")
        calibration = dataclasses.replace(calibration, background_weight=weight, background_kernel_km=kernel)
    masses, points = validation_draws(log_q, fine, calibration.kernel_km, true, hybrid, neighbours, POINT_RADII_KM,
                                      background=background_for(calibration, coarse.centroids, coarse.counts))
    errors = None
    if hybrid is not None:
        radius, scores = choose_point_radius(points, true)
        log(f"the hybrid's best guess on the {held_out.name} (mean accuracy over the radii): " + ", ".join(
            f"{describe_point_rule(r)} {100 * v:.1f}" for r, v in scores.items())
            + f"; {describe_point_rule(radius)} chosen")
        # where retrieval is blind (a low top similarity) the cells' guess, if that is better
        cells_points = np.asarray(fine, dtype=np.float64)[np.argmax(log_q, axis=1)]
        top = neighbours[0][:, 0]
        threshold, by_threshold = choose_fallback(points[radius], cells_points, top, true, bands)
        log(f"the best guess falls back to the cells below a top similarity of {threshold:.3f} "
            f"({100 * np.mean(top < threshold):.1f}% of the {held_out.name}; mean accuracy "
            f"{100 * by_threshold[threshold]:.1f}, hybrid alone "
            + (f"{100 * by_threshold[-1.0]:.1f}" if by_threshold[-1.0] is not None else "worse than the cells in a band")
            + f", cells alone {100 * by_threshold[2.0]:.1f})")
        calibration = dataclasses.replace(calibration, hybrid=dataclasses.replace(
            hybrid, point_radius_km=float(radius), fallback_similarity=float(threshold)))
        errors = great_circle_errors_km(np.where((top < threshold)[:, None], cells_points, points[radius]), true)
    top_similarity = neighbours[0][:, 0] if neighbours is not None else None
    # the distance bands make the regions hold in every band; without an index there is no
    # record of the training photos here
    calibration = dataclasses.replace(calibration, **region_groups(masses, top_similarity, bands=bands))
    return Fitted(calibration=calibration, truth_mass=masses, hybrid_errors_km=errors)


def describe_fit(fit: HybridFit, best_guess: bool = True) -> str:
    """One line saying how the hybrid weighs the neighbours and how its kinds scored."""
    m = fit.metrics
    share = (f"weight {fit.weight:.3f}" if fit.kind != "gated"
             else f"weight sigmoid({fit.gate[0]:.2f} + {fit.gate[1]:.2f} x top similarity)")
    study = ", ".join(f"{k[7:]} {v:.3f}" for k, v in m.items() if k.startswith("nll_cv_"))
    kernel = f"neighbour kernel {fit.kernel_km:.1f} km" + (
        f" x exp({fit.kernel_slope:.1f} x (1 - similarity))" if fit.kernel_slope else "")
    return (f"{fit.kind} ({share}, {kernel}, temperature {fit.temperature:.3g}); "
            f"held-out NLL cells alone {m.get('nll_cells', float('nan')):.3f}, two-fold: {study}"
            + (f"; best guess: {describe_point_rule(fit.point_radius_km)}"
               + (f", the cells' below a top similarity of {fit.fallback_similarity:.3f}"
                  if fit.fallback_similarity > -1 else "") if best_guess else ""))


def truth_densities(log_q: np.ndarray, fine_centroids: np.ndarray, kernel_km: float, true_latlng: np.ndarray,
                    hybrid: HybridFit | None = None, neighbours=None) -> np.ndarray:
    """Each image's mixture density at its true location (per km², no background): what
    :func:`fit_background` weighs the background against."""
    fine_unit = latlng_to_unit(fine_centroids)
    out = np.empty(len(true_latlng))
    for i in range(len(true_latlng)):
        kernels = neighbour_kernels(hybrid, neighbours[0][i], neighbours[1][i]) if hybrid is not None else None
        mixture = Mixture(log_q[i], fine_unit, kernel_km, samples=1, seed=i, neighbours=kernels)
        out[i] = mixture.density_at(latlng_to_unit(true_latlng[i]))[0]
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
    fine_unit = latlng_to_unit(fine_centroids)
    masses = np.empty(len(true_latlng))
    points = {float(r): np.empty((len(true_latlng), 2)) for r in (radii_km if hybrid is not None else ())}
    for i in range(len(true_latlng)):
        kernels = neighbour_kernels(hybrid, neighbours[0][i], neighbours[1][i]) if hybrid is not None else None
        mixture = Mixture(log_q[i], fine_unit, kernel_km, samples=samples, seed=i, neighbours=kernels,
                          background=background)
        masses[i] = mixture.mass_at(true_latlng[i])
        if points:
            for r, point in zip(points, hybrid_points(mixture, log_q[i], fine_unit, kernels, tuple(points))):
                points[r][i] = point
    return masses, points


def fit_on_manifest(model, ckpt, partitions, hierarchy, index, manifest, *, device, batch_size, num_workers,
                    progress, name) -> dict:
    """The hybrid fitted on held-out rows of a manifest (their logits and neighbours in
    ``index``), with the best guess's rule and the conformal regions refitted on the same rows:
    the checkpoint's were made with its own fit (or none) and would not keep the regions'
    promise. The checkpoint's cells and background stay, as predictions with this index use them
    too. Returns the index's stored fit (the hybrid's fields and the regions')."""
    import torch

    from geocell.loading.files import make_transform, stream_files

    cal = Calibration.from_dict(ckpt.get("calibration"), len(partitions))
    if not cal.calibrated:
        raise ValueError("the checkpoint is not calibrated (its cells have no kernel to mix with)")
    logits, emb, true = [], [], []
    model = model.to(device).eval()
    with torch.inference_mode():
        for images, indices, _failed in stream_files(manifest.paths, make_transform(ckpt.get("preprocess")),
                                                     batch_size=batch_size, num_workers=num_workers):
            if images is None:
                continue
            geo, _, embeddings = forward_with_embeddings(model, images.to(device))
            logits.append([g.double().cpu().numpy() for g in geo])
            emb.append(embeddings)
            true.append(np.stack([manifest.lat[indices], manifest.lng[indices]], axis=1))
    if not logits:
        raise ValueError("no held-out image could be read")
    held_out = HeldOut([np.concatenate(z) for z in zip(*logits)], np.concatenate(true),
                               np.concatenate(emb), name=name)
    notes = []
    fitted = fit(held_out, partitions, hierarchy, index=index, calibration=cal, log=notes.append)
    if fitted.calibration.hybrid is None:  # the fit said why
        raise ValueError(notes[-1] if notes else f"no hybrid fitted on {held_out.fitted_on}")
    regions = {k: v for k, v in fitted.calibration.to_dict().items() if k.startswith("region_")}
    return {**fitted.calibration.hybrid.to_dict(), **regions}
