"""``geocell evaluate``: accuracy table and error CDF of a checkpoint on a manifest.

Rows: each partitioning's own top-1, the hierarchical top-1 and the most-frequent-cell
baseline; columns: the share of images within 1/25/200/750/2500 km and the median error.
The manifest may be the GeoEstimation test metadata as published (im2gps_places365.csv,
im2gps3k_places365.csv) or the plain layout. Unreadable images are reported and skipped.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from dataclasses import dataclass, field

import numpy as np

from geocell.infer.metrics import (
    BASELINE_ROW,
    HIERARCHY_ROW,
    THRESHOLDS_KM,
    accuracy_from_errors,
    baseline_row,
    format_table,
    great_circle_errors_km,
)


@dataclass
class Evaluation:
    """Per-image predictions of one evaluation run (rows that could be evaluated)."""

    names: list[str]                      # partitioning names, coarsest first
    paths: list[str]
    true_latlng: np.ndarray               # (N, 2)
    pred_latlng: dict[str, np.ndarray]    # row name -> (N, 2): each partitioning + hierarchy
    cells: np.ndarray                     # hierarchical top-1 token per image
    probability: np.ndarray               # its (renormalised hierarchical) probability
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def errors_km(self) -> dict[str, np.ndarray]:
        return {name: great_circle_errors_km(pred, self.true_latlng)
                for name, pred in self.pred_latlng.items()}


def evaluate_paths(geo, paths, true_latlng, *, tta: str = "none", tta_combine: str = "max",
                   batch_size: int = 32, num_workers: int = 2, progress: bool = False) -> Evaluation:
    """Run ``geo`` (a Geolocator) over image files with known locations."""
    true_latlng = np.asarray(true_latlng, dtype=np.float64).reshape(-1, 2)
    if len(paths) != len(true_latlng):
        raise ValueError(f"{len(paths)} paths but {len(true_latlng)} locations")
    from geocell.infer.predict import stream_files

    names = list(geo.partition_names)
    rows = names + ([HIERARCHY_ROW] if len(names) > 1 else [])
    centroids = [np.asarray(p.centroids, dtype=np.float64) for p in geo.partitions]
    fine_tokens = geo.tokens(len(names) - 1)
    kept, cells, probability, skipped = [], [], [], []
    preds: dict[str, list[np.ndarray]] = {r: [] for r in rows}

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(paths), unit="img", file=sys.stderr, dynamic_ncols=True)
    for images, indices, failed in stream_files(paths, geo.transform(tta), batch_size=batch_size,
                                                num_workers=num_workers):
        skipped += [(paths[i], err) for i, err in failed]
        if images is not None:
            probs, hier, _ = geo.distributions(images, tta_combine=tta_combine)
            for name, p, cents in zip(names, probs, centroids):
                preds[name].append(cents[p.argmax(axis=1)])
            best = hier.argmax(axis=1)
            if len(names) > 1:
                preds[HIERARCHY_ROW].append(centroids[-1][best])
            cells.append(fine_tokens[best])
            probability.append(hier[np.arange(len(best)), best])
            kept += indices
        if bar is not None:
            bar.update(len(indices) + len(failed))
    if bar is not None:
        bar.close()

    def cat(chunks, shape):
        return np.concatenate(chunks) if chunks else np.zeros(shape)

    kept_idx = np.asarray(kept, dtype=np.int64)
    return Evaluation(
        names=names, paths=[paths[i] for i in kept], true_latlng=true_latlng[kept_idx],
        pred_latlng={r: cat(preds[r], (0, 2)) for r in rows},
        cells=cat(cells, (0,)).astype(str), probability=cat(probability, (0,)), skipped=skipped)


def accuracy_rows(ev: Evaluation, finest_partition) -> dict[str, dict]:
    """{row name: accuracy dict} for each partitioning, the hierarchy and the baseline."""
    rows = {name: accuracy_from_errors(err) for name, err in ev.errors_km().items()}
    rows[BASELINE_ROW] = baseline_row(finest_partition, ev.true_latlng)
    return rows


def baseline_errors_km(finest_partition, true_latlng) -> np.ndarray:
    top = int(np.argmax(np.asarray(finest_partition.counts)))
    pred = np.asarray(finest_partition.centroids, dtype=np.float64)[top]
    true_latlng = np.asarray(true_latlng, dtype=np.float64).reshape(-1, 2)
    return great_circle_errors_km(np.repeat(pred[None], len(true_latlng), axis=0), true_latlng)


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
    fig.savefig(path)
    plt.close(fig)
    return os.fspath(path)


def write_predictions_csv(ev: Evaluation, path) -> None:
    errors = ev.errors_km()
    final = HIERARCHY_ROW if HIERARCHY_ROW in ev.pred_latlng else ev.names[-1]
    header = ["image", "true_lat", "true_lng", "pred_lat", "pred_lng", "error_km", "cell", "probability"]
    for name in ev.names:
        header += [f"{name}_lat", f"{name}_lng", f"{name}_error_km"]
    header.append("error")
    with open(path, "w", newline="", encoding="utf-8") as f:
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


def build_parser() -> argparse.ArgumentParser:
    from geocell.infer.predict import TTA_COMBINE, TTA_MODES

    ap = argparse.ArgumentParser(
        prog="geocell evaluate",
        description="Accuracy of a checkpoint at 1/25/200/750/2500 km and the median error, per "
                    "partitioning, for the hierarchical prediction and the most-frequent-cell "
                    "baseline.")
    ap.add_argument("--checkpoint", required=True, help="a geocell checkpoint (best.pt or last.pt of a run)")
    ap.add_argument("--manifest", required=True,
                    help="GeoEstimation metadata (e.g. im2gps3k_places365.csv) or path,lat,lng CSV")
    ap.add_argument("--image-root", help="folder the manifest's image paths are relative to "
                    "(default: the manifest's folder)")
    ap.add_argument("--split", help="evaluate only the manifest rows of this split (e.g. test); "
                    "default: every row")
    ap.add_argument("--tta", choices=TTA_MODES, default="none",
                    help="'five': four corner crops + centre, combined by --tta-combine")
    ap.add_argument("--tta-combine", choices=TTA_COMBINE, default="max",
                    help="how the five crops' probabilities are combined (default: %(default)s)")
    ap.add_argument("--cdf", metavar="PNG", help="write the error CDF plot")
    ap.add_argument("--out", metavar="CSV", help="write per-image predictions")
    ap.add_argument("--limit", type=int, help="evaluate only the first N rows (quick checks)")
    ap.add_argument("--batch-size", type=int, default=32, help="images per batch (default: %(default)s)")
    ap.add_argument("--workers", type=int, default=2, help="decoding worker processes (default: %(default)s)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from geocell.data.manifest import read_manifest
    from geocell.infer.predict import Geolocator

    try:
        geo = Geolocator.from_checkpoint(args.checkpoint, device=args.device)
    except Exception as exc:  # unreadable, unsafe or incompatible file: say which and why
        print(f"geocell evaluate: cannot load {args.checkpoint}: {exc}", file=sys.stderr)
        return 1
    try:
        manifest = read_manifest(args.manifest, image_root=args.image_root)
    except (OSError, ValueError) as exc:
        print(f"geocell evaluate: cannot read {args.manifest}: {exc}", file=sys.stderr)
        return 1
    if manifest.report:
        print(f"geocell evaluate: {len(manifest.report)} manifest rows left out:\n"
              f"{manifest.format_report()}", file=sys.stderr)
    if args.split is not None:
        if manifest.split is None:
            print(f"geocell evaluate: {args.manifest} has no split column (--split {args.split})", file=sys.stderr)
            return 2
        keep = np.asarray(manifest.split) == args.split
        if not keep.any():
            print(f"geocell evaluate: no rows of split {args.split!r} in {args.manifest} (splits: "
                  f"{', '.join(sorted(set(map(str, manifest.split))))})", file=sys.stderr)
            return 2
        manifest = manifest.subset(np.flatnonzero(keep))
    if args.limit is not None:
        manifest = manifest.subset(np.arange(min(args.limit, len(manifest))))
    if len(manifest) == 0:
        print("geocell evaluate: no usable rows in the manifest", file=sys.stderr)
        return 1

    ev = evaluate_paths(geo, manifest.paths, np.stack([manifest.lat, manifest.lng], axis=1),
                        tta=args.tta, tta_combine=args.tta_combine, batch_size=args.batch_size,
                        num_workers=args.workers,
                        progress=not args.no_progress and sys.stderr.isatty())
    for path, reason in ev.skipped:
        print(f"geocell evaluate: skipped {path}: {reason}", file=sys.stderr)
    if len(ev.paths) == 0:
        print("geocell evaluate: no image could be read", file=sys.stderr)
        return 1
    rows = accuracy_rows(ev, geo.fine)
    tta = "" if args.tta == "none" else f", tta {args.tta} ({args.tta_combine})"
    print(f"{os.path.basename(args.manifest)}: {len(ev.paths)} images{tta}")
    print(format_table(rows))
    if ev.skipped or manifest.report:
        print(f"({len(ev.skipped)} unreadable images skipped, {len(manifest.report)} manifest rows "
              "left out; accuracies are over the images evaluated)")
    if args.out:
        write_predictions_csv(ev, args.out)
        print(f"wrote {args.out}", file=sys.stderr)
    if args.cdf:
        errors = ev.errors_km()
        errors[BASELINE_ROW] = baseline_errors_km(geo.fine, ev.true_latlng)
        plot_error_cdf(errors, args.cdf, title=f"{os.path.basename(args.manifest)}: "
                                               f"{len(ev.paths)} images{tta}")
        print(f"wrote {args.cdf}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
