"""S2 cells over numpy arrays, bit-exact with Google's s2geometry.

Every function takes array-likes (numpy arrays, lists, scalars) and returns
numpy arrays of the input's shape. Conventions shared by all of them:

- Coordinates are degrees. Any real dtype is converted to float64; a
  C-contiguous float64 array is used in place, without a copy.
- Cell ids are uint64. int64 arrays are accepted and reinterpreted bit for bit
  (ids stored "viewed as int64", as in checkpoints).
- Scalar (0-d) input gives numpy scalar output (``np.uint64``, ``np.float64``,
  ``np.int64``, ``np.bool_``, ``np.str_``), or a tuple of them; the return
  annotations say ``np.ndarray`` for brevity. ``cell_to_boundary`` and
  ``cell_to_children`` of a scalar give arrays of shape (4, 2) and (4,).
- Bad input raises ``ValueError`` naming the first offending index and value:
  non-finite or out-of-range coordinates, arrays of different shapes, a level
  outside 0..30, an invalid cell id where a valid one is needed, a malformed
  token. Empty arrays give empty results.
- ``threads=0`` uses every hardware thread; the compiled kernels release the
  GIL.
"""

from __future__ import annotations

import numbers

import numpy as np
import numpy.typing as npt

from geocell import _core

ArrayLike = npt.ArrayLike

__all__ = [
    "EARTH_RADIUS_KM",
    "cell_area_km2",
    "cell_contains",
    "cell_level",
    "cell_range",
    "cell_to_boundary",
    "cell_to_children",
    "cell_to_latlng",
    "cell_to_parent",
    "cell_to_token",
    "great_circle_km",
    "is_valid_cell",
    "latlng_to_cell",
    "token_to_cell",
]

MAX_LEVEL = 30
# The compiled kernels take a C int; they never start more threads than there is work for.
MAX_THREADS = 2**31 - 1
# The sphere of every distance and area in geocell (the C++ core's great_circle_km uses the same).
EARTH_RADIUS_KM = 6371.0

_ONE = np.uint64(1)


# ---- coercion and validation -------------------------------------------------


def _where(name: str, shape: tuple, flat_index: int) -> str:
    if len(shape) <= 1:
        return f"{name}[{flat_index}]" if shape else name
    idx = np.unravel_index(flat_index, shape)
    return f"{name}[{', '.join(str(int(k)) for k in idx)}]"


def _contiguous(a: np.ndarray) -> np.ndarray:
    # Unlike np.ascontiguousarray, keeps 0-d arrays 0-d; never copies a C-contiguous array.
    return a if a.flags.c_contiguous else np.array(a, order="C")


def _as_float64(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype != np.float64:
        if a.dtype.kind not in "fiub" and not (a.dtype.kind == "O" and a.size == 0):
            raise TypeError(f"{name} must be real numbers, got dtype {a.dtype}")
        a = a.astype(np.float64)
    return _contiguous(a)


def _as_cells(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if not isinstance(x, np.ndarray) and a.dtype.kind in "fO" and a.size:
        # A list mixing uint64 ids with Python ints would become float64 and
        # lose bits: take its elements as Python ints instead.
        items = np.asarray(x, dtype=object).reshape(-1)
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_)) for v in items):
            raise TypeError(f"{name} must be integer cell ids")
        if any(not -(2**63) <= int(v) < 2**64 for v in items):
            raise ValueError(f"{name} must be 64-bit cell ids")
        a = np.array([int(v) & 0xFFFFFFFFFFFFFFFF for v in items], dtype=np.uint64).reshape(a.shape)
    if a.dtype == np.uint64:
        pass
    elif a.dtype == np.int64:
        a = a.view(np.uint64)
    elif a.dtype.kind == "u":
        a = a.astype(np.uint64)
    elif a.dtype.kind == "i":
        a = a.astype(np.int64).view(np.uint64)
    elif a.size == 0:
        a = a.astype(np.uint64)
    else:
        raise TypeError(f"{name} must be integer cell ids, got dtype {a.dtype}")
    return _contiguous(a)


def _check_same_shape(**arrays: np.ndarray) -> tuple:
    shapes = {name: a.shape for name, a in arrays.items()}
    first = next(iter(shapes.values()))
    if any(s != first for s in shapes.values()):
        desc = ", ".join(f"{name} {s}" for name, s in shapes.items())
        raise ValueError(f"inputs have different shapes: {desc}")
    return first


def _check_latlng(lat: np.ndarray, lng: np.ndarray, lat_name: str, lng_name: str) -> None:
    k = _core.find_invalid_latlng(lat.reshape(-1), lng.reshape(-1))
    if k >= 0:
        _raise_invalid_latlng(lat, lng, lat_name, lng_name, k)


