"""The built-in Earth dataset: determinism, splits, sensible scene labels, the command."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from geocell.commands.data import main as data_main
from geocell.data.earth import build_earth, default_locations
from geocell.data.terrain import SCENE_NAMES, land_fraction, scene_from_shares, scene_labels, terrain_shares
from geocell.data.manifest import read_manifest


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted((folder / "images").iterdir()):
        h.update(p.name.encode() + p.read_bytes())
    h.update((folder / "manifest.csv").read_bytes())
    return h.hexdigest()


def test_vendored_locations():
    loc = default_locations()
    assert loc.shape == (100000, 2)
    assert np.abs(loc[:, 0]).max() <= 90 and np.abs(loc[:, 1]).max() <= 180


def test_deterministic_with_splits(tmp_path):
    a = build_earth(tmp_path / "a", n=60, size=32, seed=3, progress=False)
    b = build_earth(tmp_path / "b", n=60, size=32, seed=3, progress=False)
    c = build_earth(tmp_path / "c", n=60, size=32, seed=4, progress=False)
    assert _digest(a.parent) == _digest(b.parent) != _digest(c.parent)
    m = read_manifest(a)
    assert 0 < len(m) <= 60 and m.report == []
    assert m.scene_names == SCENE_NAMES
    assert set(m.split.tolist()) <= {"test", "train", "val"} and (m.split == "train").any()
    # the held-out rules: no val/test patch centre within 5 km of a training one ("held-out"),
    # within one footprint ("remote": no held-out patch overlaps a training patch)
    from geocell.data.earth import FOOTPRINT_KM, build_recipe, built_with
    from geocell.data.splits import min_distance_km

    tr, ho = m.split == "train", m.split != "train"
    assert min_distance_km(m.lat[ho], m.lng[ho], m.lat[tr], m.lng[tr]).min() >= 5.0
    assert built_with(a.parent) == build_recipe(60, 32, 3, "held-out") != build_recipe(60, 32, 3, "remote")
    far = read_manifest(build_earth(tmp_path / "far", n=60, size=32, seed=3, progress=False, split_rule="remote"))
    tr, ho = far.split == "train", far.split != "train"
    assert ho.any() and min_distance_km(far.lat[ho], far.lng[ho], far.lat[tr], far.lng[tr]).min() >= FOOTPRINT_KM
    r = read_manifest(build_earth(tmp_path / "r", n=60, size=32, seed=3, progress=False, split_rule="random"))
    assert len(r) == 60 and (r.split == "train").sum() == 48 and (r.split == "val").sum() == 6
    with Image.open(m.paths[0]) as im:
        assert im.size == (32, 32) and im.format == "JPEG"


PLACES = [((0.0, -150.0), "water"),      # mid-Pacific
          ((23.0, 10.0), "desert"),      # central Sahara
          ((-25.0, 134.0), "desert"),    # central Australia
          ((38.0, -9.5), "coast"),       # Lisbon: a third land
          ((-40.0, -30.0), "water"),     # South Atlantic
          ((89.5, 0.0), "water"),        # North Pole, sea ice on water
          ((-89.5, 0.0), "ice"),         # South Pole, Antarctica
          ((72.0, -40.0), "ice"),        # Greenland's ice sheet
          ((46.5, 9.0), "mountains"),    # the Alps
          ((33.0, 90.0), "mountains"),   # Tibet: high before dry
          ((-5.0, -62.0), "lowland"),    # Amazon basin
          ((42.0, -93.0), "lowland")]    # Iowa


def test_scene_labels_at_known_places(tmp_path):
    lat, lng = [p[0][0] for p in PLACES], [p[0][1] for p in PLACES]
    frac = land_fraction(lat, lng)
    assert frac[0] == 0 and frac[1] == 1 and frac[2] == 1 and 0.2 < frac[3] < 0.6
    assert frac[4] == 0 and frac[5] == 0 and frac[6] == 1
    assert [SCENE_NAMES[k] for k in scene_labels(lat, lng)] == [p[1] for p in PLACES]
    # a footprint across the antimeridian (Chukotka) wraps: the same ground from either side
    shares = terrain_shares([66.0, 66.0], [179.999, -179.999])
    for values in shares.values():
        assert values[0] == pytest.approx(values[1], abs=0.02)
    assert shares["land"][0] > 0.5
    loc = tmp_path / "places.csv"
    loc.write_text("lat,lng\n" + "".join(f"{a},{b}\n" for a, b in zip(lat, lng)))
    assert data_main(["earth", "-o", str(tmp_path / "e"), "--size", "24", "--locations", str(loc), "-q"]) == 0
    m = read_manifest(tmp_path / "e" / "manifest.csv")
    assert m.scene_names == SCENE_NAMES
    assert [m.scene_names[s] for s in m.scene] == [p[1] for p in PLACES]
    assert set(m.split.tolist()) == {"test"}
    np.testing.assert_allclose(m.lat, lat)
    # Imagery matches the label: the Sahara patch is bright, the ocean patch dark blue.
    sahara = np.asarray(Image.open(m.paths[1]), dtype=float).mean(axis=(0, 1))
    ocean = np.asarray(Image.open(m.paths[0]), dtype=float).mean(axis=(0, 1))
    assert sahara.mean() > 2 * ocean.mean() and ocean[2] > ocean[0]


def test_scene_rules_in_order():
    # each rule by hand: the first that holds wins
    shares = {"land": np.array([0.05, 0.5, 0.5, 0.9, 0.9, 0.9, 0.9]),
              "ice": np.array([0.05, 0.2, 0.0, 0.0, 0.0, 0.0, 0.1]),
              "highland": np.array([0.0, 0.0, 0.3, 0.4, 0.3, 0.0, 0.0]),
              "bare": np.array([0.0, 0.0, 0.3, 0.6, 0.6, 0.2, 0.0])}
    assert [SCENE_NAMES[k] for k in scene_from_shares(shares)] == [
        "water", "ice", "coast", "mountains", "desert", "lowland", "lowland"]


def test_scene_dataset_beside_the_gps_dataset(tmp_path):
    from geocell.data.splits import min_distance_km

    plain = read_manifest(build_earth(tmp_path / "plain", n=80, size=16, seed=2, progress=False, workers=1))
    both = build_earth(tmp_path / "both", n=80, size=16, seed=2, progress=False, workers=1, n_scenes=40)
    gps, scenes = read_manifest(both), read_manifest(both.parent / "scenes.csv")
    # the GPS dataset is the same with or without the scene dataset
    np.testing.assert_array_equal(gps.lat, plain.lat)
    np.testing.assert_array_equal(gps.split, plain.split)
    assert len(scenes) == 40 and scenes.scene_names == SCENE_NAMES and (scenes.scene >= 0).all()
    assert sorted(set(scenes.split.tolist())) == ["train", "val"] and (scenes.split == "val").sum() == 4
    # at locations the geo model never uses, and never near a val/test place
    gps_places = set(zip(gps.lat.tolist(), gps.lng.tolist()))
    assert not any(p in gps_places for p in zip(scenes.lat.tolist(), scenes.lng.tolist()))
    held = gps.split != "train"
    assert min_distance_km(scenes.lat, scenes.lng, gps.lat[held], gps.lng[held]).min() >= 5.0
    assert all(Path(p).parent.name == "scene_images" and Path(p).is_file() for p in scenes.paths)
    # rebuilt without it, the folder loses the stale scene dataset
    build_earth(tmp_path / "both", n=80, size=16, seed=2, progress=False, workers=1)
    assert not (tmp_path / "both" / "scenes.csv").exists()
    # the command builds both, with the recipe the main job looks for before reusing a folder
    from geocell.data.earth import build_recipe, built_with, default_far, default_land

    assert data_main(["earth", "-o", str(tmp_path / "cli"), "--n", "40", "--scenes", "20", "--size", "16",
                      "--workers", "1", "-q"]) == 0
    assert len(read_manifest(tmp_path / "cli" / "scenes.csv")) == 20
    # by default as many far (land) places per patch as the default build's 1,500 (5,000) for 18,000
    assert built_with(tmp_path / "cli") == build_recipe(40, 16, 0, "held-out", n_scenes=20, n_far=default_far(40),
                                                        n_land=default_land(40))


def test_bad_locations_file(tmp_path):
    loc = tmp_path / "bad.csv"
    loc.write_text("lat,lng\n10,20\n95,0\n")
    with pytest.raises(ValueError, match="line 3"):
        build_earth(tmp_path / "e", locations=loc, progress=False)
