"""Bad input to the S2 API: clear ValueErrors naming the first offending index, never garbage."""

from __future__ import annotations

import math

import numpy as np
import pytest

import geocell

LEAF = geocell.latlng_to_cell(40.7, -74.0)
CELL12 = geocell.cell_to_parent(LEAF, 12)


@pytest.mark.parametrize(
    "lat, lng, message",
    [
        ([0.0, 1.0, 2.0, math.nan], [0.0] * 4, r"lat\[3\] = nan is not a finite latitude in \[-90, 90\]"),
        ([0.0, 90.5], [0.0, 0.0], r"lat\[1\] = 90.5 is not a finite latitude"),
        ([-math.inf], [0.0], r"lat\[0\] = -inf is not a finite latitude"),
        ([0.0, 0.0], [1.0, math.inf], r"lng\[1\] = inf is not a finite longitude"),
        ([0.0, 0.0], [math.nan, 1.0], r"lng\[0\] = nan is not a finite longitude"),
        ([[0.0, 1.0], [2.0, -91.0]], [[0.0, 0.0], [0.0, 0.0]], r"lat\[1, 1\] = -91.0"),
        (math.nan, 0.0, r"lat = nan"),
    ],
)
def test_bad_coordinates(lat, lng, message):
    with pytest.raises(ValueError, match=message):
        geocell.latlng_to_cell(lat, lng)


