"""``geocell scenes``: the scene helper network.

A scene-only network is trained on scene-labelled images (``train``) and then labels the images
of a GPS dataset that have no scene label (``label``): the argmax becomes the scene column and the
probabilities the ``scene_prob_<name>`` columns of the written manifest. The multitask network then
trains on that manifest.

    geocell scenes train --manifest scenes.csv -o scene.pt
    geocell scenes label --checkpoint scene.pt --manifest gps.csv -o labelled.csv
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

from geocell._internal.torch_util import autocast_context
from geocell.loading.preprocess import Preprocess
from geocell.training import engine
from geocell.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from geocell.training.losses import MultitaskLoss
from geocell.training.model import GeoModel, PretrainedWeightsError
from geocell.training.state import TrainState


def _labels(manifest):
    from geocell.loading.labels import LabelTable

    return LabelTable.from_manifest(manifest, [])  # no partitionings: scene targets only


def _loader(manifest, args, train, device):
    from geocell.loading.base import make_loader

    return make_loader(manifest, _labels(manifest), train=train, batch_size=args.batch_size,
                       image_size=args.image_size, backend=args.backend, device=device,
                       num_workers=args.workers, seed=args.seed)


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


def cmd_train(args) -> int:
    from geocell.data.manifest import read_manifest

    engine.seed_everything(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = engine.pick_device(args.device)
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    full = read_manifest(args.manifest, image_root=args.image_root)
    labelled = full.subset(full.scene >= 0)
    if len(labelled) == 0 or not full.scene_names:
        print(f"geocell scenes train: {args.manifest} has no scene-labelled rows", file=sys.stderr)
        return 2
    if args.val_manifest:
        train_set, val_set = labelled, read_manifest(args.val_manifest, image_root=args.image_root)
    else:
        order = np.random.default_rng(args.seed).permutation(len(labelled))
        n_val = max(1, int(round(args.val_fraction * len(labelled)))) if len(labelled) > 1 else 0
        val_set, train_set = labelled.subset(np.sort(order[:n_val])), labelled.subset(np.sort(order[n_val:]))
    names = list(full.scene_names)
    try:
        model = GeoModel(args.arch, [], len(names), pretrained=args.pretrained).to(device)
    except PretrainedWeightsError as exc:
        print(f"geocell scenes train: {exc}", file=sys.stderr)
        return 2
    train_loader = _loader(train_set, args, True, device)
    steps = len(train_loader)
    if steps == 0:
        print(f"geocell scenes train: {len(train_set)} images give no batch of {args.batch_size}", file=sys.stderr)
        return 2
    criterion = MultitaskLoss(scene_weight=1.0)
    optimizer = engine.build_optimizer(model, args.lr, 0.9, 1e-4)
    scheduler = engine.build_scheduler(optimizer, engine.LRSchedule("cosine", steps, args.epochs, warmup_epochs=0.3))
    state = TrainState(optimizer, scheduler)
    options = engine.EpochOptions(steps=steps, amp_dtype=amp_dtype, log_every=0, show_progress=not args.no_progress)
    info = engine.DistInfo(device=device)
    val_loader = _loader(val_set, args, False, device) if len(val_set) else None
    for epoch in range(args.epochs):
        train_loader.set_epoch(epoch)
        state.epoch, state.step_in_epoch = epoch, 0
        t0 = time.perf_counter()
        means, _ = engine.train_one_epoch(model, criterion, train_loader, state, info, options)
        msg = f"epoch {epoch + 1}/{args.epochs}: loss {means.get('loss', float('nan')):.3f} ({time.perf_counter() - t0:.0f} s)"
        if val_loader is not None:
            probs = scene_probabilities(model, val_loader, len(val_set), device, amp_dtype)
            ok = ~np.isnan(probs).any(axis=1) & (val_set.scene >= 0)
            acc = float((probs[ok].argmax(axis=1) == val_set.scene[ok]).mean()) if ok.any() else float("nan")
            msg += f", validation scene accuracy {100 * acc:.1f}% ({int(ok.sum())} images)"
        print(msg, flush=True)
    save_checkpoint(args.output, arch=args.arch, model=model.state_dict(), num_classes=[],
                    scene_names=names, partitions=[],
                    preprocess=Preprocess(args.image_size).to_dict())
    print(f"wrote {args.output}")
    return 0


def cmd_label(args) -> int:
    from geocell.data.manifest import read_manifest, write_manifest

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        ckpt = load_checkpoint(args.checkpoint)
    except CheckpointError as exc:
        print(f"geocell scenes label: {exc}", file=sys.stderr)
        return 2
    names = list(ckpt.get("scene_names") or [])
    if not names:
        print(f"geocell scenes label: {args.checkpoint} has no scene head", file=sys.stderr)
        return 2
    device = engine.pick_device(args.device)
    model = GeoModel(ckpt["arch"], ckpt["num_classes"], len(names))
    model.load_state_dict(ckpt["model"])
    model.to(device)
    manifest = read_manifest(args.manifest, image_root=args.image_root)
    if manifest.scene_names and list(manifest.scene_names) != names and (manifest.scene >= 0).any():
        print(f"geocell scenes label: the manifest's scenes {manifest.scene_names} differ from the "
              f"checkpoint's {names}", file=sys.stderr)
        return 2
    args.image_size = args.image_size or int(ckpt["preprocess"]["image_size"])
    loader = _loader(manifest, args, False, device)
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    probs = scene_probabilities(model, loader, len(manifest), device, amp_dtype)
    predicted = np.where(np.isnan(probs).any(axis=1), -1, np.nan_to_num(probs, nan=-1.0).argmax(axis=1))
    unlabelled = manifest.scene < 0
    replace = np.ones(len(manifest), bool) if args.overwrite else unlabelled
    manifest.scene = np.where(replace, predicted, manifest.scene).astype(np.int64)
    manifest.scene_names = names
    manifest.scene_probs = probs
    write_manifest(manifest, args.output)
    failed = int(np.isnan(probs).any(axis=1).sum())
    print(f"labelled {int((replace & (predicted >= 0)).sum())} of {len(manifest)} images "
          f"({int(unlabelled.sum())} had no scene label"
          + (f"; {failed} could not be read" if failed else "") + f") -> {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="geocell scenes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the scene-only network on scene-labelled images")
    t.add_argument("--manifest", required=True, help="manifest with a scene column (rows without one are ignored)")
    t.add_argument("--val-manifest", help="validation manifest (default: a random 10%% of the labelled rows)")
    t.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of the labelled rows held out for validation (default 0.1)")
    t.add_argument("--arch", default="resnet18", choices=["resnet18", "resnet50", "resnet101"],
                   help="network (default resnet18)")
    t.add_argument("--pretrained", default="none", help="none | imagenet | PATH")
    t.add_argument("--epochs", type=int, default=5, help="default 5")
    # 0.05 (the geo network's rate, made for a batch of several heads) diverged on a three-class
    # scene set from random init: loss above ln 3 after an epoch, one class predicted everywhere.
    t.add_argument("--lr", type=float, default=0.01,
                   help="SGD learning rate, cosine schedule after a 0.3-epoch warm-up (default 0.01)")
    t.add_argument("--seed", type=int, default=0, help="validation draw, initialisation and augmentation")
    t.add_argument("-o", "--output", required=True, help="checkpoint to write (scene.pt)")
    la = sub.add_parser("label", help="label a GPS manifest's images with scene probabilities")
    la.add_argument("--checkpoint", required=True, help="scene network from 'geocell scenes train'")
    la.add_argument("--manifest", required=True)
    la.add_argument("-o", "--output", required=True, help="manifest to write (plain layout + scene_prob_<name>)")
    la.add_argument("--overwrite", action="store_true", help="replace existing scene labels too")
    la.set_defaults(seed=0)
    for p in (t, la):
        p.add_argument("--image-root")
        p.add_argument("--image-size", type=int, default=None if p is la else 96,
                       help="input size (label: default the checkpoint's)")
        p.add_argument("--batch-size", type=int, default=64, help="default 64")
        p.add_argument("--workers", type=int, default=2, help="loader processes (default 2)")
        p.add_argument("--backend", default="auto", choices=["auto", "dali", "torch"],
                       help="image loader (default auto: DALI when installed)")
        p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
        p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return cmd_train(args) if args.command == "train" else cmd_label(args)


if __name__ == "__main__":
    sys.exit(main())
