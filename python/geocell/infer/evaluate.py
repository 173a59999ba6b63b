"""The evaluation loop (after each training epoch and in ``geocell evaluate``) and its report.

Rows: each partitioning's own top-1, the hierarchical top-1, with a retrieval index the hybrid
(the mode of the cells' mixture joined by the nearest training photos, see
:mod:`geocell.infer.hybrid`) and the most-frequent-cell baseline; columns: the share of images within 1/25/200/750/2500 km and the median error. For a
calibrated model also: how often each credible region holds the true location, the regions'
median area and the expected calibration error of the top-1 cell.
The manifest may be the GeoEstimation test metadata as published (im2gps_places365.csv,
im2gps3k_places365.csv) or the plain layout. Unreadable images are reported and skipped.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import sys
from dataclasses import dataclass, field

import numpy as np

import torch

from geocell.cells import cell_to_token
from geocell._internal.atomic import atomic_write
from geocell._internal.geometry import latlng_to_unit
from geocell._internal.progress import progress_bar
from geocell._internal.torch_util import autocast_context
from geocell.infer.hybrid import best_guess, neighbour_kernels
from geocell.infer.mixture import Mixture, background_for, combined_log_probs
from geocell.infer.metrics import (
    BASELINE_ROW,
    HIERARCHY_ROW,
    HYBRID_ROW,
    INTERVAL_BLOCK_LEVEL,
    THRESHOLDS_KM,
    gather_concat,
    reduce_counts,
    accuracy_from_errors,
    expected_calibration_error,
    baseline_latlng,
    baseline_row,
    best_row_difference,
    bootstrap_interval,
    bootstrap_share,
    format_interval_table,
    great_circle_errors_km,
    location_blocks,
)
from geocell.infer.retrieval import forward_with_embeddings
from geocell.model.records import Calibration, HybridFit, partition_names
from geocell.loading.files import stream_files

REGION_MASSES = (0.5, 0.9)  # the credible regions whose coverage an evaluation reports


@dataclass
class Evaluation:
    """Per-image results of one evaluation pass (the images that could be evaluated)."""

    names: list[str]                      # partitioning names, coarsest first
    paths: list[str]                      # image paths (or manifest rows as strings)
    true_latlng: np.ndarray               # (N, 2)
    pred_latlng: dict[str, np.ndarray]    # row name -> (N, 2): each partitioning + hierarchy
    cells: np.ndarray                     # hierarchical top-1 token per image
    probability: np.ndarray               # its probability (calibrated when the model is)
    top1_correct: np.ndarray              # the true location lies in the top-1 fine cell
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    scene_hits: int = 0
    scene_total: int = 0
    region_holds: dict[float, np.ndarray] = field(default_factory=dict)  # mass -> truth inside?
    region_area_km2: dict[float, np.ndarray] = field(default_factory=dict)  # mass -> area
    # per image, the mixture mass of the smallest region holding the truth (with region_masses)
    truth_mass: np.ndarray = field(default_factory=lambda: np.zeros(0))
    logits: list[np.ndarray] | None = None  # per-partitioning logits, when kept (calibration)
    embeddings: np.ndarray | None = None    # unit trunk embeddings, when kept (fitting the hybrid)

    def errors_km(self) -> dict[str, np.ndarray]:
        return {name: great_circle_errors_km(pred, self.true_latlng)
                for name, pred in self.pred_latlng.items()}

    def subset(self, rows) -> "Evaluation":
        """The per-image results of the images selected by a boolean mask or an index array (the
        scene counts, totals over all images, and the skipped list are not kept)."""
        n = len(self.true_latlng)
        sel = np.asarray(rows)
        idx = np.flatnonzero(sel) if sel.dtype == bool else sel.astype(np.int64).reshape(-1)
        if sel.dtype == bool and len(sel) != n:
            raise ValueError(f"mask has {len(sel)} entries, the evaluation has {n} images")

        def take(a):  # arrays of one entry per image; others (not kept) as they are
            return a[idx] if a is not None and len(a) == n else a

        return dataclasses.replace(
            self, paths=[self.paths[i] for i in idx] if len(self.paths) == n else [],
            true_latlng=self.true_latlng[idx], pred_latlng={k: v[idx] for k, v in self.pred_latlng.items()},
            cells=take(self.cells), probability=take(self.probability), top1_correct=take(self.top1_correct),
            skipped=[], scene_hits=0, scene_total=0,
            region_holds={m: take(h) for m, h in self.region_holds.items()},
            region_area_km2={m: take(a) for m, a in self.region_area_km2.items()},
            truth_mass=take(self.truth_mass), embeddings=take(self.embeddings),
            logits=None if self.logits is None else [take(z) for z in self.logits])

    @property
    def scene_acc(self) -> float | None:
        return self.scene_hits / self.scene_total if self.scene_total else None

    def calibration_summary(self) -> dict:
        """Coverage of each credible region, its median area, and the top-1 cell's ECE."""
        out = {f"coverage_{round(100 * m)}": float(h.mean()) for m, h in self.region_holds.items() if h.size}
        out.update({f"median_area_km2_{round(100 * m)}": float(np.median(a))
                    for m, a in self.region_area_km2.items() if a.size})
        if self.probability.size:
            out["ece_top1"] = expected_calibration_error(self.probability, self.top1_correct)
            out["mean_top1_probability"] = float(self.probability.mean())
        return out


