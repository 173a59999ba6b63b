"""Damaged or inconsistent checkpoints are refused on load, naming the file and what is wrong;
a bit flip is caught by the stored checksum; orphan temporary files of killed writers go away."""

import logging
import os
import signal
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")

from geocell.model.checkpoint import (  # noqa: E402
    DIGEST_KEY, CheckpointError, InvalidCheckpoint, load_checkpoint, payload_digest,
    remove_orphan_temporaries, save_checkpoint, _host)
from helpers import make_tiny_checkpoint, run_cli, write_jpegs  # noqa: E402


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    path = make_tiny_checkpoint(root / "good.pt")
    return path, torch.load(path, weights_only=True)


def _write(payload, path, digest=True):
    """Saves a payload as-is (with a fresh digest when asked): only the table check can refuse it."""
    payload = dict(payload)
    payload.pop(DIGEST_KEY, None)
    if digest:
        payload[DIGEST_KEY] = payload_digest(payload)
    torch.save(payload, path)
    return os.fspath(path)


def _fine(p):
    return p["partitions"][-1]


def _edit_fine(field, fn):
    def edit(p):
        parts = [dict(q) for q in p["partitions"]]
        parts[-1][field] = fn(parts[-1][field].clone())
        p["partitions"] = parts
    return edit


def _set(key, value):
    def edit(p):
        p[key] = value
    return edit


def _nan_centroid(c):
    c[3, 0] = float("nan")
    return c


def _lat_95(c):
    c[0, 0] = 95.0
    return c


def _lng_200(c):
    c[1, 1] = -200.0
    return c


def _invalid_cell(c):
    c[2] = 0
    return c


def _unsorted(c):
    c[[0, 1]] = c[[1, 0]]
    return c


def _negative_count(c):
    c[0] = -3
    return c


def _hier(fn):
    def edit(p):
        p["hierarchy"] = fn(p["hierarchy"].clone())
    return edit


def _hier_out_of_range(h):
    h[0, 0] = 10_000
    return h


def _weight(key, fn):
    def edit(p):
        p["model"] = dict(p["model"])
        p["model"][key] = fn(p["model"][key].clone())
    return edit


def _nan_weight(w):
    w[0, 0] = float("nan")
    return w


def _drop_fine_cell(p):
    """A partition table one cell short of the model's head."""
    parts = [dict(q) for q in p["partitions"]]
    for f in ("cells", "counts", "centroids"):
        parts[-1][f] = parts[-1][f][:-1].clone()
    p["partitions"] = parts
    p["num_classes"] = [len(q["cells"]) for q in parts]
    p["hierarchy"] = p["hierarchy"][:-1].clone()


