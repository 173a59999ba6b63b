"""Dataset manifests: one CSV row per image with its location and optional scene label.

Two layouts are read:

- GeoEstimation metadata, as published with MP-16 / Im2GPS3k:
  ``IMG_ID,LAT,LON,S3_Label,S16_Label,S365_Label,Prob_indoor,Prob_natural,Prob_urban``
  (``IMG_ID`` relative to an image root; ``S3_Label`` 0/1/2 = indoor/natural/urban).
- plain: ``path,lat,lng[,scene][,split][,place][,scene_prob_<name>...]`` (``lon``/``longitude``,
  ``latitude`` and ``image``/``img_id`` are accepted as column names). ``place`` says where a
  row's location comes from: ``photo`` (a photo's location), ``far`` (a far place of the
  Earth dataset's val/test splits, see :mod:`geocell.data.places`) or ``land`` (a land place of
  its training split, at least 200 km from every val/test place).

A folder written by ``geocell data pack`` is a dataset too, but not a manifest file: open either
with :func:`geocell.data.dataset.read_dataset` (this module knows nothing of shards).

Rows that cannot be used (missing file, unparsable or out-of-range coordinates, unknown scene)
are left out and listed in ``Manifest.report`` as ``(line_number, reason)``; the header is
line 1, so the number is the line to look at in the file.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from geocell._internal.atomic import atomic_write

GEOESTIMATION_SCENES = ["indoor", "natural", "urban"]
# Known label sets keep their natural order when a plain manifest stores scene names.
_KNOWN_SCENE_ORDERS = (GEOESTIMATION_SCENES, ["water", "ice", "coast", "mountains", "desert", "lowland"],
                       ["water", "coast", "land"])

# The column names a manifest (and a locations or metadata CSV) may use, lower case.
PATH_COLUMNS = ("path", "image", "img_id", "file", "filename")
LAT_COLUMNS = ("lat", "latitude")
LNG_COLUMNS = ("lng", "lon", "long", "longitude")
PLACE_PHOTO, PLACE_FAR, PLACE_LAND = "photo", "far", "land"  # the values of a manifest's place column
# Integer scene ids index a name list built as range(max + 1): a bound keeps a hostile id
# (e.g. 999999999) from allocating a list of a billion names.
MAX_SCENE_ID = 100_000


class ManifestError(ValueError):
    """A manifest that cannot be read at all (missing columns, empty file)."""


@dataclass
class Manifest:
    paths: list
    lat: np.ndarray
    lng: np.ndarray
    scene: np.ndarray
    scene_names: list = field(default_factory=list)
    split: Optional[np.ndarray] = None
    scene_probs: Optional[np.ndarray] = None
    report: list = field(default_factory=list)
    source: Optional[str] = None
    # Shard-backed manifests (see geocell.data.shards): the packed folder and each row's
    # sample id in its tars.
    shards: Optional[str] = None
    ids: Optional[np.ndarray] = None
    place: Optional[np.ndarray] = None  # PLACE_PHOTO / PLACE_FAR / PLACE_LAND per row, when the file has the column

    def __post_init__(self):
        n = len(self.paths)
        self.lat = np.asarray(self.lat, dtype=np.float64)
        self.lng = np.asarray(self.lng, dtype=np.float64)
        self.scene = np.asarray(self.scene, dtype=np.int64)
        if self.split is not None:
            self.split = np.asarray(self.split, dtype=str)
        if self.place is not None:
            self.place = np.asarray(self.place, dtype=str)
        if self.scene_probs is not None:
            self.scene_probs = np.asarray(self.scene_probs, dtype=np.float64)
        for name, arr in (("lat", self.lat), ("lng", self.lng), ("scene", self.scene),
                          ("split", self.split), ("place", self.place), ("scene_probs", self.scene_probs)):
            if arr is not None and len(arr) != n:
                raise ValueError(f"Manifest.{name} has {len(arr)} rows, paths has {n}")

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, mask_or_indices) -> "Manifest":
        """Rows selected by a boolean mask or an index array (report and names are kept)."""
        sel = np.asarray(mask_or_indices)
        if sel.dtype == bool:
            if len(sel) != len(self):
                raise ValueError(f"mask has {len(sel)} entries, manifest has {len(self)} rows")
            idx = np.flatnonzero(sel)
        else:
            idx = sel.astype(np.int64).reshape(-1)
        return Manifest(
            paths=[self.paths[i] for i in idx],
            lat=self.lat[idx],
            lng=self.lng[idx],
            scene=self.scene[idx],
            scene_names=list(self.scene_names),
            split=None if self.split is None else self.split[idx],
            scene_probs=None if self.scene_probs is None else self.scene_probs[idx],
            report=list(self.report),
            source=self.source,
            shards=self.shards,
            ids=None if self.ids is None else np.asarray(self.ids)[idx],
            place=None if self.place is None else self.place[idx],
        )

    def with_split(self, name: str) -> "Manifest":
        """Rows whose split column equals ``name``."""
        if self.split is None:
            raise ValueError(f"manifest {self.source or ''} has no split column")
        return self.subset(self.split == name)

    def format_report(self, limit: int = 20) -> str:
        if not self.report:
            return f"{len(self)} rows read, none skipped"
        lines = [f"{len(self)} rows read, {len(self.report)} skipped:"]
        for line, reason in self.report[:limit]:
            lines.append(f"  line {line}: {reason}")
        if len(self.report) > limit:
            lines.append(f"  ... and {len(self.report) - limit} more")
        return "\n".join(lines)


def find_column(columns: Sequence[str], candidates: Sequence[str]) -> Optional[int]:
    """Index of the first of ``candidates`` among ``columns`` (case and spaces ignored), or None."""
    lowered = [c.strip().lower() for c in columns]
    for cand in candidates:
        if cand in lowered:
            return lowered.index(cand)
    return None


def parse_coord(text: str, what: str, limit: float):
    """A coordinate within [-limit, limit]: (value, None), or (None, reason) naming ``what``."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None, f"unparsable {what} {text!r}"
    if not math.isfinite(value):
        return None, f"{what} is {text.strip()}"
    if abs(value) > limit:
        return None, f"{what} {value} out of range [-{limit:g}, {limit:g}]"
    return value, None


