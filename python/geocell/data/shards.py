"""WebDataset tar shards for large datasets, with the index files DALI's webdataset reader needs.

``pack(manifest, out_dir)`` decodes every image once, re-encodes it with the shorter side at
most ``shorter_side`` px (and the longer at most ``max_side``), and writes
``<split>-NNNNNN.tar`` shards whose samples are ``KEY.jpg`` + ``KEY.cls`` (the sample id as
text, the WebDataset convention) + ``KEY.id`` (the same id as little-endian int64, which DALI
reads without parsing) + ``KEY.json`` (id, source row, lat, lng, scene, path). The sample id is
the row of ``out_dir/manifest.csv``, the manifest of the packed samples, so labels come from
that manifest. Broken images are never packed; they are listed in ``out_dir/pack_report.csv``.

Importers whose images are not one file each (``geocell data download``, the msgpack import)
use the same writer: ``sources`` gives a row's image as a byte range of a container file,
``extra_json`` adds fields (source id, URL, metadata columns) to each sample's JSON, and
``keep_jpeg`` stores an RGB JPEG already within the size limits as it is (no second lossy
encode of an image the downloader has just encoded).

Index files follow DALI's ``wds2idx`` format v1.2: a header line ``v1.2 <samples>``, then one
line per sample of ``<ext> <data offset> <size> <member name>`` groups.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shutil
import struct
import tarfile
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from geocell._internal.atomic import DiskFull, atomic_write, disk_full_cause
from geocell._internal.progress import progress_bar
from geocell.data.images import exif_orientation, open_checked, to_rgb8, upright
from geocell.data.manifest import Manifest, read_manifest, write_manifest

INDEX_VERSION = "v1.2"
SHARDS_META = "shards.json"
EXTENSIONS = ("jpg", "cls", "id", "json")


@dataclass
class ShardInfo:
    tar: str
    index: str
    first_id: int
    count: int
    split: str


_SPLIT_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _open_source(source):
    """A binary file on an image given as a path (read lazily: a file's size is not trusted)
    or as ``(container path, offset, size)`` (the importer bounds the size)."""
    if isinstance(source, str):
        return open(source, "rb")
    container, offset, size = source
    with open(container, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise ValueError(f"{container}: {size} bytes at offset {offset} expected, {len(data)} there")
    return io.BytesIO(data)


def _encode(source, shorter_side: Optional[int], max_side: Optional[int], quality: int,
            keep_jpeg: bool = False) -> bytes:
    """Decodes once and re-encodes as RGB JPEG within the size limits; raises on bad images
    (also on images over the pixel limit, before decoding them). With ``keep_jpeg`` an RGB JPEG
    that needs no resize is checked by decoding and kept as is."""
    from PIL import Image

    with _open_source(source) as f, open_checked(f) as img:
        orientation = exif_orientation(img)  # shards hold upright pixels (no EXIF is kept)
        # orientations 5-8 turn a quarter: the size limits apply to the upright sides
        w, h = img.size if orientation < 5 else img.size[::-1]
        scale = 1.0
        if shorter_side:
            scale = min(scale, shorter_side / min(w, h))
        if max_side:
            scale = min(scale, max_side / max(w, h))
        target = (max(1, round(w * scale)), max(1, round(h * scale)))
        # Kept only when no bigger than a JPEG of these pixels can be (no trailing payload).
        size = f.seek(0, io.SEEK_END)
        if (keep_jpeg and scale >= 1.0 and img.format == "JPEG" and img.mode == "RGB"
                and orientation == 1 and size <= 2 * 3 * w * h + (1 << 16)):
            img.load()  # a truncated or corrupt JPEG fails here, as it would when re-encoded
            f.seek(0)
            return f.read()
        if scale < 1.0:
            # DCT-domain downscaling while decoding JPEGs: the decode stays the only one.
            img.draft("RGB", target if orientation < 5 else target[::-1])
        img.load()
        img = upright(to_rgb8(img), orientation)
        if img.size != target:
            img = img.resize(target, Image.BILINEAR, reducing_gap=3.0)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> int:
    """Adds a member; returns the offset of its data (ustar headers are one 512-byte block)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    header_at = tar.offset
    tar.addfile(info, io.BytesIO(data))
    return header_at + tarfile.BLOCKSIZE


def _pack_shard(task):
    (tar_path, idx_path, ids, rows, paths, lats, lngs, scenes, shorter_side, max_side,
     quality, sources, extras, keep_jpeg) = task
    skipped = []
    lines = []
    # tar_path and idx_path lie in pack's staging folder: a failure here leaves the packed folder as it was
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        next_id = ids
        for row, path, lat, lng, scene, source, extra in zip(rows, paths, lats, lngs, scenes,
                                                             sources, extras):
            try:
                jpg = _encode(path if source is None else source, shorter_side, max_side, quality,
                              keep_jpeg)
            except Exception as e:  # Pillow raises many types for broken files
                skipped.append((int(row), path, f"{type(e).__name__}: {e}"))
                continue
            key = f"{next_id:09d}"
            fields = dict(extra or {})
            fields.update({"id": next_id, "row": int(row), "lat": float(lat), "lng": float(lng),
                           "scene": int(scene), "path": path})
            meta = json.dumps(fields).encode()
            parts = []
            for ext, data in (("jpg", jpg), ("cls", str(next_id).encode()),
                              ("id", struct.pack("<q", next_id)), ("json", meta)):
                name = f"{key}.{ext}"
                parts.append(f"{ext} {_add_member(tar, name, data)} {len(data)} {name}")
            lines.append(" ".join(parts))
            next_id += 1
        tar.fileobj.flush()
        os.fsync(tar.fileobj.fileno())
    packed = len(lines)
    if packed:
        with atomic_write(idx_path, "w") as f:
            f.write(f"{INDEX_VERSION} {packed}\n")
            f.write("\n".join(lines) + "\n")
    else:
        os.remove(tar_path)
    return packed, skipped


def _refuse_own_input(manifest, out_dir: Path) -> None:
    """Packing into the folder its manifest lies in as ``manifest.csv`` would write the packed
    manifest over the source one (and its extra columns)."""
    source = getattr(manifest, "source", None)
    target = out_dir / "manifest.csv"
    if source and os.path.isfile(source) and target.exists() and os.path.samefile(source, target):
        raise ValueError(f"pack: the output folder {out_dir} holds the input manifest {source} as "
                         "manifest.csv, which packing writes: choose another output folder")


def _commit_pack(stage: Path, out_dir: Path, names: list) -> None:
    """Moves a finished pack from ``stage`` into ``out_dir``. shards.json goes first (the folder
    stops being a packed dataset) and comes back last, so an interrupted commit leaves a folder
    that refuses to load rather than one whose shards and manifest disagree. Shards of an
    earlier pack that this one does not list are removed."""
    meta = out_dir / SHARDS_META
    old = []
    if meta.is_file():
        try:
            old = [n for s in shard_meta(out_dir).get("shards", []) for n in (s["tar"], s["index"])]
        except (OSError, ValueError, KeyError, TypeError):
            old = []
        os.remove(meta)
    for name in names:
        os.replace(stage / name, out_dir / name)
    for name in set(old) - set(names):
        if os.path.basename(name) == name and name.endswith((".tar", ".idx")):
            with contextlib.suppress(OSError):
                os.remove(out_dir / name)
    os.replace(stage / SHARDS_META, meta)


def pack(manifest, out_dir, *, shard_size: int = 5000, shorter_side: Optional[int] = 320,
         max_side: Optional[int] = None, quality: int = 90, workers: int = 2,
         progress: bool = True, sources: Optional[list] = None,
         extra_json: Optional[list] = None, keep_jpeg: bool = False) -> dict:
    """Packs ``manifest`` into shards under ``out_dir``; returns the summary written to
    ``out_dir/shards.json`` (also: ``skipped`` list of (row, path, reason)).

    ``sources[i]``: where row i's image is when it is not the file ``manifest.paths[i]``:
    ``(container path, offset, size)``. ``extra_json[i]``: a dict of fields added to row i's
    sample JSON (the writer's own fields win). ``keep_jpeg``: see ``_encode``."""
    out_dir = Path(out_dir)
    n = len(manifest)
    for name, given in (("sources", sources), ("extra_json", extra_json)):
        if given is not None and len(given) != n:
            raise ValueError(f"pack: {name} has {len(given)} entries, the manifest {n} rows")
    split = manifest.split if manifest.split is not None else np.full(n, "all")
    # Split names become file names: check them all before anything is written.
    where = manifest.source or "manifest"
    for i, name in enumerate(split.tolist()):
        if not _SPLIT_NAME.fullmatch(name):
            raise ValueError(f"{where} row {i + 1} ({manifest.paths[i]}): split name {name!r} is "
                             "not a plain name (letters, digits, '_' and '-' only)")
    _refuse_own_input(manifest, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".pack-", dir=out_dir))
    try:
        summary = _pack_into(manifest, split, stage, shard_size, shorter_side, max_side, quality,
                             workers, progress, sources, extra_json, keep_jpeg)
        names = [n for s in summary["shards"] for n in (s["tar"], s["index"])]
        names += ["manifest.csv", "ids.npy", "pack_report.csv"]
        _commit_pack(stage, out_dir, names)
    except OSError as exc:
        full = disk_full_cause(exc)
        if full is None or isinstance(exc, DiskFull):
            raise
        raise DiskFull(full.errno, f"disk full: cannot pack into {out_dir} ({os.strerror(full.errno)}); "
                                   "the folder's previous pack, if any, is unchanged") from exc
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return summary


