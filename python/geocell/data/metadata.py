"""Metadata keyed by image id, for images that come from elsewhere (URLs, msgpack records).

A metadata CSV has a manifest's layout (GeoEstimation's ``IMG_ID,LAT,LON,S3_Label,...`` or the
plain ``path,lat,lng[,scene][,split]``); its path column is read as the image's id. The rows are
read by ``read_manifest``, so coordinates and scene labels follow the manifest's rules and a
row it rejects keeps its reason; every column of a row is kept as text, so columns geocell does
not use (``S16_Label``, ``S365_Label``, ...) travel with the image.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from geocell.data.manifest import PATH_COLUMNS, Manifest, ManifestError, find_column, read_manifest


@dataclass
class KeyedMetadata:
    """``manifest`` row i is the image with id ``keys[i]`` on ``lines[i]`` of ``source``;
    ``values[i]`` are its fields as written, under ``header``. ``rejected`` maps the id of a
    row ``read_manifest`` left out to ``(line, reason)``."""

    manifest: Manifest
    keys: list
    lines: list
    header: list
    values: list
    rejected: dict
    source: str

    def __post_init__(self):
        self._row = {k: i for i, k in enumerate(self.keys)}

    def __len__(self) -> int:
        return len(self.keys)

    def row_of(self, key: str) -> Optional[int]:
        return self._row.get(key)

    def why_missing(self, key: str) -> tuple:
        """(reason, detail) for an id with no usable row."""
        if key in self.rejected:
            line, reason = self.rejected[key]
            return "bad metadata", f"{self.source} line {line}: {reason}"
        return "no metadata", f"id {key!r} not in {self.source}"

    def fields(self, row: int) -> dict:
        """The row's columns as written (the JSON ``meta`` of its sample)."""
        return dict(zip(self.header, self.values[row]))


def key_column(header: list) -> Optional[int]:
    """The column of a manifest-layout header that ``read_manifest`` reads as the image path."""
    return find_column(header, PATH_COLUMNS)


def read_keyed_metadata(path) -> KeyedMetadata:
    """Reads a manifest-layout CSV keyed by its path column; an id on two rows is an error."""
    path = Path(path)
    # The image root only shapes the manifest's paths, which are replaced by the importer.
    manifest = read_manifest(path, image_root=path.resolve().parent, check_files=False)
    dropped = {line: reason for line, reason in manifest.report}
    keys, lines, values, rejected = [], [], [], {}
    first_line = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader)]
        i_key = key_column(header)
        if i_key is None:  # read_manifest has already said so; kept for a direct call
            raise ManifestError(f"{path}: no id column in header {header}")
        # The same reader and the same blank-row rule as read_manifest, so line numbers agree.
        for row in reader:
            line = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            key = row[i_key].strip() if len(row) > i_key else ""
            if key:
                if key in first_line:
                    raise ValueError(f"{path} line {line}: id {key!r} already on line "
                                     f"{first_line[key]}")
                first_line[key] = line
            if line in dropped:
                rejected[key] = (line, dropped[line])
                continue
            keys.append(key)
            lines.append(line)
            values.append(tuple(row[: len(header)]))
    if len(keys) != len(manifest):
        raise ValueError(f"{path}: {len(manifest)} rows read as a manifest but {len(keys)} "
                         "as metadata (a field with a line break?)")
    return KeyedMetadata(manifest=manifest, keys=keys, lines=lines, header=header, values=values,
                         rejected=rejected, source=str(path))