class Evaluator:
    """The evaluation loop's body, shared by the training loop (loaders) and ``geocell
    evaluate`` (image files): feed it each batch's logits and true locations with :meth:`add`;
    :meth:`finish` gathers the ranks' results under torch.distributed."""

    def __init__(self, partitions, hierarchy, *, names=None, calibration: Calibration | None = None,
                 region_masses=(), keep_logits: bool = False, mixture_samples: int = 4000,
                 hybrid: HybridFit | None = None, keep_embeddings: bool = False):
        self.partitions = list(partitions)
        self.hierarchy = np.asarray(hierarchy)
        self.names = list(names) if names is not None else partition_names(len(self.partitions))
        self.calibration = calibration or Calibration.identity(len(self.partitions))
        self.region_masses = tuple(region_masses) if self.calibration.calibrated else ()
        self.keep_logits, self.keep_embeddings = keep_logits, keep_embeddings
        # the hybrid needs the cells' kernel: with an uncalibrated model there is no mixture to join
        self.hybrid = hybrid if self.calibration.calibrated else None
        self.mixture_samples = mixture_samples
        self.centroids = [np.asarray(p.centroids, dtype=np.float64) for p in self.partitions]
        self.fine_unit = latlng_to_unit(self.centroids[-1])
        self.background = background_for(self.calibration, self.centroids[0], self.partitions[0].counts)
        self.fine_tokens = None
        rows = self.names + ([HIERARCHY_ROW] if len(self.names) > 1 else []) + ([HYBRID_ROW] if self.hybrid else [])
        self._pred = {r: [] for r in rows}
        self._truth, self._best, self._prob, self._ids, self._logits, self._emb = [], [], [], [], [], []
        self._holds = {m: [] for m in self.region_masses}
        self._truth_mass = []
        self._areas = {m: [] for m in self.region_masses}
        self.scene_hits = self.scene_total = 0

    def add(self, geo_logits, true_latlng, *, scene_logits=None, scene_labels=None, ids=(),
            neighbours=None, embeddings=None) -> None:
        """``neighbours``: (similarities (B, k), locations (B, k, 2)) of the retrieved training
        photos, needed with a hybrid; ``embeddings`` (B, D) are kept when asked for."""
        true = np.asarray(true_latlng, dtype=np.float64).reshape(-1, 2)
        for name, z, cents in zip(self.names, geo_logits, self.centroids):
            self._pred[name].append(cents[z.argmax(dim=1).cpu().numpy()])
        log_q = combined_log_probs(geo_logits, self.hierarchy, self.calibration).cpu()
        prob, best = log_q.max(dim=1)
        best = best.numpy()
        if len(self.names) > 1:
            self._pred[HIERARCHY_ROW].append(self.centroids[-1][best])
        self._best.append(best)
        self._prob.append(prob.exp().numpy())
        self._truth.append(true)
        self._ids += [str(i) for i in ids]
        if self.keep_logits:
            self._logits.append([z.float().cpu().numpy() for z in geo_logits])
        if self.keep_embeddings and embeddings is not None:
            self._emb.append(np.asarray(embeddings, dtype=np.float32))
        if self.hybrid is not None and neighbours is None:
            raise ValueError("a hybrid evaluation needs each batch's neighbours")
        hybrid_pred = []
        # draws: for the regions, and for a best guess by mass within a radius
        draws = self.region_masses or (self.hybrid is not None and self.hybrid.point_radius_km > 0)
        for i in range(len(true) if (self.region_masses or self.hybrid) else 0):
            kernels = neighbour_kernels(self.hybrid, neighbours[0][i], neighbours[1][i]) if self.hybrid else None
            mixture = Mixture(log_q[i].numpy(), self.fine_unit, self.calibration.kernel_km,
                              samples=self.mixture_samples if draws else 1, seed=i, neighbours=kernels,
                              background=self.background)
            if kernels is not None:
                hybrid_pred.append(best_guess(self.hybrid, mixture, log_q[i].numpy(), self.fine_unit, kernels,
                                              float(neighbours[0][i][0]))[:2])
            if self.region_masses:
                self._truth_mass.append(mixture.mass_at(true[i]))
            top_similarity = float(neighbours[0][i][0]) if neighbours is not None else None
            for m in self.region_masses:
                # the region reported as m: the mass the conformal fit maps m to (m when none)
                fitted = self.calibration.region_mass(m, top_similarity)
                self._holds[m].append(mixture.holds(true[i], fitted))
                self._areas[m].append(mixture.region_area_km2(fitted))
        if self.hybrid is not None:
            self._pred[HYBRID_ROW].append(np.asarray(hybrid_pred, dtype=np.float64).reshape(-1, 2))
        if scene_logits is not None and scene_labels is not None:
            scene = torch.as_tensor(scene_labels).to(scene_logits.device)
            mask = scene >= 0
            self.scene_hits += int((scene_logits.argmax(dim=1)[mask] == scene[mask]).sum())
            self.scene_total += int(mask.sum())

    def finish(self, skipped=(), *, gather: bool = True) -> Evaluation:
        """The Evaluation of everything added; ``gather``: join the ranks' parts under
        torch.distributed (False when every rank was fed the same, already gathered, images)."""
        def cat(chunks, shape):
            joined = np.concatenate(chunks) if chunks else np.zeros(shape)
            return gather_concat(joined) if gather else joined

        true = cat(self._truth, (0, 2))
        best = cat(self._best, (0,)).astype(np.int64)
        if self.fine_tokens is None:
            self.fine_tokens = np.asarray(cell_to_token(np.asarray(self.partitions[-1].cells, np.uint64)))
        truth_cell = self.partitions[-1].assign(true[:, 0], true[:, 1]) if len(true) else np.zeros(0, np.int64)
        logits = None
        if self.keep_logits:
            logits = [cat([b[p] for b in self._logits], (0, len(self.partitions[p])))
                      for p in range(len(self.partitions))]
        scene_hits, scene_total = (reduce_counts(self.scene_hits, self.scene_total) if gather
                                   else (self.scene_hits, self.scene_total))
        embeddings = cat(self._emb, (0, 0)) if self.keep_embeddings else None
        return Evaluation(
            names=self.names, paths=list(self._ids), true_latlng=true,
            pred_latlng={r: cat(v, (0, 2)) for r, v in self._pred.items()},
            cells=self.fine_tokens[best] if best.size else np.zeros(0, dtype=str),
            probability=cat(self._prob, (0,)), top1_correct=(truth_cell == best),
            skipped=list(skipped), scene_hits=scene_hits, scene_total=scene_total,
            region_holds={m: cat([np.asarray(v, dtype=bool)], (0,)) for m, v in self._holds.items()},
            region_area_km2={m: cat([np.asarray(v, dtype=np.float64)], (0,)) for m, v in self._areas.items()},
            truth_mass=cat([np.asarray(self._truth_mass, dtype=np.float64)], (0,)),
            logits=logits, embeddings=embeddings)


