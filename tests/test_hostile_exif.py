"""EXIF GPS stored with every tag type and hostile references: read right where the meaning is
clear, skipped with the reason otherwise (never a wrong location). The JPEGs are written here:
Pillow writes the GPS directory with the tag types forced, around it a minimal TIFF header."""

import struct

import pytest
from PIL import Image, TiffImagePlugin, TiffTags
from PIL.TiffImagePlugin import IFDRational as R

from geocell.data.exif import NoGPS, manifest_from_exif, read_gps

ASCII, SHORT, RATIONAL, SRATIONAL, FLOAT, DOUBLE = (TiffTags.ASCII, TiffTags.SHORT, TiffTags.RATIONAL,
                                                    TiffTags.SIGNED_RATIONAL, TiffTags.FLOAT,
                                                    TiffTags.DOUBLE)


def exif_bytes(entries: dict, order: bytes = b"II") -> bytes:
    """EXIF with one GPS directory; ``entries``: {tag: (tiff type, value)}."""
    fmt = "<" if order == b"II" else ">"
    head = order + struct.pack(fmt + "HL", 42, 8)
    gps = TiffImagePlugin.ImageFileDirectory_v2(ifh=head, group=0x8825)
    for tag, (typ, value) in entries.items():
        gps.tagtype[tag] = typ
        gps[tag] = value
    ifd0 = struct.pack(fmt + "H", 1) + struct.pack(fmt + "HHLL", 0x8825, TiffTags.LONG, 1, 26) + b"\0" * 4
    return b"Exif\x00\x00" + head + ifd0 + gps.tobytes(26)


def photo(tmp_path, entries, name="p.jpg", order=b"II"):
    path = tmp_path / name
    Image.new("RGB", (8, 8), (90, 90, 90)).save(path, exif=exif_bytes(entries, order))
    return path


def gps(lat, lat_ref, lng, lng_ref):
    out = {}
    if lat_ref is not None:
        out[1] = (ASCII, lat_ref)
    out[2] = lat
    if lng_ref is not None:
        out[3] = (ASCII, lng_ref)
    out[4] = lng
    return out


PARIS = (48 + 51 / 60 + 29.88 / 3600, 2 + 17 / 60 + 40.2 / 3600)
PARIS_RAT = ((RATIONAL, (R(48, 1), R(51, 1), R(2988, 100))), (RATIONAL, (R(2, 1), R(17, 1), R(402, 10))))

READ = {
    "rational": (gps(PARIS_RAT[0], "N", PARIS_RAT[1], "E"), PARIS),
    "ascii decimal": (gps((ASCII, "48.8583"), "N", (ASCII, "2.2945"), "E"), (48.8583, 2.2945)),
    "ascii dms": (gps((ASCII, "48 51 29.88"), "S", (ASCII, "2,17,40.2"), "W"), (-PARIS[0], -PARIS[1])),
    "double dms": (gps((DOUBLE, (48.0, 51.0, 29.88)), "N", (DOUBLE, (2.0, 17.0, 40.2)), "E"), PARIS),
    "double degrees": (gps((DOUBLE, 48.8583), "S", (DOUBLE, 2.2945), "E"), (-48.8583, 2.2945)),
    "float": (gps((FLOAT, (48.0, 30.0, 0.0)), "N", (FLOAT, (2.0, 15.0, 0.0)), "W"), (48.5, -2.25)),
    "short": (gps((SHORT, (48, 30, 0)), "N", (SHORT, (2, 15, 0)), "E"), (48.5, 2.25)),
    "srational signed, agreeing ref": (
        gps((SRATIONAL, (R(-48, 1), R(7, 1), R(30, 1))), "S", (SRATIONAL, (R(2, 1), R(17, 1), R(40, 1))), "E"),
        (-(48 + 7 / 60 + 30 / 3600), 2 + 17 / 60 + 40 / 3600)),
    "srational signed, no ref": (
        gps((SRATIONAL, (R(-48, 1), R(30, 1), R(0, 1))), None, (SRATIONAL, (R(-2, 1), R(15, 1), R(0, 1))), None),
        (-48.5, -2.25)),
    "zero needs no ref": (gps((RATIONAL, (R(0, 1), R(0, 1), R(0, 1))), None, PARIS_RAT[1], "E"), (0.0, PARIS[1])),
    "lower-case refs": (gps(PARIS_RAT[0], "s", PARIS_RAT[1], "w"), (-PARIS[0], -PARIS[1])),
}

