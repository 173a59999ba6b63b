"""geocell scenes: train the scene-only network, then label a GPS manifest without scene labels."""

import numpy as np
import pytest

pytest.importorskip("torchvision")

from geocell.commands import scenes
from geocell.model.checkpoint import load_checkpoint
from geocell.data.manifest import read_manifest, write_manifest
from geocell.data.terrain import SCENE_NAMES

COMMON = ["--image-size", "32", "--batch-size", "16", "--workers", "0", "--backend", "torch", "--threads", "1",
          "--no-progress"]


def test_train_then_label(tmp_path):
    from geocell.data.earth import build_earth

    manifest = read_manifest(build_earth(tmp_path / "earth", n=120, size=32, seed=1, progress=False, workers=1))
    n = len(manifest)  # the held-out split leaves out rows near val/test blocks: fewer than 120
    assert n >= 60
    labelled = manifest.subset(np.arange(n * 2 // 3))
    write_manifest(labelled, tmp_path / "scenes.csv")
    gps = manifest.subset(np.arange(n * 2 // 3, n))
    gps.scene = np.full(len(gps), -1)  # a GPS-only dataset: no scene labels
    write_manifest(gps, tmp_path / "gps.csv")

    assert scenes.main(["train", "--manifest", str(tmp_path / "scenes.csv"), "--epochs", "1",
                        "-o", str(tmp_path / "scene.pt"), *COMMON]) == 0
    ckpt = load_checkpoint(tmp_path / "scene.pt")
    assert ckpt["scene_names"] == SCENE_NAMES and ckpt["num_classes"] == []

    assert scenes.main(["label", "--checkpoint", str(tmp_path / "scene.pt"), "--manifest", str(tmp_path / "gps.csv"),
                        "-o", str(tmp_path / "labelled.csv"), *COMMON]) == 0
    out = read_manifest(tmp_path / "labelled.csv")
    assert len(out) == len(gps) and (out.scene >= 0).all()
    assert out.scene_probs.shape == (len(gps), len(SCENE_NAMES))
    np.testing.assert_allclose(out.scene_probs.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(out.scene, out.scene_probs.argmax(axis=1))
    header = (tmp_path / "labelled.csv").read_text().splitlines()[0]
    assert all(f"scene_prob_{name}" in header for name in SCENE_NAMES)


def test_label_rejects_a_model_without_scene_head(tmp_path, capsys):
    # a real, loadable geo checkpoint whose model has no scene head: refused for that reason
    from helpers import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "geo_only.pt", scene_names=[])
    assert load_checkpoint(ckpt)["scene_names"] == []
    assert scenes.main(["label", "--checkpoint", ckpt, "--manifest", "x.csv",
                        "-o", str(tmp_path / "o.csv")]) == 2
    assert capsys.readouterr().err.strip() == f"geocell scenes label: {ckpt} has no scene head"
    assert not (tmp_path / "o.csv").exists()


def _colour_manifest(folder, n_per_class: int, seed: int):
    """Three scenes a network can tell apart only by learning: reddish, greenish and bluish noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["path,lat,lng,scene"]
    for k, name in enumerate(["red", "green", "blue"]):
        for i in range(n_per_class):
            pixels = rng.integers(0, 215, size=(32, 32, 3))
            pixels[..., k] += 40
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{name}{i}.png")
            rows.append(f"{name}{i}.png,{rng.uniform(-60, 60):.3f},{rng.uniform(-170, 170):.3f},{name}")
    (folder / "m.csv").write_text("\n".join(rows) + "\n")
    return folder / "m.csv"


def test_default_training_separates_a_separable_scene_set(tmp_path):
    train = _colour_manifest(tmp_path / "train", 32, seed=0)
    val = _colour_manifest(tmp_path / "val", 20, seed=1)
    # The defaults (learning rate, warm-up, schedule) under test: only the size of the run is set.
    assert scenes.main(["train", "--manifest", str(train), "--val-manifest", str(val), "--epochs", "4",
                        "-o", str(tmp_path / "scene.pt"), *COMMON]) == 0
    assert scenes.main(["label", "--checkpoint", str(tmp_path / "scene.pt"), "--manifest", str(val),
                        "--overwrite", "-o", str(tmp_path / "labelled.csv"), *COMMON]) == 0
    truth, labelled = read_manifest(val), read_manifest(tmp_path / "labelled.csv")
    assert labelled.scene_names == truth.scene_names
    accuracy = float((labelled.scene == truth.scene).mean())
    assert accuracy >= 0.8, accuracy  # chance is 1/3; a diverged run predicts one class (1/3)


def test_scenes_train_help_names_its_defaults(capsys):
    with pytest.raises(SystemExit):
        scenes.main(["train", "--help"])
    out = capsys.readouterr().out
    assert "default 0.01" in out and "resnet50" in out
