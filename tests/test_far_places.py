"""Far places: distances to the nearest training photo by hand, the distance bands at their edges,
land places drawn by area, the Earth dataset's far places in val and test and its land places in
train, and the per-band report."""

from __future__ import annotations

import math

import numpy as np
import pytest

from geocell.data.manifest import PLACE_FAR, PLACE_PHOTO, Manifest, read_manifest, write_manifest
from geocell.data.places import SOUTH_LIMIT_DEG, land_places, split_places
from geocell.data.splits import min_distance_km
from geocell.data.terrain import land_fraction
from geocell.infer.bands import (DISTANCE_BANDS_KM, band_labels, band_section, by_band, distance_bands,
                                 format_band_intervals, format_bands, image_bands)
from geocell.infer.evaluate import Evaluation

R_KM = 6371.0  # geocell.cells.EARTH_RADIUS_KM
KM_PER_DEG = R_KM * math.pi / 180


def test_nearest_training_distance_by_hand_at_the_poles_and_the_antimeridian():
    # the north pole and a training photo 1 degree from it (its longitude does not matter); the
    # south pole is 179 degrees from that photo
    d = min_distance_km([90.0, -90.0], [0.0, 45.0], [89.0], [123.0])
    np.testing.assert_allclose(d, [KM_PER_DEG, 179 * KM_PER_DEG], rtol=1e-9)  # 111.2 km, 19,903 km
    # a place on the equator at 179.9 E, a photo at 179.9 W: 0.2 degrees across the antimeridian
    # (22.2 km), not 359.8; at 60 N the same 0.2 degrees of longitude are the haversine's 11.1 km
    d = min_distance_km([0.0, 60.0], [179.9, 179.9], [0.0, 60.0], [-179.9, -179.9])
    h = 2 * R_KM * math.asin(math.cos(math.radians(60)) * math.sin(math.radians(0.1)))
    np.testing.assert_allclose(d, [0.2 * KM_PER_DEG, h], rtol=1e-9)
    assert 22.2 < d[0] < 22.3 and 11.1 < d[1] < 11.2
    # no training photo at all: infinitely far
    assert np.isinf(min_distance_km([1.0], [2.0], [], [])).all()
    # their bands: 22 km and 11 km "<= 25 km"; 111 km "25-200 km"; the south pole and a place
    # with no training photo "> 200 km"
    assert image_bands([[0.0, 179.9], [60.0, 179.9], [90.0, 0.0], [-90.0, 0.0]], [0.0, 60.0, 89.0],
                       [-179.9, -179.9, 123.0]).tolist() == [0, 0, 1, 2]
    assert image_bands(np.zeros((2, 2)), np.zeros(0), np.zeros(0)).tolist() == [2, 2]


def test_bands_hold_lo_exclusive_hi_inclusive():
    assert DISTANCE_BANDS_KM == (25.0, 200.0)
    assert band_labels() == ["<= 25 km", "25-200 km", "> 200 km"]
    d = [0.0, 24.999, 25.0, np.nextafter(25.0, 30), 199.9, 200.0, np.nextafter(200.0, 300), 1e4, np.inf]
    # (lo, hi]: exactly 25 km is "<= 25 km", exactly 200 km "25-200 km"
    assert distance_bands(d).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    with pytest.raises(ValueError, match="index 1"):
        distance_bands([3.0, np.nan])
    with pytest.raises(ValueError, match="index 0"):
        distance_bands([-1.0])
    with pytest.raises(ValueError, match="increasing"):
        distance_bands([1.0], edges=(200, 25))
    assert band_labels((10, 100, 1000)) == ["<= 10 km", "10-100 km", "100-1000 km", "> 1000 km"]


