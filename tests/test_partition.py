"""geocell.partition & co against a literal implementation of the rule, plus invariants."""

import gzip
import os
import warnings

import numpy as np
import pytest
import s2geometry as s2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import geocell
from geocell.partition import Partition
from partition_reference import angular_distance_deg, reference_partition

DATA = os.path.join(os.path.dirname(__file__), "data", "mp16_coords_100k.csv.gz")


def load_mp16():
    with gzip.open(DATA, "rt") as f:
        assert f.readline().strip() == "LAT,LON"
        a = np.loadtxt(f, delimiter=",")
    return a[:, 0], a[:, 1]


def assert_matches_reference(p, lat, lng, tau_min, tau_max, level_min, level_max):
    ref = reference_partition(lat, lng, tau_min, tau_max, level_min, level_max)
    ref_cells = sorted(ref)
    assert p.cells.tolist() == ref_cells
    assert p.counts.tolist() == [ref[c][0] for c in ref_cells]
    assert p.levels.tolist() == [s2.S2CellId(c).level() for c in ref_cells]
    if ref_cells:
        ref_latlng = np.array([ref[c][1:] for c in ref_cells])
        dist = angular_distance_deg(p.centroids[:, 0], p.centroids[:, 1],
                                    ref_latlng[:, 0], ref_latlng[:, 1])
        assert dist.max() < 1e-6


# ---- generated data: random, clustered, duplicate-heavy ----

coord = st.tuples(st.floats(-90, 90), st.floats(-180, 180))


@st.composite
def point_sets(draw):
    kind = draw(st.sampled_from(["random", "clustered", "duplicates"]))
    n = draw(st.integers(0, 120))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "random":
        lat = np.degrees(np.arcsin(rng.uniform(-1, 1, n)))
        lng = rng.uniform(-180, 180, n)
    elif kind == "clustered":
        centres = draw(st.lists(coord, min_size=1, max_size=4))
        spread = 10.0 ** draw(st.integers(-7, 1))
        k = rng.integers(0, len(centres), n)
        c = np.array(centres).reshape(-1, 2)[k]
        lat = np.clip(c[:, 0] + rng.normal(0, spread, n), -90, 90)
        lng = np.clip(c[:, 1] + rng.normal(0, spread, n), -180, 180)
    else:
        distinct = draw(st.lists(coord, min_size=1, max_size=5))
        c = np.array(distinct).reshape(-1, 2)[rng.integers(0, len(distinct), n)]
        lat, lng = c[:, 0], c[:, 1]
    return lat, lng


@st.composite
def params(draw):
    tau_min = draw(st.integers(0, 12))
    tau_max = draw(st.integers(tau_min + 1, tau_min + 40))
    level_min = draw(st.integers(0, 30))
    level_max = draw(st.integers(level_min, min(30, level_min + draw(st.integers(0, 30)))))
    return tau_min, tau_max, level_min, level_max


FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(point_sets(), params())
def test_equals_reference(points, prm):
    lat, lng = points
    p = geocell.partition(lat, lng, *prm)
    assert_matches_reference(p, lat, lng, *prm)


@FAST
@given(point_sets(), st.lists(st.tuples(st.integers(0, 5), st.integers(6, 30)), min_size=1,
                              max_size=3), st.integers(0, 6), st.integers(0, 24))
def test_partitions_equal_single_runs_and_hierarchy(points, taus, level_min, extra):
    lat, lng = points
    level_max = min(30, level_min + extra)
    ps = geocell.partitions(lat, lng, taus, level_min, level_max)
    assert len(ps) == len(taus)
    for (a, b), p in zip(taus, ps):
        single = geocell.partition(lat, lng, a, b, level_min, level_max)
        assert p.cells.tolist() == single.cells.tolist()
        assert p.counts.tolist() == single.counts.tolist()
        # Sums are grouped differently when partitionings share segments.
        np.testing.assert_allclose(p.centroids, single.centroids, rtol=0, atol=1e-9)
        assert (p.tau_min, p.tau_max) == (a, b)
    h = geocell.hierarchy(ps)
    assert h.shape == (len(ps[-1]), len(ps)) and h.dtype == np.int64
    assert (h[:, -1] == np.arange(len(ps[-1]))).all()
    for r, fine in enumerate(ps[-1].cells.tolist()):
        for k, p in enumerate(ps):
            containing = [i for i, c in enumerate(p.cells.tolist())
                          if s2.S2CellId(c).contains(s2.S2CellId(fine))]
            assert h[r, k] == (containing[0] if containing else -1)


