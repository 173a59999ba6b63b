"""Adaptive S2 partitioning of photo locations into classes.

The rule is the one of GeoEstimation (Müller-Budack et al., ECCV 2018), for a
pair (tau_min, tau_max):

1. every point starts in its cell at ``level_min``;
2. cells holding <= tau_min points are dropped (their points get no class);
3. while some cell holds > tau_max points and the level is below
   ``level_max``: level += 1 and every point of such a cell moves to its own
   cell at the new level (cells holding <= tau_max stay as they are);
4. cells holding <= tau_min points are dropped again.

Cells at ``level_max`` may hold more than tau_max points (stacks of identical
locations). :func:`partitions` computes several partitionings from one pass
over the data; :func:`hierarchy` links them for hierarchical prediction.
"""

from __future__ import annotations

import gzip
import io
import operator
import os
import re
import warnings
from typing import Iterable, Optional, Sequence, Tuple

import numpy as np

from geocell import _core
from .cells import MAX_THREADS

__all__ = ["Partition", "partition", "partitions", "hierarchy"]

CSV_HEADER = ("class_label", "hex_id", "imgs_per_cell", "latitude_mean", "longitude_mean")
MAX_LEVEL = 30
# The core counts points in int64.
MAX_TAU = 2**63 - 1

_U64_ONE = np.uint64(1)


# ---- small S2 helpers on uint64 arrays (kept local: the partitioner only needs these) ----

def _lowest_bit(cells: np.ndarray) -> np.ndarray:
    return cells & (~cells + _U64_ONE)


def _valid_cells(cells: np.ndarray) -> np.ndarray:
    lsb = _lowest_bit(cells)
    return ((cells >> np.uint64(61)) < np.uint64(6)) & ((lsb & np.uint64(0x1555555555555555)) != 0)


def _levels(cells: np.ndarray) -> np.ndarray:
    # The lowest set bit of a valid id is a power of two up to 2**60: exact in float64.
    bit = np.log2(_lowest_bit(cells).astype(np.float64)).astype(np.int64)
    return (MAX_LEVEL - bit // 2).astype(np.int8)


def _token(cell: int) -> str:
    return format(cell, "016x").rstrip("0") or "X"


def _parse_token(token: str) -> Optional[int]:
    token = token.strip()
    if token in ("X", "x"):
        return 0
    if not 1 <= len(token) <= 16 or not re.fullmatch(r"[0-9a-fA-F]+", token):
        return None
    return int(token.ljust(16, "0"), 16)


def _open_text(path, mode: str):
    path = os.fspath(path)
    if path.endswith(".gz"):
        return gzip.open(path, mode + "t", encoding="utf-8", newline="")
    return open(path, mode, encoding="utf-8", newline="")


# ---- argument checks (the messages name the offending argument) ----

def _as_int(value, name: str) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        if isinstance(value, (float, np.floating)) and float(value).is_integer():
            return int(value)
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _check_taus(tau_min, tau_max, where: str = "") -> Tuple[int, int]:
    tau_min = _as_int(tau_min, f"tau_min{where}")
    tau_max = _as_int(tau_max, f"tau_max{where}")
    if tau_min < 0:
        raise ValueError(f"tau_min{where} must be >= 0, got {tau_min}")
    if tau_max < 0:
        raise ValueError(f"tau_max{where} must be >= 0, got {tau_max}")
    for name, value in (("tau_min", tau_min), ("tau_max", tau_max)):
        if value > MAX_TAU:
            raise ValueError(f"{name}{where} must be at most 2**63 - 1, got {value}")
    if tau_min >= tau_max:
        raise ValueError(
            f"tau_min must be < tau_max{where}, got tau_min={tau_min}, tau_max={tau_max}")
    return tau_min, tau_max


def _check_levels(level_min, level_max) -> Tuple[int, int]:
    level_min = _as_int(level_min, "level_min")
    level_max = _as_int(level_max, "level_max")
    if not 0 <= level_min <= level_max <= MAX_LEVEL:
        raise ValueError(
            "levels must satisfy 0 <= level_min <= level_max <= 30, "
            f"got level_min={level_min}, level_max={level_max}")
    return level_min, level_max


def _check_threads(threads) -> int:
    threads = _as_int(threads, "threads")
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0 = all cores), got {threads}")
    if threads > MAX_THREADS:
        raise ValueError(f"threads must be at most {MAX_THREADS}, got {threads}")
    return threads


