"""``geocell predict``: locate photos with a checkpoint; text, JSON or CSV out, probability maps
(the work: :class:`geocell.infer.predict.Geolocator`)."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

import numpy as np

from geocell._internal.atomic import atomic_write
from geocell.commands._checkpoint import add_checkpoint_arguments, load_geolocator
from geocell.commands._outputs import map_target_problem, writable_folder
from geocell.infer.predict import TTA_COMBINE, csv_header, csv_row, display_name, format_prediction, list_inputs
from geocell.infer.regions import MAX_TOP_K
from geocell.loading.files import TTA_MODES


def _exif_location(path: str) -> tuple[float, float] | None:
    """The photo's own GPS position, if its EXIF has one (marked on the map as the truth)."""
    from geocell.data.exif import read_gps

    try:
        return read_gps(path)
    except Exception:  # no GPS block, or EXIF the reader does not understand
        return None


def _parse_truth(text: str) -> tuple[float, float]:
    try:
        lat, lng = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LAT,LNG, got {text!r}") from None
    if not (-90 <= lat <= 90 and -180 <= lng <= 180):
        raise argparse.ArgumentTypeError(f"LAT,LNG out of range: {text!r}")
    return lat, lng


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="geocell predict",
        description="Estimate where photos were taken: top-k S2 cells, the hierarchical best "
                    "guess and the 90%% credible region with its area. Folders are searched "
                    "for images. Unreadable images are reported and skipped.")
    ap.add_argument("images", nargs="+", metavar="IMG", help="image files or folders")
    add_checkpoint_arguments(ap)
    ap.add_argument("--top-k", type=int, default=5, help="candidates per image (default 5)")
    ap.add_argument("--mass", type=float, default=0.9, help="credible region mass (default 0.9)")
    ap.add_argument("--json", action="store_true", help="print JSON to stdout instead of text")
    ap.add_argument("--out", help="write all predictions to a .csv or .json file")
    ap.add_argument("--map", metavar="PNG", help="probability map; several images: "
                    "out.png -> out_0.png, out_1.png, ... (or give a folder)")
    ap.add_argument("--truth", type=_parse_truth, metavar="LAT,LNG",
                    help="true location to mark on the map(s) (default: the photo's EXIF GPS, if any)")
    ap.add_argument("--tta", choices=TTA_MODES, default="none", help="test-time crops")
    ap.add_argument("--tta-combine", choices=TTA_COMBINE, default="max")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2, help="decoding worker processes (default: %(default)s)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def check_args(ap: argparse.ArgumentParser, args) -> None:
    """Everything that can be checked before the checkpoint is loaded and the first image read;
    a bad value ends the command the argparse way (exit 2, the flag named)."""
    if not 1 <= args.top_k <= MAX_TOP_K:
        ap.error(f"argument --top-k: must be between 1 and {MAX_TOP_K}, got {args.top_k}")
    if not 0.0 < args.mass <= 1.0:  # also refuses nan
        ap.error(f"argument --mass: must be in (0, 1], got {args.mass}")
    if args.batch_size < 1:
        ap.error(f"argument --batch-size: must be at least 1, got {args.batch_size}")
    if args.workers < 0:
        ap.error(f"argument --workers: must be at least 0, got {args.workers}")
    if args.out:
        if not args.out.lower().endswith((".csv", ".json")):
            ap.error(f"argument --out: must end in .csv or .json, got {args.out}")
        if os.path.isdir(args.out):
            ap.error(f"argument --out: {args.out} is a folder")
        why = writable_folder(os.path.dirname(args.out))
        if why:
            ap.error(f"argument --out: {why}")
    if args.map:
        why = map_target_problem(args.map)
        if why:
            ap.error(f"argument --map: {why}")


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    check_args(ap, args)
    geo = load_geolocator(args, "predict")
    if geo is None:
        return 1

    paths, passed_over = list_inputs(args.images)
    for path, why in passed_over:
        print(f"geocell predict: not predicted {display_name(path)}: {why}", file=sys.stderr)
    if not paths:
        print("geocell predict: no images found", file=sys.stderr)
        return 1
    map_paths = None
    if args.map:
        from geocell.infer.maps import numbered_map_paths

        map_paths = numbered_map_paths(args.map, len(paths), names=paths)

    records, skipped = [], list(passed_over)  # the files not predicted are in every output
    csv_rows = [csv_row(path, None, why, args.top_k) for path, why in passed_over]
    show_text = not args.json and not args.out
    progress = not args.no_progress and len(paths) > 1 and sys.stderr.isatty()
    for i, (path, pred, error) in enumerate(geo.predict_files(
            paths, args.top_k, mass=args.mass, tta=args.tta, tta_combine=args.tta_combine,
            batch_size=args.batch_size, num_workers=args.workers,
            keep_probs=map_paths is not None, progress=progress)):
        if pred is None:
            skipped.append((path, error))
            print(f"geocell predict: skipped {display_name(path)}: {error}", file=sys.stderr)
            csv_rows.append(csv_row(path, None, error, args.top_k))
            continue
        if map_paths is not None:
            from geocell.infer.maps import draw_probability_map

            top = pred.best_guess
            draw_probability_map(
                map_paths[i], np.asarray(geo.fine.cells, dtype=np.uint64), pred.fine_probs,
                top1=top, truth=args.truth or _exif_location(path), region=pred.region_cell_ids,
                title=f"{display_name(os.path.basename(path))}: best guess {top[0]:.3f}, {top[1]:.3f}; "
                      f"{pred.region_mass:.0%} region {pred.region_area_km2:,.0f} km²")
            pred.fine_probs = pred.region_cell_ids = None  # don't hold n_fine floats per image
        records.append(pred.to_dict())
        csv_rows.append(csv_row(path, pred, None, args.top_k))
        if show_text:
            print(format_prediction(pred))

    document = {"checkpoint": os.fspath(args.checkpoint), "predictions": records,
                "skipped": [{"image": p, "error": e} for p, e in skipped]}
    if args.out:
        # JSON: names are kept exactly (ASCII escapes, non-UTF-8 bytes as \\udcXX surrogates that
        # os.fsencode turns back into the bytes). CSV: display names; backslashreplace also
        # covers a non-UTF-8 name inside an error message.
        if args.out.lower().endswith(".json"):
            with atomic_write(args.out, "w", encoding="utf-8") as f:
                json.dump(document, f, indent=1, ensure_ascii=True)
        else:
            with atomic_write(args.out, "w", newline="", encoding="utf-8", errors="backslashreplace") as f:
                writer = csv.writer(f)
                writer.writerow(csv_header(args.top_k))
                writer.writerows(csv_rows)
    if args.json:
        json.dump(document, sys.stdout, indent=1)
        sys.stdout.write("\n")
    summary = f"predicted {len(records)} of {len(paths) + len(passed_over)} images"
    if skipped:
        summary += f"; skipped {len(skipped)} unreadable"
    if args.out:
        summary += f"; wrote {args.out}"
    if map_paths is not None and records:
        summary += f"; maps: {map_paths[0]}" + (" ..." if len(map_paths) > 1 else "")
    print(summary, file=sys.stderr)
    return 0 if records or not skipped else 1
