"""latlng_to_cell throughput: geocell against the other S2 (and H3) Python libraries.

Run: pytest bench/bench_latlng_to_cell.py --benchmark-only -q
geocell converts 10M points per call; the per-point Python loops of the other
libraries run on a 20k subsample. All figures come from the same run, so
compare ratios (the machine may be shared). A summary table prints at the end.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import geocell
from geocell import _core

from conftest import record

N_POINTS = int(os.environ.get("GEOCELL_BENCH_POINTS", 10_000_000))
N_LOOP = 20_000


@pytest.fixture(scope="module")
def points():
    rng = np.random.default_rng(0)
    lat = np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, N_POINTS)))
    lng = rng.uniform(-180.0, 180.0, N_POINTS)
    return lat, lng


@pytest.fixture(scope="module")
def loop_points(points):
    lat, lng = points
    return lat[:N_LOOP].tolist(), lng[:N_LOOP].tolist()


@pytest.mark.parametrize("threads", [1, 0], ids=["1-thread", "all-threads"])
def test_geocell(benchmark, points, threads):
    """The honest default: a fresh output array per call (its page faults included)."""
    lat, lng = points
    label = "1 thread" if threads == 1 else f"{_core.resolve_threads(0)} threads"
    out = benchmark.pedantic(geocell.latlng_to_cell, args=(lat, lng, 30), kwargs={"threads": threads},
                             rounds=15, iterations=1, warmup_rounds=1)
    assert out.shape == lat.shape
    record(benchmark, f"geocell ({_core.simd_level()}, {label})", lat.size)


def test_geocell_out(benchmark, points):
    """Repeated calls into one preallocated output (out=): no fresh 80 MB to fault in."""
    lat, lng = points
    out = np.empty(lat.shape, np.uint64)
    res = benchmark.pedantic(geocell.latlng_to_cell, args=(lat, lng, 30), kwargs={"threads": 1, "out": out},
                             rounds=15, iterations=1, warmup_rounds=1)
    assert res is out
    record(benchmark, f"geocell ({_core.simd_level()}, 1 thread, out=)", lat.size)


@pytest.mark.parametrize("path", [p for p in _core.simd_levels()[1:] if p != "scalar"])
def test_geocell_other_vector_path(benchmark, points, path):
    """The slower vector paths this CPU also runs (AVX2 where AVX-512 is the default), fresh output."""
    lat, lng = points
    _core.set_simd_level(path)
    try:
        benchmark.pedantic(geocell.latlng_to_cell, args=(lat, lng, 30), kwargs={"threads": 1},
                           rounds=15, iterations=1, warmup_rounds=1)
    finally:
        _core.set_simd_enabled(True)
    record(benchmark, f"geocell ({path}, 1 thread)", lat.size)


def test_geocell_baseline_path(benchmark, points):
    lat, lng = points[0][:1_000_000], points[1][:1_000_000]
    _core.set_simd_enabled(False)
    try:
        benchmark.pedantic(geocell.latlng_to_cell, args=(lat, lng, 30), kwargs={"threads": 1},
                           rounds=3, iterations=1)
    finally:
        _core.set_simd_enabled(True)
    record(benchmark, "geocell (scalar path, 1 thread)", lat.size)


def _loop_bench(benchmark, loop_points, name, convert):
    lat, lng = loop_points

    def run():
        return [convert(a, b) for a, b in zip(lat, lng)]

    benchmark.pedantic(run, rounds=5, iterations=1)
    record(benchmark, name, len(lat))


def test_s2geometry(benchmark, loop_points):
    s2 = pytest.importorskip("s2geometry")
    _loop_bench(benchmark, loop_points, "s2geometry 0.14 (Python loop)",
                lambda a, b: s2.S2CellId(s2.S2LatLng.FromDegrees(a, b)).id())


def test_s2sphere(benchmark, loop_points):
    s2sphere = pytest.importorskip("s2sphere")
    _loop_bench(benchmark, loop_points, "s2sphere (Python loop)",
                lambda a, b: s2sphere.CellId.from_lat_lng(s2sphere.LatLng.from_degrees(a, b)).id())


def test_s2cell(benchmark, loop_points):
    s2cell = pytest.importorskip("s2cell")
    _loop_bench(benchmark, loop_points, "s2cell (Python loop)",
                lambda a, b: s2cell.lat_lon_to_cell_id(a, b, 30))


def test_h3(benchmark, loop_points):
    h3 = pytest.importorskip("h3")
    # A different grid (hexagons, resolution 15 ~ 1 m^2), for scale only.
    _loop_bench(benchmark, loop_points, "h3 res 15 (Python loop)", lambda a, b: h3.latlng_to_cell(a, b, 15))


def test_agreement_with_s2geometry(points):
    """Not a benchmark: the fast path agrees with the oracle on the benchmark's own points."""
    s2 = pytest.importorskip("s2geometry")
    lat, lng = points[0][:5000], points[1][:5000]
    got = geocell.latlng_to_cell(lat, lng)
    want = [s2.S2CellId(s2.S2LatLng.FromDegrees(a, b)).id() for a, b in zip(lat.tolist(), lng.tolist())]
    assert [int(g) for g in got] == want