def _coordinates(lat, lng) -> Tuple[np.ndarray, np.ndarray]:
    lat = np.asarray(lat)
    lng = np.asarray(lng)
    if lat.ndim > 1 or lng.ndim > 1:
        raise ValueError(f"lat and lng must be 1-D, got shapes {lat.shape} and {lng.shape}")
    lat = np.ascontiguousarray(lat.reshape(-1), dtype=np.float64)
    lng = np.ascontiguousarray(lng.reshape(-1), dtype=np.float64)
    if lat.shape != lng.shape:
        raise ValueError(
            f"lat and lng must have the same length, got {lat.shape[0]} and {lng.shape[0]}")
    return lat, lng


class InvalidCoordinates(ValueError):
    """A point with NaN or out-of-range coordinates; ``row`` is its 0-based index."""

    def __init__(self, row: int, lat: float, lng: float):
        self.row, self.lat, self.lng = row, lat, lng
        super().__init__(
            f"invalid coordinates in row {row}: lat={lat!r}, lng={lng!r} (latitude must be in "
            "[-90, 90], longitude in [-180, 180], both finite); pass drop_invalid=True to skip "
            "such rows")


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


class Partition:
    """One partitioning of the Earth into S2 cells, each cell one class.

    Attributes (read-only arrays):

    - ``cells``: uint64 S2 cell ids, ascending (Hilbert order); the class of a
      cell is its position.
    - ``counts``: int64 number of points in each cell.
    - ``levels``: int8 S2 level of each cell.
    - ``centroids``: (N, 2) float64 mean (lat, lng) in degrees of each cell's
      points, taken on the sphere: the mean of the points' unit vectors,
      renormalised, so cells across the antimeridian or around a pole come out
      right. Each point is represented by the centre of its S2 leaf cell
      (within about 1 cm of the point, i.e. ~1e-7 degrees).
    - ``tau_min``, ``tau_max``, ``level_min``, ``level_max``: the parameters
      (None where unknown, e.g. for a partitioning read from a file).
    - ``dropped_invalid``: rows skipped for invalid coordinates
      (``drop_invalid=True``).
    - ``source_labels``: for a partitioning read from a file, the file's
      class_label of each cell (files written by other tools need not list
      cells in id order); None otherwise.
    """

    __slots__ = ("_cells", "_counts", "_levels", "_centroids", "tau_min", "tau_max",
                 "level_min", "level_max", "dropped_invalid", "source_labels")

    def __init__(self, cells, counts, levels, centroids, *, tau_min=None, tau_max=None,
                 level_min=None, level_max=None, dropped_invalid=0, source_labels=None):
        self._cells = _readonly(np.asarray(cells, dtype=np.uint64))
        self._counts = _readonly(np.asarray(counts, dtype=np.int64))
        self._levels = _readonly(np.asarray(levels, dtype=np.int8))
        self._centroids = _readonly(np.asarray(centroids, dtype=np.float64).reshape(-1, 2))
        self.tau_min = tau_min
        self.tau_max = tau_max
        self.level_min = level_min
        self.level_max = level_max
        self.dropped_invalid = int(dropped_invalid)
        self.source_labels = (None if source_labels is None
                              else _readonly(np.asarray(source_labels, dtype=np.int64)))

    cells = property(lambda self: self._cells, doc="uint64 cell ids, ascending")
    counts = property(lambda self: self._counts, doc="int64 points per cell")
    levels = property(lambda self: self._levels, doc="int8 level of each cell")
    centroids = property(lambda self: self._centroids, doc="(N, 2) mean lat, lng per cell")

    def __len__(self) -> int:
        return int(self._cells.shape[0])

    @property
    def num_points(self) -> int:
        """Points that belong to a cell."""
        return int(self._counts.sum())

    def __repr__(self) -> str:
        tau = ("?" if self.tau_min is None else str(self.tau_min)) + ":" + (
            "?" if self.tau_max is None else str(self.tau_max))
        levels = (f"levels {int(self._levels.min())}-{int(self._levels.max())}"
                  if len(self) else "no cells")
        extra = f", {self.dropped_invalid:,} invalid rows dropped" if self.dropped_invalid else ""
        return (f"<Partition tau={tau}: {len(self):,} cells, {self.num_points:,} points, "
                f"{levels}{extra}>")

    def __eq__(self, other) -> bool:
        if not isinstance(other, Partition):
            return NotImplemented
        return (np.array_equal(self._cells, other._cells)
                and np.array_equal(self._counts, other._counts)
                and np.array_equal(self._centroids, other._centroids))

    __hash__ = None

    # ---- lookups ----

    def assign(self, lat, lng, *, threads: int = 0) -> np.ndarray:
        """Class index (int64) of the cell containing each point; -1 where no
        cell covers the point or its coordinates are invalid (NaN, latitude
        outside [-90, 90], longitude outside [-180, 180])."""
        lat, lng = _coordinates(lat, lng)
        return _core.partition_assign_latlng(self._cells, lat, lng, _check_threads(threads))

    def assign_cells(self, cells, *, threads: int = 0) -> np.ndarray:
        """Class index (int64) of the cell containing each given S2 cell
        (any level); -1 where no cell contains it whole."""
        cells = np.asarray(cells).reshape(-1)
        # Checkpoints store ids as int64: reinterpret, don't convert.
        cells = cells.view(np.uint64) if cells.dtype == np.int64 else cells.astype(np.uint64)
        cells = np.ascontiguousarray(cells)
        return _core.partition_assign_cells(self._cells, cells, _check_threads(threads))

    # ---- persistence ----

    @classmethod
    def from_arrays(cls, cells, counts, centroids, tau_min=None, tau_max=None, *,
                    level_min=None, level_max=None) -> "Partition":
        """Rebuilds a partitioning (e.g. from a checkpoint). ``cells`` may be
        uint64 or int64 (ids viewed as signed); they must be valid S2 cell ids,
        ascending and disjoint."""
        cells = np.asarray(cells)
        if cells.dtype == np.int64:
            cells = cells.view(np.uint64)
        elif cells.dtype != np.uint64:
            if cells.size and (not np.issubdtype(cells.dtype, np.integer) or cells.min() < 0):
                raise ValueError(f"cells must be uint64 S2 cell ids, got dtype {cells.dtype}")
            cells = cells.astype(np.uint64)
        cells = cells.reshape(-1)
        counts = np.asarray(counts).reshape(-1)
        centroids = np.asarray(centroids, dtype=np.float64)
        n = cells.shape[0]
        if counts.shape[0] != n:
            raise ValueError(f"cells and counts must have the same length, got {n} and "
                             f"{counts.shape[0]}")
        if counts.size and not np.issubdtype(counts.dtype, np.integer):
            raise ValueError(f"counts must be integers, got dtype {counts.dtype}")
        if centroids.shape != (n, 2):
            raise ValueError(f"centroids must have shape ({n}, 2), got {centroids.shape}")
        bad = np.flatnonzero(~((np.abs(centroids[:, 0]) <= 90.0) & (np.abs(centroids[:, 1]) <= 180.0)))
        if bad.size:  # also NaN
            raise ValueError(f"centroids[{bad[0]}] = ({centroids[bad[0], 0]!r}, "
                             f"{centroids[bad[0], 1]!r}) is not a finite latitude in [-90, 90] "
                             "and longitude in [-180, 180]")
        bad = np.flatnonzero(counts < 0) if counts.size else bad[:0]
        if bad.size:
            raise ValueError(f"counts[{bad[0]}] = {int(counts[bad[0]])} is negative")
        bad = np.flatnonzero(~_valid_cells(cells))
        if bad.size:
            raise ValueError(f"cells[{bad[0]}] = {int(cells[bad[0]])} is not a valid S2 cell id")
        if n > 1:
            lsb = _lowest_bit(cells)
            range_min, range_max = cells - (lsb - _U64_ONE), cells + (lsb - _U64_ONE)
            bad = np.flatnonzero(cells[1:] <= cells[:-1])
            if bad.size:
                k = int(bad[0])
                raise ValueError(f"cells must be in ascending order: cells[{k}] = "
                                 f"{_token(int(cells[k]))} >= cells[{k + 1}] = "
                                 f"{_token(int(cells[k + 1]))}")
            bad = np.flatnonzero(range_max[:-1] >= range_min[1:])
            if bad.size:
                k = int(bad[0])
                raise ValueError(f"cells must be disjoint: cells[{k}] = {_token(int(cells[k]))} "
                                 f"and cells[{k + 1}] = {_token(int(cells[k + 1]))} overlap")
        if tau_min is not None and tau_max is not None:
            tau_min, tau_max = _check_taus(tau_min, tau_max)
        return cls(cells, counts.astype(np.int64), _levels(cells), centroids, tau_min=tau_min,
                   tau_max=tau_max, level_min=level_min, level_max=level_max)

    def to_csv(self, path) -> None:
        """Writes the GeoEstimation layout (``class_label,hex_id,imgs_per_cell,
        latitude_mean,longitude_mean``, hex_id = S2 token); ``.gz`` compresses."""
        buf = io.StringIO()
        buf.write(",".join(CSV_HEADER) + "\n")
        cells = self._cells.tolist()
        counts = self._counts.tolist()
        lats = self._centroids[:, 0].tolist()
        lngs = self._centroids[:, 1].tolist()
        for k in range(len(cells)):
            # repr() of a float round-trips exactly.
            buf.write(f"{k},{_token(cells[k])},{counts[k]},{lats[k]!r},{lngs[k]!r}\n")
        with _open_text(path, "w") as f:
            f.write(buf.getvalue())

    @classmethod
    def read_csv(cls, path) -> "Partition":
        """Reads the GeoEstimation layout, including the published files that
        start with ``num_images: ...`` and ``min_concept_probability: ...``
        lines. Rows are put in cell id order (the file's class labels are kept
        in ``source_labels``). tau_min/tau_max are taken from a file name like
        ``cells_50_5000.csv`` when present. Errors name the file and line."""
        name = os.fspath(path)
        labels, cells, counts, lats, lngs, lines = [], [], [], [], [], []
        with _open_text(path, "r") as f:
            header_seen = False
            for line_no, line in enumerate(f, start=1):
                line = line.strip()
                if not line:
                    continue
                fields = [x.strip() for x in line.split(",")]
                if not header_seen:
                    if fields[0] == "class_label":
                        if tuple(fields[:5]) != CSV_HEADER:
                            raise ValueError(f"{name}, line {line_no}: expected header "
                                             f"{','.join(CSV_HEADER)}, got {line!r}")
                        header_seen = True
                    elif ":" not in line:  # preamble lines are "key: value"
                        raise ValueError(f"{name}, line {line_no}: expected header "
                                         f"{','.join(CSV_HEADER)}, got {line!r}")
                    continue
                if len(fields) < 5:
                    raise ValueError(f"{name}, line {line_no}: expected 5 fields, got "
                                     f"{len(fields)}: {line!r}")
                cell = _parse_token(fields[1])
                if cell is None or not bool(_valid_cells(np.array([cell], np.uint64))[0]):
                    raise ValueError(f"{name}, line {line_no}: hex_id {fields[1]!r} is not a "
                                     "valid S2 cell token")
                try:
                    label, count = int(fields[0]), int(fields[2])
                    lat, lng = float(fields[3]), float(fields[4])
                except ValueError:
                    raise ValueError(f"{name}, line {line_no}: cannot parse {line!r}") from None
                if count < 0:
                    raise ValueError(f"{name}, line {line_no}: negative imgs_per_cell {count}")
                if not (-90.0 <= lat <= 90.0 and -180.0 <= lng <= 180.0):  # also refuses NaN
                    raise ValueError(f"{name}, line {line_no}: centroid ({fields[3]}, {fields[4]}) "
                                     "is not a finite latitude in [-90, 90] and longitude in "
                                     "[-180, 180]")
                labels.append(label)
                cells.append(cell)
                counts.append(count)
                lats.append(lat)
                lngs.append(lng)
                lines.append(line_no)
        if not header_seen:
            raise ValueError(f"{name}: no header line {','.join(CSV_HEADER)} found")
        cells_a = np.array(cells, dtype=np.uint64)
        order = np.argsort(cells_a, kind="stable")
        cells_a = cells_a[order]
        n = cells_a.shape[0]
        if n > 1:
            lsb = _lowest_bit(cells_a)
            overlap = np.flatnonzero(cells_a[:-1] + (lsb[:-1] - _U64_ONE)
                                     >= cells_a[1:] - (lsb[1:] - _U64_ONE))
            if overlap.size:
                a, b = lines[order[overlap[0]]], lines[order[overlap[0] + 1]]
                raise ValueError(f"{name}, lines {min(a, b)} and {max(a, b)}: cells "
                                 f"{_token(int(cells_a[overlap[0]]))} and "
                                 f"{_token(int(cells_a[overlap[0] + 1]))} overlap")
        tau = re.search(r"cells_(\d+)_(\d+)", os.path.basename(name))
        tau_min, tau_max = (int(tau.group(1)), int(tau.group(2))) if tau else (None, None)
        if tau_min is not None and tau_min >= tau_max:
            tau_min = tau_max = None
        centroids = np.stack([np.array(lats, dtype=np.float64)[order],
                              np.array(lngs, dtype=np.float64)[order]], axis=1).reshape(n, 2)
        return cls(cells_a, np.array(counts, dtype=np.int64)[order], _levels(cells_a), centroids,
                   tau_min=tau_min, tau_max=tau_max,
                   source_labels=np.array(labels, dtype=np.int64)[order])