@FAST
@given(point_sets(), params(), st.integers(0, 2**32 - 1))
def test_invariants(points, prm, seed):
    lat, lng = points
    tau_min, tau_max, level_min, level_max = prm
    p = geocell.partition(lat, lng, *prm)
    assert (p.counts > tau_min).all()
    assert ((p.counts <= tau_max) | (p.levels == level_max)).all()
    assert (p.levels >= level_min).all() and (p.levels <= level_max).all()
    ids = [s2.S2CellId(int(c)) for c in p.cells]
    for a, b in zip(ids, ids[1:]):  # ascending and disjoint
        assert a.range_max().id() < b.range_min().id()
    # every kept point lies in exactly one cell, and assign finds it
    idx = p.assign(lat, lng)
    assert np.bincount(idx[idx >= 0], minlength=len(p)).tolist() == p.counts.tolist()
    for i in np.flatnonzero(idx >= 0):
        assert ids[idx[i]].contains(s2.S2CellId(s2.S2LatLng.FromDegrees(lat[i], lng[i])))
    # input order does not matter
    perm = np.random.default_rng(seed).permutation(len(lat))
    assert geocell.partition(lat[perm], lng[perm], *prm) == p


def test_mp16_equals_reference():
    lat, lng = load_mp16()
    taus = [(50, 5000), (50, 2000), (50, 1000), (5, 100)]
    ps = geocell.partitions(lat, lng, taus)
    for (a, b), p in zip(taus, ps):
        assert_matches_reference(p, lat, lng, a, b, 2, 30)
    # A deeper level range on a subset exercises level_max stacks.
    assert_matches_reference(geocell.partition(lat[:20000], lng[:20000], 3, 10, 4, 16),
                             lat[:20000], lng[:20000], 3, 10, 4, 16)


def test_mp16_counts_and_hierarchy():
    lat, lng = load_mp16()
    ps = geocell.partitions(lat, lng, [(50, 5000), (50, 2000), (50, 1000)])
    assert [len(p) for p in ps] == sorted(len(p) for p in ps)
    h = geocell.hierarchy(ps)
    fine = ps[-1]
    for k, p in enumerate(ps):
        ok = h[:, k] >= 0
        c = p.cells[h[ok, k]]
        lsb_c = c & (~c + np.uint64(1))
        assert ((c - (lsb_c - np.uint64(1)) <= fine.cells[ok])
                & (fine.cells[ok] <= c + (lsb_c - np.uint64(1)))).all()


# ---- assign ----

def test_assign_outside_and_invalid():
    lat = np.array([48.85, 48.85, 48.86, -33.9, np.nan, 95.0, 10.0])
    lng = np.array([2.35, 2.35, 2.35, 151.2, 0.0, 0.0, 200.0])
    p = geocell.partition(lat[:3], lng[:3], 1, 10)
    assert len(p) == 1
    assert p.assign(lat, lng).tolist() == [0, 0, 0, -1, -1, -1, -1]
    assert p.assign([], []).shape == (0,)


# ---- CSV ----

def test_csv_round_trip(tmp_path):
    lat, lng = load_mp16()
    p = geocell.partition(lat, lng, 20, 500)
    for name in ["cells_20_500.csv", "cells_20_500.csv.gz"]:
        path = tmp_path / name
        p.to_csv(path)
        q = Partition.read_csv(path)
        assert q == p and (q.tau_min, q.tau_max) == (20, 500)
        assert q.levels.tolist() == p.levels.tolist()
        assert q.source_labels.tolist() == list(range(len(p)))
    text = (tmp_path / "cells_20_500.csv").read_text().splitlines()
    assert text[0] == "class_label,hex_id,imgs_per_cell,latitude_mean,longitude_mean"
    first = text[1].split(",")
    assert first[0] == "0" and first[1] == s2.S2CellId(int(p.cells[0])).ToToken()


def test_read_published_layout(tmp_path):
    # GeoEstimation's files: two preamble lines, class labels in their own order.
    a = s2.S2CellId(s2.S2LatLng.FromDegrees(48.85, 2.35)).parent(8)
    b = s2.S2CellId(s2.S2LatLng.FromDegrees(40.7, -74.0)).parent(6)
    path = tmp_path / "cells_50_5000_images_4654532.csv"
    path.write_text("num_images: 4654532\nmin_concept_probability: 0.0\n"
                    "class_label,hex_id,imgs_per_cell,latitude_mean,longitude_mean\n"
                    f"0,{b.ToToken()},120,40.7,-74.0\n1,{a.ToToken()},80,48.85,2.35\n")
    p = Partition.read_csv(path)
    assert p.cells.tolist() == sorted([a.id(), b.id()])
    order = np.argsort([b.id(), a.id()])
    assert p.source_labels.tolist() == [0, 1] if order[0] == 0 else [1, 0]
    assert p.counts.tolist() == [[120, 80][i] for i in order]
    assert p.levels.tolist() == [[6, 8][i] for i in order]
    assert (p.tau_min, p.tau_max) == (50, 5000)


