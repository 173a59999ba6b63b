"""geocell.data.dataset.read_dataset: one opener for a manifest file and a packed folder;
geocell.data.manifest reads manifest files only (it knows nothing of shards)."""

import numpy as np
import pytest
from PIL import Image

from geocell.data.dataset import read_dataset
from geocell.data.manifest import ManifestError, find_column, parse_coord, read_manifest
from geocell.data.shards import pack


def _photos(folder, n=5):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    rows = ["path,lat,lng,split"]
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
        rows.append(f"{i}.jpg,{10 * i - 20},{30 * i - 60},{'val' if i == 0 else 'train'}")
    (folder / "m.csv").write_text("\n".join(rows) + "\n")
    return folder / "m.csv"


def test_read_dataset_opens_a_manifest_file_as_read_manifest_does(tmp_path):
    path = _photos(tmp_path / "src")
    a, b = read_dataset(path), read_manifest(path)
    assert a.paths == b.paths and np.array_equal(a.lat, b.lat) and list(a.split) == list(b.split)
    assert a.shards is None and a.ids is None


def test_read_dataset_opens_a_packed_folder_with_its_sample_ids(tmp_path):
    src = read_manifest(_photos(tmp_path / "src"))
    pack(src, tmp_path / "packed", shard_size=2, workers=1, progress=False)
    m = read_dataset(tmp_path / "packed")
    assert m.shards == str((tmp_path / "packed").resolve())
    assert sorted(m.ids.tolist()) == list(range(len(src)))
    assert sorted(m.lat.tolist()) == sorted(src.lat.tolist())


def test_a_folder_is_refused_by_the_manifest_reader_and_a_plain_folder_by_both(tmp_path):
    src = read_manifest(_photos(tmp_path / "src"))
    pack(src, tmp_path / "packed", workers=1, progress=False)
    with pytest.raises(ManifestError, match="read_dataset"):
        read_manifest(tmp_path / "packed")
    with pytest.raises(ManifestError, match="not a packed dataset"):
        read_dataset(tmp_path / "src")


def test_column_and_coordinate_helpers_are_the_readers_rules():
    assert find_column([" Latitude ", "LON"], ("lat", "latitude")) == 0
    assert find_column(["x"], ("lat",)) is None
    assert parse_coord("45.5", "latitude", 90.0) == (45.5, None)
    value, why = parse_coord("95", "latitude", 90.0)
    assert value is None and "out of range" in why
    assert "unparsable" in parse_coord("north", "longitude", 180.0)[1]