def partitions(lat, lng, taus: Iterable[Sequence[int]] = ((50, 5000), (50, 2000), (50, 1000)),
               level_min: int = 2, level_max: int = 30, drop_invalid: bool = False,
               threads: int = 0) -> list:
    """Several partitionings of the same points, one per (tau_min, tau_max)
    pair, from one pass over the data (one conversion to leaf cells, one sort).

    Rows with NaN or out-of-range coordinates (latitude outside [-90, 90],
    longitude outside [-180, 180]) raise ValueError naming the first one,
    unless ``drop_invalid`` is True: then they are skipped, a warning says how
    many, and each Partition's ``dropped_invalid`` records it.
    """
    pairs = []
    for k, pair in enumerate(taus):
        try:
            tau_min, tau_max = pair
        except (TypeError, ValueError):
            raise ValueError(f"taus[{k}] must be a (tau_min, tau_max) pair, got {pair!r}") from None
        pairs.append(_check_taus(tau_min, tau_max, f" in taus[{k}]"))
    return _run(lat, lng, pairs, level_min, level_max, drop_invalid, threads)


def _run(lat, lng, pairs, level_min, level_max, drop_invalid, threads):
    level_min, level_max = _check_levels(level_min, level_max)
    threads = _check_threads(threads)
    lat, lng = _coordinates(lat, lng)
    params = [(a, b, level_min, level_max) for a, b in pairs]
    first_invalid, dropped, results = _core.partition_latlng(lat, lng, params, bool(drop_invalid),
                                                             threads)
    if first_invalid >= 0:
        raise InvalidCoordinates(int(first_invalid), float(lat[first_invalid]),
                                 float(lng[first_invalid]))
    if dropped:
        # stacklevel 3: the caller of partition() / partitions().
        warnings.warn(f"dropped {dropped} of {lat.shape[0]} rows with invalid coordinates",
                      stacklevel=3)
    return [Partition(cells, counts, levels, centroids, tau_min=a, tau_max=b,
                      level_min=level_min, level_max=level_max, dropped_invalid=dropped)
            for (a, b), (cells, counts, levels, centroids) in zip(pairs, results)]


