"""The `geocell partition` command (geocell.commands.partition.main), run in-process."""

import gzip
import os

import numpy as np
import pytest

import geocell
from geocell.partition import Partition
from geocell.commands.partition import main

DATA = os.path.join(os.path.dirname(__file__), "data", "mp16_coords_100k.csv.gz")


def mp16():
    with gzip.open(DATA, "rt") as f:
        f.readline()
        a = np.loadtxt(f, delimiter=",")
    return a[:, 0], a[:, 1]


def test_mp16_gz_three_partitionings(tmp_path, capsys):
    out = tmp_path / "cells"
    rc = main([DATA, "--tau", "50:5000", "--tau", "50:2000", "--tau", "50:1000", "-o", str(out)])
    assert rc == 0
    captured = capsys.readouterr()
    for stage in ("[reading]", "[partitioning]", "[writing]"):
        assert stage in captured.err
    assert "100,000 rows" in captured.out and "cells_50_1000" in captured.out
    lat, lng = mp16()
    expect = geocell.partitions(lat, lng, [(50, 5000), (50, 2000), (50, 1000)])
    got = [Partition.read_csv(out / f"cells_50_{b}.csv") for b in (5000, 2000, 1000)]
    for p, q in zip(expect, got):
        assert q == p
    h = np.loadtxt(out / "hierarchy.csv", delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)
    assert (h == geocell.hierarchy(expect)).all()
    assert (out / "hierarchy.csv").read_text().splitlines()[0] == \
        "cells_50_5000,cells_50_2000,cells_50_1000"


def test_column_names_levels_npy_and_invalid(tmp_path, capsys):
    src = tmp_path / "points.csv"
    rows = ["id,latitude,longitude,extra"] + [f"{k},48.85,2.35,x" for k in range(30)]
    rows += ["30,,2.0,x", "31,95.0,2.0,x", "32,10.0,20.0,x"]
    src.write_text("\n".join(rows) + "\n")
    out = tmp_path / "o"
    assert main([str(src), "--tau", "5:10", "-o", str(out), "-q"]) == 1
    err = capsys.readouterr().err
    assert "points.csv, line 32" in err and "--drop-invalid" in err
    assert main([str(src), "--tau", "5:10", "-o", str(out), "-q", "--drop-invalid",
                 "--level-min", "4", "--level-max", "20", "--hierarchy-format", "npy"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "2 dropped as invalid" in captured.out
    p = Partition.read_csv(out / "cells_5_10.csv")
    assert p.counts.tolist() == [30] and p.levels.tolist() == [20]
    assert np.load(out / "hierarchy.npy").tolist() == [[0]]


def test_named_columns_and_errors(tmp_path, capsys):
    src = tmp_path / "p.csv"
    src.write_text("a,b\n1,2\n")
    assert main([str(src), "-o", str(tmp_path / "o")]) == 1
    assert "no latitude column" in capsys.readouterr().err
    assert main([str(src), "--lat-column", "a", "--lng-column", "b", "--tau", "0:5",
                 "-o", str(tmp_path / "o"), "-q"]) == 0
    assert main([str(src), "--lat-column", "zz", "-o", str(tmp_path / "o")]) == 1
    assert "no column 'zz'" in capsys.readouterr().err
    assert main([str(src), "--lat-column", "a", "--lng-column", "b", "--tau", "5:5",
                 "-o", str(tmp_path / "o")]) == 1
    assert "tau_min must be < tau_max" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.csv")]) == 1
    with pytest.raises(SystemExit):
        main([str(src), "--tau", "5-10"])
