"""Split-conformal credible regions: which mixture mass to report as "X %".

The mass of the smallest highest-density region that holds a validation image's true location
is its conformal score; the region reported as X % is the one of the ceil((n + 1) X)-th smallest
score (:meth:`geocell.model.records.Calibration.region_mass`). With retrieval the validation
images are grouped by how similar their nearest training photo looks (Mondrian conformal
prediction), so that the promise holds whatever share of a test set lies near places the model
has seen; and within each group, where the distance bands of the validation images are known
(:func:`geocell.infer.bands.image_bands`), the region is the largest of the bands' own, so that
it holds in every band and not only on the group's mix of them.
"""

from __future__ import annotations

import numpy as np

from geocell.model.records import conformal_mass, region_group

REGION_GROUPS = 2           # conformal groups by the top neighbour's similarity (split at validation quantiles)

MIN_GROUP_IMAGES = 100      # fewer validation images per group: one group for all

MIN_BAND_IMAGES = 50        # a distance band with fewer validation images in a group has no say of its own


def band_envelope(masses: np.ndarray, bands: np.ndarray | None, min_images: int = MIN_BAND_IMAGES) -> np.ndarray:
    """The sorted scores whose k-th value is the largest, over all ``masses`` and over each band
    of ``bands`` with at least ``min_images`` images, of that band's conformal mass at level
    k / (n + 1). Read as a plain list of scores (``Calibration.region_mass``), the X % region of
    it is at least every such band's own X % region, so it holds for X of each band's images,
    not only for X of the mix: the share of far images in a group of similar top similarities
    differs between validation and a user's photos, and far images need the larger regions."""
    masses = np.asarray(masses, dtype=np.float64)
    envelope = np.sort(masses)
    if bands is None:
        return envelope
    bands = np.asarray(bands)
    levels = np.arange(1, len(masses) + 1) / (len(masses) + 1)
    for band in np.unique(bands):
        own = np.sort(masses[bands == band])
        if len(own) >= min_images:
            envelope = np.maximum(envelope, [conformal_mass(own, level) for level in levels])
    return envelope


def region_groups(masses: np.ndarray, top_similarity: np.ndarray, groups: int = REGION_GROUPS,
                  bands: np.ndarray | None = None) -> dict:
    """The conformal fit of validation images' truth ``masses``: all sorted (``region_scores``)
    and, with ``top_similarity`` (their most similar training photo's), per group of equal size
    cut at its quantiles (``region_edges``, ``region_group_scores``); with ``bands`` (each
    image's distance band) every list is the bands' envelope (:func:`band_envelope`). Why groups:
    a test set far from the training photos needs larger regions than one near them; fitted over
    all validation images at once, the X % region over-covers near images and under-covers far
    ones, and the share that holds moves with the test set's mix. Why the envelope: no statistic
    of the image tells the bands apart well enough (the groups still mix them). Fewer than
    MIN_GROUP_IMAGES per group: one."""
    masses = np.asarray(masses, dtype=np.float64)
    bands = None if bands is None else np.asarray(bands)
    out = {"region_scores": tuple(band_envelope(masses, bands).tolist()), "region_edges": (),
           "region_group_scores": ()}
    if top_similarity is None or groups < 2 or len(masses) < groups * MIN_GROUP_IMAGES:
        return out
    top_similarity = np.asarray(top_similarity, dtype=np.float64)
    edges = np.quantile(top_similarity, np.arange(1, groups) / groups)
    member = region_group(edges, top_similarity)
    if np.bincount(member, minlength=groups).min() < MIN_GROUP_IMAGES:  # ties at an edge
        return out
    out["region_edges"] = tuple(float(e) for e in edges)
    out["region_group_scores"] = tuple(
        tuple(band_envelope(masses[member == g], None if bands is None else bands[member == g]).tolist())
        for g in range(groups))
    return out
