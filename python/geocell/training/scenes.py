"""``geocell scenes``: the scene helper network.

A scene-only network is trained on scene-labelled images (``train``) and then labels the images
of a GPS dataset that have no scene label (``label``): the argmax becomes the scene column and the
probabilities the ``scene_prob_<name>`` columns of the written manifest. The multitask network then
trains on that manifest.

    geocell scenes train --manifest scenes.csv -o scene.pt
    geocell scenes label --checkpoint scene.pt --manifest gps.csv -o labelled.csv
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time

import numpy as np
import torch

from geocell._internal.torch_util import autocast_context
from geocell.loading.preprocess import Preprocess
from geocell.training import engine
from geocell.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from geocell.training.losses import MultitaskLoss
from geocell.model.network import GeoModel
from geocell.training.state import TrainState


def _labels(manifest):
    from geocell.loading.labels import LabelTable

    return LabelTable.from_manifest(manifest, [])  # no partitionings: scene targets only


def _loader(manifest, train: bool, options: "HelperOptions", device):
    from geocell.loading.loaders import make_loader

    return make_loader(manifest, _labels(manifest), train=train, batch_size=options.batch_size,
                       preprocess=options.preprocess, backend=options.backend, device=device,
                       num_workers=options.workers, seed=options.seed)


@torch.no_grad()
def scene_probabilities(model, loader, n_rows: int, device, amp_dtype=None) -> np.ndarray:
    """(n_rows, S) softmax probabilities by manifest row; NaN for rows the loader skipped."""
    model.eval()
    out = np.full((n_rows, model.num_scenes), np.nan, dtype=np.float64)
    for images, targets in loader:
        with autocast_context(device, amp_dtype):
            _, logits = model(images.to(device))
        out[targets["index"].cpu().numpy()] = torch.softmax(logits.float(), dim=1).cpu().numpy()
    return out


def scene_accuracy(probs: np.ndarray, truth: np.ndarray) -> tuple:
    """(share of rows whose argmax is the true scene, rows counted): rows that were read and
    have a true label."""
    ok = ~np.isnan(probs).any(axis=1) & (np.asarray(truth) >= 0)
    if not ok.any():
        return float("nan"), 0
    return float((probs[ok].argmax(axis=1) == np.asarray(truth)[ok]).mean()), int(ok.sum())


@dataclasses.dataclass
class HelperOptions:
    """How the scene helper trains and reads images (``geocell scenes train`` flags, and the main
    job's --helper-* settings)."""

    arch: str = "resnet18"
    epochs: int = 5
    # 0.05 (the geo network's rate, made for a batch of several heads) diverged on a three-class
    # scene set from random init: loss above ln 3 after an epoch, one class predicted everywhere.
    lr: float = 0.01
    warmup_epochs: float = 0.3
    image_size: int = 96
    batch_size: int = 64
    backend: str = "auto"
    workers: int = 2
    seed: int = 0
    pretrained: str = "none"
    progress: bool = True

    @property
    def preprocess(self) -> Preprocess:
        """The helper's one preprocessing (its loaders' and its checkpoint's): ``image_size``
        with the default crops, flip and normalisation."""
        return Preprocess(self.image_size)


def train_helper(train_set, val_set, names: list, options: HelperOptions, device, log=print):
    """The scene-only network trained on ``train_set``'s scene labels (SGD, cosine schedule after
    a warm-up); after each epoch its accuracy on ``val_set`` (if any rows) is logged. Returns
    (model, validation accuracy or NaN). Raises ValueError when the data gives no batch."""
    engine.seed_everything(options.seed)
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    model = GeoModel(options.arch, [], len(names), pretrained=options.pretrained).to(device)
    train_loader = _loader(train_set, True, options, device)
    steps = len(train_loader)
    if steps == 0:
        raise ValueError(f"{len(train_set)} scene images give no batch of {options.batch_size}")
    criterion = MultitaskLoss(scene_weight=1.0)
    optimizer = engine.build_optimizer(model, options.lr, 0.9, 1e-4)
    scheduler = engine.build_scheduler(optimizer, engine.LRSchedule("cosine", steps, options.epochs,
                                                                    warmup_epochs=options.warmup_epochs))
    state = TrainState(optimizer, scheduler)
    epoch_options = engine.EpochOptions(steps=steps, amp_dtype=amp_dtype, log_every=0, show_progress=options.progress)
    info = engine.DistInfo(device=device)
    val_loader = _loader(val_set, False, options, device) if val_set is not None and len(val_set) else None
    accuracy = float("nan")
    for epoch in range(options.epochs):
        train_loader.set_epoch(epoch)
        state.epoch, state.step_in_epoch = epoch, 0
        t0 = time.perf_counter()
        means, _ = engine.train_one_epoch(model, criterion, train_loader, state, info, epoch_options)
        msg = (f"scene helper epoch {epoch + 1}/{options.epochs}: loss {means.get('loss', float('nan')):.3f} "
               f"({time.perf_counter() - t0:.0f} s)")
        if val_loader is not None:
            probs = scene_probabilities(model, val_loader, len(val_set), device, amp_dtype)
            accuracy, counted = scene_accuracy(probs, val_set.scene)
            msg += f", validation scene accuracy {100 * accuracy:.1f}% ({counted} images)"
        log(msg)
    return model, accuracy


def label_images(model, manifest, options: HelperOptions, device) -> np.ndarray:
    """(N, S) scene probabilities of every image of ``manifest`` (NaN rows: unreadable images)."""
    loader = _loader(manifest, False, options, device)
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    return scene_probabilities(model, loader, len(manifest), device, amp_dtype)


def apply_labels(manifest, probs: np.ndarray, names: list, replace: np.ndarray):
    """``manifest`` with the argmax of ``probs`` as its scene where ``replace`` (and the image was
    read), the probabilities as its scene_prob columns."""
    predicted = np.where(np.isnan(probs).any(axis=1), -1, np.nan_to_num(probs, nan=-1.0).argmax(axis=1))
    out = manifest.subset(np.arange(len(manifest)))
    out.scene = np.where(replace, predicted, manifest.scene).astype(np.int64)
    out.scene_names = list(names)
    out.scene_probs = probs
    return out, predicted


HELPER = HelperOptions()


def save_helper(path, model, names: list, options: HelperOptions) -> None:
    save_checkpoint(path, arch=options.arch, model=model.state_dict(), num_classes=[], scene_names=list(names),
                    partitions=[], preprocess=options.preprocess.to_dict())


class HelperCache:
    """The scene helper of an earlier run, reused: its checkpoint and the scene probabilities it
    gave each GPS image, kept beside the scene dataset under ``.helper_cache/<key>``. The key
    covers everything the result depends on: the scene manifest's bytes, the helper's options
    (the number of loader workers aside: batches do not depend on it), the GPS images of each
    split with their locations, and the torch version."""

    def __init__(self, scene_manifest, options: HelperOptions, splits: dict):
        h = hashlib.sha256()
        with open(scene_manifest, "rb") as f:
            h.update(f.read())
        kept = {k: v for k, v in dataclasses.asdict(options).items() if k not in ("workers", "progress")}
        h.update(json.dumps(kept, sort_keys=True).encode())
        for name, m in splits.items():
            h.update(f"{name}:{len(m)}\n".encode())
            h.update("\n".join(map(str, m.paths)).encode("utf-8", "backslashreplace"))
            h.update(np.asarray(m.lat, np.float64).tobytes() + np.asarray(m.lng, np.float64).tobytes())
        h.update(torch.__version__.encode())
        self.splits = list(splits)
        self.folder = os.path.join(os.path.dirname(os.path.abspath(scene_manifest)), ".helper_cache",
                                   h.hexdigest()[:20])
        self.helper_path = os.path.join(self.folder, "scene_helper.pt")

    def load(self):
        """(probabilities by split, helper validation accuracy), or None when nothing usable is kept."""
        try:
            with np.load(os.path.join(self.folder, "probs.npz"), allow_pickle=False) as z:
                probs = {name: z[name] for name in self.splits}
                accuracy = float(z["accuracy"])
            load_checkpoint(self.helper_path)  # refuses a damaged or tampered file
        except (OSError, KeyError, ValueError, CheckpointError):
            return None
        return probs, accuracy

    def store(self, helper_checkpoint, probs: dict, accuracy: float) -> None:
        """Written whole or not at all (a folder renamed into place); a failure only costs the reuse."""
        parent, tmp = os.path.dirname(self.folder), None
        try:
            os.makedirs(parent, exist_ok=True)
            tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
            shutil.copyfile(helper_checkpoint, os.path.join(tmp, "scene_helper.pt"))
            np.savez(os.path.join(tmp, "probs.npz"), accuracy=np.float64(accuracy), **probs)
            os.replace(tmp, self.folder)
        except OSError:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)


def scene_splits(labelled, val_set, val_fraction: float, seed: int):
    """(training, validation) manifests of the scene helper from its scene-labelled rows:
    ``val_set`` when given, else the manifest's own validation split, else a random
    ``val_fraction`` of the rows (drawn from ``seed``)."""
    from geocell.data.splits import validation_rows

    if val_set is not None:
        return labelled, val_set
    in_val = validation_rows(labelled)
    if in_val.any() and not in_val.all():  # the manifest's own validation split
        return labelled.subset(~in_val), labelled.subset(in_val)
    order = np.random.default_rng(seed).permutation(len(labelled))
    n_val = max(1, int(round(val_fraction * len(labelled)))) if len(labelled) > 1 else 0
    return labelled.subset(np.sort(order[n_val:])), labelled.subset(np.sort(order[:n_val]))


def helper_from_checkpoint(ckpt: dict, device):
    """The scene network of a loaded helper checkpoint (one with scene names), on ``device``."""
    model = GeoModel(ckpt["arch"], ckpt["num_classes"], len(ckpt["scene_names"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device)