@pytest.mark.parametrize("body, message", [
    ("class_label,hex_id,imgs_per_cell,latitude_mean,longitude_mean\n0,zz,3,1,2\n",
     "line 2: hex_id 'zz'"),
    ("class_label,hex_id,imgs_per_cell,latitude_mean,longitude_mean\n0,89,3,1\n",
     "line 2: expected 5 fields"),
    ("class_label,hex_id,imgs_per_cell,latitude_mean,longitude_mean\n0,89,x,1,2\n",
     "line 2: cannot parse"),
    ("class_label,hex_id,imgs_per_cell,latitude_mean,longitude_mean\n0,89,3,1,2\n1,894,3,1,2\n",
     "lines 2 and 3"),
    ("a,b\n", "line 1: expected header"),
    ("", "no header"),
])
def test_read_csv_errors_name_file_and_line(tmp_path, body, message):
    path = tmp_path / "bad.csv"
    path.write_text(body)
    with pytest.raises(ValueError, match=message) as e:
        Partition.read_csv(path)
    assert "bad.csv" in str(e.value)


def test_from_arrays():
    lat, lng = load_mp16()
    p = geocell.partition(lat, lng, 50, 1000)
    q = Partition.from_arrays(p.cells.view(np.int64), p.counts, p.centroids, 50, 1000)
    assert q == p and q.levels.tolist() == p.levels.tolist() and q.tau_max == 1000
    with pytest.raises(ValueError, match="ascending"):
        Partition.from_arrays(p.cells[::-1], p.counts, p.centroids)
    parent = s2.S2CellId(int(p.cells[0])).parent(1).id()
    with pytest.raises(ValueError, match="disjoint"):
        Partition.from_arrays(np.sort(np.array([parent, p.cells[0]], np.uint64)), [1, 1],
                              np.zeros((2, 2)))
    with pytest.raises(ValueError, match="not a valid S2 cell"):
        Partition.from_arrays(np.array([0], np.uint64), [1], np.zeros((1, 2)))
    with pytest.raises(ValueError, match="same length"):
        Partition.from_arrays(p.cells, p.counts[:-1], p.centroids)
    with pytest.raises(ValueError, match="shape"):
        Partition.from_arrays(p.cells, p.counts, p.centroids[:-1])


# ---- bad input, empty input, edge cases ----

@pytest.mark.parametrize("kwargs, message", [
    (dict(tau_min=10, tau_max=10), "tau_min must be < tau_max"),
    (dict(tau_min=-1, tau_max=10), "tau_min must be >= 0"),
    (dict(tau_min=1, tau_max=-10), "tau_max must be >= 0"),
    (dict(tau_min=1.5, tau_max=10), "tau_min must be an integer"),
    (dict(level_min=3, level_max=2), "0 <= level_min <= level_max <= 30"),
    (dict(level_min=-1), "0 <= level_min"),
    (dict(level_max=31), "level_max=31"),
    (dict(threads=-1), "threads must be >= 0"),
])
def test_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        geocell.partition([1.0], [2.0], **kwargs)


def test_bad_coordinates():
    with pytest.raises(ValueError, match="same length, got 2 and 1"):
        geocell.partition([1.0, 2.0], [3.0])
    with pytest.raises(ValueError, match="taus\\[1\\]"):
        geocell.partitions([1.0], [2.0], [(1, 5), (5, 5)])
    for lat, lng in [(np.nan, 0.0), (91.0, 0.0), (0.0, np.inf), (0.0, -180.5)]:
        with pytest.raises(ValueError, match="row 2"):
            geocell.partition([0.0, 1.0, lat, 2.0], [0.0, 1.0, lng, 2.0])
    # Large enough to be checked by several threads: still the first row is named.
    big_lat, big_lng = np.zeros(400_000), np.zeros(400_000)
    big_lat[[350_000, 399_999]] = np.nan
    big_lng[250_000] = 181.0
    with pytest.raises(ValueError, match="row 250000: lat=0.0, lng=181.0"):
        geocell.partition(big_lat, big_lng, threads=2)
    lat = np.array([10.0] * 5 + [np.nan, 100.0])
    lng = np.array([20.0] * 5 + [0.0, 0.0])
    with pytest.warns(UserWarning, match="dropped 2 of 7"):
        p = geocell.partition(lat, lng, 1, 10, drop_invalid=True)
    assert p.dropped_invalid == 2 and p.counts.tolist() == [5]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert geocell.partition(lat[:5], lng[:5], 1, 10, drop_invalid=True).dropped_invalid == 0