def test_land_places_are_on_land_and_drawn_by_area():
    places = land_places(2000, np.random.default_rng(0))
    assert places.shape == (2000, 2)
    assert (land_fraction(places[:, 0], places[:, 1]) >= 0.5).all()
    assert places[:, 0].min() >= SOUTH_LIMIT_DEG and np.abs(places[:, 1]).max() <= 180
    # the share within 30 degrees of the equator against the land mask's, cells weighted by their
    # area (cos lat): 48.6 %; drawn uniform in latitude instead it would be the unweighted 36.3 %,
    # eleven standard errors away
    lat, lng = np.meshgrid(np.arange(SOUTH_LIMIT_DEG + 0.25, 90, 0.5), np.arange(-179.75, 180, 0.5), indexing="ij")
    lat, lng = lat.ravel(), lng.ravel()
    land = land_fraction(lat, lng) >= 0.5
    area = np.cos(np.radians(lat)) * land
    reference = area[np.abs(lat) < 30].sum() / area.sum()
    unweighted = land[np.abs(lat) < 30].sum() / land.sum()
    se = math.sqrt(reference * (1 - reference) / len(places))
    share = float((np.abs(places[:, 0]) < 30).mean())
    assert abs(share - reference) < 4 * se < abs(share - unweighted)
    # deterministic for a count and a seed; another seed, other places
    np.testing.assert_array_equal(land_places(10, np.random.default_rng(0)), land_places(10, np.random.default_rng(0)))
    assert not np.array_equal(land_places(10, np.random.default_rng(0)), land_places(10, np.random.default_rng(1)))


def test_land_places_away_from_points_and_the_clear_error():
    ref = np.array([[48.85, 2.35], [40.71, -74.0], [35.68, 139.7]])
    places = land_places(300, np.random.default_rng(2), away_from=ref, min_km=1500.0)
    assert min_distance_km(places[:, 0], places[:, 1], ref[:, 0], ref[:, 1]).min() >= 1500.0
    # a polar cap of ocean has no land to give
    with pytest.raises(ValueError, match="only 0 of 5 places found on land"):
        land_places(5, np.random.default_rng(0), south_limit=89.0, max_rounds=2)
    assert land_places(0, np.random.default_rng(0)).shape == (0, 2)


def test_split_places_keeps_val_and_test_in_different_blocks():
    from geocell.cells import cell_to_parent, latlng_to_cell

    places = land_places(600, np.random.default_rng(3))
    split = split_places(places, np.random.default_rng(4))
    assert set(split.tolist()) == {"val", "test"}
    assert 0.4 < (split == "val").mean() < 0.6
    blocks = cell_to_parent(latlng_to_cell(places[:, 0], places[:, 1], 30), 3)
    assert not set(blocks[split == "val"].tolist()) & set(blocks[split == "test"].tolist())


def test_place_column_round_trip(tmp_path):
    img = tmp_path / "a.jpg"
    img.write_bytes(b"")
    m = Manifest(paths=[str(img)] * 3, lat=[1.0, 2.0, 3.0], lng=[4.0, 5.0, 6.0], scene=[-1, -1, -1],
                 split=["train", "val", "test"], place=[PLACE_PHOTO, PLACE_FAR, PLACE_FAR])
    back = read_manifest(write_manifest(m, tmp_path / "m.csv"))
    assert back.place.tolist() == ["photo", "far", "far"] and back.subset([2]).place.tolist() == ["far"]
    assert (tmp_path / "m.csv").read_text().splitlines()[0] == "path,lat,lng,scene,split,place"
    with pytest.raises(ValueError, match="place has 1 rows"):
        Manifest(paths=["x", "y"], lat=[0, 0], lng=[0, 0], scene=[0, 0], place=["far"])


@pytest.fixture(scope="module")
def far_build(tmp_path_factory):
    from geocell.commands.data import main as data_main
    from geocell.data.earth import build_earth

    root = tmp_path_factory.mktemp("far")
    # the command's --far flag builds the one with far places (and no land places)
    assert data_main(["earth", "-o", str(root / "far"), "--n", "60", "--scenes", "0", "--far", "14", "--land", "0",
                      "--size", "32", "--seed", "3", "--workers", "1", "-q"]) == 0
    plain = build_earth(root / "plain", n=60, size=32, seed=3, progress=False, workers=1)
    return read_manifest(root / "far" / "manifest.csv"), read_manifest(plain), root


