"""The multitask geolocation network: a ResNet trunk, one linear head per partitioning, a scene head.

Müller-Budack et al. (ECCV 2018): global average pooled ResNet features feed one classifier per
S2 partitioning (coarse, middle, fine) and, in the multitask variant, a scene classifier.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torchvision
from torch import nn

# ShuffleNet V2 (0.5x) is there for the scene helper of small runs: about four times ResNet-18's
# training speed on a CPU, for a task (the kind of ground in a patch) that needs little capacity.
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "shufflenet_v2_x0_5")


class PretrainedWeightsError(RuntimeError):
    """The requested initial weights could not be obtained or did not fit the network."""


def _imagenet_state_dict(arch: str) -> dict:
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # urllib/HTTP/SSL/OSError: all mean "not available here"
        raise PretrainedWeightsError(
            f"could not download the ImageNet weights for {arch} from {weights.url} "
            f"({type(exc).__name__}: {exc}). This machine may have no internet access: download "
            f"that file elsewhere and pass its path (--pretrained /path/to/{os.path.basename(weights.url)}), "
            "copy it into $TORCH_HOME/hub/checkpoints/, or train from scratch with --pretrained none."
        ) from exc


def strip_wrapper_prefixes(state: dict) -> dict:
    # DDP wraps as module.*, torch.compile as _orig_mod.*; checkpoints are keyed without them.
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def _local_state_dict(path: str) -> dict:
    if not os.path.isfile(path):
        raise PretrainedWeightsError(
            f"--pretrained {path!r}: no such file (expected 'none', 'imagenet' or a path to weights)"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PretrainedWeightsError(f"could not read weights from {path}: {exc}") from exc
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]  # a geocell checkpoint (or any {"model": state_dict} file)
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PretrainedWeightsError(f"{path} does not hold a state_dict of tensors")
    return strip_wrapper_prefixes(obj)


class GeoModel(nn.Module):
    """ResNet trunk + one geo head per partitioning + an optional scene head.

    forward(x) -> (geo_logits: list of (B, C_p), scene_logits: (B, S) or None if num_scenes == 0).
    """

    def __init__(
        self,
        arch: str = "resnet50",
        num_classes: Sequence[int] = (),
        num_scenes: int = 0,
        pretrained: str = "none",
    ):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
        if len(num_classes) == 0 and num_scenes == 0:
            raise ValueError("the model needs at least one head (num_classes or num_scenes)")
        self.arch = arch
        self.num_classes = [int(c) for c in num_classes]
        self.num_scenes = int(num_scenes)

        trunk = getattr(torchvision.models, arch)(weights=None)
        self.feature_dim = trunk.fc.in_features
        trunk.fc = nn.Identity()  # the trunk ends in global average pooling + flatten
        self.trunk = trunk
        self.geo_heads = nn.ModuleList(nn.Linear(self.feature_dim, c) for c in self.num_classes)
        self.scene_head = nn.Linear(self.feature_dim, self.num_scenes) if self.num_scenes else None

        pretrained = pretrained or "none"
        if pretrained == "imagenet":
            self.load_trunk(_imagenet_state_dict(arch), source=f"ImageNet {arch}")
        elif pretrained != "none":
            self.load_trunk(_local_state_dict(pretrained), source=pretrained)

    def load_trunk(self, state: dict, source: str = "weights") -> None:
        """Load backbone weights (torchvision layout, or trunk.* from a geocell model); heads stay fresh
        unless their shapes match (a geocell checkpoint with the same partitionings)."""
        state = strip_wrapper_prefixes(state)
        own = self.state_dict()
        mapped = {}
        for key, value in state.items():
            if key.startswith("fc."):
                continue  # the ImageNet classifier has no use here
            target = key if key in own else f"trunk.{key}"
            if target in own and own[target].shape == value.shape:
                mapped[target] = value
        trunk_keys = [k for k in own if k.startswith("trunk.")]
        missing = [k for k in trunk_keys if k not in mapped]
        if missing:
            raise PretrainedWeightsError(
                f"{source} does not fit a {self.arch} trunk: {len(missing)} of {len(trunk_keys)} "
                f"tensors missing or of another shape (first: {missing[0]})"
            )
        self.load_state_dict(mapped, strict=False)

    def forward(self, x: torch.Tensor):
        geo, scene, _ = self.forward_with_features(x)
        return geo, scene

    def forward_with_features(self, x: torch.Tensor):
        """(geo logits, scene logits or None, the trunk's pooled features (B, feature_dim)):
        the penultimate layer, which retrieval L2-normalises into embeddings."""
        feats = self.trunk(x)
        geo = [head(feats) for head in self.geo_heads]
        scene = self.scene_head(feats) if self.scene_head is not None else None
        return geo, scene, feats
