"""The best guess falls back to the cells where retrieval is blind (issue: far places)."""

import numpy as np
import pytest

pytest.importorskip("torch")

from geocell._internal.geometry import latlng_to_unit  # noqa: E402
from geocell.infer.hybrid import NeighbourKernels, best_guess, choose_fallback  # noqa: E402
from geocell.infer.mixture import Mixture  # noqa: E402
from geocell.model.records import HybridFit  # noqa: E402


def _case(n_near=100, n_far=100, seed=0):
    """Near images (band 0): similar neighbours, the hybrid right to 1 km, the cells 300 km off.
    Far images (band 2): unlike neighbours, the hybrid 5000 km off, the cells 300 km off."""
    rng = np.random.default_rng(seed)
    true = np.column_stack([rng.uniform(-50, 50, n_near + n_far), rng.uniform(-170, 170, n_near + n_far)])
    cells = true + [2.7, 0.0]                      # ~300 km north of the truth
    hybrid = true.copy()
    hybrid[n_near:, 0] = -np.sign(true[n_near:, 0]) * 60.0  # the other hemisphere
    sims = np.concatenate([rng.uniform(0.8, 0.95, n_near), rng.uniform(0.3, 0.5, n_far)])
    bands = np.array([0] * n_near + [2] * n_far)
    return hybrid, cells, sims, true, bands


def test_the_threshold_separates_blind_retrieval_from_good_retrieval():
    hybrid, cells, sims, true, bands = _case()
    t, scores = choose_fallback(hybrid, cells, sims, true, bands)
    assert 0.5 <= t <= 0.8  # every far image falls back, every near one keeps the hybrid
    assert scores[-1.0] is None  # the hybrid alone loses to the cells within 750 km in the far band
    assert scores[t] > scores[2.0]  # and the rule beats the cells alone (the near images within 1 km)


def test_a_hybrid_that_is_never_worse_keeps_every_guess():
    hybrid, cells, sims, true, bands = _case()
    hybrid[100:] = true[100:]  # retrieval right everywhere
    t, scores = choose_fallback(hybrid, cells, sims, true, bands)
    assert t == -1.0 and scores[-1.0] == max(v for v in scores.values() if v is not None)


def test_never_worse_than_the_cells_within_750_and_2500_km_in_each_band():
    rng = np.random.default_rng(3)
    for seed in range(5):
        hybrid, cells, sims, true, bands = _case(seed=seed)
        hybrid[:100] += rng.normal(scale=8.0, size=(100, 2))  # the near band gets noisy too
        t, _ = choose_fallback(hybrid, cells, sims, true, bands)
        guess = np.where((sims < t)[:, None], cells, hybrid)
        from geocell.infer.metrics import accuracy_table

        for b in (0, 2):
            for km in ("acc_750km", "acc_2500km"):
                assert accuracy_table(guess[bands == b], true[bands == b])[km] >= \
                    accuracy_table(cells[bands == b], true[bands == b])[km]


def test_best_guess_takes_the_top_cell_below_the_threshold():
    fine = np.array([[10.0, 20.0], [-30.0, 100.0]])
    fine_unit = latlng_to_unit(fine)
    log_q = np.log([0.9, 0.1])
    kernels = NeighbourKernels(weight=0.9, q=np.array([1.0]), means=latlng_to_unit([[-30.0, 100.0]]), kernel_km=25.0)
    mixture = Mixture(log_q, fine_unit, 300.0, neighbours=kernels, samples=500)
    fit = HybridFit(kind="uniform", weight=0.9, kernel_km=25.0, fallback_similarity=0.5)
    lat, lng, source = best_guess(fit, mixture, log_q, fine_unit, kernels, top_similarity=0.4)
    assert source == "cells" and (lat, lng) == pytest.approx((10.0, 20.0))
    lat, lng, source = best_guess(fit, mixture, log_q, fine_unit, kernels, top_similarity=0.6)
    assert source == "hybrid" and (lat, lng) == pytest.approx((-30.0, 100.0))


def test_the_threshold_is_stored_checked_and_absent_in_older_fits():
    fit = HybridFit(kind="gated", fallback_similarity=0.42)
    assert HybridFit.from_dict(fit.to_dict()).fallback_similarity == 0.42
    older = {k: v for k, v in fit.to_dict().items() if k != "fallback_similarity"}
    assert HybridFit.from_dict(older).fallback_similarity == -1.0 and HybridFit.from_dict(older).trusts(-1.0)
    with pytest.raises(ValueError, match="fallback_similarity"):
        HybridFit.from_dict({**fit.to_dict(), "fallback_similarity": float("nan")})