def test_earth_far_places_in_val_and_test_only(far_build):
    from geocell.data.earth import build_recipe, built_with

    m, plain, root = far_build
    far = m.place == "far"
    assert far.sum() == 14 and set(m.place.tolist()) == {"photo", "far"}
    assert set(m.split[far].tolist()) == {"val", "test"}
    train = m.split == "train"
    assert min_distance_km(m.lat[far], m.lng[far], m.lat[train], m.lng[train]).min() >= 5.0
    assert (land_fraction(m.lat[far], m.lng[far]) >= 0.5).all()
    # the photo rows are those of the build without far places, all marked "photo"
    photo = m.place == "photo"
    np.testing.assert_array_equal(m.lat[photo], plain.lat)
    np.testing.assert_array_equal(m.split[photo], plain.split)
    assert (plain.place == "photo").all() and np.flatnonzero(far).min() == len(plain)
    # the recipe names the count, so a cached folder is rebuilt when it changes
    assert built_with(root / "far") == build_recipe(60, 32, 3, "held-out", n_far=14) != \
        build_recipe(60, 32, 3, "held-out")
    assert built_with(root / "plain") == build_recipe(60, 32, 3, "held-out")


def test_earth_land_places_train_without_moving_any_val_test_place_to_another_band(far_build):
    from geocell.commands.data import main as data_main
    from geocell.data.earth import LAND_BUFFER_KM, build_recipe, built_with

    far, _, root = far_build
    assert data_main(["earth", "-o", str(root / "land"), "--n", "60", "--scenes", "0", "--far", "14", "--land", "9",
                      "--size", "32", "--seed", "3", "--workers", "1", "-q"]) == 0
    m = read_manifest(root / "land" / "manifest.csv")
    land = m.place == "land"
    assert land.sum() == 9 and np.flatnonzero(land).min() == len(far)
    assert (m.split[land] == "train").all() and (land_fraction(m.lat[land], m.lng[land]) >= 0.5).all()
    # the photo and far rows are those of the build without land places
    np.testing.assert_array_equal(m.lat[~land], far.lat)
    np.testing.assert_array_equal(m.split[~land], far.split)
    held = m.split != "train"
    assert min_distance_km(m.lat[land], m.lng[land], m.lat[held], m.lng[held]).min() >= LAND_BUFFER_KM
    # the buffer is the far band's edge: no val/test place is nearer a band with them than without
    assert LAND_BUFFER_KM == DISTANCE_BANDS_KM[-1]
    train, old_train = m.split == "train", far.split == "train"
    places = np.stack([m.lat[held], m.lng[held]], 1)
    np.testing.assert_array_equal(image_bands(places, m.lat[train], m.lng[train]),
                                  image_bands(places, far.lat[old_train], far.lng[old_train]))
    assert built_with(root / "land") == build_recipe(60, 32, 3, "held-out", n_far=14, n_land=9) != \
        build_recipe(60, 32, 3, "held-out", n_far=14)


def test_default_land_count_and_a_negative_one(tmp_path):
    from geocell.data.earth import DEFAULT_N, DEFAULT_N_LAND, build_earth, default_land

    assert default_land(DEFAULT_N) == DEFAULT_N_LAND == 5000 and default_land(72) == 20
    with pytest.raises(ValueError, match="n_land must be >= 0"):
        build_earth(tmp_path / "bad", n=10, size=16, progress=False, n_land=-1)


def test_default_far_count_and_a_negative_one(tmp_path):
    from geocell.data.earth import DEFAULT_N, DEFAULT_N_FAR, build_earth, default_far

    assert default_far(DEFAULT_N) == DEFAULT_N_FAR == 1500 and default_far(60) == 5
    with pytest.raises(ValueError, match="n_far must be >= 0"):
        build_earth(tmp_path / "bad", n=10, size=16, progress=False, n_far=-1)


def _evaluation(true, pred, holds):
    n = len(true)
    return Evaluation(names=["fine"], paths=[str(i) for i in range(n)], true_latlng=np.asarray(true, float),
                      pred_latlng={"fine": np.asarray(pred, float)}, cells=np.array(["x"] * n),
                      probability=np.ones(n), top1_correct=np.ones(n, bool),
                      region_holds={m: np.asarray(h, bool) for m, h in holds.items()})


