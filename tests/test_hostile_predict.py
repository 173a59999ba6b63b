"""geocell predict with hostile file names and arguments: every row written for a name that is
not UTF-8; bad flags refused up front (exit 2, the flag named) before anything is predicted."""

import csv
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
from PIL import Image  # noqa: E402

from geocell.commands.predict import main  # noqa: E402
from helpers import make_tiny_checkpoint, run_cli  # noqa: E402

RAW_NAME = b"caf\xe9-\xff.jpg"  # Latin-1 bytes: not UTF-8


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ck") / "tiny.pt")


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    rng = np.random.default_rng(0)
    for name in (b"a.jpg", RAW_NAME, b"z.jpg"):
        path = os.path.join(os.fsencode(d), name)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(os.fsdecode(path), format="JPEG")
    return d


def test_csv_output_with_a_non_utf8_file_name_has_every_row(ckpt, folder, tmp_path):
    out = tmp_path / "p.csv"
    rc, _, err = run_cli([str(folder), "--checkpoint", ckpt, "--out", str(out), "--workers", "0"])
    assert rc == 0, err
    with open(out, newline="", encoding="utf-8") as f:  # valid UTF-8 throughout
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and all(r["lat"] and not r["error"] for r in rows)
    assert [os.path.basename(r["image"]) for r in rows] == ["a.jpg", "caf\\xe9-\\xff.jpg", "z.jpg"]


def test_json_output_with_a_non_utf8_file_name_keeps_the_exact_name(ckpt, folder, tmp_path):
    out = tmp_path / "p.json"
    rc, _, err = run_cli([str(folder), "--checkpoint", ckpt, "--out", str(out), "--workers", "0"])
    assert rc == 0, err
    doc = json.loads(out.read_text(encoding="utf-8"))
    names = [os.fsencode(p["image"]) for p in doc["predictions"]]
    assert len(names) == 3 and os.path.join(os.fsencode(folder), RAW_NAME) in names


def test_text_and_json_stdout_with_a_non_utf8_file_name(ckpt, folder):
    rc, out, _ = run_cli([str(folder), "--checkpoint", ckpt, "--workers", "0"])
    assert rc == 0 and out.count("best guess") == 3 and "caf\\xe9-\\xff.jpg" in out
    rc, out, _ = run_cli([str(folder), "--checkpoint", ckpt, "--workers", "0", "--json"])
    assert rc == 0 and len(json.loads(out)["predictions"]) == 3


@pytest.mark.parametrize("extra, flag", [
    (["--mass", "0"], "--mass"),
    (["--mass", "1.5"], "--mass"),
    (["--mass", "nan"], "--mass"),
    (["--batch-size", "0"], "--batch-size"),
    (["--top-k", "1000000000"], "--top-k"),
    (["--top-k", "0"], "--top-k"),
    (["--workers", "-1"], "--workers"),
    (["--out", "{tmp}/missing/p.csv"], "--out"),
    (["--out", "{tmp}/file.txt/p.csv"], "--out"),
    (["--out", "{tmp}"  "/p.txt"], "--out"),
    (["--out", "/proc/p.csv"], "--out"),
    (["--map", "{tmp}/missing/m.png"], "--map"),
    (["--map", "/proc/maps/"], "--map"),
])
def test_bad_arguments_fail_before_predicting(tmp_path, capsys, extra, flag):
    (tmp_path / "file.txt").write_text("x")
    argv = ["img.jpg", "--checkpoint", str(tmp_path / "never-loaded.pt")]
    argv += [a.replace("{tmp}", str(tmp_path)) for a in extra]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"argument {flag}" in err and "Traceback" not in err
    assert "never-loaded" not in err  # refused before the checkpoint is looked at


def test_writable_out_and_map_folders_are_accepted(ckpt, tmp_path):
    img = tmp_path / "a.jpg"
    Image.new("RGB", (40, 40), (10, 20, 30)).save(img)
    rc, _, err = run_cli([str(img), "--checkpoint", ckpt, "--out", str(tmp_path / "p.csv"),
                          "--map", str(tmp_path / "maps") + "/", "--workers", "0", "--top-k", "100",
                          "--mass", "1"])
    assert rc == 0, err
    assert (tmp_path / "p.csv").exists() and os.listdir(tmp_path / "maps") == ["a.png"]
