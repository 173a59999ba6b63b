"""geocell predict / Geolocator: results, credible regions, cell areas, JSON/CSV output,
unreadable images, and refusing unsafe or incompatible checkpoints."""

from __future__ import annotations

import csv
import json
import math
import os
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
from PIL import Image  # noqa: E402

import geocell  # noqa: E402
from geocell.model.checkpoint import CheckpointError  # noqa: E402
from geocell.infer.predict import Geolocator, combine_crops, make_transform  # noqa: E402
from geocell.infer.regions import EARTH_RADIUS_KM, cell_area_km2, credible_indices  # noqa: E402

# The shared helpers live in helpers.py; their names stay importable from here too.
from helpers import (IMAGE_SIZE, PREPROCESS, make_tiny_checkpoint, run_cli, synthetic_locations,  # noqa: E402,F401
                     tiny_partitions, write_jpegs)


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint, tiny_images):
    return tiny_checkpoint, tiny_images, Geolocator.from_checkpoint(tiny_checkpoint, device="cpu")


# ----------------------------------------------------------------------------- the API


def check_prediction(pred, geo, top_k):
    n_fine = len(geo.fine)
    assert len(pred.top_k) == min(top_k, n_fine)
    probs = [g.probability for g in pred.top_k]
    assert probs == sorted(probs, reverse=True)
    assert 0 < sum(probs) <= 1 + 1e-9
    assert pred.hierarchical_top1 == pred.top_k[0]
    assert all(g.partitioning == "fine" for g in pred.top_k)
    for name, guesses in pred.per_partitioning.items():
        ps = [g.probability for g in guesses]
        assert ps == sorted(ps, reverse=True) and sum(ps) <= 1 + 1e-9
        assert all(g.partitioning == name for g in guesses)
    assert list(pred.per_partitioning) == ["coarse", "fine"]
    for g in pred.top_k:
        assert -90 <= g.lat <= 90 and -180 <= g.lng <= 180
        assert geocell.token_to_cell(np.array([g.cell]))[0] in np.asarray(geo.fine.cells, np.uint64)
    assert pred.region_covered >= 0.9 - 1e-12
    assert pred.region_area_km2 > 0
    assert [n for n, _ in pred.scenes] and sum(p for _, p in pred.scenes) <= 1 + 1e-9


def test_predict_accepts_paths_pil_arrays_and_tensors(tiny):
    _, images, geo = tiny
    pil = Image.open(images[0]).convert("RGB")
    array = np.array(pil)
    tensor = torch.from_numpy(array).permute(2, 0, 1)          # uint8 CHW
    as_float = tensor.float() / 255.0                             # float CHW in [0, 1]
    by_path = geo.predict(images[0], top_k=3)
    check_prediction(by_path, geo, 3)
    for item in (pil, array, tensor, as_float):
        pred = geo.predict(item, top_k=3)
        assert pred.hierarchical_top1.cell == by_path.hierarchical_top1.cell
        assert pred.hierarchical_top1.probability == pytest.approx(
            by_path.hierarchical_top1.probability, rel=1e-4)
    batch = geo.predict([images[0], pil, images[1]], top_k=100)
    assert isinstance(batch, list) and len(batch) == 3
    check_prediction(batch[2], geo, 100)
    stacked = geo.predict(np.stack([array, array]), top_k=2)      # (B, H, W, 3) is a batch
    assert len(stacked) == 2


def test_credible_region_holds_the_mass_and_is_minimal(tiny):
    _, images, geo = tiny
    pred = geo.predict(images[1], top_k=3, keep_probs=True)
    p = pred.fine_probs
    assert p.sum() == pytest.approx(1.0)
    # an uncalibrated checkpoint: the region is made of fine cells
    assert not geo.calibration.calibrated
    fine = np.asarray(geo.fine.cells, np.uint64)
    region = np.searchsorted(fine, pred.region_cell_ids)
    assert np.array_equal(fine[region], pred.region_cell_ids)
    assert p[region].sum() >= 0.9 - 1e-12
    # Minimal: no fewer cells can reach 90 %, i.e. the len-1 most probable fall short.
    assert np.sort(p)[::-1][: len(region) - 1].sum() < 0.9
    tokens = geocell.cell_to_token(np.asarray(geo.fine.cells, np.uint64)[region])
    assert list(tokens) == pred.region_cells
    area = cell_area_km2(np.asarray(geo.fine.cells, np.uint64)[region]).sum()
    assert pred.region_area_km2 == pytest.approx(area, rel=1e-12)


