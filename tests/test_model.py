"""GeoModel heads, initial weights and checkpoints."""

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision")

import geocell
from geocell.model.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from geocell.model.network import GeoModel, PretrainedWeightsError


def test_heads_and_shapes():
    model = GeoModel("resnet18", [3, 5, 7], 3)
    geo, scene = model(torch.randn(2, 3, 32, 32))
    assert [g.shape for g in geo] == [(2, 3), (2, 5), (2, 7)]
    assert scene.shape == (2, 3)
    _, scene = GeoModel("resnet18", [4], 0).eval()(torch.randn(1, 3, 32, 32))
    assert scene is None


def test_imagenet_without_internet_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached weights
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # an unreachable proxy: as good as offline
    monkeypatch.setenv("no_proxy", "")
    monkeypatch.setenv("NO_PROXY", "")
    with pytest.raises(PretrainedWeightsError) as err:
        GeoModel("resnet18", [3], 0, pretrained="imagenet")
    msg = str(err.value)
    assert "ImageNet weights for resnet18" in msg and "--pretrained" in msg and "resnet18-" in msg


def test_pretrained_from_a_local_file(tmp_path):
    import torchvision

    ref = torchvision.models.resnet18(weights=None)
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    model = GeoModel("resnet18", [3], 2, pretrained=str(tmp_path / "r18.pth"))
    assert torch.equal(model.trunk.conv1.weight, ref.conv1.weight)
    with pytest.raises(PretrainedWeightsError, match="no such file"):
        GeoModel("resnet18", [3], 0, pretrained=str(tmp_path / "missing.pth"))
    with pytest.raises(PretrainedWeightsError, match="does not fit"):
        GeoModel("resnet50", [3], 0, pretrained=str(tmp_path / "r18.pth"))


def test_checkpoint_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    lat, lng = rng.uniform(-60, 60, 400), rng.uniform(-180, 180, 400)
    parts = geocell.partitions(lat, lng, [(2, 100), (2, 30)])
    h = geocell.hierarchy(parts)
    model = GeoModel("resnet18", [len(p) for p in parts], 3)
    path = tmp_path / "c.pt"
    save_checkpoint(path, arch="resnet18", model=model.state_dict(), num_classes=[len(p) for p in parts],
                    scene_names=["a", "b", "c"], partitions=parts, hierarchy=h,
                    preprocess={"image_size": 32, "resize_size": 37, "mean": [0.5] * 3, "std": [0.2] * 3})
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "geocell-checkpoint" and raw["partitions"][0]["cells"].dtype == torch.int64
    model2, parts2, h2 = model_from_checkpoint(load_checkpoint(path))
    np.testing.assert_array_equal(parts2[1].cells, parts[1].cells)
    assert parts2[1].cells.dtype == np.uint64
    np.testing.assert_array_equal(h2, h)
    x = torch.randn(1, 3, 32, 32)
    model.eval()
    assert torch.equal(model(x)[0][1], model2(x)[0][1])
    assert not list(tmp_path.glob(".tmp-*"))  # atomic write left nothing behind


def test_checkpoint_rejects_other_files(tmp_path):
    torch.save({"hello": 1}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="not a geocell checkpoint"):
        load_checkpoint(tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="no such"):
        load_checkpoint(tmp_path / "missing.pt")