def _pack_into(manifest, split, out_dir, shard_size, shorter_side, max_side, quality, workers,
               progress, sources, extra_json, keep_jpeg) -> dict:
    n = len(manifest)
    # Shards hold one split each, so a split of a packed dataset is a set of whole shards.
    groups = []
    for name in sorted(set(split.tolist())):
        rows = np.flatnonzero(split == name)
        for k, s in enumerate(range(0, len(rows), shard_size)):
            groups.append((name, k, rows[s:s + shard_size]))
    # Each shard reserves an id range as long as its rows; packed samples take ids from its
    # start, so skipped images leave a gap at the end of the range and ids stay unique
    # without the workers talking to each other.
    tasks = []
    first = 0
    for name, k, rows in groups:
        tar_path = str(out_dir / f"{name}-{k:06d}.tar")
        tasks.append((tar_path, tar_path[:-4] + ".idx", first, rows,
                      [manifest.paths[i] for i in rows], manifest.lat[rows], manifest.lng[rows],
                      manifest.scene[rows], shorter_side, max_side, quality,
                      [None if sources is None else sources[i] for i in rows],
                      [None if extra_json is None else extra_json[i] for i in rows], keep_jpeg))
        first += len(rows)
    bar = progress_bar(n, progress, "packing")
    results = []
    if workers <= 1 or len(tasks) == 1:
        for t in tasks:
            results.append(_pack_shard(t))
            bar.update(len(t[3]))
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(min(workers, len(tasks)), mp_context=mp.get_context("spawn")) as ex:
            for t, r in zip(tasks, ex.map(_pack_shard, tasks)):
                results.append(r)
                bar.update(len(t[3]))
    bar.close()

    # The packed manifest lists the samples in id order; ids.npy maps its rows to sample ids.
    shards, skipped, keep_rows, ids = [], [], [], []
    for t, (packed, skip) in zip(tasks, results):
        skipped += skip
        if not packed:
            continue
        bad = {r for r, _, _ in skip}
        rows = [int(r) for r in t[3] if int(r) not in bad]
        keep_rows += rows
        ids += list(range(t[2], t[2] + packed))
        shards.append(ShardInfo(tar=os.path.basename(t[0]), index=os.path.basename(t[1]),
                                first_id=t[2], count=packed,
                                split=str(split[t[3][0]])).__dict__)
    packed_manifest = manifest.subset(np.array(keep_rows, dtype=np.int64))
    packed_manifest.report = []
    write_manifest(packed_manifest, out_dir / "manifest.csv", relative=False)
    with atomic_write(out_dir / "ids.npy", "wb") as f:
        np.save(f, np.array(ids, dtype=np.int64))
    with atomic_write(out_dir / "pack_report.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["manifest_row", "path", "reason"])
        w.writerows(sorted(skipped))
    summary = {"format": "geocell-webdataset", "version": 1, "count": len(keep_rows),
               "skipped": len(skipped), "shorter_side": shorter_side, "max_side": max_side,
               "quality": quality, "scene_names": list(manifest.scene_names), "shards": shards}
    with atomic_write(out_dir / SHARDS_META, "w") as f:
        json.dump(summary, f, indent=1)
    summary["skipped_rows"] = sorted(skipped)
    return summary


def is_shard_dir(path) -> bool:
    return Path(path).is_dir() and (Path(path) / SHARDS_META).is_file()


def read_shards(path):
    """The manifest of a packed folder; ``manifest.shards`` points at the folder and
    ``manifest.ids`` holds each row's sample id (the ``KEY.id`` in the tar)."""
    path = Path(path)
    m = read_manifest(path / "manifest.csv", check_files=False)
    m.shards = str(path.resolve())
    m.ids = np.load(path / "ids.npy")
    if len(m.ids) != len(m):
        raise ValueError(f"{path}: ids.npy has {len(m.ids)} entries, manifest.csv {len(m)} rows")
    return m


def shard_meta(path) -> dict:
    with open(Path(path) / SHARDS_META) as f:
        return json.load(f)


def read_index(idx_path) -> list:
    """Parses a DALI webdataset index: list of {ext: (offset, size)} per sample."""
    with open(idx_path) as f:
        header = f.readline().split()
        if not header or header[0] != INDEX_VERSION:
            raise ValueError(f"{idx_path}: not a DALI webdataset index {INDEX_VERSION}")
        samples = []
        for line in f:
            fields = line.split()
            if not fields:
                continue
            sample = {}
            for k in range(0, len(fields), 4):
                sample[fields[k]] = (int(fields[k + 1]), int(fields[k + 2]))
            samples.append(sample)
    if len(samples) != int(header[1]):
        raise ValueError(f"{idx_path}: header says {header[1]} samples, found {len(samples)}")
    return samples


def read_sample(tar_path, offset: int, size: int) -> bytes:
    """The bytes of one member (from ``sample_locations``); raises OSError if the tar is short."""
    with open(tar_path, "rb") as f:
        f.seek(int(offset))
        data = f.read(int(size))
    if len(data) != int(size):
        raise OSError(f"shard {tar_path} is truncated")
    return data


def write_index_without(idx_path, drop_ids, out_path) -> int:
    """Copies a shard index leaving out the samples whose id is in ``drop_ids`` (a reader driven
    by the index never reads them); returns how many samples the copy lists."""
    with open(idx_path) as f:
        header = f.readline().split()
        if not header or header[0] != INDEX_VERSION:
            raise ValueError(f"{idx_path}: not a DALI webdataset index {INDEX_VERSION}")
        # Each line: "<ext> <offset> <size> <KEY.ext>" groups; KEY is the sample id.
        kept = [line for line in f
                if line.split() and int(line.split()[3].split(".")[0]) not in drop_ids]
    with open(out_path, "w") as f:
        f.write(f"{INDEX_VERSION} {len(kept)}\n")
        f.writelines(kept)
    return len(kept)


def sample_locations(manifest) -> tuple:
    """For a shard-backed manifest: (tar paths, tar_of_row, offset, size) of each row's JPEG,
    read from the index files; rows whose id is not in the shards raise."""
    meta = shard_meta(manifest.shards)
    id_to_row = {int(i): r for r, i in enumerate(manifest.ids)}
    tars = []
    tar_of = np.full(len(manifest), -1, dtype=np.int64)
    offset = np.zeros(len(manifest), dtype=np.int64)
    size = np.zeros(len(manifest), dtype=np.int64)
    for s in meta["shards"]:
        rows_here = [id_to_row.get(i) for i in range(s["first_id"], s["first_id"] + s["count"])]
        if all(r is None for r in rows_here):
            continue
        t = len(tars)
        tars.append(str(Path(manifest.shards) / s["tar"]))
        for r, sample in zip(rows_here, read_index(Path(manifest.shards) / s["index"])):
            if r is not None:
                tar_of[r] = t
                offset[r], size[r] = sample["jpg"]
    if (tar_of < 0).any():
        raise ValueError(f"{int((tar_of < 0).sum())} manifest rows are not in the shards of {manifest.shards}")
    return tars, tar_of, offset, size


def shard_indexes(manifest, index_dir) -> list:
    """The shards (tar, idx) holding a shard-backed manifest's samples, for DALI's webdataset
    reader. A shard the manifest covers whole keeps its own index; for one it covers in part
    (a held-out split drawn inside a dataset packed as one split) a copy of its index listing
    only the manifest's samples is written under ``index_dir``: the reader, driven by the
    index, reads those samples and seeks past the others, so any subset of rows reads on the
    same path as whole shards."""
    meta = shard_meta(manifest.shards)
    ids = np.unique(np.asarray(manifest.ids, dtype=np.int64))
    if len(ids) != len(manifest):
        raise ValueError(f"{manifest.shards}: {len(manifest) - len(ids)} manifest rows repeat a sample id")
    out = []
    covered = 0
    for k, s in enumerate(meta["shards"]):
        lo, hi = s["first_id"], s["first_id"] + s["count"]
        inside = ids[(ids >= lo) & (ids < hi)]
        if len(inside) == 0:
            continue
        tar, idx = str(Path(manifest.shards) / s["tar"]), str(Path(manifest.shards) / s["index"])
        if len(inside) != s["count"]:
            subset = str(Path(index_dir) / f"subset-{k}.idx")
            drop = set(range(lo, hi)) - set(inside.tolist())
            write_index_without(idx, drop, subset)
            idx = subset
        out.append((tar, idx))
        covered += len(inside)
    if covered != len(manifest):
        raise ValueError(f"{len(manifest) - covered} manifest rows are not in the shards of {manifest.shards}")
    return out
