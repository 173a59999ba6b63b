"""How an image becomes the network's input: one description, used by both loaders, by the
scene helper, by :class:`geocell.Geolocator` and stored in every checkpoint.

Evaluation: the shorter side resized to ``resize_size`` (antialiased bilinear), then the
centre ``image_size`` square, normalized with ``mean``/``std`` (ImageNet's by default).
Every path first turns the photo upright by its EXIF Orientation (``orientation``, the rule of
``geocell.data.images``). Training: a random-resized crop (area fraction in ``crop_scale``, aspect ratio in ``crop_ratio``)
and a horizontal flip with probability ``hflip``, drawn per sample by the loaders. ImageNet's crop
(0.08-1 of the area) can keep a tenth of a photo's context; the 2018 geolocation recipe kept
0.66-1. A mirror turns a place into one that exists nowhere, which matters for imagery whose
geography is the signal (maps, satellite patches), less for street photos.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TensorFlow's EfficientNet-Lite models were trained on (pixel - 127) / 128, about [-1, 1]
TF_LITE_MEAN = (127 / 255,) * 3
TF_LITE_STD = (128 / 255,) * 3
SCALE = (0.08, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)


def default_resize_size(image_size: int) -> int:
    """The evaluation resize of an ``image_size`` crop: the ImageNet 256/224 rule."""
    return int(round(int(image_size) * 256 / 224))


@dataclass(frozen=True)
class Preprocess:
    image_size: int = 224
    resize_size: int = 0  # 0: default_resize_size(image_size)
    mean: tuple = field(default=IMAGENET_MEAN)
    std: tuple = field(default=IMAGENET_STD)
    crop_scale: tuple = field(default=SCALE)   # training crop: area fraction range
    crop_ratio: tuple = field(default=RATIO)   # training crop: aspect ratio range
    hflip: float = 0.5                         # training: probability of a horizontal mirror
    orientation: str = "exif"                  # EXIF Orientation applied (geocell.data.images)

    def __post_init__(self):
        if int(self.image_size) <= 0:
            raise ValueError(f"preprocess: image_size must be positive, got {self.image_size}")
        resize = int(self.resize_size) or default_resize_size(self.image_size)
        if resize < int(self.image_size):
            raise ValueError(f"preprocess: resize_size {resize} is smaller than image_size {self.image_size}")
        mean, std = tuple(float(v) for v in self.mean), tuple(float(v) for v in self.std)
        if len(mean) != 3 or len(std) != 3 or not all(0 < s < 10 for s in std) or not all(-10 < m < 10 for m in mean):
            raise ValueError(f"preprocess: mean and std need three sane values each, got {mean} and {std}")
        scale, ratio = tuple(float(v) for v in self.crop_scale), tuple(float(v) for v in self.crop_ratio)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"preprocess: crop_scale must be (lo, hi) with 0 < lo <= hi <= 1, got {scale}")
        if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"preprocess: crop_ratio must be (lo, hi) with 0 < lo <= hi, got {ratio}")
        from geocell.data.images import ORIENTATION

        if self.orientation != ORIENTATION:
            raise ValueError(f"preprocess: orientation {self.orientation!r} is not this geocell's rule "
                             f"({ORIENTATION!r}: the EXIF Orientation tag is applied)")
        if not 0.0 <= float(self.hflip) <= 1.0:
            raise ValueError(f"preprocess: hflip is a probability in [0, 1], got {self.hflip}")
        object.__setattr__(self, "crop_scale", scale)
        object.__setattr__(self, "crop_ratio", ratio)
        object.__setattr__(self, "hflip", float(self.hflip))
        object.__setattr__(self, "image_size", int(self.image_size))
        object.__setattr__(self, "resize_size", resize)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    def to_dict(self) -> dict:
        return {"image_size": self.image_size, "resize_size": self.resize_size,
                "mean": list(self.mean), "std": list(self.std), "crop_scale": list(self.crop_scale),
                "crop_ratio": list(self.crop_ratio), "hflip": self.hflip,
                "orientation": self.orientation}

    @classmethod
    def from_dict(cls, d: dict | None) -> "Preprocess":
        d = dict(d or {})
        # checkpoints written before the training-crop fields were stored lack them: defaults
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"preprocess: unknown fields {sorted(unknown)}")
        return cls(**d)

    def eval_crop(self, image):
        """uint8 (3, H, W) tensor -> uint8 (3, S, S): the evaluation resize and centre crop
        (the torch loader's, and the reference the DALI loader's kernel is tested against)."""
        import torchvision.transforms.v2.functional as F

        image = F.resize(self._check_resize(image), [self.resize_size], antialias=True)
        return F.center_crop(image, [self.image_size, self.image_size])

    def _check_resize(self, image):
        from geocell.data.images import check_resized

        check_resized(image.shape[-1], image.shape[-2], self.resize_size)
        return image

    def five_crops(self, image):
        """uint8 (3, H, W) -> uint8 (5, 3, S, S): the four corner crops and the centre crop of the
        resized image (test-time augmentation)."""
        import torch
        import torchvision.transforms.v2.functional as F

        image = F.resize(self._check_resize(image), [self.resize_size], antialias=True)
        return torch.stack(list(F.five_crop(image, [self.image_size, self.image_size])))

    def normalize(self, images_uint8):
        """uint8 (..., 3, H, W) tensor -> float32, normalized with mean/std."""
        import torch

        shape = (3, 1, 1)
        mean = torch.tensor([m * 255 for m in self.mean], dtype=torch.float32, device=images_uint8.device).view(shape)
        std = torch.tensor([s * 255 for s in self.std], dtype=torch.float32, device=images_uint8.device).view(shape)
        return (images_uint8.float() - mean) / std