SKIP = {
    "W on the latitude": (gps(PARIS_RAT[0], "W", PARIS_RAT[1], "E"), "latitude reference 'W'"),
    "N on the longitude": (gps(PARIS_RAT[0], "N", PARIS_RAT[1], "N"), "longitude reference 'N'"),
    "missing latitude ref": (gps(PARIS_RAT[0], None, PARIS_RAT[1], "E"), "no GPS latitude reference"),
    "missing longitude ref": (gps(PARIS_RAT[0], "N", PARIS_RAT[1], None), "no GPS longitude reference"),
    "negative with N": (gps((SRATIONAL, (R(-48, 1), R(7, 1), R(30, 1))), "N", PARIS_RAT[1], "E"), "contradictory"),
    "mixed signs": (gps((SRATIONAL, (R(48, 1), R(-7, 1), R(30, 1))), "N", PARIS_RAT[1], "E"), "mixes signs"),
    "ascii two numbers": (gps((ASCII, "48,30"), "N", (ASCII, "2.5"), "E"), "ambiguous"),
    "ascii text": (gps((ASCII, "north"), "N", (ASCII, "2.5"), "E"), "unreadable GPS latitude"),
    "minutes over 60": (gps((RATIONAL, (R(48, 1), R(8583, 1), R(0, 1))), "N", PARIS_RAT[1], "E"), "at most 60"),
    "latitude 95": (gps((DOUBLE, 95.0), "N", (DOUBLE, 2.0), "E"), "out of range"),
    "zero denominator": (gps((RATIONAL, (R(48, 0), R(0, 1), R(0, 1))), "N", PARIS_RAT[1], "E"), "unreadable"),
    "unknown ref": (gps(PARIS_RAT[0], "Q", PARIS_RAT[1], "E"), "reference 'Q'"),
}


@pytest.mark.parametrize("order", [b"II", b"MM"])
@pytest.mark.parametrize("case", list(READ))
def test_every_tag_type_is_read_right(tmp_path, case, order):
    entries, (lat, lng) = READ[case]
    got = read_gps(photo(tmp_path, entries, order=order))
    assert got == pytest.approx((lat, lng), abs=1e-6)


@pytest.mark.parametrize("case", list(SKIP))
def test_unclear_positions_are_skipped_with_the_reason(tmp_path, case):
    entries, reason = SKIP[case]
    with pytest.raises(NoGPS, match=reason):
        read_gps(photo(tmp_path, entries))


def test_from_exif_reports_each_skip_and_keeps_the_clear_ones(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for k, case in enumerate(READ):
        photo(folder, READ[case][0], name=f"read_{k}.jpg")
    for k, case in enumerate(SKIP):
        photo(folder, SKIP[case][0], name=f"skip_{k}.jpg")
    m, skipped = manifest_from_exif(folder)
    assert len(m) == len(READ) and len(skipped) == len(SKIP)
    by_name = {p.split("/")[-1]: r for p, r in skipped}
    for k, case in enumerate(SKIP):
        assert SKIP[case][1].split("'")[0] in by_name[f"skip_{k}.jpg"], case
    for k, case in enumerate(READ):
        row = [i for i, p in enumerate(m.paths) if p.endswith(f"/read_{k}.jpg")][0]
        assert (m.lat[row], m.lng[row]) == pytest.approx(READ[case][1], abs=1e-6), case