def _raise_invalid_latlng(lat: np.ndarray, lng: np.ndarray, lat_name: str, lng_name: str, k: int):
    la, ln = lat.reshape(-1)[k], lng.reshape(-1)[k]
    if not (-90.0 <= la <= 90.0):
        raise ValueError(
            f"{_where(lat_name, lat.shape, k)} = {float(la)!r} is not a finite latitude in [-90, 90]"
        )
    raise ValueError(f"{_where(lng_name, lng.shape, k)} = {float(ln)!r} is not a finite longitude")


def _check_cells(cells: np.ndarray, name: str) -> None:
    k = _core.find_invalid_cell(cells.reshape(-1))
    if k >= 0:
        v = int(cells.reshape(-1)[k])
        raise ValueError(f"{_where(name, cells.shape, k)} = {v} (0x{v:016x}) is not a valid S2 cell id")


def _valid_cells(x, name: str = "cells") -> np.ndarray:
    a = _as_cells(x, name)
    _check_cells(a, name)
    return a


def _check_level(level, name: str = "level") -> int:
    if isinstance(level, (bool, np.bool_)) or not isinstance(level, numbers.Integral):
        raise TypeError(f"{name} must be an integer in 0..{MAX_LEVEL}, got {level!r}")
    if not 0 <= int(level) <= MAX_LEVEL:
        raise ValueError(f"{name} = {int(level)} is outside 0..{MAX_LEVEL}")
    return int(level)


def _check_threads(threads) -> int:
    if (isinstance(threads, (bool, np.bool_)) or not isinstance(threads, numbers.Integral)
            or not 0 <= threads <= MAX_THREADS):
        raise ValueError(f"threads = {threads!r} must be an integer in 0..{MAX_THREADS} (0 = all cores)")
    return int(threads)


def _shaped(out: np.ndarray, shape: tuple):
    out = out.reshape(shape + out.shape[1:])
    return out[()] if out.ndim == 0 else out


def _lowest_bit(cells: np.ndarray) -> np.ndarray:
    return cells & (~cells + _ONE)


def _levels_of(cells: np.ndarray) -> np.ndarray:
    # The lowest set bit of a valid id is 4^(30 - level): exact in float64.
    exponent = np.frexp(_lowest_bit(cells).astype(np.float64))[1] - 1
    return MAX_LEVEL - (exponent.astype(np.int64) >> 1)


# ---- the API -------------------------------------------------------------------


def latlng_to_cell(
    lat: ArrayLike, lng: ArrayLike, level: int = 30, *, threads: int = 0, out: np.ndarray | None = None
) -> np.ndarray:
    """Cell ids (uint64) at ``level`` of the points ``(lat, lng)`` in degrees.

    Identical to ``S2CellId(S2LatLng::FromDegrees(lat, lng)).parent(level)``.
    Longitudes outside [-180, 180] wrap as in S2. Raises ValueError for
    non-finite values, ``|lat| > 90``, different shapes, or a level outside
    0..30.

    ``out``: a preallocated, writeable, C-contiguous uint64 array of the
    points' shape to write the ids into (and return), so that repeated calls
    reuse its memory; ValueError if it is anything else or shares memory with
    the inputs. If a point is invalid, ``out`` is left partly written.
    """
    lat_a, lng_a = _as_float64(lat, "lat"), _as_float64(lng, "lng")
    shape = _check_same_shape(lat=lat_a, lng=lng_a)
    level = _check_level(level)
    threads = _check_threads(threads)
    if out is not None:
        _check_out(out, shape, lat_a, lng_a)
    # The kernel checks the points as it goes (one pass over memory).
    ids, bad = _core.latlng_to_cell(
        lat_a.reshape(-1), lng_a.reshape(-1), level, threads, None if out is None else out.reshape(-1)
    )
    if bad >= 0:
        _raise_invalid_latlng(lat_a, lng_a, "lat", "lng", bad)
    return out if out is not None else _shaped(ids, shape)


def _check_out(out, shape: tuple, *inputs: np.ndarray) -> None:
    if not isinstance(out, np.ndarray):
        raise ValueError(f"out must be a numpy.ndarray of dtype uint64, got {type(out).__name__}")
    if out.dtype != np.uint64:
        raise ValueError(f"out must have dtype uint64, got {out.dtype}")
    if out.shape != shape:
        raise ValueError(f"out must have the points' shape {shape}, got {out.shape}")
    if not out.flags.c_contiguous:
        raise ValueError("out must be C-contiguous")
    if not out.flags.writeable:
        raise ValueError("out must be writeable")
    if any(np.may_share_memory(out, a) for a in inputs):
        raise ValueError("out must not share memory with lat or lng")