def partition(lat, lng, tau_min: int = 50, tau_max: int = 1000, level_min: int = 2,
              level_max: int = 30, *, drop_invalid: bool = False, threads: int = 0) -> Partition:
    """Partitions points (degrees) into S2 cells holding more than tau_min and
    at most tau_max points each (except at level_max); see the module docs for
    the exact rule and :func:`partitions` for invalid rows."""
    pair = _check_taus(tau_min, tau_max)
    return _run(lat, lng, [pair], level_min, level_max, drop_invalid, threads)[0]


def hierarchy(parts: Sequence[Partition], *, threads: int = 0) -> np.ndarray:
    """int64 array (n_finest, n_partitions): row r gives, for cell r of the
    finest (last) partitioning, the index of the cell containing it in each
    partitioning, -1 where none does (the last column is arange). Hierarchical
    prediction multiplies the probabilities along these rows."""
    parts = list(parts)
    if not parts:
        raise ValueError("hierarchy() needs at least one partitioning")
    for k, p in enumerate(parts):
        if not isinstance(p, Partition):
            raise ValueError(f"partitions[{k}] is not a Partition, got {type(p).__name__}")
    threads = _check_threads(threads)
    finest = parts[-1].cells
    out = np.empty((finest.shape[0], len(parts)), dtype=np.int64)
    for k, p in enumerate(parts):
        out[:, k] = _core.partition_assign_cells(p.cells, finest, threads)
    return out