def test_credible_indices_by_hand():
    idx, covered = credible_indices(np.array([0.05, 0.5, 0.3, 0.15]), 0.9)
    assert list(idx) == [1, 2, 3] and covered == pytest.approx(0.95)
    idx, covered = credible_indices(np.array([2.0, 6.0, 2.0]), 0.6)    # renormalised
    assert list(idx) == [1] and covered == pytest.approx(0.6)
    idx, _ = credible_indices(np.array([0.25, 0.25, 0.25, 0.25]), 1.0)
    assert len(idx) == 4
    with pytest.raises(ValueError):
        credible_indices(np.array([0.5, 0.5]), 0.0)


def test_cell_area_matches_s2geometry():
    s2 = pytest.importorskip("s2geometry")
    rng = np.random.default_rng(1)
    lat = np.degrees(np.arcsin(rng.uniform(-1, 1, 62)))
    lng = rng.uniform(-180, 180, 62)
    levels = np.arange(62) % 31
    cells = np.array([geocell.cell_to_parent(geocell.latlng_to_cell(lat[i:i + 1], lng[i:i + 1]),
                                             int(levels[i]))[0] for i in range(62)], dtype=np.uint64)
    ours = cell_area_km2(cells)
    exact = np.array([s2.S2Cell(s2.S2CellId(int(c))).ExactArea() for c in cells]) * EARTH_RADIUS_KM ** 2
    np.testing.assert_allclose(ours, exact, rtol=1e-6)
    faces = np.array([(f << 61) | (1 << 60) for f in range(6)], dtype=np.uint64)
    assert cell_area_km2(faces).sum() == pytest.approx(4 * math.pi * EARTH_RADIUS_KM ** 2, rel=1e-12)


def test_five_crop_tta_shapes(tiny):
    _, images, geo = tiny
    crops = make_transform(PREPROCESS, "five")(Image.open(images[0]).convert("RGB"))
    assert crops.shape == (5, 3, IMAGE_SIZE, IMAGE_SIZE)
    batch = torch.stack([crops, crops])
    for how in ("max", "mean"):
        probs, hier, scenes = geo.distributions(batch, tta_combine=how)
        assert [p.shape for p in probs] == [(2, len(q)) for q in geo.partitions]
        assert hier.shape == (2, len(geo.fine)) and scenes.shape == (2, 3)
        for p in probs + [hier, scenes]:
            np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-9)
    per_crop = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]])        # one image, two crops
    np.testing.assert_allclose(combine_crops(per_crop, 2, "mean"), [[0.4, 0.5, 0.1]])
    np.testing.assert_allclose(combine_crops(per_crop, 2, "max"), [[0.7 / 1.6, 0.8 / 1.6, 0.1 / 1.6]])
    pred = geo.predict(images[0], tta="five")
    assert pred.region_covered >= 0.9 - 1e-12


# ----------------------------------------------------------------------------- the command


def test_cli_json_schema(tiny):
    ckpt, images, _ = tiny
    rc, out, err = run_cli([images[0], images[1], "--checkpoint", ckpt, "--top-k", "3", "--json",
                            "--workers", "0"])
    assert rc == 0, err
    doc = json.loads(out)
    assert set(doc) == {"checkpoint", "predictions", "skipped"} and doc["skipped"] == []
    assert [p["image"] for p in doc["predictions"]] == images[:2]
    guess_keys = {"lat", "lng", "probability", "cell", "partitioning", "level"}
    for p in doc["predictions"]:
        assert set(p) == {"image", "best_guess", "retrieval", "top_k", "hierarchical_top1", "per_partitioning",
                          "credible_region", "scenes"}
        # no retrieval index beside the checkpoint: the best guess is the top cell's
        assert p["retrieval"] is None and p["best_guess"] == {
            "lat": p["hierarchical_top1"]["lat"], "lng": p["hierarchical_top1"]["lng"], "source": "cells"}
        assert len(p["top_k"]) == 3 and all(set(g) == guess_keys for g in p["top_k"])
        assert set(p["hierarchical_top1"]) == guess_keys
        assert set(p["per_partitioning"]) == {"coarse", "fine"}
        region = p["credible_region"]
        assert set(region) == {"mass", "covered", "num_cells", "area_km2", "cells"}
        assert region["mass"] == 0.9 and region["covered"] >= 0.9 - 1e-12
        assert region["num_cells"] == len(region["cells"]) >= 1
        assert isinstance(region["area_km2"], float)
        assert {s["name"] for s in p["scenes"]} <= {"indoor", "natural", "urban"}


