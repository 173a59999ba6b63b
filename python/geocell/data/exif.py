"""GPS locations from photo EXIF (Pillow), and a manifest built from a folder of photos.

Each coordinate is read from whatever tag type the writer used, where the meaning is clear:
RATIONAL / SRATIONAL / DOUBLE / FLOAT / SHORT / LONG (degrees, minutes, seconds, or degrees
alone) and ASCII (one decimal number, or three numbers: degrees minutes seconds). The
hemisphere comes from the reference tag (N/S for the latitude, E/W for the longitude). What is
unclear is skipped with the reason, never guessed (a wrong location is worse than none):

- a missing reference with a positive value (the hemisphere is unknown); a zero coordinate or
  a negative value needs none;
- a reference of the other axis (W on a latitude) or an unknown one;
- a negative value with the positive reference (-48 with N): contradictory. A negative value
  with the negative reference (-48 with S) states the hemisphere twice and is read as 48 S;
- signs that disagree between degrees, minutes and seconds; minutes or seconds above 60;
- an ASCII value of two numbers ("48,30": 48.30 with a decimal comma, or 48 deg 30 min?);
- values out of range (|lat| > 90, |lng| > 180), NaN, zero denominators.
"""

from __future__ import annotations

import math
import os
import re
from fractions import Fraction
from pathlib import Path
from typing import Optional

import numpy as np

from geocell._internal.progress import progress_bar
from geocell.data.manifest import Manifest, write_manifest

GPS_IFD = 0x8825
GPS_LATITUDE_REF, GPS_LATITUDE, GPS_LONGITUDE_REF, GPS_LONGITUDE = 1, 2, 3, 4
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".heic", ".heif"}
# (positive reference, negative reference, largest magnitude) of each axis
_AXES = {"latitude": ("N", "S", 90.0), "longitude": ("E", "W", 180.0)}


class NoGPS(ValueError):
    """The image has no (usable) GPS position in its EXIF."""


def _components(value, what: str) -> list:
    """The 1 to 3 numbers (degrees[, minutes[, seconds]]) of a coordinate tag of any type."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    try:
        if isinstance(value, str):
            text = value.strip("\x00 \t")
            parts = [p for p in re.split(r"[\s,;]+", text) if p]
            if len(parts) == 2:
                raise NoGPS(f"ambiguous ASCII GPS {what} {value!r} (a decimal comma, or degrees "
                            "and minutes?)")
            nums = [float(p) for p in parts]
        elif isinstance(value, (tuple, list)):
            nums = [float(v) for v in value]
        else:
            nums = [float(value)]
    except (TypeError, ValueError, ZeroDivisionError) as exc:
        if isinstance(exc, NoGPS):
            raise
        raise NoGPS(f"unreadable GPS {what} {value!r}") from None
    if not 1 <= len(nums) <= 3 or not all(math.isfinite(v) for v in nums):
        raise NoGPS(f"unreadable GPS {what} {value!r}")
    return nums


def _dms_to_degrees(dms, ref, what: str) -> float:
    """Signed degrees of one coordinate (``what``: "latitude" or "longitude"); raises NoGPS
    with the reason for anything unclear (see the module doc)."""
    positive, negative, limit = _AXES[what]
    nums = _components(dms, what)
    nonzero = [v for v in nums if v != 0]
    is_negative = bool(nonzero) and nonzero[0] < 0
    later = nonzero[1:]
    if (not is_negative and any(v < 0 for v in later)) or (
            is_negative and any(v < 0 for v in later) and any(v > 0 for v in later)):
        raise NoGPS(f"GPS {what} {dms!r} mixes signs")
    mags = [abs(v) for v in nums] + [0.0] * (3 - len(nums))
    if mags[1] > 60 or mags[2] > 60:
        raise NoGPS(f"GPS {what} {dms!r}: minutes and seconds must be at most 60")
    magnitude = mags[0] + mags[1] / 60.0 + mags[2] / 3600.0
    if isinstance(ref, bytes):
        ref = ref.decode("ascii", "replace")
    ref = (ref or "").strip("\x00 ").upper() or None
    if ref is not None and ref not in (positive, negative):
        raise NoGPS(f"GPS {what} reference {ref!r} is not {positive} or {negative}")
    if magnitude > limit:
        raise NoGPS(f"GPS {what} {magnitude:g} out of range (at most {limit:g})")
    if magnitude == 0:
        return 0.0
    if is_negative:
        if ref == positive:
            raise NoGPS(f"GPS {what} {dms!r} is negative but its reference is {ref}: contradictory")
        return -magnitude  # a signed value, alone or with the reference that agrees
    if ref is None:
        raise NoGPS(f"no GPS {what} reference ({positive}/{negative}): the hemisphere is unknown")
    return magnitude if ref == positive else -magnitude


def gps_from_exif(exif) -> tuple:
    """(lat, lng) in degrees from a Pillow ``Image.Exif``; raises NoGPS."""
    gps = exif.get_ifd(GPS_IFD) if exif is not None else None
    if not gps or GPS_LATITUDE not in gps or GPS_LONGITUDE not in gps:
        raise NoGPS("no GPS position in EXIF")
    lat = _dms_to_degrees(gps[GPS_LATITUDE], gps.get(GPS_LATITUDE_REF), "latitude")
    lng = _dms_to_degrees(gps[GPS_LONGITUDE], gps.get(GPS_LONGITUDE_REF), "longitude")
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
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder")
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            files.append(Path(dirpath) / name)
    paths, lats, lngs, skipped = [], [], [], []
    bar = progress_bar(len(files), progress, "reading EXIF", unit="file")
    for f in files:
        bar.update(1)
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
    bar.close()
    manifest = Manifest(paths=paths, lat=np.array(lats), lng=np.array(lngs),
                        scene=np.full(len(paths), -1, dtype=np.int64), scene_names=[],
                        report=[(None, f"{p}: {r}") for p, r in skipped],
                        source=str(out_manifest) if out_manifest else None)
    if out_manifest is not None:
        write_manifest(manifest, out_manifest)
    return manifest, skipped