def test_bad_shapes_and_levels():
    with pytest.raises(ValueError, match="different shapes"):
        geocell.latlng_to_cell([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="different shapes"):
        geocell.great_circle_km([1.0], [1.0], [1.0, 2.0], [1.0, 2.0])
    for level in (-1, 31):
        with pytest.raises(ValueError, match=f"level = {level} is outside 0..30"):
            geocell.latlng_to_cell(0.0, 0.0, level)
    with pytest.raises(TypeError):
        geocell.latlng_to_cell(0.0, 0.0, 3.5)
    with pytest.raises(ValueError, match="threads"):
        geocell.latlng_to_cell(0.0, 0.0, threads=-1)
    with pytest.raises(ValueError, match=r"lat2\[0\] = 95.0"):
        geocell.great_circle_km([0.0], [0.0], [95.0], [0.0])


@pytest.mark.parametrize("bad", [0, 0xC000000000000000 | 1 << 40, 0xE000000000000001, 0x1000000000000002])
@pytest.mark.parametrize(
    "fn",
    [geocell.cell_level, geocell.cell_to_latlng, geocell.cell_to_boundary, geocell.cell_to_children,
     geocell.cell_range, geocell.cell_to_token, lambda c: geocell.cell_to_parent(c, 0),
     lambda c: geocell.cell_contains(c, c)],
)
def test_invalid_cells(fn, bad):
    cells = np.array([int(CELL12), int(CELL12), bad], dtype=np.uint64)
    with pytest.raises(ValueError, match=rf"\[2\] = {bad} \(0x{bad:016x}\) is not a valid S2 cell id"):
        fn(cells)


def test_parent_finer_than_cell_and_leaf_children():
    with pytest.raises(ValueError, match=r"level 13 is finer than cells\[1\] = \d+ at level 12"):
        geocell.cell_to_parent([LEAF, CELL12], 13)
    with pytest.raises(ValueError, match=r"level\[1\] = 31 is outside"):
        geocell.cell_to_parent([LEAF, LEAF], [3, 31])
    with pytest.raises(ValueError, match=r"cells\[0\] = \d+ is a leaf cell"):
        geocell.cell_to_children([LEAF])


@pytest.mark.parametrize("token", ["", "X", "zz", "89c25 ", "0", "c", "1234567890abcdef1", "89c\u00e9"])
def test_malformed_tokens(token):
    with pytest.raises(ValueError, match=r"tokens\[1\] = .* is not the token of a valid S2 cell"):
        geocell.token_to_cell(["89c25", token])


def test_empty_inputs():
    assert geocell.latlng_to_cell([], []).dtype == np.uint64
    assert geocell.latlng_to_cell([], []).shape == (0,)
    lat, lng = geocell.cell_to_latlng([])
    assert lat.shape == lng.shape == (0,)
    assert geocell.cell_to_boundary([]).shape == (0, 4, 2)
    assert geocell.cell_to_children([]).shape == (0, 4)
    assert geocell.cell_to_token([]).shape == (0,)
    assert geocell.token_to_cell([]).dtype == np.uint64
    assert geocell.is_valid_cell([]).shape == (0,)
    assert geocell.great_circle_km([], [], [], []).shape == (0,)


def test_dtypes_and_scalars():
    lat32 = np.array([40.7], dtype=np.float32)
    assert geocell.latlng_to_cell(lat32, [-74.0])[0] == geocell.latlng_to_cell(float(lat32[0]), -74.0)
    assert isinstance(geocell.latlng_to_cell(1.0, 2.0), np.uint64)
    assert isinstance(geocell.cell_level(LEAF), np.int64)
    assert isinstance(geocell.cell_to_token(LEAF), str)
    la, ln = geocell.cell_to_latlng(LEAF)
    assert isinstance(la, np.float64) and isinstance(ln, np.float64)
    # int64 views of ids are the same cells.
    np.testing.assert_array_equal(geocell.cell_level(np.array([LEAF]).view(np.int64)), [30])
    # Lists mixing numpy ids and Python ints keep every bit.
    assert geocell.cell_level([LEAF, int(CELL12)]).tolist() == [30, 12]
    # Non-contiguous input works; contiguous float64 is not copied (same results).
    lat = np.linspace(-80, 80, 20)
    np.testing.assert_array_equal(geocell.latlng_to_cell(lat[::2], lat[::2]),
                                  geocell.latlng_to_cell(lat[::2].copy(), lat[::2].copy()))
    grid = geocell.latlng_to_cell(np.zeros((2, 3)), np.ones((2, 3)), 5)
    assert grid.shape == (2, 3)
    assert geocell.cell_to_boundary(grid).shape == (2, 3, 4, 2)


def test_is_valid_cell_never_raises():
    assert geocell.is_valid_cell([0, 2**64 - 1, -5]).tolist() == [False, False, False]


@pytest.mark.parametrize(
    "out, message",
    [
        ([0, 0, 0], r"out must be a numpy.ndarray of dtype uint64, got list"),
        (np.zeros(3, np.int64), r"out must have dtype uint64, got int64"),
        (np.zeros(3, np.float64), r"out must have dtype uint64, got float64"),
        (np.zeros(4, np.uint64), r"out must have the points' shape \(3,\), got \(4,\)"),
        (np.zeros((3, 1), np.uint64), r"out must have the points' shape \(3,\), got \(3, 1\)"),
        (np.zeros(6, np.uint64)[::2], r"out must be C-contiguous"),
    ],
)
def test_bad_out(out, message):
    with pytest.raises(ValueError, match=message):
        geocell.latlng_to_cell([1.0, 2.0, 3.0], [4.0, 5.0, 6.0], out=out)


def test_out_read_only_or_overlapping():
    out = np.zeros(3, np.uint64)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out must be writeable"):
        geocell.latlng_to_cell([1.0, 2.0, 3.0], [4.0, 5.0, 6.0], out=out)
    lat = np.array([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="out must not share memory with lat or lng"):
        geocell.latlng_to_cell(lat, [4.0, 5.0, 6.0], out=lat.view(np.uint64))


def test_out_with_bad_point_raises():
    out = np.zeros(3, np.uint64)
    with pytest.raises(ValueError, match=r"lat\[2\] = nan"):
        geocell.latlng_to_cell([1.0, 2.0, math.nan], [4.0, 5.0, 6.0], out=out)


def test_core_rejects_bad_out():
    # The binding checks too (for direct callers of _core).
    from geocell import _core

    lat = np.zeros(3)
    for bad in (np.zeros(2, np.uint64), np.zeros(3, np.int64), np.zeros(6, np.uint64)[::2]):
        with pytest.raises(ValueError, match="out must be a writeable C-contiguous uint64 array"):
            _core.latlng_to_cell(lat, lat, 30, 1, bad)
