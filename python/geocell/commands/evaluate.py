"""``geocell evaluate``: the accuracy table, credible-region coverage and error CDF of a
checkpoint on a manifest (the work: :mod:`geocell.infer.evaluate`)."""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from geocell.commands._checkpoint import add_checkpoint_arguments, load_geolocator
from geocell.commands._outputs import writable_folder
from geocell.data.dataset import read_dataset
from geocell.infer.bands import band_section
from geocell.infer.evaluate import (REGION_MASSES, accuracy_rows, baseline_errors_km, evaluate_paths,
                                    format_calibration, format_intervals, plot_error_cdf, write_predictions_csv)
from geocell.infer.metrics import BASELINE_ROW, HIERARCHY_ROW, HYBRID_ROW, format_table
from geocell.infer.predict import TTA_COMBINE
from geocell.loading.files import TTA_MODES


def check_outputs(ap: argparse.ArgumentParser, args) -> None:
    """--out and --cdf are checked before the evaluation, not after it (exit 2, the flag named)."""
    for flag, target in (("--out", args.out), ("--cdf", args.cdf)):
        if not target:
            continue
        if os.path.isdir(target):
            ap.error(f"argument {flag}: {target} is a folder")
        why = writable_folder(os.path.dirname(target))
        if why:
            ap.error(f"argument {flag}: {why}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="geocell evaluate",
        description="Accuracy of a checkpoint at 1/25/200/750/2500 km and the median error, per "
                    "partitioning, for the hierarchical prediction and the most-frequent-cell "
                    "baseline.")
    add_checkpoint_arguments(ap, checkpoint_help="a geocell checkpoint (best.pt or last.pt of a run)",
                             index_help="retrieval index (default: <checkpoint stem>.retrieval.npz when present); "
                                        "adds the hybrid's row")
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
    ap.add_argument("--mass", type=float, nargs="+", default=[], metavar="X",
                    help="credible-region masses whose coverage is reported besides 0.5 and 0.9")
    ap.add_argument("--limit", type=int, help="evaluate only the first N rows (quick checks)")
    ap.add_argument("--batch-size", type=int, default=32, help="images per batch (default: %(default)s)")
    ap.add_argument("--workers", type=int, default=2, help="decoding worker processes (default: %(default)s)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if any(not 0.0 < m < 1.0 for m in args.mass):
        build_parser().error(f"argument --mass: each mass must be in (0, 1), got {args.mass}")
    check_outputs(build_parser(), args)

    geo = load_geolocator(args, "evaluate")
    if geo is None:
        return 1
    try:
        manifest = read_dataset(args.manifest, image_root=args.image_root)
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
                        num_workers=args.workers, region_masses=tuple(sorted(set(REGION_MASSES) | set(args.mass))),
                        progress=not args.no_progress and sys.stderr.isatty())
    for path, reason in ev.skipped:
        print(f"geocell evaluate: skipped {path}: {reason}", file=sys.stderr)
    if len(ev.paths) == 0:
        print("geocell evaluate: no image could be read", file=sys.stderr)
        return 1
    rows = accuracy_rows(ev, geo.fine, countries=True)
    tta = "" if args.tta == "none" else f", tta {args.tta} ({args.tta_combine})"
    print(f"{os.path.basename(args.manifest)}: {len(ev.paths)} images{tta}"
          + (f", retrieval over {len(geo.retrieval)} photos" if geo.hybrid is not None else ""))
    print(format_table(rows))
    summary = ev.calibration_summary()
    if geo.calibration.calibrated:
        if geo.hybrid is not None:
            print("credible regions of the hybrid:")
        print(format_calibration(summary))
    else:
        print("(an uncalibrated checkpoint: no credible-region coverage; top-1 cell "
              f"mean probability {summary.get('mean_top1_probability', float('nan')):.3f}, "
              f"expected calibration error {summary.get('ece_top1', float('nan')):.3f})")
    print(format_intervals(ev))
    if geo.retrieval is not None:  # the index holds the training locations
        print(band_section(ev, geo.retrieval.lat, geo.retrieval.lng, names=[HIERARCHY_ROW, HYBRID_ROW]))
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