BROKEN = {
    "nan centroid": (_edit_fine("centroids", _nan_centroid), r"centroids\[3\]"),
    "latitude 95": (_edit_fine("centroids", _lat_95), r"centroids\[0\]"),
    "longitude -200": (_edit_fine("centroids", _lng_200), r"centroids\[1\]"),
    "invalid cell": (_edit_fine("cells", _invalid_cell), "not a valid S2 cell"),
    "unsorted cells": (_edit_fine("cells", _unsorted), "ascending"),
    "negative count": (_edit_fine("counts", _negative_count), "negative"),
    "hierarchy shape": (_hier(lambda h: h[:, :1].clone()), "hierarchy has shape"),
    "hierarchy index": (_hier(_hier_out_of_range), "hierarchy column 0"),
    "head size": (_drop_fine_cell, "geo head 1 weight"),
    "num_classes": (_set("num_classes", [1, 2]), "num_classes"),
    "scene names": (_set("scene_names", ["indoor", "natural", "urban", "space"]), "scene head has 3"),
    "image size": (_set("preprocess", {"image_size": 0}), "image_size"),
    "nan weight": (_weight("trunk.conv1.weight", _nan_weight), "trunk.conv1.weight"),
    "no arch": (_set("arch", None), "arch"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_inconsistent_tables_are_refused_naming_file_and_problem(good, tmp_path, case):
    _, payload = good
    edit, match = BROKEN[case]
    broken = dict(payload)
    edit(broken)
    path = _write(broken, tmp_path / "broken.pt")
    with pytest.raises(InvalidCheckpoint, match=match) as exc:
        load_checkpoint(path)
    assert isinstance(exc.value, ValueError) and path in str(exc.value)


def test_predict_refuses_nan_centroids_instead_of_printing_nan(good, tmp_path):
    _, payload = good
    broken = dict(payload)
    _edit_fine("centroids", lambda c: c.fill_(float("nan")))(broken)
    path = _write(broken, tmp_path / "nan.pt")
    image = write_jpegs(tmp_path / "img", 1)[0]
    rc, out, err = run_cli([image, "--checkpoint", path, "--workers", "0"])
    assert rc == 1 and "nan" not in out.lower()
    assert "nan.pt" in err and "centroids" in err


def test_bit_flip_is_caught_by_the_checksum(good, tmp_path):
    path, payload = good
    # A changed weight in an otherwise well-formed file: only the digest can tell.
    changed = dict(payload)
    _weight("geo_heads.0.bias", lambda b: b + 1e-3)(changed)
    p1 = _write(changed, tmp_path / "changed.pt", digest=False)
    changed[DIGEST_KEY] = payload[DIGEST_KEY]
    torch.save(changed, p1)
    with pytest.raises(InvalidCheckpoint, match="checksum mismatch"):
        load_checkpoint(p1)
    # One flipped bit in the raw file (inside the weights): refused one way or the other.
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x10
    p2 = tmp_path / "flipped.pt"
    p2.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="flipped.pt"):
        load_checkpoint(p2)


def test_checkpoint_without_checksum_loads_with_a_warning(good, tmp_path, caplog):
    _, payload = good
    path = _write(payload, tmp_path / "old.pt", digest=False)
    with caplog.at_level(logging.WARNING, logger="geocell.model.checkpoint"):
        ckpt = load_checkpoint(path)
    assert DIGEST_KEY not in ckpt and ckpt["arch"] == "resnet18"
    assert "no checksum" in caplog.text and "old.pt" in caplog.text


def test_saved_checkpoint_round_trips_with_its_checksum(good):
    path, payload = good
    assert payload[DIGEST_KEY] == payload_digest(payload)
    ckpt = load_checkpoint(path)
    assert DIGEST_KEY not in ckpt


_KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    from geocell.model import checkpoint
    # Dies between writing the temporary file and renaming it, as a killed trainer would.
    checkpoint.os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.save_checkpoint(sys.argv[1], arch="x", model={}, num_classes=[], scene_names=[],
                               partitions=[])
""")


def test_orphan_temporary_files_of_dead_writers_are_removed(tmp_path):
    target = tmp_path / "last.pt"
    r = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(target)], timeout=120)
    assert r.returncode == -signal.SIGKILL
    orphans = [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
    assert len(orphans) == 1 and not target.exists()
    # Files of a live writer (this process's parent) and of another host stay.
    live = tmp_path / f".tmp-{_host()}-{os.getppid()}-abcd1234.pt"
    other = tmp_path / ".tmp-otherhost-1-abcd1234.pt"
    live.write_bytes(b"x")
    other.write_bytes(b"x")
    save_checkpoint(target, arch="x", model={}, num_classes=[], scene_names=[], partitions=[])
    left = sorted(n for n in os.listdir(tmp_path) if n.startswith(".tmp-"))
    assert left == sorted([live.name, other.name])
    assert remove_orphan_temporaries(tmp_path) == []
    assert load_checkpoint(target)["arch"] == "x"


def test_resume_from_a_refused_checkpoint_is_a_usage_error_not_a_traceback(good, tmp_path, capsys):
    from geocell.commands import train as trainer

    run = tmp_path / "run"
    run.mkdir()
    data = bytearray(open(good[0], "rb").read())
    data[len(data) // 2] ^= 0x40  # one bit flipped in the middle of last.pt
    (run / "last.pt").write_bytes(bytes(data))
    with pytest.raises(SystemExit) as exc:
        trainer.main(["--resume", str(run)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "last.pt" in err and "Traceback" not in err
