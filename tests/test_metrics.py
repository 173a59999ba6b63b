"""Hierarchical prediction, distance metrics and the losses, against hand-computed values."""

import math

import numpy as np
import pytest
import torch

from geocell.training.losses import MultitaskLoss, haversine_km, haversine_soft_targets
from geocell.infer.evaluate import accuracy_rows, evaluate_loader
from geocell.infer.metrics import accuracy_table, format_table, hierarchical_log_probs, hierarchical_probs

KM_PER_DEG = 6371.0 * math.pi / 180  # 111.195 km per degree of a great circle


def test_hierarchy_arithmetic_by_hand():
    coarse = np.array([[0.6, 0.4]])
    middle = np.array([[0.5, 0.3, 0.2]])
    fine = np.array([[0.1, 0.2, 0.3, 0.4]])
    # fine cell -> (coarse, middle, fine); the last fine cell lies outside every middle cell.
    h = np.array([[0, 0, 0], [0, 1, 1], [1, 2, 2], [1, -1, 3]])
    expected = [0.1 * 0.5 * 0.6, 0.2 * 0.3 * 0.6, 0.3 * 0.2 * 0.4, 0.4 * 1.0 * 0.4]
    got = hierarchical_probs([coarse, middle, fine], h)
    np.testing.assert_allclose(got[0], expected)
    logs = hierarchical_log_probs([torch.tensor(np.log(p)) for p in (coarse, middle, fine)], h)
    np.testing.assert_allclose(logs.exp().numpy()[0], expected)
    assert int(np.argmax(got[0])) == 3  # 0.16 beats 0.036 (fine alone would also say 3)


def test_accuracy_table_by_hand():
    true = np.array([[0.0, 0.0]] * 4)
    pred = np.array([[0.0, 0.0], [0.0, 0.1], [0.0, 3.0], [0.0, 30.0]])  # 0, 11.1, 333.6, 3335.8 km
    row = accuracy_table(pred, true)
    assert row["acc_1km"] == 0.25 and row["acc_25km"] == 0.5 and row["acc_200km"] == 0.5
    assert row["acc_750km"] == 0.75 and row["acc_2500km"] == 0.75
    assert row["median_km"] == pytest.approx((0.1 + 3.0) / 2 * KM_PER_DEG, rel=1e-9)
    assert float(haversine_km(*map(torch.tensor, (0.0, 0.0, 90.0, 0.0)))) == pytest.approx(90 * KM_PER_DEG)
    text = format_table({"fine": row})
    assert "fine" in text and "25.0%" in text and "2500 km" in text


def test_soft_targets_by_hand():
    cents = torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 10.0]], dtype=torch.float64)
    q = haversine_soft_targets(torch.tensor([[0.0, 0.0]], dtype=torch.float64), cents, 65.0)[0]
    w = np.exp(-np.array([0.0, 1.0, 10.0]) * KM_PER_DEG / 65.0)
    np.testing.assert_allclose(q.numpy(), w / w.sum(), rtol=1e-9)


