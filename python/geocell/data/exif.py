"""GPS locations from photo EXIF (Pillow), and a manifest built from a folder of photos."""

from __future__ import annotations

import math
import os
from fractions import Fraction
from pathlib import Path
from typing import Optional

import numpy as np

GPS_IFD = 0x8825
GPS_LATITUDE_REF, GPS_LATITUDE, GPS_LONGITUDE_REF, GPS_LONGITUDE = 1, 2, 3, 4
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".heic", ".heif"}


class NoGPS(ValueError):
    """The image has no (usable) GPS position in its EXIF."""


def _dms_to_degrees(dms, ref, what: str) -> float:
    try:
        parts = [float(v) for v in dms]
    except (TypeError, ValueError, ZeroDivisionError):
        raise NoGPS(f"unreadable GPS {what} {dms!r}") from None
    if not parts or len(parts) > 3 or any(not math.isfinite(p) for p in parts):
        raise NoGPS(f"unreadable GPS {what} {dms!r}")
    parts += [0.0] * (3 - len(parts))
    value = parts[0] + parts[1] / 60.0 + parts[2] / 3600.0
    if isinstance(ref, bytes):
        ref = ref.decode("ascii", "replace")
    ref = (ref or "").strip("\x00 ").upper()
    if ref in ("S", "W"):
        value = -value
    elif ref not in ("N", "E", ""):
        raise NoGPS(f"bad GPS {what} reference {ref!r}")
    return value


def gps_from_exif(exif) -> tuple:
    """(lat, lng) in degrees from a Pillow ``Image.Exif``; raises NoGPS."""
    gps = exif.get_ifd(GPS_IFD) if exif is not None else None
    if not gps or GPS_LATITUDE not in gps or GPS_LONGITUDE not in gps:
        raise NoGPS("no GPS position in EXIF")
    lat = _dms_to_degrees(gps[GPS_LATITUDE], gps.get(GPS_LATITUDE_REF), "latitude")
    lng = _dms_to_degrees(gps[GPS_LONGITUDE], gps.get(GPS_LONGITUDE_REF), "longitude")
    if not (abs(lat) <= 90.0 and abs(lng) <= 180.0):
        raise NoGPS(f"GPS position out of range ({lat}, {lng})")
    return lat, lng


def read_gps(path) -> tuple:
    """(lat, lng) of one photo. Raises NoGPS, or OSError/PIL errors for unreadable files."""
    from PIL import Image

    with Image.open(path) as img:
        return gps_from_exif(img.getexif())


def _to_dms(value: float) -> tuple:
    value = abs(value)
    deg = int(value)
    minutes_f = (value - deg) * 60.0
    minutes = int(minutes_f)
    seconds = Fraction(round((minutes_f - minutes) * 60.0 * 10000), 10000)
    return (Fraction(deg), Fraction(minutes), seconds)


def gps_exif(lat: float, lng: float, exif=None):
    """An ``Image.Exif`` carrying (lat, lng) as degree/minute/second rationals with N/S/E/W
    references, ready for ``img.save(..., exif=exif)``."""
    from PIL import Image, TiffImagePlugin

    exif = exif if exif is not None else Image.Exif()
    rational = TiffImagePlugin.IFDRational
    dms = lambda v: tuple(rational(f.numerator, f.denominator) for f in _to_dms(v))  # noqa: E731
    exif[GPS_IFD] = {
        0: b"\x02\x03\x00\x00",
        GPS_LATITUDE_REF: "N" if lat >= 0 else "S",
        GPS_LATITUDE: dms(lat),
        GPS_LONGITUDE_REF: "E" if lng >= 0 else "W",
        GPS_LONGITUDE: dms(lng),
    }
    return exif


def manifest_from_exif(folder, out_manifest=None, progress: bool = False):
    """Walks ``folder`` for photos and reads their GPS. Returns ``(manifest, skipped)`` where
    ``skipped`` is a list of ``(path, reason)``; writes the manifest when a path is given."""
    from geocell.data.manifest import Manifest, write_manifest

    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder")
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            files.append(Path(dirpath) / name)
    paths, lats, lngs, skipped = [], [], [], []
    iterator = files
    if progress:
        try:
            from tqdm import tqdm
            iterator = tqdm(files, desc="reading EXIF", unit="file")
        except ImportError:
            pass
    for f in iterator:
        if f.suffix.lower() not in IMAGE_EXTENSIONS:
            skipped.append((str(f), "not an image file (extension)"))
            continue
        try:
            lat, lng = read_gps(f)
        except NoGPS as e:
            skipped.append((str(f), str(e)))
            continue
        except Exception as e:  # Pillow raises many types for broken files
            skipped.append((str(f), f"unreadable: {type(e).__name__}: {e}"))
            continue
        paths.append(str(f.resolve()))
        lats.append(lat)
        lngs.append(lng)
    manifest = Manifest(paths=paths, lat=np.array(lats), lng=np.array(lngs),
                        scene=np.full(len(paths), -1, dtype=np.int64), scene_names=[],
                        report=[(None, f"{p}: {r}") for p, r in skipped],
                        source=str(out_manifest) if out_manifest else None)
    if out_manifest is not None:
        write_manifest(manifest, out_manifest)
    return manifest, skipped
