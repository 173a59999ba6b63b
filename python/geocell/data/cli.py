"""``geocell data``: build manifests and datasets.

    geocell data from-exif DIR -o manifest.csv
    geocell data pack manifest.csv -o shards/ [--shorter-side 320] [--max-side N] [--workers 2]
    geocell data earth -o DIR [--n 20000] [--size 128] [--seed 0] [--locations FILE]
"""

from __future__ import annotations

import argparse
import sys


def _from_exif(args) -> int:
    from geocell.data.exif import manifest_from_exif

    manifest, skipped = manifest_from_exif(args.folder, args.output, progress=not args.quiet)
    print(f"{len(manifest)} photos with GPS written to {args.output}; {len(skipped)} skipped")
    reasons: dict = {}
    for path, why in skipped:
        key = "no GPS" if "GPS" in why else why.split(":")[0]
        reasons[key] = reasons.get(key, 0) + 1
    for key, count in sorted(reasons.items()):
        print(f"  {count:6d}  {key}")
    for path, why in skipped[: args.show]:
        print(f"  {path}: {why}")
    if len(skipped) > args.show:
        print(f"  ... ({len(skipped) - args.show} more)")
    return 0 if len(manifest) else 1


def _pack(args) -> int:
    from geocell.data.manifest import read_manifest
    from geocell.data.shards import pack

    manifest = read_manifest(args.manifest, image_root=args.image_root)
    if manifest.report:
        print(manifest.format_report(limit=args.show), file=sys.stderr)
    summary = pack(manifest, args.output, shard_size=args.shard_size,
                   shorter_side=args.shorter_side or None, max_side=args.max_side,
                   quality=args.quality, workers=args.workers, progress=not args.quiet)
    print(f"{summary['count']} images packed into {len(summary['shards'])} shards in {args.output}; "
          f"{summary['skipped']} skipped (listed in {args.output}/pack_report.csv)")
    for row, path, why in summary["skipped_rows"][: args.show]:
        print(f"  row {row}: {path}: {why}")
    return 0 if summary["count"] else 1


def _earth(args) -> int:
    from geocell.data.earth import build_earth

    path = build_earth(args.output, n=args.n, size=args.size, seed=args.seed, split_rule=args.split,
                       locations=args.locations, progress=not args.quiet, workers=args.workers)
    print(f"Earth dataset written: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="geocell data", description="Build datasets for geocell training.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("from-exif", help="manifest from the EXIF GPS of a folder of photos")
    p.add_argument("folder")
    p.add_argument("-o", "--output", required=True, help="manifest CSV to write")
    p.add_argument("--show", type=int, default=20, help="skipped files to list")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_from_exif)

    p = sub.add_parser("pack", help="WebDataset tar shards (+ DALI index files) from a manifest")
    p.add_argument("manifest")
    p.add_argument("-o", "--output", required=True, help="folder for the shards")
    p.add_argument("--image-root", default=None, help="folder that relative image paths are under")
    p.add_argument("--shorter-side", type=int, default=320, help="shorter side at most this (0: keep)")
    p.add_argument("--max-side", type=int, default=None, help="longer side at most this")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    p.add_argument("--shard-size", type=int, default=5000, help="images per shard")
    p.add_argument("--workers", type=int, default=2, help="processes")
    p.add_argument("--show", type=int, default=20)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_pack)

    p = sub.add_parser("earth", help="the built-in Earth dataset (Blue Marble patches at MP-16 locations)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--n", type=int, default=20000, help="patches (default locations only)")
    p.add_argument("--size", type=int, default=128, help="patch size in pixels")
    p.add_argument("--seed", type=int, default=0, help="seed of the locations and the split (default 0)")
    p.add_argument("--split", choices=("held-out", "random"), default="held-out",
                   help="val/test: places never seen in training (default) or a random draw")
    p.add_argument("--locations", default=None, help="CSV with lat,lng[,split] columns")
    p.add_argument("--workers", type=int, default=None, help="processes (default: CPU count, at most 8)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_earth)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (OSError, ValueError) as e:
        print(f"geocell data {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
