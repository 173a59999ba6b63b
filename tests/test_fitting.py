"""The one fitting pipeline (geocell.infer.fitting): what the trainer and `index build
--fit-split` both run on held-out outputs."""

import numpy as np
import pytest
import torch

from geocell.infer import fitting
from geocell.infer.metrics import HIERARCHY_ROW, accuracy_table, select_score
from geocell.infer.mixture import combined_log_probs, fit_calibration
from geocell.model.records import Calibration


def _three_level_case(n_val=600, seed=0):
    rng = np.random.default_rng(seed)
    cent = np.array([[lat, lng] for lat in (-40.0, 0.0, 40.0) for lng in (-150.0, -60.0, 30.0, 120.0)])
    h = np.stack([np.arange(12) // 4, np.arange(12) // 2, np.arange(12)], 1)  # 3, 6, 12 cells
    t = rng.integers(0, 12, n_val)
    logits = [2.0 * np.eye(3)[h[t, 0]] + rng.normal(scale=0.5, size=(n_val, 3)),
              1.0 * np.eye(6)[h[t, 1]] + rng.normal(scale=0.5, size=(n_val, 6)),
              3.0 * np.eye(12)[t] + rng.normal(scale=0.5, size=(n_val, 12))]
    return cent, h, logits, cent[t] + rng.normal(scale=1.0, size=(n_val, 2))


class _Cells:
    """What the pipeline reads of a partitioning: centroids and photo counts."""

    def __init__(self, centroids):
        self.centroids = np.asarray(centroids, dtype=np.float64)
        self.counts = np.full(len(self.centroids), 10)

    def __len__(self):
        return len(self.centroids)


def test_calibration_weights_are_chosen_by_the_validation_hierarchy():
    # The fine head is sure of itself and, for 40 % of the images, wrong by a continent; the
    # coarse head is right but less sure. The chosen weights must give a hierarchy at least as
    # good on the validation images as the plain product and as the free likelihood fit, and
    # here let the coarse head decide the continent.
    rng = np.random.default_rng(0)
    n_val = 600
    cent = np.array([[lat, lng] for lat in (-40.0, 0.0, 40.0) for lng in (-150.0, -60.0, 30.0, 120.0)])
    h = np.stack([np.arange(12) // 4, np.arange(12) // 2, np.arange(12)], 1)  # 3, 6, 12 cells
    t = rng.integers(0, 12, n_val)
    wrong = (t + 4 * rng.integers(1, 3, n_val)) % 12  # another coarse cell
    fine_says = np.where(rng.random(n_val) < 0.4, wrong, t)
    logits = [2.0 * np.eye(3)[h[t, 0]] + rng.normal(scale=0.5, size=(n_val, 3)),
              1.0 * np.eye(6)[h[t, 1]] + rng.normal(scale=0.5, size=(n_val, 6)),
              6.0 * np.eye(12)[fine_says] + rng.normal(scale=0.5, size=(n_val, 12))]
    truth = cent[t] + rng.normal(scale=1.0, size=(n_val, 2))

    def score(cal):
        top = combined_log_probs([torch.as_tensor(z) for z in logits], h, cal).argmax(dim=1).numpy()
        return select_score({HIERARCHY_ROW: accuracy_table(cent[top], truth)})

    chosen = fitting.fit_cells(fitting.HeldOut(logits, truth), h, cent)
    free = fit_calibration(logits, h, cent, truth)
    assert score(chosen) >= max(score(Calibration.identity(3)), score(free))
    assert chosen.weights[0] > chosen.weights[-1]  # the coarse head weighs more than the fine one
    assert score(chosen) > score(Calibration.identity(3)) + 0.05


def test_the_whole_pipeline_fits_cells_background_and_regions_that_hold_on_its_images():
    cent, h, logits, truth = _three_level_case()
    coarse = _Cells([cent[h[:, 0] == c].mean(axis=0) for c in range(3)])
    parts = [coarse, _Cells(cent[::2]), _Cells(cent)]
    notes = []
    fitted = fitting.fit(fitting.HeldOut(logits, truth, name="made-up split"), parts, h, log=notes.append)
    cal = fitted.calibration
    assert cal.calibrated and cal.hybrid is None and fitted.hybrid_errors_km is None
    assert cal.fitted_on == "made-up split, 600 images"
    # the conformal scores are the images' truth masses, sorted; the 90 % region then holds
    # the truth for at least 90 % of those same images
    assert np.allclose(cal.region_scores, np.sort(fitted.truth_mass))
    assert np.mean(fitted.truth_mass <= cal.region_mass(0.9)) >= 0.9
    assert any("background" in n for n in notes)


def test_a_given_calibration_keeps_its_cells_and_background_and_refits_the_regions():
    cent, h, logits, truth = _three_level_case(seed=1)
    parts = [_Cells(cent[:3]), _Cells(cent[::2]), _Cells(cent)]
    given = Calibration(weights=(1.0, 1.0, 1.0), kernel_km=400.0, background_weight=0.05,
                        background_kernel_km=2000.0, region_scores=(0.5, 0.9))
    fitted = fitting.fit(fitting.HeldOut(logits, truth), parts, h, calibration=given)
    cal = fitted.calibration
    assert (cal.weights, cal.kernel_km, cal.background_weight, cal.background_kernel_km) == \
        (given.weights, given.kernel_km, given.background_weight, given.background_kernel_km)
    assert len(cal.region_scores) == len(truth) and cal.region_scores != given.region_scores


def test_too_few_images_give_no_calibration_and_say_why():
    cent, h, logits, truth = _three_level_case(n_val=1)
    notes = []
    assert fitting.fit(fitting.HeldOut(logits, truth), [_Cells(cent)] * 3, h, log=notes.append) is None
    assert sum("no calibration" in n and "at least two" in n for n in notes) == 2  # both weightings tried
