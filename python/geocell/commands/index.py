"""``geocell index build``: a retrieval index of a manifest's photos for a checkpoint, with the
hybrid optionally fitted on held-out rows (the work: :mod:`geocell.infer.retrieval`)."""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from geocell.data.dataset import read_dataset
from geocell.infer.fitting import describe_fit
from geocell.infer.fitting import fit_on_manifest
from geocell.infer.retrieval import FLAT_BUDGET_BYTES, RetrievalIndex, embed_paths, select_split
from geocell.model.checkpoint import checkpoint_fingerprint, load_checkpoint, model_from_checkpoint
from geocell.model.records import HybridFit


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="geocell index",
        description="Retrieval indexes: embeddings of photos by a checkpoint's trunk, with their locations.")
    sub = ap.add_subparsers(dest="action", required=True)
    b = sub.add_parser("build", help="embed a manifest's photos into an index for a checkpoint",
                       description="Embed the photos of a manifest with a checkpoint's trunk "
                                   "(penultimate layer, L2-normalised) into a retrieval index. "
                                   "Name it <checkpoint stem>.retrieval.npz to have predict, evaluate "
                                   "and serve use it without --index.")
    b.add_argument("--checkpoint", required=True, help="the geocell checkpoint whose trunk embeds the photos")
    b.add_argument("--manifest", required=True, help="the photos to index (path,lat,lng CSV, GeoEstimation "
                                                       "metadata, or a packed shard folder)")
    b.add_argument("-o", "--output", required=True, help="the index file (.npz)")
    b.add_argument("--image-root", help="folder the manifest's image paths are relative to")
    b.add_argument("--split", help="index only rows of this split (default: 'train' when the manifest "
                                   "has a split column with training rows, else every row)")
    b.add_argument("--fit-split", metavar="SPLIT",
                   help="fit the hybrid on these held-out rows of the manifest (e.g. val) and store the fit "
                        "in the index (needs a calibrated checkpoint); default: the checkpoint's own fit")
    b.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                   help="how the embeddings are stored (default: %(default)s)")
    b.add_argument("--batch-size", type=int, default=64)
    b.add_argument("--workers", type=int, default=2, help="decoding worker processes (default: %(default)s)")
    b.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        ckpt = load_checkpoint(args.checkpoint)
        model, partitions, hierarchy = model_from_checkpoint(ckpt)
        manifest = read_dataset(args.manifest, image_root=args.image_root)
        split = args.split
        if split is None and manifest.split is not None and (np.asarray(manifest.split) == "train").any():
            split = "train"
        rows = select_split(manifest, split, "--split") if split is not None else manifest
        held_out = select_split(manifest, args.fit_split, "--fit-split") if args.fit_split else None
    except (OSError, ValueError) as exc:
        print(f"geocell index: {exc}", file=sys.stderr)
        return 1
    if len(rows) == 0:
        print("geocell index: no usable rows in the manifest", file=sys.stderr)
        return 1
    progress = not args.no_progress and sys.stderr.isatty()
    emb, read, skipped = embed_paths(model, ckpt.get("preprocess"), rows.paths, device=device,
                                     batch_size=args.batch_size, num_workers=args.workers, progress=progress)
    for path, reason in skipped:
        print(f"geocell index: skipped {path}: {reason}", file=sys.stderr)
    if len(read) == 0:
        print("geocell index: no image could be read", file=sys.stderr)
        return 1
    index = RetrievalIndex(emb.astype(args.dtype), rows.lat[read], rows.lng[read], checkpoint_fingerprint(ckpt),
                           source=f"{os.path.basename(args.manifest)}" + (f", split {split}" if split else ""))
    if held_out is not None:
        try:
            index.fit = fit_on_manifest(model, ckpt, partitions, hierarchy, index, held_out, device=device,
                                        batch_size=args.batch_size, num_workers=args.workers, progress=progress,
                                        name=f"{os.path.basename(args.manifest)}, split {args.fit_split}")
        except (ValueError, FloatingPointError) as exc:
            print(f"geocell index: cannot fit the hybrid: {exc}", file=sys.stderr)
            return 1
        print(f"hybrid fitted on {args.fit_split}: {describe_fit(HybridFit.from_dict(index.fit))}; its credible regions refitted on "
              f"the same {len(index.fit['region_scores'])} images")
    index.save(args.output)
    print(f"wrote {args.output}: {len(index)} photos, {index.dim}-d {args.dtype} embeddings "
          f"(searched {'exactly' if len(index) * index.dim * 4 <= FLAT_BUDGET_BYTES else 'by IVF-PQ'})"
          + (f"; {len(skipped)} unreadable skipped" if skipped else ""))
    return 0
