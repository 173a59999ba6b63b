"""geocell evaluate: accuracy against hand-computed distances for a stubbed model, the
GeoEstimation metadata layout, TTA, CSV/CDF outputs and unreadable images."""

from __future__ import annotations

import csv
import io
import math
import os
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from PIL import Image  # noqa: E402

from geocell.commands.evaluate import main  # noqa: E402
from geocell.infer.evaluate import accuracy_rows, evaluate_paths  # noqa: E402
from geocell.infer.metrics import BASELINE_ROW, HIERARCHY_ROW  # noqa: E402
from geocell.infer.predict import Geolocator  # noqa: E402
from helpers import PREPROCESS, make_tiny_checkpoint, tiny_partitions, write_jpegs  # noqa: E402

R_KM = 6371.0
STEP = 50  # image grey level per class


def haversine_km(lat1, lng1, lat2, lng2):
    p1, p2 = math.radians(lat1), math.radians(lat2)
    a = math.sin((p2 - p1) / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(math.radians(lng2 - lng1) / 2) ** 2
    return 2 * R_KM * math.asin(math.sqrt(a))


class GreyLevelModel(torch.nn.Module):
    """Predicts fine class round(grey / 50) with certainty; the coarse head says nothing."""

    def __init__(self, num_classes):
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("mean", torch.tensor(PREPROCESS["mean"]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(PREPROCESS["std"]).view(1, 3, 1, 1))

    def forward(self, x):
        grey = ((x * self.std + self.mean) * 255).mean(dim=(1, 2, 3))
        cls = torch.round(grey / STEP).long().clamp(0, self.num_classes[-1] - 1)
        fine = torch.nn.functional.one_hot(cls, self.num_classes[-1]).float() * 30.0
        coarse = torch.zeros(x.shape[0], self.num_classes[0])
        return [coarse, fine], None


@pytest.fixture(scope="module")
def stubbed(tmp_path_factory):
    parts, hier = tiny_partitions()
    assert len(parts[-1]) >= 5
    geo = Geolocator(GreyLevelModel([len(p) for p in parts]), parts, hier,
                     partition_names=["coarse", "fine"], preprocess=PREPROCESS, device="cpu")
    folder = tmp_path_factory.mktemp("grey")
    paths = []
    for k in range(5):
        path = folder / f"grey_{k}.jpg"
        Image.new("RGB", (48, 40), (STEP * k,) * 3).save(path, quality=95)
        paths.append(str(path))
    # True location k lies d_k km due north (or south) of the centroid of fine cell k.
    distances = np.array([0.5, 10.0, 100.0, 1000.0, 3000.0])
    centroids = np.asarray(parts[-1].centroids, dtype=np.float64)
    truth = []
    for k, d in enumerate(distances):
        lat, lng = centroids[k]
        dlat = math.degrees(d / R_KM)
        truth.append((lat + dlat if lat + dlat <= 90 else lat - dlat, lng))
    return geo, paths, np.array(truth), distances


@pytest.mark.parametrize("tta", ["none", "five"])
def test_table_matches_hand_computed_distances(stubbed, tta):
    geo, paths, truth, distances = stubbed
    ev = evaluate_paths(geo, paths, truth, tta=tta, num_workers=0, batch_size=2)
    assert ev.paths == paths and not ev.skipped
    centroids = np.asarray(geo.fine.centroids)
    np.testing.assert_allclose(ev.pred_latlng["fine"], centroids[:5])
    np.testing.assert_allclose(ev.pred_latlng[HIERARCHY_ROW], centroids[:5])
    hand = [haversine_km(*centroids[k], *truth[k]) for k in range(5)]
    np.testing.assert_allclose(hand, distances, rtol=1e-9)
    np.testing.assert_allclose(ev.errors_km()["fine"], hand, rtol=1e-9)

    rows = accuracy_rows(ev, geo.fine)
    assert list(rows) == ["coarse", "fine", HIERARCHY_ROW, BASELINE_ROW]
    expected = {"acc_1km": 0.2, "acc_25km": 0.4, "acc_200km": 0.6, "acc_750km": 0.6,
                "acc_2500km": 0.8, "median_km": 100.0, "n": 5}
    for name in ("fine", HIERARCHY_ROW):
        for key, value in expected.items():
            assert rows[name][key] == pytest.approx(value, rel=1e-9), (name, key)

    top = int(np.argmax(geo.fine.counts))
    base = sorted(haversine_km(*centroids[top], *t) for t in truth)
    assert rows[BASELINE_ROW]["median_km"] == pytest.approx(base[2], rel=1e-9)
    assert rows[BASELINE_ROW]["acc_2500km"] == pytest.approx(sum(b <= 2500 for b in base) / 5)
    assert set(ev.cells) == set(geo.tokens(1)[:5])


def run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def test_cli_on_geoestimation_metadata(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "tiny.pt")
    images = write_jpegs(tmp_path / "im2gps", 3)
    (tmp_path / "im2gps" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    names = [os.path.basename(p) for p in images] + ["broken.jpg", "missing.jpg"]
    manifest = tmp_path / "im2gps3k_places365.csv"
    with open(manifest, "w") as f:
        f.write("IMG_ID,LAT,LON,S3_Label,S16_Label,S365_Label,Prob_indoor,Prob_natural,Prob_urban\n")
        for i, name in enumerate(names):
            f.write(f"{name},{40 + i},{-74 + 10 * i},2,12,300,0.1,0.2,0.7\n")
    rc, out, err = run_cli([
        "--checkpoint", ckpt, "--manifest", str(manifest), "--image-root", str(tmp_path / "im2gps"),
        "--tta", "five", "--tta-combine", "mean", "--out", str(tmp_path / "preds.csv"),
        "--cdf", str(tmp_path / "cdf.png"), "--workers", "0"])
    assert rc == 0, err
    assert "3 images, tta five (mean)" in out
    for row in ("coarse", "fine", HIERARCHY_ROW, BASELINE_ROW, "2500 km", "median km", "country"):
        assert row in out
    assert "1 unreadable images skipped, 1 manifest rows left out" in out
    assert "95 % intervals, resampling the" in out and "hierarchy minus the best single partitioning" in out
    assert "broken.jpg" in err and "missing.jpg" in err
    with open(tmp_path / "preds.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and sum(bool(r["error"]) for r in rows) == 1
    for r in rows[:3]:
        d = haversine_km(float(r["true_lat"]), float(r["true_lng"]), float(r["pred_lat"]), float(r["pred_lng"]))
        assert float(r["error_km"]) == pytest.approx(d, abs=2e-3)
    assert os.path.getsize(tmp_path / "cdf.png") > 10_000


def test_intervals_of_an_evaluation_by_hand():
    """Six images in two places far apart (two S2 level-3 blocks of 4 and 2 images); the
    hierarchy's guesses are the fine head's, the coarse head is off by 1,000 km everywhere."""
    from geocell.infer.evaluate import Evaluation, format_intervals

    true = np.array([[48.85, 2.35]] * 4 + [[-33.9, 151.2]] * 2)
    fine = true + [0.0, 0.1]  # about 7 km east in Paris, 9 km in Sydney
    coarse = true + [9.0, 0.0]  # 1,000 km north
    ev = Evaluation(names=["coarse", "fine"], paths=[str(i) for i in range(6)], true_latlng=true,
                    pred_latlng={"coarse": coarse, "fine": fine, HIERARCHY_ROW: fine.copy()},
                    cells=np.zeros(6, dtype=np.uint64), probability=np.full(6, 0.5),
                    top1_correct=np.ones(6, dtype=bool),
                    region_holds={0.9: np.array([True] * 4 + [False] * 2)})
    text = format_intervals(ev)
    # 6 images in blocks of 4 and 2: effective number 36 / 20 = 1.8, the largest holds 67 %
    assert "resampling the 2 S2 level-3 blocks" in text and "effective number is 1.8" in text and "67%" in text
    # equal to the fine head on every image: no difference in any replicate
    assert "hierarchy minus the best single partitioning: 200 km +0.0 [+0.0, +0.0], 750 km +0.0 [+0.0, +0.0], " \
           "2500 km +0.0 [+0.0, +0.0]" in text
    # the region held Paris, not Sydney: 4/6, and a replicate of two Paris blocks gives 100 %,
    # of two Sydney blocks 0 %
    assert "90% credible region holds the true location for 66.7% [0.0, 100.0]" in text
    assert format_intervals(Evaluation(names=["fine"], paths=[], true_latlng=np.zeros((0, 2)), pred_latlng={},
                                       cells=np.zeros(0, dtype=np.uint64), probability=np.zeros(0),
                                       top1_correct=np.zeros(0, dtype=bool))) == ""


