"""Benchmark of geocell.partitions against a plain NumPy implementation of the rule.

    pytest bench/bench_partition.py                      # pytest-benchmark tables
    python bench/bench_partition.py [--points 10000000]  # one summary: seconds, points/s,
                                                         # ratio, bytes per point

Input: the 100K real MP-16 locations (tests/data), resampled with replacement
and jittered (Gaussian, 0.005 degrees), so the density is that of real photos.
Three partitionings, tau = 50:5000, 50:2000, 50:1000, levels 2..30.
"""

from __future__ import annotations

import argparse
import gzip
import os
import subprocess
import sys
import time

import numpy as np

import geocell

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "tests", "data", "mp16_coords_100k.csv.gz")
TAUS = [(50, 5000), (50, 2000), (50, 1000)]
N_LARGE = 10_000_000
N_NUMPY = 1_000_000  # the NumPy version is timed on fewer points; rates are per point


def make_points(n: int, seed: int = 0):
    with gzip.open(DATA, "rt") as f:
        f.readline()
        base = np.loadtxt(f, delimiter=",")
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, base.shape[0], n)
    lat = np.clip(base[pick, 0] + rng.normal(0, 0.005, n), -90, 90)
    lng = base[pick, 1] + rng.normal(0, 0.005, n)
    lng = np.where(lng > 180, lng - 360, np.where(lng < -180, lng + 360, lng))
    return lat, lng


# ---- the plain NumPy implementation (unique/sort based) ----

def _parent(leaves: np.ndarray, level: int) -> np.ndarray:
    lsb = np.uint64(1) << np.uint64(2 * (30 - level))
    return (leaves & ~(lsb - np.uint64(1)) & ~lsb) | lsb


def leaf_ids(lat, lng):
    """Leaf ids from geocell's S2 API when present, else from s2geometry."""
    try:
        return geocell.latlng_to_cell(lat, lng, 30)
    except NotImplementedError:
        import s2geometry as s2

        return np.fromiter((s2.S2CellId(s2.S2LatLng.FromDegrees(a, b)).id()
                            for a, b in zip(lat.tolist(), lng.tolist())),
                           dtype=np.uint64, count=lat.shape[0])


def numpy_partitions(leaves, lat, lng, taus, level_min=2, level_max=30):
    """The rule with np.unique per level (cells over tau_max split one level at
    a time; equivalent to the literal rule), centroids by bincount."""
    phi, theta = np.radians(lat), np.radians(lng)
    xyz = np.stack([np.cos(phi) * np.cos(theta), np.cos(phi) * np.sin(theta), np.sin(phi)])
    out = []
    for tau_min, tau_max in taus:
        idx = np.arange(leaves.shape[0])
        level = level_min
        cells, counts, members = [], [], []
        n_kept = 0
        while idx.size:
            cur = _parent(leaves[idx], level)
            uniq, inv, cnt = np.unique(cur, return_inverse=True, return_counts=True)
            split_cell = (cnt > tau_max) & (level < level_max)
            keep_cell = ~split_cell & (cnt > tau_min)
            cells.append(uniq[keep_cell])
            counts.append(cnt[keep_cell])
            label = np.full(uniq.shape[0], -1, np.int64)
            label[keep_cell] = n_kept + np.arange(keep_cell.sum())
            n_kept += int(keep_cell.sum())
            members.append((idx, label[inv]))
            idx = idx[split_cell[inv]]
            level += 1
        cells = np.concatenate(cells)
        order = np.argsort(cells)
        sums = np.zeros((3, n_kept))
        for pts, lab in members:
            ok = lab >= 0
            for k in range(3):
                sums[k] += np.bincount(lab[ok], xyz[k, pts[ok]], minlength=n_kept)
        cen = np.stack([np.degrees(np.arctan2(sums[2], np.hypot(sums[0], sums[1]))),
                        np.degrees(np.arctan2(sums[1], sums[0]))], axis=1)
        out.append((cells[order], np.concatenate(counts)[order], cen[order]))
    return out


# ---- peak memory, measured in a fresh process ----

_MEMORY_SCRIPT = r"""
import sys, numpy as np, geocell
sys.path.insert(0, {here!r})
from bench_partition import make_points, TAUS
lat, lng = make_points({n})
def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
import ctypes
ctypes.CDLL('libc.so.6').malloc_trim(0)  # freed heap pages would hide new allocations
open('/proc/self/clear_refs', 'w').write('5')  # reset the peak (VmHWM) to the current RSS
before = status('VmRSS:')
ps = geocell.partitions(lat, lng, TAUS)
print(status('VmHWM:') - before)
"""


