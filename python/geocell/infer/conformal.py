"""Split-conformal credible regions: which mixture mass to report as "X %".

The mass of the smallest highest-density region that holds a validation image's true location
is its conformal score; the region reported as X % is the one of the ceil((n + 1) X)-th smallest
score (:meth:`geocell.model.records.Calibration.region_mass`). With retrieval the validation
images are grouped by how similar their nearest training photo looks (Mondrian conformal
prediction), so that the promise holds whatever share of a test set lies near places the model
has seen.
"""

from __future__ import annotations

import numpy as np

from geocell.model.records import region_group

REGION_GROUPS = 2           # conformal groups by the top neighbour's similarity (split at validation quantiles)

MIN_GROUP_IMAGES = 100      # fewer validation images per group: one group for all


def region_groups(masses: np.ndarray, top_similarity: np.ndarray, groups: int = REGION_GROUPS) -> dict:
    """The conformal fit of validation images' truth ``masses``: all sorted (``region_scores``)
    and, with ``top_similarity`` (their most similar training photo's), per group of equal size
    cut at its quantiles (``region_edges``, ``region_group_scores``). Why groups: a test set far
    from the training photos needs larger regions than one near them; fitted over all validation
    images at once, the X % region over-covers near images and under-covers far ones, and the
    share that holds moves with the test set's mix. Fewer than MIN_GROUP_IMAGES per group: one."""
    masses = np.asarray(masses, dtype=np.float64)
    out = {"region_scores": tuple(np.sort(masses).tolist()), "region_edges": (), "region_group_scores": ()}
    if top_similarity is None or groups < 2 or len(masses) < groups * MIN_GROUP_IMAGES:
        return out
    top_similarity = np.asarray(top_similarity, dtype=np.float64)
    edges = np.quantile(top_similarity, np.arange(1, groups) / groups)
    member = region_group(edges, top_similarity)
    if np.bincount(member, minlength=groups).min() < MIN_GROUP_IMAGES:  # ties at an edge
        return out
    out["region_edges"] = tuple(float(e) for e in edges)
    out["region_group_scores"] = tuple(tuple(np.sort(masses[member == g]).tolist()) for g in range(groups))
    return out
