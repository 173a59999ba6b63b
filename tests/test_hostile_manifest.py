"""read_manifest on random rows of valid and invalid fields: never an exception other than
ManifestError; every data row is either loaded with exactly its values or reported with its line."""

import csv
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from geocell.data.manifest import MAX_SCENE_ID, ManifestError, read_manifest

TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\x00"), max_size=12)


def _coord(limit):
    return st.one_of(
        st.floats(-limit, limit, allow_nan=False).map(repr),             # valid
        st.floats(allow_nan=True, allow_infinity=True).map(repr),       # often out of range
        st.sampled_from(["", " ", "nan", "inf", "-inf", "1e400", f"{limit + 1e-9}", "0x10", "1,5"]),
        TEXT,
    )


SCENE = st.one_of(st.just(""), st.just("-1"), st.integers(-3, 6).map(str),
                  st.sampled_from([str(MAX_SCENE_ID + 1), "999999999999999999999"]),
                  st.sampled_from(["indoor", "natural", "urban"]), TEXT)
PATH = st.one_of(st.from_regex(r"[A-Za-z0-9_ ./,'\"-]{0,12}", fullmatch=True), TEXT)
ROW = st.tuples(PATH, _coord(90.0), _coord(180.0), SCENE, st.booleans())  # last: drop a field


def _oracle_coord(text, limit):
    try:
        v = float(text)
    except ValueError:
        return None
    return v if math.isfinite(v) and abs(v) <= limit else None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(ROW, max_size=25))
def test_random_rows_are_loaded_exactly_or_reported_with_their_line(tmp_path, rows):
    path = tmp_path / "m.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["path", "lat", "lng", "scene"])
        for p, lat, lng, scene, short in rows:
            w.writerow([p, lat, lng] + ([] if short else [scene]))
    # Each record's line as the csv module counts it (a field may hold a quoted newline).
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        next(reader)
        lines = []
        for record in reader:
            lines.append((reader.line_num, record))
    assert len(lines) == len(rows)
    try:
        m = read_manifest(path, check_files=False)
    except ManifestError:
        return  # a clear refusal of the whole file is allowed; any other exception fails
    reported = [line for line, _ in m.report]
    assert len(set(reported)) == len(reported)
    expected_loaded = []
    for (line, record), (p, lat, lng, scene, short) in zip(lines, rows):
        blank = not record or all(not c.strip() for c in record)
        if blank:
            assert line not in reported  # blank lines are neither rows nor problems
            continue
        if line in reported:
            continue
        expected_loaded.append((p, lat, lng, scene, short))
        # A row with a bad field is never loaded.
        assert not short and p.strip()
        assert _oracle_coord(lat, 90.0) is not None and _oracle_coord(lng, 180.0) is not None
    assert len(m) == len(expected_loaded)
    names = m.scene_names
    for i, (p, lat, lng, scene, _) in enumerate(expected_loaded):
        assert m.paths[i] == str(tmp_path / p.strip()) or m.paths[i] == p.strip()
        assert m.lat[i] == float(lat) and m.lng[i] == float(lng)
        s = scene.strip()
        if s in ("", "-1"):
            assert m.scene[i] == -1
        elif s.lstrip("+-").isdigit():
            assert m.scene[i] == int(s) and 0 <= int(s) < len(names)
        else:
            assert names[m.scene[i]] == s
    # Rows whose every field is clearly fine are loaded.
    for (line, record), (p, lat, lng, scene, short) in zip(lines, rows):
        if (not short and p.strip() and "\n" not in p and "\r" not in p
                and _oracle_coord(lat, 90.0) is not None and _oracle_coord(lng, 180.0) is not None
                and scene.strip() in ("", "-1")):
            assert line not in reported, (line, m.report)


@pytest.mark.parametrize("blob, line", [
    (b"path,lat,lng\na.jpg,1,2\nb\xe9.jpg,3,4\n", 3),
    (b"path,lat,lng\n" + b"a.jpg,1,2\n" * 3000 + b"\xff,1,2\n", 3002),
])
def test_bytes_that_are_not_utf8_name_their_line(tmp_path, blob, line):
    p = tmp_path / "m.csv"
    p.write_bytes(blob)
    with pytest.raises(ManifestError, match=rf"m\.csv line {line}: not UTF-8"):
        read_manifest(p, check_files=False)


def test_byte_order_mark_is_not_part_of_the_header(tmp_path):
    p = tmp_path / "m.csv"
    p.write_bytes("\ufeffpath,lat,lng\na.jpg,1,2\n".encode("utf-8"))
    m = read_manifest(p, check_files=False)
    assert len(m) == 1 and m.lat[0] == 1.0
