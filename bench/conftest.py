"""Collects the throughput of each benchmark and prints a side-by-side table at the end."""

from __future__ import annotations

RESULTS: list[tuple[str, int, float]] = []  # (name, points per call, points per second)


def record(benchmark, name: str, n_points: int) -> None:
    """Stores points/s of the fastest round (the least disturbed on a shared machine) in
    extra_info and for the summary table."""
    best = benchmark.stats.stats.min
    rate = n_points / best
    benchmark.extra_info["points"] = n_points
    benchmark.extra_info["points_per_s"] = rate
    benchmark.extra_info["M_points_per_s"] = rate / 1e6
    RESULTS.append((name, n_points, rate))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not RESULTS:
        return
    ref = next((r for n, _, r in RESULTS if n.startswith("s2geometry")), None)
    tr = terminalreporter
    tr.section("latlng_to_cell throughput (same run; best round)")
    tr.write_line(f"{'implementation':<40} {'points/call':>12} {'M points/s':>11} {'x s2geometry py':>16}")
    for name, n, rate in sorted(RESULTS, key=lambda r: -r[2]):
        ratio = f"{rate / ref:16.1f}" if ref else f"{'-':>16}"
        tr.write_line(f"{name:<40} {n:>12,} {rate / 1e6:>11.3f} {ratio}")
