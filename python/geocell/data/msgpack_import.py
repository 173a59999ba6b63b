"""GeoEstimation's msgpack shards into geocell shards (``geocell data pack --from-msgpack``).

GeoEstimation's downloader stores MP-16 as ``shard_N.msg`` files, each a stream of msgpack
maps ``{"image": JPEG bytes, "id": IMG_ID}``; the locations and scene labels are in the
metadata CSV (``mp16_places365.csv``). Records are joined with the metadata on the id and
packed by ``shards.pack`` straight from the msgpack files (each image is a byte range of its
file: nothing is extracted). Records with no (usable) metadata row, malformed records and
unreadable file tails are counted and listed in ``OUT/import_report.csv``.
"""

from __future__ import annotations

import csv
import os
import re
from collections import Counter
from pathlib import Path

from geocell.data.metadata import read_keyed_metadata
from geocell.data.shards import pack

IMPORT_REPORT = "import_report.csv"
# A record larger than this is not a photo of a dataset; the bound keeps memory bounded
# whatever a file claims.
MAX_RECORD_BYTES = 64 << 20


def msgpack_files(folder) -> list:
    """The ``*.msg`` files of a folder, ``shard_N.msg`` in the order of N."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder of msgpack shards")
    files = sorted(folder.glob("*.msg"))
    number = re.compile(r"shard_(\d+)\.msg")

    def order(p):
        m = number.fullmatch(p.name)
        return (0, int(m.group(1)), p.name) if m else (1, 0, p.name)

    files.sort(key=order)
    if not files:
        raise ValueError(f"{folder}: no .msg files")
    return files


def _text(value):
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, (str, int)):
        return str(value)
    raise TypeError(f"id of type {type(value).__name__}")


def read_records(path, max_record_bytes: int = MAX_RECORD_BYTES):
    """Yields ``(offset, id, image offset, image size)`` for each record of a msgpack file,
    or ``(offset, None, None, reason)`` for one that cannot be used. A file whose rest cannot
    be parsed ends with one such entry."""
    import msgpack

    size = os.path.getsize(path)
    with open(path, "rb") as f, open(path, "rb") as again:
        # raw=True: GeoEstimation's older files store the JPEG as a msgpack raw string.
        # strict_map_key=False: a record with an integer key is one record, not the end of the file
        unpacker = msgpack.Unpacker(f, raw=True, max_buffer_size=max_record_bytes, strict_map_key=False)
        start = 0
        while True:
            try:
                record = unpacker.unpack()
            except msgpack.OutOfData:
                if start < size:
                    yield start, None, None, f"truncated record ({size - start} bytes at the end)"
                return
            except (msgpack.UnpackException, ValueError) as e:
                why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                yield start, None, None, f"unreadable from here on ({why})"
                return
            end = unpacker.tell()
            if not isinstance(record, dict):
                yield start, None, None, f"record is a {type(record).__name__}, not a map"
                start = end
                continue
            image = record.get(b"image", record.get("image"))
            key = record.get(b"id", record.get("id"))
            if not isinstance(image, bytes) or key is None:
                yield start, None, None, "record without image bytes or id"
                start = end
                continue
            try:
                key = _text(key).strip()
            except (TypeError, UnicodeDecodeError) as e:
                yield start, None, None, f"unreadable id: {e}"
                start = end
                continue
            # The image's place in the file: its bytes inside the record's (any occurrence
            # holds the same bytes, so the first one found is right).
            again.seek(start)
            at = again.read(end - start).find(image)
            yield start, key, start + at, len(image)
            start = end


def pack_msgpack(folder, metadata, out_dir, *, max_record_bytes: int = MAX_RECORD_BYTES,
                 progress: bool = True, **pack_options) -> dict:
    """Packs the records of ``folder``'s msgpack files that have a metadata row into shards
    under ``out_dir``; returns ``shards.pack``'s summary plus ``records``, ``unmatched``
    (Counter of reasons) and ``report`` (path of the CSV listing them)."""
    files = msgpack_files(folder)
    meta = read_keyed_metadata(metadata)
    rows, sources, extra, problems = [], [], [], []
    seen = {}
    records = 0
    for path in files:
        for offset, key, at, size in read_records(path, max_record_bytes):
            where = f"{path.name}@{offset}"
            if key is None:
                problems.append((str(path), offset, "", "unreadable record", size))
                continue
            records += 1
            r = meta.row_of(key)
            if r is None:
                reason, detail = meta.why_missing(key)
                problems.append((str(path), offset, key, reason, detail))
                continue
            if r in seen:
                problems.append((str(path), offset, key, "duplicate id", f"already at {seen[r]}"))
                continue
            seen[r] = where
            rows.append(r)
            sources.append((str(path), at, size))
            extra.append({"source_id": key, "meta": meta.fields(r)})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / IMPORT_REPORT, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file", "offset", "id", "reason", "detail"])
        w.writerows(problems)
    if not rows:
        raise ValueError(f"{folder}: none of {records} records has a usable row in {metadata} "
                         f"(listed in {out_dir / IMPORT_REPORT})")
    m = meta.manifest.subset(rows)
    # A sample's path names where its image came from: the msgpack file and the id.
    m.paths = [f"{src[0]}#{x['source_id']}" for src, x in zip(sources, extra)]
    m.report = []
    # GeoEstimation stored JPEGs already resized: kept as they are, not encoded a second time.
    summary = pack(m, out_dir, sources=sources, extra_json=extra, keep_jpeg=True, progress=progress,
                   **pack_options)
    summary["records"] = records
    summary["unmatched"] = Counter(p[3] for p in problems)
    summary["report"] = str(out_dir / IMPORT_REPORT)
    return summary