@torch.no_grad()
def evaluate_loader(model, loader, partitions, hierarchy, device, *, amp=None, names=None, channels_last=False,
                    calibration: Calibration | None = None, region_masses=(), keep_logits=False,
                    retrieval=None, hybrid: HybridFit | None = None, keep_embeddings=False) -> Evaluation:
    """One pass of ``model`` over a training-style loader (batches of images and targets).
    Under torch.distributed every rank evaluates its shard and every rank gets the whole result.
    With a ``retrieval`` index and a ``hybrid`` fit the table gains the hybrid's row."""
    device = torch.device(device)
    hybrid = hybrid if retrieval is not None else None
    evaluator = Evaluator(partitions, hierarchy, names=names, calibration=calibration,
                          region_masses=region_masses, keep_logits=keep_logits, hybrid=hybrid,
                          keep_embeddings=keep_embeddings)
    features = keep_embeddings or evaluator.hybrid is not None
    net = getattr(model, "module", model)  # the features come from the model inside DDP
    was_training = model.training
    model.eval()
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        emb = neighbours = None
        with autocast_context(device, amp):
            if features:
                geo_logits, scene_logits, emb = forward_with_embeddings(net, images)
            else:
                geo_logits, scene_logits = model(images)
        if evaluator.hybrid is not None:
            neighbours = retrieval.neighbours(emb, evaluator.hybrid.k)
        evaluator.add([g.float() for g in geo_logits], targets["latlng"].cpu().numpy(),
                      scene_logits=scene_logits, scene_labels=targets.get("scene"),
                      ids=targets["index"].cpu().tolist(), neighbours=neighbours, embeddings=emb)
    if was_training:
        model.train()
    return evaluator.finish()


