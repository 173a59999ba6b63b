"""No traceback reaches a user from a ``geocell`` command for an input or environment problem:
every subcommand run with its optional extras hidden (a meta-path finder in a child process)
answers with one line naming the extra, exit status 2; a missing input names the file; a bug
says it is one and shows its traceback only with --debug / GEOCELL_DEBUG=1."""

import io
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image

from geocell import commands as cli

# Runs geocell.commands.main(ARGS) with the top-level modules in HIDE not importable.
CHILD = r"""
import importlib.abc, sys
HIDE = set(sys.argv[1].split(","))

class Hidden(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in HIDE:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Hidden())
from geocell.commands import main
sys.exit(main(sys.argv[2:]))
"""
LIMIT_S = 120
TRAIN = "torch,torchvision,PIL,yaml,tqdm,tensorboard,matplotlib"
DOWNLOAD = "img2dataset,pyarrow,msgpack"


def _run(hide, args, env=None):
    p = subprocess.run([sys.executable, "-c", CHILD, hide, *args], capture_output=True, text=True,
                       timeout=LIMIT_S, env={**os.environ, **(env or {})})
    return p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("in")
    rng = np.random.default_rng(0)
    lines = ["path,lat,lng"]
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(d / f"{i}.jpg")
        lines.append(f"{i}.jpg,{-60 + 5 * i},{-170 + 14 * i}")
    (d / "m.csv").write_text("\n".join(lines) + "\n")
    # the same photos at two places, a few hundred km across each: enough for partitionings
    near = [f"{i}.jpg,{(10, -30)[i % 2] + rng.uniform(-2, 2):.4f},{(10, 100)[i % 2] + rng.uniform(-2, 2):.4f}"
            for i in range(24)]
    (d / "two_places.csv").write_text("path,lat,lng\n" + "\n".join(near) + "\n")
    (d / "urls.csv").write_text("id,url,lat,lng\na,http://127.0.0.1:9/a.jpg,1,2\n")
    (d / "msgpack").mkdir()
    (d / "msgpack" / "shard_0.msg").write_bytes(b"\x90")
    (d / "meta.csv").write_text("IMG_ID,LAT,LON\na,1,2\n")
    (d / "ckpt.pt").write_bytes(b"not read")
    return d


def _cases(d):
    m, o = str(d / "m.csv"), str(d / "out")
    tiny = ["--image-size", "32", "--batch-size", "4", "--epochs", "1", "--workers", "0",
            "--taus", "1/40", "--device", "cpu", "--no-progress", "--no-tensorboard", "-o", o]
    return [
        (TRAIN, ["data", "from-exif", str(d), "-o", o + ".csv"], "train"),
        (TRAIN, ["data", "pack", m, "-o", o], "train"),
        (TRAIN, ["data", "earth", "-o", o, "--n", "4"], "train"),
        (DOWNLOAD, ["data", "download", str(d / "urls.csv"), "-o", o], "download"),
        ("pyarrow", ["data", "download", str(d / "urls.csv"), "-o", o, "--workers", "1"], "download"),
        ("msgpack", ["data", "pack", "--from-msgpack", str(d / "msgpack"), "--metadata",
                     str(d / "meta.csv"), "-o", o], "download"),
        (TRAIN, ["scenes", "train", "--manifest", m, "-o", o], "train"),
        (TRAIN, ["scenes", "label", "x.pt", m], "train"),
        (TRAIN, ["train", "--manifest", m], "train"),
        (TRAIN, ["evaluate", str(d / "ckpt.pt"), m], "train"),
        (TRAIN, ["predict", str(d / "ckpt.pt"), str(d / "0.jpg")], "train"),
        (TRAIN, ["index", "build", "--checkpoint", str(d / "ckpt.pt"), "--manifest", m, "-o", o], "train"),
        (TRAIN, ["serve", "--checkpoint", str(d / "ckpt.pt")], "train"),
        ("fastapi,uvicorn,starlette,multipart", ["serve", "--checkpoint", str(d / "ckpt.pt")], "serve"),
        ("nvidia", ["train", "--manifest", str(d / "two_places.csv"), "--backend", "dali", *tiny], "dali"),
    ]


