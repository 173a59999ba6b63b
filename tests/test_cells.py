"""geocell's S2 API against Google's s2geometry (the oracle) and S2 invariants."""

from __future__ import annotations

import csv
import gzip
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import geocell
from geocell import _core

s2 = pytest.importorskip("s2geometry")

CORPUS = Path(__file__).parent / "data" / "s2_encode_corpus.csv.gz"


# ---- the oracle ----------------------------------------------------------------


def oracle_cell(lat: float, lng: float, level: int) -> int:
    return s2.S2CellId(s2.S2LatLng.FromDegrees(lat, lng)).parent(level).id()


def oracle_centre(cell: int) -> tuple[float, float]:
    ll = s2.S2CellId(cell).ToLatLng()
    return ll.lat().degrees(), ll.lng().degrees()


def oracle_boundary(cell: int) -> np.ndarray:
    c = s2.S2Cell(s2.S2CellId(cell))
    out = []
    for k in range(4):
        ll = s2.S2LatLng(c.GetVertex(k))
        out.append((ll.lat().degrees(), ll.lng().degrees()))
    return np.array(out)


def nudge(x: float, ulps: int) -> float:
    for _ in range(abs(ulps)):
        x = math.nextafter(x, math.inf if ulps > 0 else -math.inf)
    return x


def sphere_points(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    lat = np.degrees(np.arcsin(rng.uniform(-1, 1, n)))
    lng = rng.uniform(-180, 180, n)
    return lat, lng


# Edge cases: poles, +-180, +-0, face boundaries, tiny values, wrap-around.
SPECIAL_LATS = [90.0, -90.0, 0.0, -0.0, 45.0, -45.0, 35.264389682754654, -35.264389682754654,
                math.nextafter(90.0, 0.0), 1e-300, 5e-324, 89.99999999999999]
SPECIAL_LNGS = [180.0, -180.0, 0.0, -0.0, 45.0, -45.0, 90.0, -90.0, 135.0, -135.0, 360.0,
                -360.0, 540.0, 1000.5, -1e5, 1e12, 179.99999999999997, 5e-324]


# ---- golden corpus --------------------------------------------------------------


def test_golden_corpus_fully():
    with gzip.open(CORPUS, "rt") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 111_600
    lat = np.array([float(r["lat"]) for r in rows])
    lng = np.array([float(r["lon"]) for r in rows])
    level = np.array([int(r["level"]) for r in rows])
    want = np.array([int(r["cell_id"]) for r in rows], dtype=np.uint64)
    tokens = np.array([r["token"] for r in rows])
    got = np.zeros_like(want)
    for lv in range(31):
        m = level == lv
        got[m] = geocell.latlng_to_cell(lat[m], lng[m], lv)
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, f"row {bad[0]}: {rows[bad[0]]} gave {got[bad[0]]}"
    np.testing.assert_array_equal(geocell.cell_level(want), level)
    np.testing.assert_array_equal(geocell.cell_to_token(want), tokens)
    np.testing.assert_array_equal(geocell.token_to_cell(tokens), want)


# ---- property tests against the oracle -------------------------------------------

latitudes = st.one_of(
    st.floats(-90, 90, allow_nan=False),
    st.sampled_from(SPECIAL_LATS),
)
longitudes = st.one_of(
    st.floats(-180, 180, allow_nan=False),
    st.floats(-1e4, 1e4, allow_nan=False),
    st.sampled_from(SPECIAL_LNGS),
)
levels = st.integers(0, 30)


@settings(max_examples=2000, deadline=None)
@given(latitudes, longitudes, levels)
def test_point_matches_oracle(lat, lng, level):
    c = geocell.latlng_to_cell(lat, lng, level)
    assert int(c) == oracle_cell(lat, lng, level)
    assert int(geocell.cell_level(c)) == level
    assert str(geocell.cell_to_token(c)) == s2.S2CellId(int(c)).ToToken()
    clat, clng = geocell.cell_to_latlng(c)
    olat, olng = oracle_centre(int(c))
    assert abs(clat - olat) <= 1e-12 and abs(clng - olng) <= 1e-12


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32 - 1), levels, st.integers(-4, 4), st.integers(0, 3))
def test_cell_vertices_and_neighbourhood_match_oracle(seed, level, ulps, vertex):
    """Vertices of a random cell, moved a few ulps: the hardest points for the fast path."""
    rng = np.random.default_rng(seed)
    lat0, lng0 = sphere_points(rng, 1)
    cell = int(geocell.latlng_to_cell(lat0, lng0, level)[0])
    b = geocell.cell_to_boundary(cell)
    np.testing.assert_allclose(b, oracle_boundary(cell), rtol=0, atol=1e-12)
    la, ln = b[vertex]
    nxt = b[(vertex + 1) % 4]
    t = rng.uniform()
    pts = [(la, ln), (la + t * (nxt[0] - la), ln + t * (nxt[1] - ln))]
    lats = np.array([min(90.0, max(-90.0, nudge(p[0], ulps))) for p in pts])
    lngs = np.array([nudge(p[1], -ulps) for p in pts])
    for lv in (30, level):
        got = geocell.latlng_to_cell(lats, lngs, lv)
        assert [int(g) for g in got] == [oracle_cell(a, o, lv) for a, o in zip(lats, lngs)]