def test_accuracy_and_coverage_by_band_by_hand():
    # one training photo at (0, 0); five images on the equator 10, 25 (to within float), 100, 150
    # and 1000 km east, predicted 5, 5, 500, 5, 5 km further east; the 90 % region held the truth
    # for the first, the third and the fifth, the 50 % region for the first only
    east = np.array([10.0, 24.9, 100.0, 150.0, 1000.0])
    off = np.array([5.0, 5.0, 500.0, 5.0, 5.0])
    true = np.column_stack([np.zeros(5), east / KM_PER_DEG])
    pred = true + np.column_stack([np.zeros(5), off / KM_PER_DEG])
    ev = _evaluation(true, pred, {0.5: [1, 0, 0, 0, 0], 0.9: [1, 0, 1, 0, 1]})
    bands = image_bands(ev.true_latlng, np.zeros(1), np.zeros(1))
    assert bands.tolist() == [0, 0, 1, 1, 2]
    report = by_band(ev, bands)
    assert list(report) == ["<= 25 km", "25-200 km", "> 200 km"]
    assert [b["n"] for b in report.values()] == [2, 2, 1]
    assert [b["rows"]["fine"]["acc_25km"] for b in report.values()] == [1.0, 0.5, 1.0]
    assert [b["rows"]["fine"]["acc_200km"] for b in report.values()] == [1.0, 0.5, 1.0]
    assert [b["coverage"][0.9] for b in report.values()] == [0.5, 0.5, 1.0]
    assert [b["coverage"][0.5] for b in report.values()] == [0.5, 0.0, 0.0]
    text = format_bands(report)
    assert "nearest training photo 25-200 km (2 images):" in text
    assert "nearest training photo > 200 km (1 image):" in text
    assert "credible regions holding the true location: 50% region 50.0%, 90% region 50.0%" in text
    assert "50% region 0.0%, 90% region 100.0%" in text
    # an empty band: counted, no table; a row the evaluation lacks is left out
    empty = by_band(ev, np.zeros(5, int), names=["hierarchy", "fine"])
    assert empty["> 200 km"]["n"] == 0 and list(empty["> 200 km"]["rows"]) == ["fine"]
    assert format_bands(empty).splitlines()[-2:] == ["nearest training photo 25-200 km (0 images):",
                                                     "nearest training photo > 200 km (0 images):"]
    with pytest.raises(ValueError, match="one per image"):
        by_band(ev, bands[:3])


def test_band_intervals_resample_each_band_alone():
    # the <= 25 km band: two images 0.1 degrees apart (one S2 level-3 block), the region held one
    true = np.array([[0.0, 0.05], [0.0, 0.15], [0.0, 20.0]])
    ev = _evaluation(true, true, {0.9: [1, 0, 1]})
    bands = np.array([0, 0, 2])
    sub = ev.subset(bands == 0)
    assert sub.paths == ["0", "1"] and sub.region_holds[0.9].tolist() == [True, False]
    assert ev.subset([2]).true_latlng.tolist() == [[0.0, 20.0]]
    text = format_band_intervals(ev, bands)
    assert text.count("95 % intervals") == 2 and "25-200 km" not in text
    first, second = text.split("nearest training photo > 200 km: ")
    assert first.startswith("nearest training photo <= 25 km: 95 % intervals, resampling the 1 S2 level-3 blocks")
    # one block: every replicate is the band itself
    assert "90% credible region holds the true location for 50.0% [50.0, 50.0]" in first
    assert "90% credible region holds the true location for 100.0% [100.0, 100.0]" in second
    section = band_section(ev, np.zeros(1), np.full(1, 0.1))
    assert section.startswith("by the distance to the nearest training photo:\nnearest training photo <= 25 km "
                              "(2 images):")
    assert "95 % intervals" in section and "95 % intervals" not in band_section(ev, np.zeros(1), np.zeros(1),
                                                                               intervals=False)
