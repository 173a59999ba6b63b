"""Accuracy and credible-region coverage by the distance to the nearest training photo.

A place next to training photos and a place hundreds of kilometres from all of them are
different questions: retrieval finds a neighbour for the first and none for the second, and a
region fitted on the first is too small for the second. Every image falls in one band of the
great-circle distance from its true location to the nearest training photo
(:func:`geocell.data.splits.min_distance_km`, the distance the split rules use); band ``i`` holds
``(edges[i-1], edges[i]]``, so exactly 25 km is "<= 25 km" and exactly 200 km is "25-200 km".
The report gives, per band, the image count, each prediction row's accuracy
(:func:`geocell.infer.metrics.accuracy_from_errors`), the share of images whose X % credible
region held the truth (the evaluation's ``region_holds``), and block-resampled 95 % intervals
(:func:`geocell.infer.evaluate.format_intervals` on the band's images).
"""

from __future__ import annotations

import numpy as np

from geocell.data.splits import min_distance_km
from geocell.infer.metrics import accuracy_from_errors, format_table

DISTANCE_BANDS_KM = (25.0, 200.0)  # "<= 25 km", "25-200 km", "> 200 km"


def band_labels(edges=DISTANCE_BANDS_KM) -> list[str]:
    """The bands' names: "<= 25 km", "25-200 km", "> 200 km" for the default edges."""
    edges = [float(e) for e in edges]
    return ([f"<= {edges[0]:g} km"] + [f"{lo:g}-{hi:g} km" for lo, hi in zip(edges, edges[1:])]
            + [f"> {edges[-1]:g} km"])


def distance_bands(near_km, edges=DISTANCE_BANDS_KM) -> np.ndarray:
    """(N,) band index of each distance in km: band i holds (edges[i-1], edges[i]] (the first
    band starts at 0, the last has no end; inf, no training photo at all, is in the last)."""
    d = np.asarray(near_km, dtype=np.float64).reshape(-1)
    e = np.asarray(edges, dtype=np.float64)
    if e.size == 0 or np.any(np.diff(e) <= 0):
        raise ValueError(f"band edges must be increasing and at least one, got {tuple(edges)}")
    bad = np.flatnonzero(np.isnan(d) | (d < 0))
    if bad.size:
        raise ValueError(f"distance {d[bad[0]]} at index {bad[0]} is not a distance in km")
    return np.searchsorted(e, d, side="left")


def image_bands(true_latlng, train_lat, train_lng, edges=DISTANCE_BANDS_KM) -> np.ndarray:
    """(N,) band index of each true location by its distance to the nearest training photo."""
    true = np.asarray(true_latlng, dtype=np.float64).reshape(-1, 2)
    return distance_bands(min_distance_km(true[:, 0], true[:, 1], train_lat, train_lng), edges)


def by_band(ev, bands, names=None, edges=DISTANCE_BANDS_KM) -> dict[str, dict]:
    """{band label: {"n": images, "rows": {prediction row: accuracy dict}, "coverage": {mass: share
    of the band's images whose region of that mass held the truth}}}; ``ev`` an
    :class:`~geocell.infer.evaluate.Evaluation`, ``bands`` from :func:`image_bands`. ``names``:
    the rows to report (those the evaluation has; all of them when none is)."""
    bands = np.asarray(bands).reshape(-1)
    if len(bands) != len(ev.true_latlng):
        raise ValueError(f"bands: one per image needed, got {len(bands)} for {len(ev.true_latlng)} images")
    errors = ev.errors_km()
    names = [n for n in (names or errors) if n in errors] or list(errors)
    out = {}
    for b, label in enumerate(band_labels(edges)):
        inside = bands == b
        out[label] = {"n": int(inside.sum()),
                      "rows": {n: accuracy_from_errors(errors[n][inside]) for n in names},
                      "coverage": {m: float(h[inside].mean()) if inside.any() else float("nan")
                                   for m, h in ev.region_holds.items() if h.size}}
    return out


def format_bands(report: dict) -> str:
    """One block per band of :func:`by_band`: its image count, the accuracy rows, the coverage."""
    blocks = []
    for label, band in report.items():
        n = band["n"]
        blocks.append(f"nearest training photo {label} ({n} image{'' if n == 1 else 's'}):")
        if n:
            blocks.append(format_table(band["rows"]))
            if band["coverage"]:
                blocks.append("credible regions holding the true location: " + ", ".join(
                    f"{100 * m:g}% region {100 * v:.1f}%" for m, v in band["coverage"].items()))
    return "\n".join(blocks)


def format_band_intervals(ev, bands, names=None, edges=DISTANCE_BANDS_KM, *, seed: int = 0) -> str:
    """:func:`geocell.infer.evaluate.format_intervals` of each band's images (rows ``names``)."""
    from geocell.infer.evaluate import format_intervals  # evaluate's command prints this module's section

    bands = np.asarray(bands).reshape(-1)
    parts = []
    for b, label in enumerate(band_labels(edges)):
        inside = bands == b
        if inside.any():
            parts.append(f"nearest training photo {label}: "
                         + format_intervals(ev.subset(inside), rows=names, seed=seed))
    return "\n".join(parts)


def band_section(ev, train_lat, train_lng, names=None, *, intervals: bool = True, seed: int = 0) -> str:
    """The printed section of ``geocell evaluate`` and of the main job's final report: the
    bands' accuracy and coverage, then (``intervals``) their 95 % intervals."""
    bands = image_bands(ev.true_latlng, train_lat, train_lng)
    text = "by the distance to the nearest training photo:\n" + format_bands(by_band(ev, bands, names))
    return text + ("\n" + format_band_intervals(ev, bands, names, seed=seed) if intervals else "")
