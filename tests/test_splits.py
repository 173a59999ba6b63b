"""Held-out splits keep their distance guarantee; the brute-force distance against a direct loop."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import geocell
from geocell.data.splits import held_out_split, min_distance_km

lat_st = st.floats(-90, 90, allow_nan=False)
lng_st = st.floats(-180, 180, allow_nan=False)


@st.composite
def location_sets(draw):
    pts = draw(st.lists(st.tuples(lat_st, lng_st), min_size=1, max_size=120))
    # clusters and exact duplicates, the antimeridian and the poles, as photo sets have
    extra = [(lat, 180.0 - 1e-9) for lat, _ in pts[:5]] + [(lat, -180.0) for lat, _ in pts[:5]]
    extra += [(90.0, 0.0), (-90.0, 45.0)] + pts[:10]
    pts = pts + draw(st.sampled_from([[], extra]))
    return np.array(pts, dtype=np.float64)


@settings(max_examples=60, deadline=None)
@given(location_sets(), st.sampled_from([0.0, 5.0, 50.0, 450.0, 3000.0]),
       st.one_of(st.integers(0, 3), st.lists(st.integers(0, 9), min_size=1, max_size=4)), st.integers(0, 5))
def test_no_held_out_location_near_a_training_location(pts, buffer_km, level, seed):
    split = held_out_split(pts[:, 0], pts[:, 1], buffer_km=buffer_km, block_level=level, seed=seed,
                           fractions={"val": 0.2, "test": 0.2})
    assert set(split) <= {"train", "val", "test", ""}
    train = split == "train"
    for name in ("val", "test"):
        held = split == name
        if held.any() and train.any() and buffer_km > 0:
            d = geocell.great_circle_km(np.repeat(pts[held, 0], train.sum()), np.repeat(pts[held, 1], train.sum()),
                                        np.tile(pts[train, 0], held.sum()), np.tile(pts[train, 1], held.sum()))
            assert d.min() >= buffer_km - 1e-6
    # a whole block goes one way: duplicates never straddle train and held-out
    for k in range(len(pts)):
        same = (pts[:, 0] == pts[k, 0]) & (pts[:, 1] == pts[k, 1])
        assert len(set(split[same]) - {""}) <= 1


def test_min_distance_matches_a_direct_loop():
    rng = np.random.default_rng(0)
    q = np.column_stack([rng.uniform(-90, 90, 50), rng.uniform(-180, 180, 50)])
    r = np.column_stack([rng.uniform(-90, 90, 70), rng.uniform(-180, 180, 70)])
    direct = [min(geocell.great_circle_km(a, b, c, d) for c, d in r) for a, b in q]
    np.testing.assert_allclose(min_distance_km(q[:, 0], q[:, 1], r[:, 0], r[:, 1], chunk=7), direct, atol=1e-6)
    np.testing.assert_allclose(min_distance_km(q[:, 0], q[:, 1], r[:, 0], r[:, 1], chunk=7, ref_chunk=5),
                               direct, atol=1e-6)
    assert np.isinf(min_distance_km([0.0], [0.0], [], [])).all()
    from geocell._internal.geometry import unit_vectors
    from geocell.data.splits import nearest_km

    idx, km = nearest_km(unit_vectors(q[:, 0], q[:, 1]), unit_vectors(r[:, 0], r[:, 1]), chunk=7, ref_chunk=5)
    direct_idx = [int(np.argmin([geocell.great_circle_km(a, b, c, d) for c, d in r])) for a, b in q]
    assert idx.tolist() == direct_idx
    np.testing.assert_allclose(km, direct, atol=1e-6)


def test_fractions_and_determinism():
    rng = np.random.default_rng(1)
    lat, lng = rng.uniform(-60, 70, 5000), rng.uniform(-180, 180, 5000)
    a = held_out_split(lat, lng, seed=3, buffer_km=0)
    assert np.array_equal(a, held_out_split(lat, lng, seed=3, buffer_km=0))
    # whole blocks are drawn until each split holds its share
    assert 0.1 <= (a == "val").mean() < 0.15 and 0.1 <= (a == "test").mean() < 0.15
    with pytest.raises(ValueError, match="fractions"):
        held_out_split(lat, lng, fractions={"val": 0.6, "test": 0.5})


def test_several_block_levels_share_each_split():
    """Blocks of each level hold about an equal part of a split, coarse blocks are whole, and the
    fine blocks make held-out places that lie close to training ones (the mix a real test set has)."""
    from geocell.cells import cell_to_parent, latlng_to_cell

    rng = np.random.default_rng(2)
    centres = np.column_stack([rng.uniform(-50, 60, 300), rng.uniform(-180, 180, 300)])
    pts = centres[rng.integers(0, 300, 20000)] + rng.normal(scale=0.3, size=(20000, 2))
    lat, lng = np.clip(pts[:, 0], -89, 89), pts[:, 1]
    split = held_out_split(lat, lng, fractions={"val": 0.2}, block_level=[9, 3], buffer_km=5.0, seed=1)
    assert np.array_equal(split, held_out_split(lat, lng, fractions={"val": 0.2}, block_level=(3, 9),
                                                buffer_km=5.0, seed=1))
    val, train = split == "val", split == "train"
    block = cell_to_parent(latlng_to_cell(lat, lng, 30), 3)
    # level-3 blocks are drawn first and whole (none of their locations is train); the level-9
    # blocks, the other half, sit inside level-3 blocks that keep training locations
    whole = [b for b in np.unique(block[val]) if not train[block == b].any()]
    assert 0.3 < np.isin(block[val], whole).mean() < 0.8
    d = min_distance_km(lat[val], lng[val], lat[train], lng[train])
    assert d.min() >= 5.0 and (d < 100).mean() > 0.2 and (d > 300).mean() > 0.2
    with pytest.raises(ValueError, match="levels"):
        held_out_split(lat, lng, block_level=[3, 31])


def test_a_dense_block_is_passed_over_while_smaller_ones_remain():
    """40 photos within a few hundred metres (one block at every level) and 960 spread over the
    world; val draws 10 %, 50 photos at each of two levels. With the cap (a block may make up a
    tenth of that, 5) the dense block never goes to val, the spread photos' blocks fill it; without
    it (max_block_share 1) it sometimes does, and is then 40 % of the split: one place."""
    rng = np.random.default_rng(5)
    dense = np.column_stack([48.85 + rng.normal(scale=1e-3, size=40), 2.35 + rng.normal(scale=1e-3, size=40)])
    spread = np.column_stack([rng.uniform(-60, 70, 960), rng.uniform(-180, 180, 960)])
    pts = np.concatenate([dense, spread])
    in_val = {cap: [] for cap in (0.1, 1.0)}
    for seed in range(20):
        for cap in in_val:
            split = held_out_split(pts[:, 0], pts[:, 1], fractions={"val": 0.1}, block_level=[3, 9], buffer_km=0,
                                   seed=seed, max_block_share=cap)
            assert len(set(split[:40])) == 1  # a block goes one way
            in_val[cap].append(split[0] == "val")
            if cap == 0.1:  # each level overshoots its 50 by less than one block of at most 5
                assert 0.1 <= (split == "val").mean() <= 0.11
    assert not any(in_val[0.1]) and any(in_val[1.0])


def test_big_blocks_are_drawn_when_the_small_ones_run_out():
    """Only two places, each far more than a tenth of the split's share: the split is still
    filled, from the big blocks."""
    rng = np.random.default_rng(6)
    pts = np.concatenate([np.tile([[10.0, 20.0]], (50, 1)), np.tile([[-30.0, 140.0]], (50, 1))])
    pts = pts + rng.normal(scale=1e-3, size=pts.shape)
    split = held_out_split(pts[:, 0], pts[:, 1], fractions={"val": 0.2}, buffer_km=0, seed=0)
    assert (split == "val").sum() == 50 and (split == "train").sum() == 50
