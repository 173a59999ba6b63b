"""Photo locations from a CSV file (.csv or .csv.gz) and the partitioning files written from
them: what ``geocell partition`` reads and writes.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import warnings
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from geocell.partition import Partition

# Column names recognised without --lat/--lng, first match wins (case-insensitive).
LAT_NAMES = ("LAT", "lat", "latitude")
LNG_NAMES = ("LON", "lng", "lon", "longitude", "long")


class PointsError(ValueError):
    """A points file that cannot be read as asked; the message names the file (and line)."""


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
        raise PointsError(f"{path}: no column {wanted!r} for the {what} "
                       f"(columns: {', '.join(stripped)})")
    lowered = [h.lower() for h in stripped]
    for name in names:
        if name.lower() in lowered:
            return lowered.index(name.lower())
    raise PointsError(f"{path}: no {what} column found (looked for {', '.join(names)}; columns: "
                   f"{', '.join(stripped)}); name it with --{'lat' if what == 'latitude' else 'lng'}-column")


def read_points(path: str, lat_column: Optional[str], lng_column: Optional[str],
                drop_invalid: bool, progress: Optional[Callable[[int], None]] = None
                ) -> Tuple[np.ndarray, np.ndarray, int]:
    """Reads the two coordinate columns. Returns (lat, lng, unparseable rows);
    unparseable fields become NaN when drop_invalid, else raise naming the line.
    ``progress(rows)``, when given, hears the count now and then on the slow path."""
    with _open(path) as f:
        first = f.readline()  # readline, not iteration: keeps f.tell() usable
        if not first.strip():
            raise PointsError(f"{path}: empty file, expected a header line")
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
                if progress is not None and n >= 1 << 20:
                    progress(n)
            try:
                if len(row) < need:
                    raise ValueError(f"expected at least {need} fields, got {len(row)}")
                lat[n] = float(row[i_lat])
                lng[n] = float(row[i_lng])
            except ValueError as e:
                if not drop_invalid:
                    raise PointsError(f"{path}, line {line_no}: cannot read coordinates ({e}); "
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


def write_partitions(folder: str, taus: Sequence[Tuple[int, int]], parts: Sequence[Partition],
                     hierarchy: np.ndarray, hierarchy_format: str = "csv") -> Tuple[List[str], str]:
    """cells_<min>_<max>.csv per partitioning and hierarchy.<format> in ``folder`` (made if
    missing). Returns (the partitionings' names, the hierarchy file's path)."""
    os.makedirs(folder, exist_ok=True)
    names = []
    for (a, b), p in zip(taus, parts):
        name = f"cells_{a}_{b}"
        names.append(name)
        p.to_csv(os.path.join(folder, name + ".csv"))
    h_path = os.path.join(folder, "hierarchy." + hierarchy_format)
    write_hierarchy(h_path, hierarchy, names)
    return names, h_path