def evaluate_paths(geo, paths, true_latlng, *, tta: str = "none", tta_combine: str = "max",
                   batch_size: int = 32, num_workers: int = 2, progress: bool = False,
                   region_masses=REGION_MASSES) -> Evaluation:
    """Run ``geo`` (a Geolocator, with its calibration) over image files with known locations."""
    true_latlng = np.asarray(true_latlng, dtype=np.float64).reshape(-1, 2)
    if len(paths) != len(true_latlng):
        raise ValueError(f"{len(paths)} paths but {len(true_latlng)} locations")
    evaluator = Evaluator(geo.partitions, geo.hierarchy, names=geo.partition_names,
                          calibration=geo.calibration, region_masses=region_masses, hybrid=geo.hybrid)
    skipped = []
    bar = progress_bar(len(paths), progress, file=sys.stderr, dynamic_ncols=True)
    for images, indices, failed in stream_files(paths, geo.transform(tta), batch_size=batch_size,
                                                num_workers=num_workers):
        skipped += [(paths[i], err) for i, err in failed]
        if images is not None:
            log_probs, _, emb = geo.head_outputs(images, tta_combine=tta_combine)
            evaluator.add(log_probs, true_latlng[indices], ids=[paths[i] for i in indices],
                          neighbours=geo.neighbours(emb) if evaluator.hybrid is not None else None)
        bar.update(len(indices) + len(failed))
    bar.close()
    return evaluator.finish(skipped)


def accuracy_rows(ev: Evaluation, finest_partition, *, countries: bool = False) -> dict[str, dict]:
    """{row name: accuracy dict} for each partitioning, the hierarchy and the baseline; with
    ``countries``, each row also holds ``acc_country`` (geocell.infer.countries; a few seconds)."""
    rows = {name: accuracy_from_errors(err) for name, err in ev.errors_km().items()}
    rows[BASELINE_ROW] = baseline_row(finest_partition, ev.true_latlng)
    if countries and len(ev.true_latlng):
        from geocell.infer.countries import country_accuracy, latlng_to_country

        true_country = latlng_to_country(ev.true_latlng[:, 0], ev.true_latlng[:, 1])
        preds = dict(ev.pred_latlng)
        preds[BASELINE_ROW] = baseline_latlng(finest_partition, len(ev.true_latlng))
        for name, pred in preds.items():
            rows[name]["acc_country"], rows[name]["n_country"] = country_accuracy(pred, ev.true_latlng, true_country)
    return rows


def baseline_errors_km(finest_partition, true_latlng) -> np.ndarray:
    true_latlng = np.asarray(true_latlng, dtype=np.float64).reshape(-1, 2)
    return great_circle_errors_km(baseline_latlng(finest_partition, len(true_latlng)), true_latlng)


def format_calibration(summary: dict) -> str:
    """One line per figure of :meth:`Evaluation.calibration_summary`."""
    lines = []
    for key, value in summary.items():
        if key.startswith("coverage_"):
            lines.append(f"{key[9:]}% credible region holds the true location for {100 * value:.1f}% of images")
        elif key.startswith("median_area_km2_"):
            lines.append(f"median area of the {key[16:]}% region: {value:,.0f} km²")
    if "ece_top1" in summary:
        lines.append(f"top-1 cell: mean probability {summary['mean_top1_probability']:.3f}, "
                     f"expected calibration error {summary['ece_top1']:.3f}")
    return "\n".join(lines)


