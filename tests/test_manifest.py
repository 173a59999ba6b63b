"""Manifest reading (both layouts), bad-row reports with line numbers, label tables."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from geocell.loading.labels import LabelTable
from geocell.data.manifest import ManifestError, read_manifest, write_manifest


def _touch(folder, names):
    for n in names:
        (folder / n).parent.mkdir(parents=True, exist_ok=True)
        (folder / n).write_bytes(b"\xff\xd8\xff\xd9")


def test_geoestimation_layout(tmp_path):
    root = tmp_path / "images"
    _touch(root, ["a/1.jpg", "b/2.jpg", "c/3.jpg"])
    (tmp_path / "mp16_places365.csv").write_text(
        "IMG_ID,LAT,LON,S3_Label,S16_Label,S365_Label,Prob_indoor,Prob_natural,Prob_urban\n"
        "a/1.jpg,48.85,2.35,2,10,300,0.1,0.2,0.7\n"
        "b/2.jpg,-33.9,151.2,1,5,120,0.05,0.9,0.05\n"
        "c/3.jpg,40.7,-74.0,0,1,20,0.8,0.1,0.1\n")
    m = read_manifest(tmp_path / "mp16_places365.csv", image_root=root)
    assert len(m) == 3 and m.report == []
    assert m.scene_names == ["indoor", "natural", "urban"]
    assert m.scene.tolist() == [2, 1, 0]
    assert m.paths[0] == str(root / "a/1.jpg")
    np.testing.assert_allclose(m.lat, [48.85, -33.9, 40.7])
    np.testing.assert_allclose(m.lng, [2.35, 151.2, -74.0])
    assert m.scene_probs.shape == (3, 3)
    np.testing.assert_allclose(m.scene_probs[1], [0.05, 0.9, 0.05])
    assert m.split is None


def test_plain_layout_and_round_trip(tmp_path):
    _touch(tmp_path, ["x.jpg", "y.jpg", "z.jpg"])
    (tmp_path / "m.csv").write_text(
        "path,lat,lng,scene,split\nx.jpg,1.5,2.5,land,train\ny.jpg,-10,170,water,val\nz.jpg,0,0,,test\n")
    m = read_manifest(tmp_path / "m.csv")
    assert m.scene_names == ["water", "coast", "land"]
    assert m.scene.tolist() == [2, 0, -1]
    assert m.split.tolist() == ["train", "val", "test"]
    assert len(m.with_split("train")) == 1
    out = write_manifest(m, tmp_path / "copy.csv")
    assert out.read_text().splitlines()[1].startswith("x.jpg,1.5,2.5,land,train")
    m2 = read_manifest(out)
    assert m2.paths == m.paths and m2.scene.tolist() == m.scene.tolist()
    np.testing.assert_array_equal(m2.lat, m.lat)
    sub = m.subset(np.array([False, True, True]))
    assert sub.paths == m.paths[1:] and sub.scene.tolist() == [0, -1]


def test_bad_rows_are_reported_with_line_numbers(tmp_path):
    _touch(tmp_path, ["ok.jpg", "ok2.jpg"])
    (tmp_path / "m.csv").write_text(
        "path,lat,lng\n"
        "ok.jpg,10,20\n"          # line 2
        "missing.jpg,10,20\n"     # line 3
        "ok.jpg,nan,20\n"         # line 4
        "ok.jpg,95,20\n"          # line 5
        "ok.jpg,10,abc\n"         # line 6
        "ok.jpg,10,-180.5\n"      # line 7
        "ok2.jpg,-90,180\n")      # line 8
    m = read_manifest(tmp_path / "m.csv")
    assert len(m) == 2
    lines = dict(m.report)
    assert sorted(lines) == [3, 4, 5, 6, 7]
    assert "missing file" in lines[3]
    assert "nan" in lines[4].lower()
    assert "out of range" in lines[5]
    assert "unparsable" in lines[6] and "abc" in lines[6]
    assert "out of range" in lines[7]
    assert "line 3" in m.format_report()


def test_unknown_header_is_a_clear_error(tmp_path):
    (tmp_path / "m.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ManifestError, match="lat"):
        read_manifest(tmp_path / "m.csv")


class _Bands:
    """Stands in for a Partition: classes are latitude bands, -1 south of -60."""

    def __init__(self, k):
        self.k = k

    def assign(self, lat, lng):
        c = np.floor((np.asarray(lat) + 90) / 180 * self.k).clip(0, self.k - 1).astype(np.int64)
        return np.where(np.asarray(lat) < -60, -1, c)


def test_label_table_from_manifest(tmp_path):
    _touch(tmp_path, ["a.jpg", "b.jpg"])
    (tmp_path / "m.csv").write_text("path,lat,lng,scene\na.jpg,45,10,1\nb.jpg,-70,0,0\n")
    m = read_manifest(tmp_path / "m.csv")
    t = LabelTable.from_manifest(m, [_Bands(2), _Bands(8)])
    assert t.geo.dtype == np.int64 and t.geo.shape == (2, 2)
    assert t.geo.tolist() == [[1, 6], [-1, -1]]
    assert t.scene.tolist() == [1, 0]
    np.testing.assert_array_equal(t.latlng, [[45, 10], [-70, 0]])
    assert t.unlabelled_counts().tolist() == [1, 1]


def test_label_table_with_real_partitions(tmp_path):
    geocell = pytest.importorskip("geocell")
    rng = np.random.default_rng(0)
    lat, lng = rng.uniform(-60, 70, 400), rng.uniform(-180, 180, 400)
    names = [f"{i}.jpg" for i in range(len(lat))]
    _touch(tmp_path, names)
    (tmp_path / "m.csv").write_text("path,lat,lng\n" + "".join(
        f"{n},{a},{b}\n" for n, a, b in zip(names, lat, lng)))
    m = read_manifest(tmp_path / "m.csv")
    try:
        ps = geocell.partitions(m.lat, m.lng, [(5, 100), (5, 40)])
    except NotImplementedError:
        pytest.skip("partitioner not built")
    t = LabelTable.from_manifest(m, ps)
    assert t.geo.shape == (400, 2)
    for k, p in enumerate(ps):
        np.testing.assert_array_equal(t.geo[:, k], p.assign(m.lat, m.lng))
        assert t.geo[:, k].max() < len(p)


def test_relative_paths_are_written_relative_to_the_manifest(tmp_path, monkeypatch):
    # Paths relative to the working folder must still resolve once read back from the file.
    from geocell.data.manifest import Manifest

    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a.jpg")
    m = Manifest(paths=["imgs/a.jpg"], lat=np.array([1.0]), lng=np.array([2.0]),
                 scene=np.array([-1]), scene_names=[], split=None)
    out = write_manifest(m, tmp_path / "sub" / "m.csv")
    back = read_manifest(out)
    assert not back.report
    assert Path(back.paths[0]).resolve() == (tmp_path / "imgs" / "a.jpg").resolve()
