"""`geocell partition`: adaptive S2 partitionings of photo locations from a CSV file.

    geocell partition points.csv --tau 50:5000 --tau 50:2000 --tau 50:1000 -o cells/

writes cells/cells_50_5000.csv ... in the GeoEstimation layout and the
hierarchy linking them (cells/hierarchy.csv or .npy).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import os
import sys
import time
import warnings
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .partition import InvalidCoordinates, hierarchy, partitions

DEFAULT_TAUS = [(50, 5000), (50, 2000), (50, 1000)]
# Column names recognised without --lat/--lng, first match wins (case-insensitive).
LAT_NAMES = ("LAT", "lat", "latitude")
LNG_NAMES = ("LON", "lng", "lon", "longitude", "long")


class CliError(Exception):
    pass


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


def _open(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, "r", encoding="utf-8", newline="")


def _find_column(header: List[str], wanted: Optional[str], names: Sequence[str], what: str,
                 path: str) -> int:
    stripped = [h.strip() for h in header]
    if wanted is not None:
        if wanted in stripped:
            return stripped.index(wanted)
        raise CliError(f"{path}: no column {wanted!r} for the {what} "
                       f"(columns: {', '.join(stripped)})")
    lowered = [h.lower() for h in stripped]
    for name in names:
        if name.lower() in lowered:
            return lowered.index(name.lower())
    raise CliError(f"{path}: no {what} column found (looked for {', '.join(names)}; columns: "
                   f"{', '.join(stripped)}); name it with --{'lat' if what == 'latitude' else 'lng'}-column")


def read_points(path: str, lat_column: Optional[str], lng_column: Optional[str],
                drop_invalid: bool, progress: Progress) -> Tuple[np.ndarray, np.ndarray, int]:
    """Reads the two coordinate columns. Returns (lat, lng, unparseable rows);
    unparseable fields become NaN when drop_invalid, else raise naming the line."""
    with _open(path) as f:
        first = f.readline()  # readline, not iteration: keeps f.tell() usable
        if not first.strip():
            raise CliError(f"{path}: empty file, expected a header line")
        header = next(csv.reader([first]))
        i_lat = _find_column(header, lat_column, LAT_NAMES, "latitude", path)
        i_lng = _find_column(header, lng_column, LNG_NAMES, "longitude", path)
        need = max(i_lat, i_lng) + 1
        start = f.tell()
        fast = _read_columns_fast(f, (i_lat, i_lng))
        if fast is not None:
            return fast[0], fast[1], 0
        # Something numpy could not parse: read again row by row for the exact
        # line (or NaN for the row, with drop_invalid).
        f.seek(start)
        reader = csv.reader(f)
        lat = np.empty(1 << 16)
        lng = np.empty(1 << 16)
        n = bad = 0
        for line_no, row in enumerate(reader, start=2):
            if not row:
                continue
            if n == lat.shape[0]:
                lat = np.resize(lat, 2 * n)
                lng = np.resize(lng, 2 * n)
                if not progress.quiet and n >= 1 << 20:
                    progress.update(f"{n:,}")
            try:
                if len(row) < need:
                    raise ValueError(f"expected at least {need} fields, got {len(row)}")
                lat[n] = float(row[i_lat])
                lng[n] = float(row[i_lng])
            except ValueError as e:
                if not drop_invalid:
                    raise CliError(f"{path}, line {line_no}: cannot read coordinates ({e}); "
                                   "use --drop-invalid to skip such rows") from None
                lat[n] = lng[n] = np.nan
                bad += 1
            n += 1
    return lat[:n].copy(), lng[:n].copy(), bad


def data_line_number(path: str, row: int) -> int:
    """The file line (1-based, header = line 1) of data row ``row`` (0-based, blank lines not
    counted, as ``read_points`` counts them); read again only to word an error."""
    with _open(path) as f:
        reader = csv.reader(f)
        next(reader, None)
        k = 0
        for fields in reader:
            if not fields:
                continue
            if k == row:
                return reader.line_num
            k += 1
    return row + 2


def _read_columns_fast(f, columns) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """Both columns with numpy's C parser, or None if any field does not parse."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "empty input" warnings
            a = np.loadtxt(f, delimiter=",", usecols=columns, dtype=np.float64, quotechar='"',
                           ndmin=2)
    except ValueError:
        return None
    return np.ascontiguousarray(a[:, 0]), np.ascontiguousarray(a[:, 1])


def write_hierarchy(path: str, h: np.ndarray, names: List[str]) -> None:
    if path.endswith(".npy"):
        np.save(path, h)
        return
    buf = io.StringIO()
    buf.write(",".join(names) + "\n")
    np.savetxt(buf, h, fmt="%d", delimiter=",")
    with open(path, "w", encoding="utf-8") as f:
        f.write(buf.getvalue())


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    taus = args.tau or DEFAULT_TAUS
    progress = Progress(args.quiet)
    try:
        if not os.path.exists(args.points):
            raise CliError(f"{args.points}: no such file")
        progress.start("reading", args.points)
        lat, lng, unreadable = read_points(args.points, args.lat_column, args.lng_column,
                                           args.drop_invalid, progress)
        progress.done(f"{lat.shape[0]:,} rows")

        progress.start("partitioning", f"{len(taus)} partitioning(s)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # reported in the summary instead
            parts = partitions(lat, lng, taus, args.level_min, args.level_max,
                               drop_invalid=args.drop_invalid, threads=args.threads)
            h = hierarchy(parts)
        progress.done()

        progress.start("writing", args.output)
        os.makedirs(args.output, exist_ok=True)
        names = []
        for (a, b), p in zip(taus, parts):
            name = f"cells_{a}_{b}"
            names.append(name)
            p.to_csv(os.path.join(args.output, name + ".csv"))
        h_path = os.path.join(args.output, "hierarchy." + args.hierarchy_format)
        write_hierarchy(h_path, h, names)
        progress.done(f"{len(parts) + 1} files")
    except InvalidCoordinates as e:
        sys.stderr.write(f"\ngeocell partition: error: {args.points}, line "
                         f"{data_line_number(args.points, e.row)}: invalid coordinates "
                         f"lat={e.lat!r}, lng={e.lng!r} (latitude must be in [-90, 90], longitude "
                         "in [-180, 180], both finite); use --drop-invalid to skip such rows\n")
        return 1
    except (CliError, ValueError, OSError) as e:
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


if __name__ == "__main__":
    sys.exit(main())
