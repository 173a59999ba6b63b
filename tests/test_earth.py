"""The built-in Earth dataset: determinism, splits, sensible scene labels, the command."""

import hashlib

import numpy as np
import pytest
from PIL import Image

from geocell.data.cli import main as data_main
from geocell.data.earth import build_earth, default_locations, land_fraction
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
    assert m.scene_names == ["water", "coast", "land"]
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


def test_scene_labels_at_known_places(tmp_path):
    places = [(0.0, -150.0),    # mid-Pacific
              (23.0, 10.0),     # central Sahara
              (-25.0, 134.0),   # central Australia
              (51.0, 1.0),      # Strait of Dover
              (-40.0, -30.0),   # South Atlantic
              (89.5, 0.0),      # North Pole, sea ice on water
              (-89.5, 0.0),     # South Pole, Antarctica
              (60.0, 179.99)]   # straddles the antimeridian
    frac = land_fraction([p[0] for p in places], [p[1] for p in places])
    assert frac[0] == 0 and frac[1] == 1 and frac[2] == 1 and 0.2 < frac[3] < 0.8
    assert frac[4] == 0 and frac[5] == 0 and frac[6] == 1
    loc = tmp_path / "places.csv"
    loc.write_text("lat,lng\n" + "".join(f"{a},{b}\n" for a, b in places))
    assert data_main(["earth", "-o", str(tmp_path / "e"), "--size", "24", "--locations", str(loc), "-q"]) == 0
    m = read_manifest(tmp_path / "e" / "manifest.csv")
    names = [m.scene_names[s] for s in m.scene]
    assert names[:7] == ["water", "land", "land", "coast", "water", "water", "land"]
    assert set(m.split.tolist()) == {"test"}
    np.testing.assert_allclose(m.lat, [p[0] for p in places])
    # Imagery matches the label: the Sahara patch is bright, the ocean patch dark blue.
    sahara = np.asarray(Image.open(m.paths[1]), dtype=float).mean(axis=(0, 1))
    ocean = np.asarray(Image.open(m.paths[0]), dtype=float).mean(axis=(0, 1))
    assert sahara.mean() > 2 * ocean.mean() and ocean[2] > ocean[0]


def test_bad_locations_file(tmp_path):
    loc = tmp_path / "bad.csv"
    loc.write_text("lat,lng\n10,20\n95,0\n")
    with pytest.raises(ValueError, match="line 3"):
        build_earth(tmp_path / "e", locations=loc, progress=False)
