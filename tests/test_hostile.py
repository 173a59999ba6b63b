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


# ---- arguments the compiled core cannot hold: a ValueError naming the argument ----

@pytest.mark.parametrize("call, name", [
    (lambda g: g.latlng_to_cell(0.0, 0.0, threads=2**31), "threads"),
    (lambda g: g.cell_to_latlng(np.uint64(0x1000000000000000), threads=2**40), "threads"),
    (lambda g: g.partition([0.0], [0.0], threads=2**31), "threads"),
    (lambda g: g.partition([0.0], [0.0], 1, 2**64), "tau_max"),
    (lambda g: g.partition([0.0], [0.0], 2**64, 2**65), "tau_min"),
    (lambda g: g.partitions([0.0], [0.0], [(1, 2**63)]), r"tau_max in taus\[0\]"),
])
def test_oversized_integer_arguments_name_the_argument(call, name):
    import geocell

    with pytest.raises(ValueError, match=name):
        call(geocell)


def test_largest_thread_count_the_core_holds_is_accepted():
    import geocell

    assert geocell.latlng_to_cell(0.0, 0.0, threads=2**31 - 1) == geocell.latlng_to_cell(0.0, 0.0)


# ---- the partition CLI names file lines and its own flags; cell files are checked ----

def test_partition_cli_names_the_file_line_and_the_flag(tmp_path, capsys):
    from geocell.commands.partition import main

    p = tmp_path / "points.csv"
    # line 1 header, line 2 fine, line 3 blank, line 4 fine, line 5 bad (data row 2, 0-based)
    p.write_text("lat,lng\n10,20\n\n11,21\n95,20\n12,22\n")
    assert main([str(p), "--tau", "0:5", "-o", str(tmp_path / "cells"), "-q"]) == 1
    err = capsys.readouterr().err
    assert "line 5" in err and "--drop-invalid" in err
    assert "row 2" not in err and "drop_invalid=True" not in err


@pytest.mark.parametrize("bad, why", [
    ("3,89c,1,nan,10.0", "centroid"),
    ("3,89c,1,91.5,10.0", "centroid"),
    ("3,89c,1,45.0,-180.5", "centroid"),
    ("3,89c,-4,45.0,10.0", "negative imgs_per_cell"),
])
def test_cell_file_with_impossible_values_is_refused_with_its_line(tmp_path, bad, why):
    from geocell import Partition

    p = tmp_path / "cells.csv"
    p.write_text("class_label,hex_id,imgs_per_cell,latitude_mean,longitude_mean\n"
                 "0,0f,5,1.0,2.0\n\n" + bad + "\n")
    with pytest.raises(ValueError, match=rf"cells\.csv, line 4: {why}"):
        Partition.read_csv(p)