def test_cli_folder_skips_and_counts_unreadable_images(tiny, tmp_path):
    ckpt, _, _ = tiny
    folder = tmp_path / "photos"
    good = write_jpegs(folder, 3, seed=5)
    (folder / "broken.jpg").write_bytes(b"this is not a jpeg")
    rc, out, err = run_cli([str(folder), "--checkpoint", ckpt, "--out", str(tmp_path / "p.csv"),
                            "--top-k", "2", "--workers", "0", "--batch-size", "2"])
    assert rc == 0
    assert "skipped" in err and "broken.jpg" in err
    assert "predicted 3 of 4 images; skipped 1 unreadable" in err
    with open(tmp_path / "p.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["image"] for r in rows) == sorted(good + [str(folder / "broken.jpg")])
    bad = [r for r in rows if r["error"]]
    assert len(bad) == 1 and bad[0]["image"].endswith("broken.jpg") and bad[0]["lat"] == ""
    for r in rows:
        if not r["error"]:
            assert float(r["top1_probability"]) >= float(r["top2_probability"])
            assert float(r["region_covered"]) >= 0.9 - 1e-6
    rc, _, err = run_cli([str(folder), "--checkpoint", ckpt, "--out", str(tmp_path / "p.json"),
                          "--workers", "0"])
    doc = json.loads((tmp_path / "p.json").read_text())
    assert len(doc["predictions"]) == 3 and len(doc["skipped"]) == 1
    assert "broken.jpg" in doc["skipped"][0]["image"] and doc["skipped"][0]["error"]


def test_unreadable_path_raises_in_the_api(tiny, tmp_path):
    _, _, geo = tiny
    with pytest.raises(OSError):
        geo.predict(str(tmp_path / "nope.jpg"))


# ----------------------------------------------------------------------------- checkpoints


class _Payload:
    """Creates a marker file when unpickled: what a malicious checkpoint would run."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_malicious_checkpoint_is_refused_not_executed(tmp_path, writer):
    marker = tmp_path / "pwned"
    _Payload.marker = str(marker)
    evil = {"format": "geocell-checkpoint", "format_version": 1, "model": _Payload()}
    path = tmp_path / "evil.pt"
    if writer == "torch":
        torch.save(evil, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(evil, f)
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        Geolocator.from_checkpoint(path)
    assert not marker.exists()
    rc, _, err = run_cli(["x.jpg", "--checkpoint", str(path)])
    assert rc == 1 and "cannot load" in err and not marker.exists()


def test_incompatible_version_gives_a_clear_error(tiny, tmp_path):
    ckpt, _, _ = tiny
    data = torch.load(ckpt, weights_only=True)
    data["format_version"] = 999
    path = tmp_path / "future.pt"
    torch.save(data, path)
    with pytest.raises(CheckpointError, match="version 999"):
        Geolocator.from_checkpoint(path)
    rc, _, err = run_cli(["x.jpg", "--checkpoint", str(path)])
    assert rc == 1 and "999" in err and "future.pt" in err


def test_geolocator_is_exposed_lazily():
    assert geocell.Geolocator is Geolocator


def test_huge_logits_keep_finite_log_probabilities(tiny, monkeypatch):
    """Logits of a very confident head (|z| ~ 1e4) underflow a softmax to exact zeros; the
    log-probabilities the combination works with stay finite and keep the same top cell."""
    ckpt, images, _ = tiny
    geo = Geolocator.from_checkpoint(ckpt, device="cpu")
    forward = geo.model.forward

    def confident(x):
        geo_logits, scene_logits = forward(x)
        return [g * 1e4 for g in geo_logits], scene_logits

    monkeypatch.setattr(geo.model, "forward", confident)
    x = torch.stack([geo.transform()(Image.open(p).convert("RGB")) for p in images])
    log_probs, _ = geo.head_log_probs(x)
    assert all(torch.isfinite(lp).all() for lp in log_probs)
    assert any((torch.exp(lp) == 0).any() for lp in log_probs)  # the softmax did underflow
    with torch.no_grad():
        plain = [g.argmax(dim=1) for g in confident(x)[0]]
    assert all(torch.equal(lp.argmax(dim=1), p) for lp, p in zip(log_probs, plain))
    record = geo.predict(images[0], top_k=3)
    assert np.isfinite(record.hierarchical_top1.probability) and 0 < record.hierarchical_top1.probability <= 1