def test_loss_sums_heads_ignores_unlabelled_and_smooths():
    torch.manual_seed(0)
    logits = [torch.randn(3, 2), torch.randn(3, 3)]
    scene = torch.randn(3, 2)
    targets = {"geo": torch.tensor([[0, 1], [1, -1], [-1, -1]]), "scene": torch.tensor([1, -1, 0]),
               "latlng": torch.zeros(3, 2, dtype=torch.float64)}
    loss, parts = MultitaskLoss(scene_weight=0.5)(logits, scene, targets)
    ce = torch.nn.functional.cross_entropy
    expected = (ce(logits[0][:2], torch.tensor([0, 1])) + ce(logits[1][:1], torch.tensor([1]))
                + 0.5 * ce(scene[[0, 2]], torch.tensor([1, 0])))
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    # A batch with no label at all gives 0, not NaN.
    empty = {"geo": torch.full((3, 2), -1), "scene": torch.full((3,), -1), "latlng": torch.zeros(3, 2)}
    assert float(MultitaskLoss()(logits, scene, empty)[0]) == 0.0
    # A tiny smoothing temperature recovers one-hot targets when the true cell is the nearest centroid.
    cents = [torch.tensor([[0.0, 0.0], [0.0, 20.0]]), torch.tensor([[0.0, 0.0], [0.0, 20.0], [0.0, 40.0]])]
    t = {"geo": torch.tensor([[0, 0], [1, 1], [1, 2]]), "scene": torch.full((3,), -1),
         "latlng": torch.tensor([[0.0, 0.1], [0.0, 19.9], [0.0, 39.0]], dtype=torch.float64)}
    sharp = MultitaskLoss(cents, smoothing_tau_km=1e-3)(logits, None, t)[0]
    t_plain = MultitaskLoss()(logits, None, t)[0]
    assert float(sharp) == pytest.approx(float(t_plain), rel=1e-5)
    soft = MultitaskLoss(cents, smoothing_tau_km=5000.0)(logits, None, t)[0]
    assert float(soft) != pytest.approx(float(t_plain), rel=1e-3)


class _Part:
    """A partitioning whose cell k is the level-10 cell around centroid k."""

    def __init__(self, centroids, counts):
        import geocell

        self.centroids = np.asarray(centroids, dtype=np.float64)
        self.counts = np.asarray(counts)
        self.cells = geocell.latlng_to_cell(self.centroids[:, 0], self.centroids[:, 1], 10)

    def __len__(self):
        return len(self.cells)

    def assign(self, lat, lng):
        import geocell

        cell = geocell.latlng_to_cell(np.asarray(lat, float), np.asarray(lng, float), 10)
        return np.array([int(np.flatnonzero(self.cells == c)[0]) if c in self.cells else -1 for c in cell])


class _FixedModel(torch.nn.Module):
    """Logits depend on the image's mean value, so predictions are known in advance."""

    def forward(self, x):
        v = x.mean(dim=(1, 2, 3))
        coarse = torch.stack([v, -v], 1)
        fine = torch.stack([v, -v, 0 * v], 1)
        return [coarse, fine], None


def test_evaluate_rows():
    parts = [_Part([[0, 0], [0, 90]], [5, 5]), _Part([[0, 0], [0, 90], [0, 10]], [1, 2, 9])]
    h = np.array([[0, 0], [1, 1], [0, 2]])
    images = torch.cat([torch.ones(2, 3, 4, 4), -torch.ones(2, 3, 4, 4)])
    true = torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 90.0], [0.0, 0.0]], dtype=torch.float64)
    loader = [(images, {"latlng": true, "geo": torch.zeros(4, 2, dtype=torch.int64), "index": torch.arange(4)})]
    rows = accuracy_rows(evaluate_loader(_FixedModel(), loader, parts, h, "cpu"), parts[-1])
    assert set(rows) == {"coarse", "fine", "hierarchy", "most frequent cell"}
    assert rows["fine"]["acc_1km"] == 0.5 and rows["fine"]["acc_200km"] == 0.75
    assert rows["hierarchy"]["acc_200km"] == 0.75
    # The baseline predicts fine cell 2 (count 9) at (0, 10) for everyone.
    assert rows["most frequent cell"]["median_km"] == pytest.approx(np.median([10, 9, 80, 10]) * KM_PER_DEG)


