"""``geocell scenes``: train the scene helper network, label a GPS manifest with it (the work:
:mod:`geocell.training.scenes`)."""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from geocell.data.dataset import read_dataset
from geocell.data.manifest import write_manifest
from geocell.model.checkpoint import CheckpointError, load_checkpoint
from geocell.model.network import ARCHS, PretrainedWeightsError
from geocell.training import engine, scenes
from geocell.training.scenes import (HELPER, HelperOptions, apply_labels, helper_from_checkpoint, label_images,
                                     save_helper, scene_splits, train_helper)


def _options(args) -> HelperOptions:
    """The options of either command (``label`` has no training flags: the defaults stand in)."""
    return HelperOptions(arch=getattr(args, "arch", HELPER.arch), epochs=getattr(args, "epochs", HELPER.epochs),
                         lr=getattr(args, "lr", HELPER.lr), image_size=args.image_size, batch_size=args.batch_size,
                         backend=args.backend, workers=args.workers, seed=args.seed,
                         pretrained=getattr(args, "pretrained", HELPER.pretrained), progress=not args.no_progress)


def cmd_train(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = engine.pick_device(args.device)
    full = read_dataset(args.manifest, image_root=args.image_root)
    labelled = full.subset(full.scene >= 0)
    if len(labelled) == 0 or not full.scene_names:
        print(f"geocell scenes train: {args.manifest} has no scene-labelled rows", file=sys.stderr)
        return 2
    val = read_dataset(args.val_manifest, image_root=args.image_root) if args.val_manifest else None
    train_set, val_set = scene_splits(labelled, val, args.val_fraction, args.seed)
    names = list(full.scene_names)
    options = _options(args)
    try:
        model, _ = train_helper(train_set, val_set, names, options, device, log=lambda m: print(m, flush=True))
    except (PretrainedWeightsError, ValueError) as exc:  # weights that do not fit; no full batch
        print(f"geocell scenes train: {exc}", file=sys.stderr)
        return 2
    save_helper(args.output, model, names, options)
    print(f"wrote {args.output}")
    return 0


def cmd_label(args) -> int:
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
    model = helper_from_checkpoint(ckpt, device)
    manifest = read_dataset(args.manifest, image_root=args.image_root)
    if manifest.scene_names and list(manifest.scene_names) != names and (manifest.scene >= 0).any():
        print(f"geocell scenes label: the manifest's scenes {manifest.scene_names} differ from the "
              f"checkpoint's {names}", file=sys.stderr)
        return 2
    args.image_size = args.image_size or int(ckpt["preprocess"]["image_size"])
    probs = label_images(model, manifest, _options(args), device)
    unlabelled = manifest.scene < 0
    replace = np.ones(len(manifest), bool) if args.overwrite else unlabelled
    manifest, predicted = apply_labels(manifest, probs, names, replace)
    write_manifest(manifest, args.output)
    failed = int(np.isnan(probs).any(axis=1).sum())
    print(f"labelled {int((replace & (predicted >= 0)).sum())} of {len(manifest)} images "
          f"({int(unlabelled.sum())} had no scene label"
          + (f"; {failed} could not be read" if failed else "") + f") -> {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="geocell scenes", description=scenes.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the scene-only network on scene-labelled images")
    t.add_argument("--manifest", required=True, help="manifest with a scene column (rows without one are ignored)")
    t.add_argument("--val-manifest", help="validation manifest (default: the manifest's 'val' split, else a random "
                                          "--val-fraction of the labelled rows)")
    t.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of the labelled rows held out for validation (default 0.1)")
    t.add_argument("--arch", default=HELPER.arch, choices=ARCHS, help=f"network (default {HELPER.arch})")
    t.add_argument("--pretrained", default="none", help="none | imagenet | PATH")
    t.add_argument("--epochs", type=int, default=HELPER.epochs, help=f"default {HELPER.epochs}")
    t.add_argument("--lr", type=float, default=HELPER.lr,
                   help=f"SGD learning rate, cosine schedule after a {HELPER.warmup_epochs:g}-epoch warm-up "
                        f"(default {HELPER.lr:g})")
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
        p.add_argument("--image-size", type=int, default=None if p is la else HELPER.image_size,
                       help=f"input size (default {HELPER.image_size}; label: the checkpoint's)")
        p.add_argument("--batch-size", type=int, default=HELPER.batch_size, help=f"default {HELPER.batch_size}")
        p.add_argument("--workers", type=int, default=HELPER.workers,
                       help=f"loader processes (default {HELPER.workers})")
        p.add_argument("--backend", default="auto", choices=["auto", "dali", "torch"],
                       help="image loader (default auto: DALI when installed)")
        p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
        p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return cmd_train(args) if args.command == "train" else cmd_label(args)