def extra_bytes_per_point(n: int) -> float:
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT.format(here=HERE, n=n)],
                         check=True, capture_output=True, text=True).stdout
    return int(out.split()[-1]) / n


# ---- pytest-benchmark ----

def _points(n, cache={}):
    if n not in cache:
        cache[n] = make_points(n)
    return cache[n]


def test_geocell_partitions_10m(benchmark):
    lat, lng = _points(N_LARGE)
    ps = benchmark.pedantic(geocell.partitions, args=(lat, lng, TAUS), rounds=3, iterations=1)
    benchmark.extra_info["points_per_s"] = N_LARGE / benchmark.stats.stats.min
    benchmark.extra_info["cells"] = [len(p) for p in ps]


def test_geocell_partitions_1m(benchmark):
    lat, lng = _points(N_NUMPY)
    benchmark.pedantic(geocell.partitions, args=(lat, lng, TAUS), rounds=5, iterations=1)
    benchmark.extra_info["points_per_s"] = N_NUMPY / benchmark.stats.stats.min


def test_numpy_rule_1m(benchmark):
    lat, lng = _points(N_NUMPY)
    leaves = leaf_ids(lat, lng)
    ref = benchmark.pedantic(numpy_partitions, args=(leaves, lat, lng, TAUS), rounds=2,
                             iterations=1)
    benchmark.extra_info["points_per_s"] = N_NUMPY / benchmark.stats.stats.min
    for (cells, counts, cen), p in zip(ref, geocell.partitions(lat, lng, TAUS)):
        assert np.array_equal(cells, p.cells) and np.array_equal(counts, p.counts)
        assert np.abs(cen - p.centroids).max() < 1e-5


def test_extra_memory_per_point():
    per_point = extra_bytes_per_point(N_LARGE)
    print(f"\nextra memory: {per_point:.1f} bytes per point")
    assert per_point <= 40


# ---- one summary from the command line ----

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", type=int, default=N_LARGE)
    ap.add_argument("--numpy-points", type=int, default=N_NUMPY)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    cpu_times = {}

    def best(fn, rounds):
        # Wall-clock minimum; also the CPU seconds of all threads of that
        # process over the same call (a fair figure on a shared machine).
        times, cpus = [], []
        for _ in range(rounds):
            c, t = time.process_time(), time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - t)
            cpus.append(time.process_time() - c)
        cpu_times[fn] = min(cpus)
        return min(times), result

    lat, lng = make_points(args.points)
    run_big = lambda: geocell.partitions(lat, lng, TAUS)  # noqa: E731
    t_big, ps = best(run_big, args.rounds)
    slat, slng = lat[:args.numpy_points], lng[:args.numpy_points]
    t_small, _ = best(lambda: geocell.partitions(slat, slng, TAUS), args.rounds)
    leaves = leaf_ids(slat, slng)
    t_leaves, _ = best(lambda: leaf_ids(slat, slng), 1)
    t_np, ref = best(lambda: numpy_partitions(leaves, slat, slng, TAUS), 1)
    for (cells, counts, _), p in zip(ref, geocell.partitions(slat, slng, TAUS)):
        assert np.array_equal(cells, p.cells) and np.array_equal(counts, p.counts)
    mem = extra_bytes_per_point(args.points)
    n, m = args.points, args.numpy_points
    print(f"load average (1 min): {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"geocell.partitions, {n:,} points, 3 partitionings: {t_big:.3f} s "
          f"({n / t_big / 1e6:.1f} M points/s), {cpu_times[run_big]:.3f} CPU s over all "
          f"threads; cells {[len(p) for p in ps]}")
    print(f"geocell.partitions, {m:,} points: {t_small:.3f} s ({m / t_small / 1e6:.1f} M points/s)")
    print(f"NumPy rule, {m:,} points: {t_np:.3f} s + leaf ids {t_leaves:.3f} s "
          f"({m / (t_np + t_leaves) / 1e6:.2f} M points/s)")
    print(f"ratio at {m:,} points: {(t_np + t_leaves) / t_small:.1f}x "
          f"(rule only, without leaf ids: {t_np / t_small:.1f}x); per-point rate ratio "
          f"{(n / t_big) / (m / (t_np + t_leaves)):.1f}x")
    print(f"extra memory: {mem:.1f} bytes per point ({n:,} points)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