@pytest.mark.parametrize("case", range(15))
def test_a_missing_extra_is_one_line_naming_it(inputs, case):
    hide, args, extra = _cases(inputs)[case]
    code, out, err = _run(hide, args)
    assert "Traceback" not in err + out, err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert f"pip install 'geocell[{extra}]'" in lines[0]
    assert lines[0].startswith(f"geocell {args[0]}")


def test_partition_needs_no_extra(inputs, tmp_path):
    code, out, err = _run(TRAIN + "," + DOWNLOAD + ",fastapi,faiss,nvidia",
                          ["partition", str(inputs / "m.csv"), "-o", str(tmp_path / "p"),
                           "--tau", "1:40", "-q"])
    assert code == 0 and "Traceback" not in err and "geocell[" not in err, err
    assert any((tmp_path / "p").iterdir())


def test_a_missing_input_names_the_file(tmp_path):
    missing = tmp_path / "nowhere.csv"
    code, out, err = _run("", ["train", "--manifest", str(missing), "--device", "cpu"])
    assert code == 2 and "Traceback" not in err
    assert str(missing) in err and len(err.strip().splitlines()) == 1


def _boom(monkeypatch):
    mod = types.ModuleType("geocell_test_boom")

    def main(argv):
        raise RuntimeError("a bug")

    mod.main = main
    monkeypatch.setitem(sys.modules, "geocell_test_boom", mod)
    monkeypatch.setitem(cli.COMMANDS, "boom", ("geocell_test_boom", "raises", False))


def test_a_bug_says_so_and_keeps_its_traceback_behind_debug(monkeypatch, capsys):
    _boom(monkeypatch)
    monkeypatch.delenv("GEOCELL_DEBUG", raising=False)
    assert cli.main(["boom"]) == 1
    err = capsys.readouterr().err
    assert "bug" in err and "--debug" in err and "GEOCELL_DEBUG=1" in err and "RuntimeError: a bug" in err
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["boom", "--debug"])
    monkeypatch.setenv("GEOCELL_DEBUG", "1")
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["boom"])


def test_a_full_disk_at_checkpoint_time_is_one_line_from_train_run_py(tmp_path):
    # train/run.py goes through the geocell command: the checkpoint's EFBIG (a file-size limit
    # stands in for a full disk) reads "disk full" and names the file, with no traceback.
    import resource

    pytest.importorskip("torch")
    run_py = os.path.join(os.path.dirname(__file__), "..", "train", "run.py")
    limit = 8 * 1024 * 1024  # a ResNet-18 checkpoint is about 45 MB; the rest of the run writes less

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    from geocell.data.earth import build_earth

    earth = build_earth(tmp_path / "earth", n=240, size=32, seed=0, progress=False, workers=1)
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, run_py, "--manifest", str(earth), "--image-size", "32",
                        "--batch-size", "16", "--epochs", "1", "--workers", "0",
                        "--device", "cpu", "--no-progress", "--no-tensorboard", "--no-retrieval", "-o", str(out)],
                       capture_output=True, text=True, timeout=LIMIT_S, preexec_fn=small_files)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("geocell train:") and "disk full" in last and ".pt" in last, last


def test_too_few_photos_for_a_partitioning_is_one_line(inputs):
    # 24 photos with tau_min 1 and tau_max 40: the coarse partitioning is a single cell
    code, out, err = _run("", ["train", "--manifest", str(inputs / "m.csv"), "--image-size", "32",
                               "--batch-size", "4", "--epochs", "1", "--workers", "0", "--taus", "1/40",
                               "--device", "cpu", "--no-progress", "--no-tensorboard", "-o",
                               str(inputs / "few")])
    assert code == 2 and "Traceback" not in err, err
    assert "fewer than two cells" in err.strip().splitlines()[-1] and "--taus" in err
