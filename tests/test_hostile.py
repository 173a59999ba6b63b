"""Hostile inputs (issue 12): each test builds its hostile file itself."""

import numpy as np
import pytest

from geocell.data.manifest import Manifest, ManifestError, read_manifest


def test_huge_scene_id_is_reported_not_allocated(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("path,lat,lng,scene\na.jpg,1,2,0\nb.jpg,3,4,999999999\n")
    m = read_manifest(p, check_files=False)
    assert len(m) == 1 and m.scene_names == ["0"]
    assert m.report[0][0] == 3 and "999999999" in m.report[0][1]


def test_oversized_field_is_a_clear_error_naming_the_line(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("path,lat,lng\na.jpg,1,2\n" + "x" * 300_000 + ",1,2\n")
    with pytest.raises(ManifestError, match=r"m\.csv line 3: field larger"):
        read_manifest(p, check_files=False)


@pytest.mark.parametrize("bad", ["../x", "/abs/path", "a/b", ""])
def test_pack_refuses_split_names_that_are_not_plain(tmp_path, bad):
    from geocell.data.shards import pack

    m = Manifest(paths=["a.jpg", "b.jpg"], lat=[0, 1], lng=[0, 1], scene=[-1, -1],
                 split=np.array(["train", bad]), source="m.csv")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="m.csv row 2"):
        pack(m, out, workers=1, progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []
