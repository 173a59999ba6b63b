"""Calibration: the fit recovers a known temperature and spread, the credible regions of the
mixture hold what they say (by hand for one kernel, by simulation for many), ECE by hand, and
checkpoints carry the calibration (older ones without it still load, uncalibrated)."""

import dataclasses
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from geocell._internal.geometry import unit_vectors  # noqa: E402
from geocell.cells import EARTH_RADIUS_KM, great_circle_km  # noqa: E402
from geocell.model.records import Calibration  # noqa: E402
from geocell.infer.mixture import Mixture, combined_log_probs, fit_calibration  # noqa: E402
from geocell.infer.metrics import expected_calibration_error  # noqa: E402
from geocell.infer.conformal import band_envelope, region_groups  # noqa: E402

R = EARTH_RADIUS_KM


def _offset(lat, lng, km, bearing_deg):
    """The point ``km`` from (lat, lng) along ``bearing_deg`` (great circle)."""
    d, b = km / R, math.radians(bearing_deg)
    la, ln = math.radians(lat), math.radians(lng)
    la2 = math.asin(math.sin(la) * math.cos(d) + math.cos(la) * math.sin(d) * math.cos(b))
    ln2 = ln + math.atan2(math.sin(b) * math.sin(d) * math.cos(la), math.cos(d) - math.sin(la) * math.sin(la2))
    return math.degrees(la2), (math.degrees(ln2) + 540) % 360 - 180


def _synthetic(n, temperature, spread_km, seed=0, images_seed=0):
    """30 cells (from ``seed``); each image's class drawn from softmax(z0), its location spread
    around the class centroid by a vMF of ``spread_km``; the network's logits are z0 * temperature.
    Images come from ``images_seed``."""
    rng = np.random.default_rng(seed)
    cent = np.stack([rng.uniform(-60, 60, 30), rng.uniform(-180, 180, 30)], 1)
    rng = np.random.default_rng([seed, images_seed])
    z0 = rng.normal(size=(n, 30)) * 2.0
    p = np.exp(z0 - z0.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    cls = np.array([rng.choice(30, p=row) for row in p])
    from geocell.infer.mixture import _sample_vmf

    from geocell._internal.geometry import unit_to_latlng

    pts = _sample_vmf(unit_vectors(cent[cls, 0], cent[cls, 1]), (R / spread_km) ** 2, rng)
    truth = np.stack(unit_to_latlng(pts), 1)
    return [torch.tensor(z0 * temperature)], np.arange(30)[:, None], cent, truth


def test_fit_recovers_a_known_temperature_and_spread():
    logits, h, cent, truth = _synthetic(3000, temperature=2.5, spread_km=120.0)
    cal = fit_calibration(logits, h, cent, truth, fitted_on="synthetic")
    assert cal.weights[0] == pytest.approx(1 / 2.5, rel=0.08)   # w is an inverse temperature
    assert cal.kernel_km == pytest.approx(120.0, rel=0.08)
    assert cal.metrics["nll_after"] < cal.metrics["nll_before"]


def test_regions_hold_what_they_say_on_simulated_images():
    logits, h, cent, truth = _synthetic(2000, temperature=0.5, spread_km=300.0, seed=1)
    cal = fit_calibration(logits, h, cent, truth)
    # the same cells, images the fit has not seen
    test_logits, _, _, test_truth = _synthetic(400, temperature=0.5, spread_km=300.0, seed=1, images_seed=1)
    log_q = combined_log_probs(test_logits, h, cal).numpy()
    cu = unit_vectors(cent[:, 0], cent[:, 1])
    for mass in (0.5, 0.9):
        held = np.mean([Mixture(log_q[i], cu, cal.kernel_km, seed=i).holds(test_truth[i], mass)
                        for i in range(len(log_q))])
        assert abs(held - mass) < 0.07, (mass, held)


def test_one_kernel_region_is_the_cap_of_the_right_radius():
    # One cell: the 90 % region of a vMF is the cap where P(cos >= w0) = 0.9, i.e.
    # (1 - exp(-k (1 - w0))) / (1 - exp(-2k)) = 0.9; its area is 2 pi R^2 (1 - w0).
    kernel_km, mass = 400.0, 0.9
    k = (R / kernel_km) ** 2
    one_minus_w0 = -math.log(1 - mass * (1 - math.exp(-2 * k))) / k
    radius_km = R * math.acos(1 - one_minus_w0)
    centre = (30.0, 40.0)
    m = Mixture(np.zeros(1), unit_vectors([centre[0]], [centre[1]]), kernel_km, samples=20000, seed=3)
    assert m.region_area_km2(mass) == pytest.approx(2 * math.pi * R ** 2 * one_minus_w0, rel=0.03)
    assert m.holds(_offset(*centre, 0.95 * radius_km, 70.0), mass)
    assert not m.holds(_offset(*centre, 1.05 * radius_km, 200.0), mass)
    region = m.region(mass)
    from geocell import cell_to_latlng

    lat, lng = cell_to_latlng(region.cells)
    # every cell of the drawn region has its centre inside the cap (plus half a cell of slack)
    assert (great_circle_km(lat, lng, np.full(lat.shape, centre[0]), np.full(lat.shape, centre[1]))
            <= radius_km * 1.02).all()
    assert region.covered == pytest.approx(mass, abs=0.05)


def test_combination_by_hand():
    # fine cell r -> (coarse, fine); weights (0.5, 2): log q = 0.5 log p_c[h] + 2 log p_f, renormalised
    coarse = torch.log(torch.tensor([[0.6, 0.4]], dtype=torch.float64))
    fine = torch.log(torch.tensor([[0.1, 0.2, 0.7]], dtype=torch.float64))
    h = np.array([[0, 0], [0, 1], [1, 2]])
    got = combined_log_probs([coarse, fine], h, Calibration(weights=(0.5, 2.0), kernel_km=100.0)).exp()
    raw = np.array([0.6 ** 0.5 * 0.1 ** 2, 0.6 ** 0.5 * 0.2 ** 2, 0.4 ** 0.5 * 0.7 ** 2])
    np.testing.assert_allclose(got.numpy()[0], raw / raw.sum(), rtol=1e-12)


def test_ece_by_hand():
    conf = np.array([0.95, 0.95, 0.25, 0.25, 0.25, 0.25])
    correct = np.array([1, 0, 0, 0, 0, 1])
    # bins: [0.933, 1.0) holds two images at accuracy 0.5; [0.2, 0.267) four at accuracy 0.25
    assert expected_calibration_error(conf, correct) == pytest.approx(2 / 6 * 0.45 + 4 / 6 * 0.0)


def test_calibration_dict_round_trip_and_checks():
    cal = Calibration(weights=(0.3, 0.7, 1.1), kernel_km=250.0, fitted_on="validation split, 10 images",
                      metrics={"nll_before": 20.0, "nll_after": 15.0})
    assert Calibration.from_dict(cal.to_dict(), 3) == cal
    assert Calibration.from_dict(None, 3) == Calibration.identity(3) and not Calibration.identity(3).calibrated
    with pytest.raises(ValueError, match="3 weights for 2"):
        Calibration.from_dict(cal.to_dict(), 2)
    with pytest.raises(ValueError, match="kernel_km"):
        Calibration.from_dict(dict(cal.to_dict(), kernel_km=float("nan")), 3)
    with pytest.raises(ValueError, match="weights"):
        Calibration.from_dict(dict(cal.to_dict(), weights=[0.0, 0.0, 0.0]), 3)


def test_checkpoint_carries_the_calibration(tmp_path):
    from helpers import make_tiny_checkpoint

    from geocell.infer.predict import Geolocator
    from geocell.model.checkpoint import load_checkpoint, save_checkpoint

    old = make_tiny_checkpoint(tmp_path / "old.pt")        # written without a calibration
    geo_old = Geolocator.from_checkpoint(old, device="cpu")
    assert not geo_old.calibration.calibrated
    ckpt = load_checkpoint(old)
    n = len(ckpt["num_classes"])
    cal = Calibration(weights=(0.5,) * n, kernel_km=800.0, fitted_on="test")
    fields = {k: v for k, v in ckpt.items() if k not in ("format", "format_version", "geocell_version", "sha256")}
    save_checkpoint(tmp_path / "new.pt", **fields, calibration=cal.to_dict())
    geo = Geolocator.from_checkpoint(tmp_path / "new.pt", device="cpu")
    assert geo.calibration == cal
    image = np.full((40, 48, 3), 120, np.uint8)
    pred = geo.predict(image, mass=0.9)
    # a calibrated region is drawn with S2 cells of one level; its area is the mixture's
    levels = {len(t) for t in pred.region_cells}
    assert pred.region_cells and len(levels) <= 2 and pred.region_area_km2 > 0
    assert 0.8 <= pred.region_covered <= 1.0


def test_a_head_weighted_zero_ignores_its_underflowed_probabilities():
    import torch

    from geocell.infer.metrics import hierarchical_log_probs

    coarse = torch.tensor([[0.0, float("-inf")]], dtype=torch.float64)  # p = 1, 0 (underflowed)
    fine = torch.log(torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64))
    hierarchy = [[0, 0], [1, 1], [1, 2]]
    out = hierarchical_log_probs([coarse, fine], hierarchy, weights=[0.0, 1.0])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, fine)


def test_conformal_region_mass_by_hand():
    cal = Calibration(weights=(1.0,), kernel_km=100.0, region_scores=tuple(np.arange(1, 11) / 10))
    # n = 10: the ceil(11 * m)-th smallest score
    assert cal.region_mass(0.5) == pytest.approx(0.6)    # ceil(5.5) = 6
    assert cal.region_mass(0.9) == pytest.approx(1.0)    # ceil(9.9) = 10
    assert cal.region_mass(0.95) == 1.0                  # ceil(10.45) = 11 > n: everything
    assert Calibration(weights=(1.0,), kernel_km=100.0).region_mass(0.9) == 0.9  # none fitted
    assert Calibration.from_dict(cal.to_dict(), 1) == cal
    with pytest.raises(ValueError, match="region_scores"):
        Calibration.from_dict(dict(cal.to_dict(), region_scores=[0.5, 0.2]), 1)


def test_conformal_groups_by_hand():
    """Each image's region comes from the scores of its similarity group (an edge belongs to the
    group above it); without a similarity, or in an older fit without groups, from all scores."""
    low, high = tuple(np.arange(1, 11) / 10), tuple(np.arange(1, 11) / 100)
    cal = Calibration(weights=(1.0,), kernel_km=100.0, region_scores=tuple(sorted(low + high)),
                      region_edges=(0.5,), region_group_scores=(low, high))
    assert cal.region_mass(0.5, 0.2) == pytest.approx(0.6)    # group 0, ceil(11 * 0.5) = 6th
    assert cal.region_mass(0.5, 0.5) == pytest.approx(0.06)   # the edge: group 1
    assert cal.region_mass(0.5, 0.99) == pytest.approx(0.06)
    assert cal.region_mass(0.5) == pytest.approx(sorted(low + high)[10])  # all 20: ceil(10.5) = 11th
    assert Calibration.from_dict(cal.to_dict(), 1) == cal
    old = {k: v for k, v in cal.to_dict().items() if k not in ("region_edges", "region_group_scores")}
    assert Calibration.from_dict(old, 1).region_mass(0.5, 0.2) == cal.region_mass(0.5)
    with pytest.raises(ValueError, match="edges"):
        Calibration.from_dict(dict(cal.to_dict(), region_edges=[]), 1)
    with pytest.raises(ValueError, match="region_group_scores"):
        Calibration.from_dict(dict(cal.to_dict(), region_group_scores=[[0.5, 0.2], [0.1]]), 1)


def test_region_groups_split_at_the_similarity_quantiles():
    rng = np.random.default_rng(0)
    sims, masses = rng.uniform(0, 1, 400), rng.uniform(0, 1, 400)
    fit = region_groups(masses, sims, groups=2)
    assert fit["region_edges"] == (pytest.approx(np.median(sims)),)
    below = sims < fit["region_edges"][0]
    assert fit["region_group_scores"] == (tuple(np.sort(masses[below])), tuple(np.sort(masses[~below])))
    assert fit["region_scores"] == tuple(np.sort(masses))
    few = region_groups(masses[:150], sims[:150], groups=2)   # under 100 images a group: one group
    assert few["region_group_scores"] == () and few["region_edges"] == ()
    assert region_groups(masses, None)["region_group_scores"] == ()


def test_conformal_groups_hold_when_the_test_set_is_farther_than_validation():
    """Images near training photos (similar, small truth masses) and far ones (truth masses
    spread over [0, 1]); validation is half and half, the test set 10 % near. Fitted over all
    validation images, the 90 % region holds for 0.1 + 0.9 * 0.8 = 82 % of the test set; fitted
    per similarity group, for about 90 %."""
    rng = np.random.default_rng(1)

    def images(n_near, n_far):
        sims = np.concatenate([rng.uniform(0.9, 1.0, n_near), rng.uniform(0.5, 0.9, n_far)])
        return sims, np.concatenate([rng.uniform(0, 0.6, n_near), rng.uniform(0, 1, n_far)])

    val_sims, val_masses = images(2000, 2000)
    test_sims, test_masses = images(400, 3600)
    grouped = Calibration(weights=(1.0,), kernel_km=100.0, **region_groups(val_masses, val_sims))
    pooled = dataclasses.replace(grouped, region_edges=(), region_group_scores=())
    for cal, expected, tolerance in ((pooled, 0.82, 0.02), (grouped, 0.90, 0.02)):
        held = np.mean([m <= cal.region_mass(0.9, s) for s, m in zip(test_sims, test_masses)])
        assert abs(held - expected) <= tolerance, (cal.region_edges, held)


def test_band_envelope_by_hand():
    """Ten near images (truth masses 0.01 ... 0.10) and ten far ones (0.1 ... 1.0); n = 20. The
    80 % region is the ceil(21 * 0.8) = 17th score: pooled 0.7, which holds 7 of the 10 far
    images; the envelope's 17th is the far band's own ceil(11 * 17 / 21) = 9th, 0.9."""
    near, far = np.arange(1, 11) / 100, np.arange(1, 11) / 10
    masses, bands = np.concatenate([near, far]), np.array([0] * 10 + [2] * 10)
    pooled = Calibration(weights=(1.0,), kernel_km=100.0, region_scores=tuple(np.sort(masses)))
    envelope = band_envelope(masses, bands, min_images=10)
    fitted = dataclasses.replace(pooled, region_scores=tuple(envelope))
    assert pooled.region_mass(0.8) == pytest.approx(0.7) and fitted.region_mass(0.8) == pytest.approx(0.9)
    assert np.all(np.diff(envelope) >= 0) and np.all(envelope >= np.sort(masses))
    assert fitted.region_mass(0.95) == 1.0       # the far band's ceil(11 * 20 / 21) = 11th: none, everything
    assert np.array_equal(band_envelope(masses, bands, min_images=11), np.sort(masses))  # bands too small: pooled
    assert np.array_equal(band_envelope(masses, None), np.sort(masses))


def test_band_envelope_holds_in_each_band_when_the_groups_mix_them():
    """Near and far images with the same similarities (no statistic tells them apart), far ones
    with larger truth masses; validation 70 % near, the test set 20 % near. Grouped by similarity
    alone the 90 % region is the mix's quantile, 0.67 (0.7 m / 0.5 + 0.3 m = 0.9), which holds
    for 67 % of the far test images; with the bands' envelope it holds for about 90 % of each."""
    rng = np.random.default_rng(2)

    def images(n_near, n_far):
        sims = rng.uniform(0.5, 1.0, n_near + n_far)
        masses = np.concatenate([rng.uniform(0, 0.5, n_near), rng.uniform(0, 1, n_far)])
        return sims, masses, np.array([0] * n_near + [2] * n_far)

    val, test = images(2800, 1200), images(800, 3200)
    grouped = Calibration(weights=(1.0,), kernel_km=100.0, **region_groups(val[1], val[0]))
    banded = Calibration(weights=(1.0,), kernel_km=100.0, **region_groups(val[1], val[0], bands=val[2]))
    for cal, far_range in ((grouped, (0.0, 0.85)), (banded, (0.88, 0.93))):
        held = np.array([m <= cal.region_mass(0.9, s) for s, m in zip(test[0], test[1])])
        assert far_range[0] <= held[test[2] == 2].mean() <= far_range[1], held[test[2] == 2].mean()
        assert held[test[2] == 0].mean() >= 0.88


def test_conformal_regions_repair_an_overconfident_mixture():
    """A kernel of 300 km for locations spread by 400 km: its 90 % regions hold about 77 % of
    the images; the masses fitted on 1,000 images (Mixture.mass_at) bring 1,000 new images'
    coverage back to about 90 % (and the 50 % region's to about 50 %)."""
    logits, h, cent, truth = _synthetic(2000, temperature=1.0, spread_km=400.0, seed=3)
    narrow = Calibration(weights=(1.0,), kernel_km=300.0)
    log_q = combined_log_probs(logits, h, narrow).numpy()
    cu = unit_vectors(cent[:, 0], cent[:, 1])
    mixtures = [Mixture(log_q[i], cu, 300.0, seed=i, samples=2000) for i in range(2000)]
    scores = [m.mass_at(truth[i]) for i, m in enumerate(mixtures[:1000])]
    fitted = dataclasses.replace(narrow, region_scores=tuple(np.sort(scores)))
    new = range(1000, 2000)
    for mass, before_at_most in ((0.9, 0.82), (0.5, 0.45)):
        before = np.mean([mixtures[i].holds(truth[i], mass) for i in new])
        after = np.mean([mixtures[i].holds(truth[i], fitted.region_mass(mass)) for i in new])
        assert before <= before_at_most and abs(after - mass) <= 0.04, (mass, before, after)


@pytest.mark.parametrize("factor", [1.0, 2.0, 4.0])
def test_fixed_ratios_keep_the_weighted_products_top_cell(factor):
    from geocell.infer.mixture import level_ratios

    assert level_ratios(3, 2.0) == (4.0, 2.0, 1.0) and level_ratios(3, 1.0) == (1.0, 1.0, 1.0)
    rng = np.random.default_rng(4)
    cent = np.stack([rng.uniform(-60, 60, 12), rng.uniform(-180, 180, 12)], 1)
    h = np.stack([np.arange(12) // 4, np.arange(12) // 2, np.arange(12)], 1)  # 3, 6, 12 cells
    logits = [torch.tensor(rng.normal(size=(300, c)) * 3) for c in (3, 6, 12)]
    truth = cent[rng.integers(0, 12, 300)] + rng.normal(scale=2.0, size=(300, 2))
    ratios = level_ratios(3, factor)
    cal = fit_calibration(logits, h, cent, truth, ratios=ratios)
    scale = cal.weights[-1]
    assert scale > 0 and np.allclose(np.asarray(cal.weights) / scale, ratios)
    # the top cell of the product weighted by the ratios, by hand
    by_hand = sum(r * torch.log_softmax(z, 1)[:, h[:, p]] for p, (r, z) in enumerate(zip(ratios, logits)))
    assert torch.equal(combined_log_probs(logits, h, cal).argmax(dim=1), by_hand.argmax(dim=1))
    free = fit_calibration(logits, h, cent, truth)
    assert free.metrics["nll_after"] <= cal.metrics["nll_after"] + 1e-6  # more freedom, no worse fit


@pytest.mark.parametrize("ratios", [(1.0, 1.0), (0.0, 0.0, 0.0), (1.0, float("nan"), 1.0), (1.0, -1.0, 1.0)])
def test_bad_ratios_are_refused(ratios):
    rng = np.random.default_rng(5)
    cent = np.stack([rng.uniform(-60, 60, 12), rng.uniform(-180, 180, 12)], 1)
    h = np.stack([np.arange(12) // 4, np.arange(12) // 2, np.arange(12)], 1)
    logits = [torch.tensor(rng.normal(size=(20, c))) for c in (3, 6, 12)]
    with pytest.raises(ValueError, match="ratios"):
        fit_calibration(logits, h, cent, cent[rng.integers(0, 12, 20)], ratios=ratios)


def test_best_guess_by_mass_within_a_radius():
    # The top cell A holds 0.4; three cells around B hold 0.6 together. The densest candidate is
    # A's centroid; the candidate with the most mass within 750 km is the neighbour next to B,
    # the best point for "within 750 km". Neighbours with no weight are only candidates.
    from geocell.infer.hybrid import NeighbourKernels, choose_point_radius, hybrid_points

    cells = np.array([[0.0, 0.0], [40.0, 40.0], [40.5, 40.0], [40.0, 40.6]])
    log_q = np.log([0.4, 0.2, 0.2, 0.2])
    unit = unit_vectors(cells[:, 0], cells[:, 1])
    mixture = Mixture(log_q, unit, 100.0, samples=4000, seed=0)
    kernels = NeighbourKernels(weight=0.0, q=np.array([0.5, 0.5]),
                               means=unit_vectors(np.array([40.2, -30.0]), np.array([40.2, 100.0])), kernel_km=25.0)
    densest, within = hybrid_points(mixture, log_q, unit, kernels, (0.0, 750.0))
    assert densest == pytest.approx((0.0, 0.0), abs=1e-6)
    assert within == pytest.approx((40.2, 40.2), abs=1e-6)
    # the rule is chosen by mean accuracy over the five radii: here the second set of guesses
    true = np.array([[40.1, 40.1], [40.3, 40.0]])
    radius, scores = choose_point_radius({0.0: np.array([[0.0, 0.0], [0.0, 0.0]]), 750.0: true + 0.001}, true)
    assert radius == 750.0 and scores[750.0] == pytest.approx(1.0) and scores[0.0] == pytest.approx(0.0)
    assert choose_point_radius({0.0: true, 25.0: true}, true)[0] == 0.0  # a tie: the smaller radius


def _vmf_by_hand(distance_km, kernel_km):
    """The vMF density per km² at a great-circle distance, from its textbook formula."""
    kappa = (R / kernel_km) ** 2
    return kappa / (2 * math.pi * R * R * (1 - math.exp(-2 * kappa))) * math.exp(kappa * (math.cos(distance_km / R) - 1))


def test_background_density_and_mass_by_hand():
    """One cell at (0, 0) with a 100 km kernel; a background over two cells, (0, 0) with 3 photos
    and (0, 90) with 1, a 2,000 km kernel and 20 % of the mass. At (0, 90), 10,008 km from the cell,
    the density is the background's; without it, almost 0, so every draw is denser and the
    smallest region holding the point is the whole mixture."""
    from geocell.infer.mixture import Background

    far = 2 * math.pi * R / 4
    cell = unit_vectors(np.array([0.0]), np.array([0.0]))
    bg = Background(0.2, np.array([0.75, 0.25]), unit_vectors(np.array([0.0, 0.0]), np.array([0.0, 90.0])), 2000.0)
    with_bg = Mixture(np.array([0.0]), cell, 100.0, samples=4000, seed=1, background=bg)
    want = 0.8 * _vmf_by_hand(far, 100.0) + 0.2 * (0.75 * _vmf_by_hand(far, 2000.0) + 0.25 * _vmf_by_hand(0.0, 2000.0))
    got = with_bg.density_at(unit_vectors(np.array([0.0]), np.array([90.0])))[0]
    assert got == pytest.approx(want, rel=1e-9)
    assert with_bg.density_at(cell)[0] == pytest.approx(
        0.8 * _vmf_by_hand(0.0, 100.0) + 0.2 * (0.75 * _vmf_by_hand(0.0, 2000.0) + 0.25 * _vmf_by_hand(far, 2000.0)))
    without = Mixture(np.array([0.0]), cell, 100.0, samples=4000, seed=1)
    assert without.mass_at((0.0, 90.0)) == 1.0
    # with it, only the cell's draws and the background's near (0, 0) are denser: about 80 + 15 %
    assert 0.9 < with_bg.mass_at((0.0, 90.0)) < 0.99
    # draws follow the weights: about a fifth land more than 1,000 km from the cell
    lat, lng = np.degrees(np.arcsin(with_bg.draws[:, 2])), np.degrees(np.arctan2(with_bg.draws[:, 1], with_bg.draws[:, 0]))
    assert 0.15 < (great_circle_km(lat, lng, np.zeros_like(lat), np.zeros_like(lng)) > 1000).mean() < 0.22


def test_fit_background_by_hand():
    """Images whose truth the mixture put far from every guess want a background; images whose
    truth it covered well do not. The score is the mean log density, checked by hand."""
    from geocell.infer.mixture import fit_background

    centroids, counts = np.array([[0.0, 0.0], [10.0, 20.0]]), np.array([1, 3])
    truth = np.array([[0.0, 0.0], [5.0, 5.0], [10.0, 20.0], [0.0, 10.0]])
    sharp = np.full(4, 1e-3)  # 1e-3 per km²: about what a 20 km kernel gives at its centre
    w, kernel, scores = fit_background(sharp, truth, centroids, counts)
    assert (w, kernel) == (0.0, 0.0)
    missed = np.array([1e-3, 1e-3, 1e-3, 1e-40])  # the fourth truth: nowhere near the guesses
    w, kernel, scores = fit_background(missed, truth, centroids, counts)
    assert w > 0 and kernel > 0 and scores[(w, kernel)] > scores[(0.0, kernel)]
    d = [[float(great_circle_km(*map(np.atleast_1d, (t[0], t[1], c[0], c[1])))[0]) for c in centroids] for t in truth]
    by_hand = np.mean([math.log(0.9 * m + 0.1 * (0.25 * _vmf_by_hand(a, 2000.0) + 0.75 * _vmf_by_hand(b, 2000.0)))
                       for m, (a, b) in zip(missed, d)])
    assert scores[(0.1, 2000.0)] == pytest.approx(by_hand, rel=1e-9)


def test_background_round_trip_and_checks():
    cal = Calibration(weights=(1.0,), kernel_km=300.0, background_weight=0.1, background_kernel_km=4000.0)
    assert Calibration.from_dict(cal.to_dict(), 1) == cal
    older = dict(cal.to_dict())
    del older["background_weight"], older["background_kernel_km"]
    assert Calibration.from_dict(older, 1).background_weight == 0.0
    for bad in ({"background_weight": 1.0, "background_kernel_km": 4000.0},
                {"background_weight": 0.1, "background_kernel_km": 0.0},
                {"background_weight": float("nan"), "background_kernel_km": 4000.0}):
        with pytest.raises(ValueError, match="background"):
            Calibration.from_dict(dict(cal.to_dict(), **bad), 1)