def test_empty_and_extremes():
    p = geocell.partition([], [])
    assert len(p) == 0 and p.cells.dtype == np.uint64 and p.centroids.shape == (0, 2)
    assert geocell.hierarchy([p]).shape == (0, 1)
    # Poles, antimeridian, identical stacks at level 30.
    lat = np.array([90.0] * 30 + [-90.0] * 30 + [0.0] * 30)
    lng = np.array([0.0] * 30 + [180.0] * 30 + [-180.0] * 15 + [179.9999999] * 15)
    p = geocell.partition(lat, lng, 2, 10)
    assert_matches_reference(p, lat, lng, 2, 10, 2, 30)
    assert len(p) == 4 and (p.levels == 30).all()


def test_antimeridian_centroid():
    lat = np.full(200, -16.5)
    lng = np.where(np.arange(200) % 2 == 0, 179.99, -179.99)
    p = geocell.partition(lat, lng, 10, 10_000, level_min=0, level_max=0)
    (c,) = p.centroids
    assert abs(c[0] - (-16.5)) < 1e-6 and abs(abs(c[1]) - 180.0) < 1e-6


def test_repr_and_attributes():
    p = geocell.partition([10.0] * 3, [20.0] * 3, 1, 2, 5, 12)
    assert (p.tau_min, p.tau_max, p.level_min, p.level_max) == (1, 2, 5, 12)
    assert "1:2" in repr(p) and "1 cells" in repr(p) and "3 points" in repr(p)
    with pytest.raises(ValueError):
        p.cells[0] = 1


def test_single_point_cells_sit_at_leaf_centres():
    # One point per cell: the centroid is that point's leaf-cell centre exactly,
    # which checks the incremental Hilbert decode used for the centroid sums.
    rng = np.random.default_rng(5)
    centres = np.column_stack([rng.uniform(-89, 89, 40), rng.uniform(-179, 179, 40)])
    pick = rng.integers(0, 40, 4000)
    spread = 10.0 ** rng.integers(-6, 0, 4000)
    lat = np.clip(centres[pick, 0] + rng.normal(0, 1, 4000) * spread, -90, 90)
    lng = np.clip(centres[pick, 1] + rng.normal(0, 1, 4000) * spread, -180, 180)
    lat = np.concatenate([lat, np.degrees(np.arcsin(rng.uniform(-1, 1, 2000)))])
    lng = np.concatenate([lng, rng.uniform(-180, 180, 2000)])
    p = geocell.partition(lat, lng, 0, 1, level_min=0)
    idx = p.assign(lat, lng)
    alone = np.flatnonzero(p.counts[idx] == 1)  # points alone in their cell
    expect = np.array([[ll.lat().degrees(), ll.lng().degrees()] for ll in
                       (s2.S2CellId(s2.S2LatLng.FromDegrees(lat[i], lng[i])).ToLatLng()
                        for i in alone)])
    got = p.centroids[idx[alone]]
    dist = angular_distance_deg(got[:, 0], got[:, 1], expect[:, 0], expect[:, 1])
    assert alone.size > 5000 and dist.max() < 1e-12


def test_regional_data_dropped_rows_and_threads():
    # All points in one small region (the sort's first digit does not vary),
    # more than fit one in-cache sort, with invalid rows spread through.
    rng = np.random.default_rng(9)
    n = 80_000
    lat = 48.85 + rng.normal(0, 0.05, n)
    lng = 2.35 + rng.normal(0, 0.05, n)
    lat[rng.integers(0, n, 3000)] = 48.8584  # a stack of identical geotags
    bad = rng.choice(n, 500, replace=False)
    lat_bad = lat.copy()
    lat_bad[bad[:250]] = np.nan
    lat_bad[bad[250:]] = 123.0
    keep = np.ones(n, bool)
    keep[bad] = False
    runs = []
    for threads in (1, 2):
        with pytest.warns(UserWarning, match="dropped 500"):
            runs.append(geocell.partitions(lat_bad, lng, [(20, 2000), (5, 300)], 4, 22,
                                           drop_invalid=True, threads=threads))
    for one, two in zip(*runs):
        assert one.cells.tolist() == two.cells.tolist()
        assert one.counts.tolist() == two.counts.tolist()
        np.testing.assert_allclose(one.centroids, two.centroids, rtol=0, atol=1e-9)
    assert_matches_reference(runs[1][1], lat[keep], lng[keep], 5, 300, 4, 22)
