"""`geocell partition`: adaptive S2 partitionings of photo locations from a CSV file.

    geocell partition points.csv --tau 50:5000 --tau 50:2000 --tau 50:1000 -o cells/

writes cells/cells_50_5000.csv ... in the GeoEstimation layout and the
hierarchy linking them (cells/hierarchy.csv or .npy).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import List, Optional, Tuple

from geocell.data.points import data_line_number, read_points, write_partitions
from geocell.partition import InvalidCoordinates, hierarchy, partitions

DEFAULT_TAUS = [(50, 5000), (50, 2000), (50, 1000)]


def _tau(text: str) -> Tuple[int, int]:
    try:
        a, b = text.split(":")
        return int(a), int(b)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected TAU_MIN:TAU_MAX with integers, e.g. 50:1000, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="geocell partition",
        description="Adaptive S2 partitionings (GeoEstimation tau_min/tau_max rule) of the "
                    "photo locations in a CSV file (.csv or .csv.gz).")
    p.add_argument("points", help="CSV file with a header and latitude/longitude columns")
    p.add_argument("--tau", action="append", type=_tau, metavar="MIN:MAX",
                   help="a partitioning: cells keep > MIN points and are split above MAX; "
                        "repeat for several, coarsest first "
                        "(default: 50:5000 50:2000 50:1000)")
    p.add_argument("-o", "--output", default="cells", help="output folder (default: cells)")
    p.add_argument("--lat-column", help="latitude column (default: LAT, lat or latitude)")
    p.add_argument("--lng-column", "--lon-column", dest="lng_column",
                   help="longitude column (default: LON, lng, lon or longitude)")
    p.add_argument("--level-min", type=int, default=2, help="starting S2 level (default 2)")
    p.add_argument("--level-max", type=int, default=30, help="deepest S2 level (default 30)")
    p.add_argument("--drop-invalid", action="store_true",
                   help="skip rows with missing or out-of-range coordinates instead of failing")
    p.add_argument("--hierarchy-format", choices=("csv", "npy"), default="csv",
                   help="write the hierarchy as hierarchy.csv (default) or hierarchy.npy")
    p.add_argument("--threads", type=int, default=0, help="worker threads (0 = all cores)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    return p


class Progress:
    """Stage lines on stderr: '[reading] points.csv ... 1.2 s'."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.t0 = time.perf_counter()

    def start(self, stage: str, what: str) -> None:
        self.t0 = time.perf_counter()
        if not self.quiet:
            sys.stderr.write(f"[{stage}] {what} ...")
            sys.stderr.flush()

    def update(self, text: str) -> None:
        if not self.quiet:
            sys.stderr.write(f" {text}")
            sys.stderr.flush()

    def done(self, text: str = "") -> None:
        if not self.quiet:
            sys.stderr.write(f" {text}{' ' if text else ''}({time.perf_counter() - self.t0:.1f} s)\n")
            sys.stderr.flush()


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    taus = args.tau or DEFAULT_TAUS
    progress = Progress(args.quiet)
    if not os.path.exists(args.points):
        sys.stderr.write(f"\ngeocell partition: error: {args.points}: no such file\n")
        return 1
    try:
        progress.start("reading", args.points)
        lat, lng, unreadable = read_points(args.points, args.lat_column, args.lng_column,
                                           args.drop_invalid, lambda n: progress.update(f"{n:,}"))
        progress.done(f"{lat.shape[0]:,} rows")

        progress.start("partitioning", f"{len(taus)} partitioning(s)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # reported in the summary instead
            parts = partitions(lat, lng, taus, args.level_min, args.level_max,
                               drop_invalid=args.drop_invalid, threads=args.threads)
            h = hierarchy(parts)
        progress.done()

        progress.start("writing", args.output)
        names, h_path = write_partitions(args.output, taus, parts, h, args.hierarchy_format)
        progress.done(f"{len(parts) + 1} files")
    except InvalidCoordinates as e:
        sys.stderr.write(f"\ngeocell partition: error: {args.points}, line "
                         f"{data_line_number(args.points, e.row)}: invalid coordinates "
                         f"lat={e.lat!r}, lng={e.lng!r} (latitude must be in [-90, 90], longitude "
                         "in [-180, 180], both finite); use --drop-invalid to skip such rows\n")
        return 1
    except (ValueError, OSError) as e:  # PointsError among them
        sys.stderr.write(f"\ngeocell partition: error: {e}\n")
        return 1

    n = lat.shape[0]
    dropped = parts[0].dropped_invalid if parts else 0
    print(f"{n:,} rows read from {args.points}"
          + (f", {dropped:,} dropped as invalid ({unreadable:,} unreadable)" if dropped else ""))
    print(f"{'partitioning':<16}{'cells':>9}{'points kept':>16}{'kept %':>9}{'levels':>9}")
    for name, p in zip(names, parts):
        kept = p.num_points
        levels = f"{p.levels.min()}-{p.levels.max()}" if len(p) else "-"
        share = 100.0 * kept / max(1, n - dropped)
        print(f"{name:<16}{len(p):>9,}{kept:>16,}{share:>8.1f}%{levels:>9}")
    print(f"wrote {len(parts)} cell files and {os.path.basename(h_path)} to {args.output}")
    return 0