def format_intervals(ev: Evaluation, *, rows=None, seed: int = 0) -> str:
    """95 % intervals of one evaluation's figures, resampling the S2 blocks of the true locations
    (:func:`geocell.infer.metrics.location_blocks`): photos of one region are not independent
    draws, so a test set of a few dozen regions says less than its image count suggests. Each
    row's accuracies (``rows``: only those, of the rows the evaluation has), the hierarchy against
    the best single partitioning, the regions' coverage."""
    if len(ev.true_latlng) == 0:
        return ""
    blocks = location_blocks(ev.true_latlng)
    errors = ev.errors_km()
    shown = [n for n in (rows or ()) if n in errors] or list(errors)
    rows = {name: bootstrap_interval(errors[name][None], blocks=blocks, seed=seed) for name in shown}
    counts = np.unique(blocks, return_counts=True)[1]
    # Kish's effective number: as many blocks of equal size would be as informative
    effective = counts.sum() ** 2 / (counts ** 2).sum()
    lines = [f"95 % intervals, resampling the {len(counts)} S2 level-{INTERVAL_BLOCK_LEVEL} blocks of the true "
             f"locations (their effective number is {effective:.1f}: the largest holds "
             f"{100 * counts.max() / counts.sum():.0f}% of the images):", format_interval_table(rows)]
    if HIERARCHY_ROW in errors and len(ev.names) > 1:
        d = best_row_difference(errors, HIERARCHY_ROW, ev.names, blocks=blocks, seed=seed)
        lines.append("hierarchy minus the best single partitioning: " + ", ".join(
            f"{t} km {100 * v:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]" for t, (v, lo, hi) in d.items()))
    for m, held in ev.region_holds.items():
        if held.size:
            v, lo, hi = bootstrap_share(held, blocks=blocks, seed=seed)
            lines.append(f"{100 * m:g}% credible region holds the true location for {100 * v:.1f}% "
                         f"[{100 * lo:.1f}, {100 * hi:.1f}]")
    return "\n".join(lines)


def plot_error_cdf(errors_km: dict[str, np.ndarray], path, title: str | None = None) -> str:
    """Share of images with error ≤ d against d (log scale), one line per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for name, err in errors_km.items():
        err = np.sort(np.asarray(err, dtype=np.float64))
        if err.size == 0:
            continue
        # Errors of 0 km (same centroid) would vanish off a log axis: floor them at 0.1 km.
        x = np.concatenate([[0.1], np.maximum(err, 0.1), [20038.0]])
        y = np.concatenate([[0.0], np.arange(1, err.size + 1) / err.size, [1.0]])
        ax.step(x, y, where="post", label=name, ls="--" if name == BASELINE_ROW else "-")
    for t in THRESHOLDS_KM:
        ax.axvline(t, color="grey", lw=0.6, ls=":")
    ax.set_xscale("log")
    ax.set_xlim(0.1, 20038.0)  # half the equator: the largest possible error
    ax.set_ylim(0, 1)
    ax.set_xlabel("great-circle error (km)")
    ax.set_ylabel("share of images with error ≤ x")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="major")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    try:
        with atomic_write(path, "wb", suffix=os.path.splitext(os.fspath(path))[1]) as f:
            fig.savefig(f, format=os.path.splitext(os.fspath(path))[1][1:] or "png")
    finally:
        plt.close(fig)
    return os.fspath(path)


def write_predictions_csv(ev: Evaluation, path) -> None:
    errors = ev.errors_km()
    final = next(r for r in (HYBRID_ROW, HIERARCHY_ROW, ev.names[-1]) if r in ev.pred_latlng)
    header = ["image", "true_lat", "true_lng", "pred_lat", "pred_lng", "error_km", "cell", "probability"]
    for name in ev.names:
        header += [f"{name}_lat", f"{name}_lng", f"{name}_error_km"]
    header.append("error")
    with atomic_write(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for i, image in enumerate(ev.paths):
            pred = ev.pred_latlng[final][i]
            row = [image, f"{ev.true_latlng[i, 0]:.6f}", f"{ev.true_latlng[i, 1]:.6f}",
                   f"{pred[0]:.6f}", f"{pred[1]:.6f}", f"{errors[final][i]:.3f}",
                   ev.cells[i], f"{ev.probability[i]:.6g}"]
            for name in ev.names:
                p = ev.pred_latlng[name][i]
                row += [f"{p[0]:.6f}", f"{p[1]:.6f}", f"{errors[name][i]:.3f}"]
            w.writerow(row + [""])
        for image, reason in ev.skipped:
            w.writerow([image] + [""] * (len(header) - 2) + [reason])