def test_special_grid_matches_oracle_at_every_level():
    lat, lng = np.meshgrid(SPECIAL_LATS, SPECIAL_LNGS)
    lat, lng = lat.ravel(), lng.ravel()
    for lv in range(31):
        got = geocell.latlng_to_cell(lat, lng, lv)
        assert [int(g) for g in got] == [oracle_cell(a, o, lv) for a, o in zip(lat, lng)]


def test_random_batch_matches_oracle():
    rng = np.random.default_rng(0)
    lat, lng = sphere_points(rng, 20_000)
    lng[::7] = rng.uniform(-1000, 1000, lng[::7].size)
    level = rng.integers(0, 31, lat.size)
    leaves = geocell.latlng_to_cell(lat, lng)
    got = geocell.cell_to_parent(leaves, level)
    want = [oracle_cell(a, o, int(lv)) for a, o, lv in zip(lat, lng, level)]
    assert [int(g) for g in got] == want
    clat, clng = geocell.cell_to_latlng(got)
    cen = np.array([oracle_centre(c) for c in want[:2000]])
    np.testing.assert_allclose(clat[:2000], cen[:, 0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(clng[:2000], cen[:, 1], rtol=0, atol=1e-12)


@pytest.fixture(params=_core.simd_levels())
def simd_level(request):
    """Each path this CPU runs ("avx512", "avx2", "scalar"), restored to the best afterwards."""
    _core.set_simd_level(request.param)
    assert _core.simd_level() == request.param
    try:
        yield request.param
    finally:
        _core.set_simd_enabled(True)


def test_every_path_equals_scalar_path(simd_level):
    rng = np.random.default_rng(1)
    lat, lng = sphere_points(rng, 300_000)
    lng[::5] = rng.uniform(-1000, 1000, lng[::5].size)
    fast = geocell.latlng_to_cell(lat, lng)
    _core.set_simd_level("scalar")
    base = geocell.latlng_to_cell(lat, lng)
    _core.set_simd_level(simd_level)
    np.testing.assert_array_equal(fast, base)
    for threads in (1, 2, 3):
        np.testing.assert_array_equal(geocell.latlng_to_cell(lat, lng, threads=threads), fast)
    # Large enough to take the streamed-output kernel; out= in place.
    lat, lng = sphere_points(rng, (1 << 18) + 5)
    want = geocell.latlng_to_cell(lat, lng)
    _core.set_simd_level("scalar")
    np.testing.assert_array_equal(geocell.latlng_to_cell(lat, lng), want)
    _core.set_simd_level(simd_level)
    out = np.zeros(lat.shape, np.uint64)
    assert geocell.latlng_to_cell(lat, lng, threads=1, out=out) is out
    np.testing.assert_array_equal(out, want)


def test_every_path_matches_oracle(simd_level):
    rng = np.random.default_rng(3)
    lat, lng = sphere_points(rng, 5000)
    lng[::3] = rng.uniform(-1000, 1000, lng[::3].size)
    grid_lat, grid_lng = np.meshgrid(SPECIAL_LATS, SPECIAL_LNGS)
    lat = np.concatenate([lat, grid_lat.ravel()])
    lng = np.concatenate([lng, grid_lng.ravel()])
    for lv in (30, 17, 0):
        got = geocell.latlng_to_cell(lat, lng, lv)
        assert [int(g) for g in got] == [oracle_cell(a, o, lv) for a, o in zip(lat.tolist(), lng.tolist())]


def test_simd_levels():
    levels = _core.simd_levels()
    assert levels[-1] == "scalar"
    assert set(levels) <= {"avx512", "avx2", "scalar"}
    assert _core.simd_level() == levels[0]
    assert _core.simd_available() == (len(levels) > 1)
    with pytest.raises(ValueError, match="simd level must be one of"):
        _core.set_simd_level("avx1024")
    assert _core.simd_level() == levels[0]


def test_latlng_to_cell_out():
    rng = np.random.default_rng(4)
    lat, lng = sphere_points(rng, 1000)
    lat, lng = lat.reshape(10, 100), lng.reshape(10, 100)
    want = geocell.latlng_to_cell(lat, lng, 12)
    out = np.full((10, 100), 7, np.uint64)
    for _ in range(2):  # reused
        assert geocell.latlng_to_cell(lat, lng, 12, out=out) is out
        np.testing.assert_array_equal(out, want)
    # A C-contiguous view into a bigger buffer is fine.
    buf = np.zeros(1010, np.uint64)
    view = buf[5:1005].reshape(10, 100)
    geocell.latlng_to_cell(lat, lng, 12, out=view)
    np.testing.assert_array_equal(view, want)
    assert not buf[:5].any() and not buf[1005:].any()
    # 0-d: the 0-d array back.
    out0 = np.zeros((), np.uint64)
    assert geocell.latlng_to_cell(40.7, -74.0, out=out0) is out0
    assert out0[()] == geocell.latlng_to_cell(40.7, -74.0)


# ---- invariants ported from s2cell_id_test.cc ------------------------------------


@pytest.fixture(scope="module")
def random_cells():
    rng = np.random.default_rng(2)
    lat, lng = sphere_points(rng, 5000)
    level = rng.integers(0, 31, lat.size)
    return geocell.cell_to_parent(geocell.latlng_to_cell(lat, lng), level), level


def test_parent_child_containment(random_cells):
    cells, level = random_cells
    inner = cells[level < 30]
    kids = geocell.cell_to_children(inner)
    assert kids.shape == (inner.size, 4)
    for k in range(4):
        assert (geocell.cell_level(kids[:, k]) == geocell.cell_level(inner) + 1).all()
        assert (geocell.cell_to_parent(kids[:, k], geocell.cell_level(inner)) == inner).all()
        assert geocell.cell_contains(inner, kids[:, k]).all()
        assert not geocell.cell_contains(kids[:, k], inner).any()
    want = [[s2.S2CellId(int(c)).child(k).id() for k in range(4)] for c in inner[:500]]
    np.testing.assert_array_equal(kids[:500], np.array(want, dtype=np.uint64))
    for lv in (0, 5):
        coarse = level >= lv
        par = geocell.cell_to_parent(cells[coarse], lv)
        assert [int(p) for p in par[:500]] == [s2.S2CellId(int(c)).parent(lv).id() for c in cells[coarse][:500]]
        assert geocell.cell_contains(par, cells[coarse]).all()
    np.testing.assert_array_equal(geocell.cell_to_parent(cells, level), cells)


def test_range_min_max(random_cells):
    cells, _ = random_cells
    lo, hi = geocell.cell_range(cells)
    assert (geocell.cell_level(lo) == 30).all() and (geocell.cell_level(hi) == 30).all()
    assert geocell.cell_contains(cells, lo).all() and geocell.cell_contains(cells, hi).all()
    assert [int(v) for v in lo[:500]] == [s2.S2CellId(int(c)).range_min().id() for c in cells[:500]]
    assert [int(v) for v in hi[:500]] == [s2.S2CellId(int(c)).range_max().id() for c in cells[:500]]


def test_token_round_trip(random_cells):
    cells, _ = random_cells
    tokens = geocell.cell_to_token(cells)
    assert list(tokens[:500]) == [s2.S2CellId(int(c)).ToToken() for c in cells[:500]]
    np.testing.assert_array_equal(geocell.token_to_cell(tokens), cells)
    np.testing.assert_array_equal(geocell.token_to_cell(np.char.upper(tokens)), cells)


def test_centre_round_trip(random_cells):
    cells, level = random_cells
    lat, lng = geocell.cell_to_latlng(cells)
    for lv in np.unique(level):
        m = level == lv
        np.testing.assert_array_equal(geocell.latlng_to_cell(lat[m], lng[m], int(lv)), cells[m])


@pytest.mark.parametrize("level", [1, 2, 5, 13, 30])
def test_hilbert_continuity(level):
    """Consecutive cells at a level share an edge: two boundary vertices."""
    rng = np.random.default_rng(level)
    n_cells = 6 * 4**level
    lsb = 4 ** (30 - level)
    first, step = np.uint64(lsb), np.uint64(2 * lsb)  # the curve's first cell at `level`
    idx = rng.integers(0, n_cells - 1, 400, dtype=np.uint64) if n_cells > 401 else np.arange(n_cells - 1, dtype=np.uint64)
    a = first + idx * step
    b = a + step
    assert (geocell.cell_level(a) == level).all() and (geocell.cell_level(b) == level).all()
    ba, bb = geocell.cell_to_boundary(a), geocell.cell_to_boundary(b)
    d = np.abs(ba[:, :, None, :] - bb[:, None, :, :]).max(axis=-1)
    d = np.minimum(d, np.abs(d - 360))  # +-180 are the same meridian
    shared = (d < 1e-9).sum(axis=(1, 2))
    assert (shared >= 2).all()


def test_boundary_counter_clockwise(random_cells):
    cells, level = random_cells
    # Below ~level 16 the determinants drown in the rounding of lat/lng.
    b = np.radians(geocell.cell_to_boundary(cells[level <= 16]))
    xyz = np.stack([np.cos(b[..., 0]) * np.cos(b[..., 1]), np.cos(b[..., 0]) * np.sin(b[..., 1]),
                    np.sin(b[..., 0])], axis=-1)
    # Each vertex turns left: det(v0, v1, v2) > 0 seen from outside.
    for k in range(4):
        det = np.einsum("ij,ij->i", xyz[:, k], np.cross(xyz[:, (k + 1) % 4], xyz[:, (k + 2) % 4]))
        assert (det > 0).all()


def test_is_valid_cell():
    ok = geocell.is_valid_cell(np.array([0, 0x1000000000000000, 0xE000000000000001, 0xC000000000000000,
                                         0x8000000000000002, 2**64 - 1, 0xB000000000000000], dtype=np.uint64))
    assert ok.tolist() == [False, True, False, False, False, False, True]
    assert bool(geocell.is_valid_cell(-1)) is False


def test_great_circle_km():
    assert geocell.great_circle_km(0, 0, 0, 180) == pytest.approx(math.pi * 6371.0)
    assert geocell.great_circle_km(90, 0, -90, 0) == pytest.approx(math.pi * 6371.0)
    rng = np.random.default_rng(4)
    lat1, lng1 = sphere_points(rng, 100)
    lat2, lng2 = sphere_points(rng, 100)
    want = [
        s2.S2LatLng.FromDegrees(a, b).GetDistance(s2.S2LatLng.FromDegrees(c, d)).radians() * 6371.0
        for a, b, c, d in zip(lat1, lng1, lat2, lng2)
    ]
    np.testing.assert_allclose(geocell.great_circle_km(lat1, lng1, lat2, lng2), want, rtol=1e-9, atol=1e-9)
