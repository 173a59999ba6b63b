"""A deliberately plain implementation of the GeoEstimation partitioning rule,
used as the oracle in the tests: s2geometry for the cell ids, dicts and
Counters for the rule, one step of the rule per block of code."""

from collections import Counter

import numpy as np
import s2geometry as s2


def leaf_ids(lat, lng):
    return [s2.S2CellId(s2.S2LatLng.FromDegrees(float(a), float(b))) for a, b in zip(lat, lng)]


def parent_id(leaf, level):
    return leaf.parent(level).id()


def reference_partition(lat, lng, tau_min, tau_max, level_min=2, level_max=30):
    """Returns {cell_id: (count, mean_lat, mean_lng)} following the rule literally."""
    leaves = leaf_ids(lat, lng)
    # 1. every point starts in its parent cell at level_min
    label = {i: parent_id(leaf, level_min) for i, leaf in enumerate(leaves)}
    # 2. cells holding <= tau_min points are dropped; their points lose their label
    counts = Counter(label.values())
    label = {i: c for i, c in label.items() if counts[c] > tau_min}
    # 3. split cells holding > tau_max points, one level at a time
    level = level_min
    while True:
        counts = Counter(label.values())
        if not any(n > tau_max for n in counts.values()) or level >= level_max:
            break
        level += 1
        label = {i: (parent_id(leaves[i], level) if counts[c] > tau_max else c)
                 for i, c in label.items()}
    # 4. cells holding <= tau_min points are dropped again
    counts = Counter(label.values())
    label = {i: c for i, c in label.items() if counts[c] > tau_min}

    members = {}
    for i, c in label.items():
        members.setdefault(c, []).append(i)
    out = {}
    for c, idx in members.items():
        out[c] = (len(idx),) + spherical_mean(np.asarray(lat)[idx], np.asarray(lng)[idx])
    return out


def spherical_mean(lat, lng):
    """Mean direction of the points' unit vectors, in degrees."""
    phi, theta = np.radians(np.asarray(lat, float)), np.radians(np.asarray(lng, float))
    x = (np.cos(phi) * np.cos(theta)).sum()
    y = (np.cos(phi) * np.sin(theta)).sum()
    z = np.sin(phi).sum()
    return (float(np.degrees(np.arctan2(z, np.hypot(x, y)))),
            float(np.degrees(np.arctan2(y, x))))


def angular_distance_deg(lat1, lng1, lat2, lng2):
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dl = np.radians(np.asarray(lng2) - np.asarray(lng1))
    a = np.sin((p2 - p1) / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(a, 0, 1))))