def test_bootstrap_interval_by_hand():
    from geocell.infer.metrics import bootstrap_interval

    # one seed, two images (10 km and 1000 km off): a replicate's share within 25 km is 0, 1/2 or
    # 1 with probabilities 1/4, 1/2, 1/4, so the 95 % interval is [0, 1] around the mean 1/2
    r = bootstrap_interval([[10.0, 1000.0]], replicates=4000)
    assert r["acc_25km"] == (0.5, 0.0, 1.0) and r["acc_2500km"] == (1.0, 1.0, 1.0)
    assert r["median_km"] == (505.0, 10.0, 1000.0) and (r["seeds"], r["n"]) == (1, 2)
    # two seeds that disagree on one image: the seeds are resampled too
    assert bootstrap_interval([[10.0], [1000.0]], replicates=4000)["acc_25km"] == (0.5, 0.0, 1.0)
    # seeds that agree on identical images: no spread at all
    assert bootstrap_interval([[100.0] * 5] * 3)["acc_200km"] == (1.0, 1.0, 1.0)
    # the pairing is kept: seed 2 always 10 km better than seed 1, so the mean over both seeds of
    # any replicate is the mean of the two; 200 km holds for one of three images for both seeds
    r = bootstrap_interval([[100.0, 300.0, 900.0], [90.0, 290.0, 890.0]], replicates=500)
    assert r["acc_200km"][0] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="seeds, images"):
        bootstrap_interval([])


def test_block_bootstrap_resamples_whole_blocks_by_hand():
    from geocell.infer.metrics import bootstrap_interval, bootstrap_share

    # 100 images in two blocks of 50: the first all 10 km off, the second all 1000 km off. The
    # images alone give a tight interval around 1/2; by blocks a replicate draws two blocks, so its
    # share within 25 km is 0, 1/2 or 1 with probabilities 1/4, 1/2, 1/4: the interval is [0, 1]
    errors = [[10.0] * 50 + [1000.0] * 50]
    blocks = [7] * 50 + [3] * 50
    by_image = bootstrap_interval(errors, replicates=2000)["acc_25km"]
    assert by_image[0] == 0.5 and 0.35 < by_image[1] < 0.5 < by_image[2] < 0.65
    r = bootstrap_interval(errors, blocks=blocks, replicates=4000)
    assert r["acc_25km"] == (0.5, 0.0, 1.0) and (r["n"], r["units"]) == (100, 2)
    # blocks of unequal size: drawing the big block twice gives 100 of 100, the small one twice 0
    flags = [True] * 90 + [False] * 10
    assert bootstrap_share(flags, blocks=[0] * 90 + [1] * 10, replicates=4000) == (0.9, 0.0, 1.0)
    # one block: nothing to resample
    assert bootstrap_share(flags, blocks=[5] * 100) == (0.9, 0.9, 0.9)
    with pytest.raises(ValueError, match="one label per image"):
        bootstrap_share(flags, blocks=[1, 2])


def test_best_row_difference_by_hand():
    from geocell.infer.metrics import best_row_difference

    # a row equal to one of the others: exactly 0 in every replicate
    e = {"a": np.array([10.0, 300.0, 900.0, 3000.0]), "b": np.array([500.0, 100.0, 100.0, 100.0])}
    e["h"] = e["b"].copy()
    d = best_row_difference(e, "h", ["a", "b"], blocks=[0, 0, 1, 1], radii=(200, 2500))
    assert d == {200: (0.0, 0.0, 0.0), 2500: (0.0, 0.0, 0.0)}
    # "h" better than both at 200 km on every image: within 200 km h 4/4, a 1/4, b 3/4
    e["h"] = np.full(4, 50.0)
    d = best_row_difference(e, "h", ["a", "b"], radii=(200,), replicates=3000)
    assert d[200][0] == 0.25 and d[200][1] == 0.0 and d[200][2] > 0.25
    # the best of the others is chosen again per replicate: a difference never exceeds h's lead
    # over the worse other, and never goes below 0 here since h is within 200 km everywhere
    assert d[200][2] <= 0.75


def test_location_blocks_are_level_3_cells():
    from geocell.cells import latlng_to_cell
    from geocell.infer.metrics import location_blocks

    latlng = np.array([[48.85, 2.35], [48.9, 2.4], [-33.9, 151.2], [40.7, -74.0]])
    got = location_blocks(latlng)
    assert np.array_equal(got, latlng_to_cell(latlng[:, 0], latlng[:, 1], 3))
    assert got[0] == got[1] and len(set(got.tolist())) == 3