def _order_scene_names(names: set, prob_names: Sequence[str]) -> list:
    if prob_names:
        return list(prob_names) + sorted(names - set(prob_names))
    for order in _KNOWN_SCENE_ORDERS:
        if names <= set(order):
            return list(order)
    return sorted(names)


def read_manifest(path, image_root=None, check_files: bool = True) -> Manifest:
    """Reads a GeoEstimation or plain manifest file; bad rows go to ``Manifest.report``.

    Relative image paths are resolved against ``image_root`` (default: the manifest's folder).
    ``check_files=False`` skips the per-row existence check. A packed folder is refused here:
    :func:`geocell.data.dataset.read_dataset` opens both.
    """
    path = Path(path)
    if path.is_dir():
        raise ManifestError(f"{path} is a folder, not a manifest file; a folder written by geocell data "
                            "pack is opened with geocell.data.dataset.read_dataset")
    root = Path(image_root) if image_root is not None else path.resolve().parent
    try:
        return _read_plain(path, root, check_files)
    except UnicodeDecodeError:
        raise ManifestError(f"{path} line {_first_non_utf8_line(path)}: not UTF-8 text") from None


def _first_non_utf8_line(path) -> int:
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return 0


def _read_plain(path: Path, root: Path, check_files: bool) -> Manifest:
    # utf-8-sig: a byte-order mark (spreadsheet exports) is not part of the first column's name
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise ManifestError(f"{path}: empty manifest (no header)") from None
        header = [h.strip() for h in header]
        lowered = [h.lower() for h in header]
        geoestimation = "img_id" in lowered and "s3_label" in lowered
        i_path = find_column(header, PATH_COLUMNS)
        i_lat = find_column(header, LAT_COLUMNS)
        i_lng = find_column(header, LNG_COLUMNS)
        missing = [n for n, i in (("path", i_path), ("lat", i_lat), ("lng", i_lng)) if i is None]
        if missing:
            raise ManifestError(
                f"{path}: no {'/'.join(missing)} column in header {header}; expected "
                "'path,lat,lng[,scene][,split]' or the GeoEstimation layout 'IMG_ID,LAT,LON,S3_Label,...'")
        if geoestimation:
            i_scene = lowered.index("s3_label")
            prob_cols = [(lowered.index(f"prob_{n}"), n) for n in GEOESTIMATION_SCENES
                         if f"prob_{n}" in lowered]
        else:
            i_scene = find_column(header, ("scene", "scene_label", "label"))
            prob_cols = [(i, h[len("scene_prob_"):]) for i, h in enumerate(header)
                         if h.lower().startswith("scene_prob_")]
        i_split = find_column(header, ("split",))
        i_place = find_column(header, ("place",))
        prob_names = [n for _, n in prob_cols]

        paths, lats, lngs, scenes_raw, splits, places, probs, lines, report = [], [], [], [], [], [], [], [], []
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                raise ManifestError(f"{path} line {reader.line_num}: {e}") from None
            line = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) < len(header):
                report.append((line, f"{len(row)} fields, header has {len(header)}"))
                continue
            lat, why = parse_coord(row[i_lat], "latitude", 90.0)
            if why is None:
                lng, why = parse_coord(row[i_lng], "longitude", 180.0)
            if why is not None:
                report.append((line, why))
                continue
            rel = row[i_path].strip()
            if not rel:
                report.append((line, "empty image path"))
                continue
            full = rel if os.path.isabs(rel) else str(root / rel)
            if check_files and not os.path.isfile(full):
                report.append((line, f"missing file {full}"))
                continue
            scene_text = row[i_scene].strip() if i_scene is not None else ""
            if scene_text and _is_int(scene_text) and int(scene_text) > MAX_SCENE_ID:
                report.append((line, f"scene id {scene_text} above the limit {MAX_SCENE_ID}"))
                continue
            prob_row = None
            if prob_cols:
                try:
                    prob_row = [float(row[i]) if row[i].strip() else math.nan for i, _ in prob_cols]
                except ValueError:
                    report.append((line, "unparsable scene probability"))
                    continue
            paths.append(full)
            lines.append(line)
            lats.append(lat)
            lngs.append(lng)
            scenes_raw.append(scene_text)
            splits.append(row[i_split].strip() if i_split is not None else "")
            places.append(row[i_place].strip() if i_place is not None else "")
            probs.append(prob_row)

    # Scene labels: integers index the name list; names are mapped through it.
    if geoestimation:
        scene_names = list(GEOESTIMATION_SCENES)
    else:
        present = {s for s in scenes_raw if s and not _is_int(s)}
        scene_names = _order_scene_names(present, prob_names) if present else list(prob_names)
        if not present:
            ints = [int(s) for s in scenes_raw if s and _is_int(s)]
            if ints and not scene_names:
                scene_names = [str(k) for k in range(max(ints) + 1)]
    name_to_id = {n: k for k, n in enumerate(scene_names)}
    keep = np.ones(len(paths), dtype=bool)
    scene = np.full(len(paths), -1, dtype=np.int64)
    for k, s in enumerate(scenes_raw):
        if not s or s == "-1":
            continue
        if _is_int(s):
            v = int(s)
            if 0 <= v < len(scene_names):
                scene[k] = v
                continue
        elif s in name_to_id:
            scene[k] = name_to_id[s]
            continue
        keep[k] = False
        report.append((lines[k], f"unknown scene label {s!r} (scenes: {scene_names})"))
    report.sort(key=lambda item: item[0])

    manifest = Manifest(
        paths=paths,
        lat=np.array(lats, dtype=np.float64),
        lng=np.array(lngs, dtype=np.float64),
        scene=scene,
        scene_names=scene_names,
        split=np.array(splits, dtype=str) if i_split is not None else None,
        place=np.array(places, dtype=str) if i_place is not None else None,
        scene_probs=np.array(probs, dtype=np.float64).reshape(len(probs), len(prob_cols)) if prob_cols else None,
        report=report,
        source=str(path),
    )
    return manifest.subset(keep) if not keep.all() else manifest


