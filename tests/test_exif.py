"""EXIF GPS round trip through Pillow-written JPEGs, and the from-exif command."""

import pytest
from PIL import Image

from geocell.commands.data import main as data_main
from geocell.data.exif import gps_exif, manifest_from_exif, read_gps
from geocell.data.manifest import read_manifest

PLACES = [(48.858370, 2.294481), (-33.856784, 151.215297), (40.689247, -74.044502),
          (-22.951916, -43.210487), (0.0, 0.0)]


@pytest.mark.parametrize("lat,lng", PLACES)
def test_gps_round_trip(tmp_path, lat, lng):
    path = tmp_path / "p.jpg"
    Image.new("RGB", (16, 12), (100, 50, 20)).save(path, exif=gps_exif(lat, lng))
    got = read_gps(path)
    assert got == pytest.approx((lat, lng), abs=1e-6)


def test_from_exif_manifest_and_skips(tmp_path, capsys):
    photos = tmp_path / "photos"
    (photos / "trip").mkdir(parents=True)
    for k, (lat, lng) in enumerate(PLACES[:3]):
        Image.new("RGB", (8, 8)).save(photos / "trip" / f"{k}.jpg", exif=gps_exif(lat, lng))
    Image.new("RGB", (8, 8)).save(photos / "nogps.jpg")
    (photos / "broken.jpg").write_bytes(b"not a jpeg at all")
    (photos / "notes.txt").write_text("hello")

    m, skipped = manifest_from_exif(photos)
    assert len(m) == 3
    reasons = {p.split("/")[-1]: r for p, r in skipped}
    assert "no GPS" in reasons["nogps.jpg"]
    assert reasons["broken.jpg"].startswith("unreadable")
    assert "not an image" in reasons["notes.txt"]

    out = tmp_path / "manifest.csv"
    assert data_main(["from-exif", str(photos), "-o", str(out), "-q"]) == 0
    text = capsys.readouterr().out
    assert "3 photos with GPS" in text and "3 skipped" in text
    back = read_manifest(out)
    assert len(back) == 3 and back.report == []
    got = sorted(zip(back.lat.round(6), back.lng.round(6)))
    assert got == sorted((round(a, 6), round(b, 6)) for a, b in PLACES[:3])