def cell_to_latlng(cells: ArrayLike, *, threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Centres ``(lat, lng)`` in degrees of the cells (float64 arrays).

    Identical to ``S2CellId::ToLatLng`` (within 1e-12 degrees).
    """
    c = _valid_cells(cells)
    lat, lng = _core.cell_to_latlng(c.reshape(-1), _check_threads(threads))
    return _shaped(lat, c.shape), _shaped(lng, c.shape)


def cell_to_boundary(cells: ArrayLike, *, threads: int = 0) -> np.ndarray:
    """Vertices of the cells, float64 of shape ``cells.shape + (4, 2)``.

    Each row holds four ``(lat, lng)`` pairs in degrees, counter-clockwise seen
    from outside the sphere, in the order of ``S2Cell::GetVertex(0..3)``.
    """
    c = _valid_cells(cells)
    out = _core.cell_to_boundary(c.reshape(-1), _check_threads(threads))
    return out.reshape(c.shape + (4, 2))


def cell_level(cells: ArrayLike) -> np.ndarray:
    """Level (0..30, int64) of each cell."""
    c = _valid_cells(cells)
    return _shaped(_levels_of(c.reshape(-1)), c.shape)


def cell_to_parent(cells: ArrayLike, level: int | ArrayLike) -> np.ndarray:
    """Ancestor of each cell at ``level`` (an int, or an array of the cells' shape).

    A cell is its own parent at its own level. Raises ValueError when
    ``level`` is finer than a cell's level.
    """
    c = _valid_cells(cells)
    flat = c.reshape(-1)
    if np.ndim(level) == 0:
        lv = np.full(flat.shape, _check_level(level), dtype=np.int64)
    else:
        lv_arr = np.asarray(level)
        if lv_arr.dtype.kind not in "iu":
            raise TypeError(f"level must be integers, got dtype {lv_arr.dtype}")
        _check_same_shape(cells=c, level=lv_arr)
        lv = lv_arr.reshape(-1).astype(np.int64)
        bad = np.flatnonzero((lv < 0) | (lv > MAX_LEVEL))
        if bad.size:
            k = int(bad[0])
            raise ValueError(f"{_where('level', c.shape, k)} = {lv[k]} is outside 0..{MAX_LEVEL}")
    own = _levels_of(flat)
    finer = np.flatnonzero(lv > own)
    if finer.size:
        k = int(finer[0])
        raise ValueError(
            f"level {lv[k]} is finer than {_where('cells', c.shape, k)} = {int(flat[k])} "
            f"at level {own[k]}"
        )
    lsb = np.left_shift(_ONE, (2 * (MAX_LEVEL - lv)).astype(np.uint64))
    return _shaped((flat & (~lsb + _ONE)) | lsb, c.shape)


def cell_to_children(cells: ArrayLike) -> np.ndarray:
    """The four children (Hilbert order) of each cell, shape ``cells.shape + (4,)``.

    Raises ValueError for leaf (level-30) cells, which have no children.
    """
    c = _valid_cells(cells)
    flat = c.reshape(-1)
    lsb = _lowest_bit(flat)
    leaves = np.flatnonzero(lsb == _ONE)
    if leaves.size:
        k = int(leaves[0])
        raise ValueError(
            f"{_where('cells', c.shape, k)} = {int(flat[k])} is a leaf cell (level 30) without children"
        )
    first = flat - lsb + (lsb >> np.uint64(2))
    step = lsb >> _ONE
    out = first[:, None] + step[:, None] * np.arange(4, dtype=np.uint64)[None, :]
    return out.reshape(c.shape + (4,))


def cell_range(cells: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """First and last leaf ids ``(min, max)`` under each cell (uint64 arrays)."""
    c = _valid_cells(cells)
    flat = c.reshape(-1)
    half = _lowest_bit(flat) - _ONE
    return _shaped(flat - half, c.shape), _shaped(flat + half, c.shape)


def cell_contains(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Whether cell ``a`` contains cell ``b`` (or equals it), elementwise (bool)."""
    ca, cb = _valid_cells(a, "a"), _valid_cells(b, "b")
    shape = _check_same_shape(a=ca, b=cb)
    fa, fb = ca.reshape(-1), cb.reshape(-1)
    half = _lowest_bit(fa) - _ONE
    return _shaped((fb >= fa - half) & (fb <= fa + half), shape)


def is_valid_cell(cells: ArrayLike) -> np.ndarray:
    """Whether each id is a valid S2 cell (face 0..5, a level marker bit); never raises for bad ids."""
    c = _as_cells(cells, "cells")
    flat = c.reshape(-1)
    ok = ((flat >> np.uint64(61)) < np.uint64(6)) & (
        (_lowest_bit(flat) & np.uint64(0x1555555555555555)) != np.uint64(0)
    )
    return _shaped(ok, c.shape)


def cell_to_token(cells: ArrayLike) -> np.ndarray:
    """Tokens (shortest lowercase hex, as ``S2CellId::ToToken``) as a str array."""
    c = _valid_cells(cells)
    out = _core.cell_to_token(c.reshape(-1)).astype("U16")
    return _shaped(out, c.shape)


def token_to_cell(tokens: ArrayLike) -> np.ndarray:
    """Cell ids (uint64) of tokens; raises ValueError for a token of no valid cell.

    Hex digits may be upper or lower case; "X" (the token of the invalid id 0)
    and tokens of invalid ids are rejected.
    """
    a = np.asarray(tokens)
    if a.dtype.kind == "O":
        if not all(isinstance(t, (str, bytes)) for t in a.reshape(-1)):
            raise TypeError("tokens must be strings")
        a = a.astype(str) if a.size else a.astype("U1")
    if a.dtype.kind == "U":
        try:
            b = a.astype("S") if a.size else np.zeros(a.shape, "S1")
        except UnicodeEncodeError:
            flat = a.reshape(-1)
            k = next(i for i, t in enumerate(flat) if not str(t).isascii())
            raise ValueError(
                f"{_where('tokens', a.shape, k)} = {str(flat[k])!r} is not the token of a valid S2 cell"
            ) from None
    elif a.dtype.kind == "S":
        b = a
    elif a.size == 0:
        b = np.zeros(a.shape, "S1")
    else:
        raise TypeError(f"tokens must be strings, got dtype {a.dtype}")
    b = _contiguous(b)
    ids, k = _core.token_to_cell(b.reshape(-1))
    if k >= 0:
        t = a.reshape(-1)[k]
        t = t.decode("ascii", "replace") if isinstance(t, bytes) else str(t)
        raise ValueError(f"{_where('tokens', a.shape, k)} = {t!r} is not the token of a valid S2 cell")
    return _shaped(ids, a.shape)


def great_circle_km(
    lat1: ArrayLike, lng1: ArrayLike, lat2: ArrayLike, lng2: ArrayLike, *, threads: int = 0
) -> np.ndarray:
    """Haversine great-circle distance in km (sphere of radius ``EARTH_RADIUS_KM``), elementwise."""
    arrays = {
        "lat1": _as_float64(lat1, "lat1"),
        "lng1": _as_float64(lng1, "lng1"),
        "lat2": _as_float64(lat2, "lat2"),
        "lng2": _as_float64(lng2, "lng2"),
    }
    shape = _check_same_shape(**arrays)
    threads = _check_threads(threads)
    _check_latlng(arrays["lat1"], arrays["lng1"], "lat1", "lng1")
    _check_latlng(arrays["lat2"], arrays["lng2"], "lat2", "lng2")
    flat = [v.reshape(-1) for v in arrays.values()]
    return _shaped(_core.great_circle_km(*flat, threads), shape)


def _unit_vectors(lat_deg: np.ndarray, lng_deg: np.ndarray) -> np.ndarray:
    lat, lng = np.radians(lat_deg), np.radians(lng_deg)
    cos_lat = np.cos(lat)
    return np.stack([cos_lat * np.cos(lng), cos_lat * np.sin(lng), np.sin(lat)], axis=-1)


def _triangle_area_sr(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Area (steradians) of spherical triangles with unit-vector corners (..., 3): Van Oosterom &
    Strackee, tan(E/2) = |a·(b×c)| / (1 + a·b + b·c + c·a), the triple product over the edge
    vectors (b-a)×(c-a) so that it keeps its precision for cells a few metres across."""
    triple = np.einsum("...i,...i->...", a, np.cross(b - a, c - a))
    denom = 1.0 + np.einsum("...i,...i->...", a, b) + np.einsum("...i,...i->...", b, c) \
        + np.einsum("...i,...i->...", c, a)
    return 2.0 * np.arctan2(np.abs(triple), denom)


def cell_area_km2(cells: ArrayLike, radius_km: float = EARTH_RADIUS_KM) -> np.ndarray:
    """Exact area of S2 cells in km² on a sphere of radius ``radius_km`` (cell edges are
    great-circle arcs, so two triangles over one diagonal are exact)."""
    cells = np.atleast_1d(np.asarray(cells, dtype=np.uint64))
    if cells.size == 0:
        return np.zeros(0, dtype=np.float64)
    v = _unit_vectors(*np.moveaxis(cell_to_boundary(cells.reshape(-1)), -1, 0))
    sr = _triangle_area_sr(v[:, 0], v[:, 1], v[:, 2]) + _triangle_area_sr(v[:, 0], v[:, 2], v[:, 3])
    return _shaped(sr * radius_km * radius_km, cells.shape)