def _is_int(text: str) -> bool:
    try:
        int(text)
        return True
    except ValueError:
        return False


def write_manifest(manifest: Manifest, path, relative_to=None, relative: bool = True) -> Path:
    """Writes the plain layout ``path,lat,lng,scene[,split][,place][,scene_prob_<name>...]``.

    Image paths under the manifest's folder (or ``relative_to``) are written relative to it,
    so a dataset folder can be moved as a whole.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = Path(relative_to if relative_to is not None else path.resolve().parent).resolve()
    header = ["path", "lat", "lng", "scene"]
    if manifest.split is not None:
        header.append("split")
    if manifest.place is not None:
        header.append("place")
    prob_names = []
    if manifest.scene_probs is not None:
        prob_names = list(manifest.scene_names[: manifest.scene_probs.shape[1]])
        header += [f"scene_prob_{n}" for n in prob_names]
    with atomic_write(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for i, p in enumerate(manifest.paths):
            # A relative path in a Manifest is relative to the working folder, not to the file.
            ap = Path(os.path.abspath(p))
            try:
                shown = ap.resolve().relative_to(base).as_posix() if relative else str(ap)
            except ValueError:
                shown = str(ap)
            s = int(manifest.scene[i])
            row = [shown, repr(float(manifest.lat[i])), repr(float(manifest.lng[i])),
                   manifest.scene_names[s] if s >= 0 else ""]
            if manifest.split is not None:
                row.append(manifest.split[i])
            if manifest.place is not None:
                row.append(manifest.place[i])
            if prob_names:
                row += [repr(float(v)) for v in manifest.scene_probs[i]]
            w.writerow(row)
    return path
