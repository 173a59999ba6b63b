"""``geocell data``: build manifests and datasets.

    geocell data from-exif DIR -o manifest.csv
    geocell data pack manifest.csv -o shards/ [--shorter-side 320] [--max-side N] [--workers 2]
    geocell data pack --from-msgpack DIR --metadata META.csv -o shards/
    geocell data download URLS.csv -o shards/ [--metadata META.csv] [--threads 4]
    geocell data earth -o DIR [--n 18000] [--scenes 3600] [--far 1500] [--land 5000] [--size 128] [--seed 0] [--locations FILE]
"""

from __future__ import annotations

import argparse
import sys

from geocell.data.earth import (DEFAULT_N, DEFAULT_N_FAR, DEFAULT_N_LAND, DEFAULT_N_SCENES, LAND_BUFFER_KM, SPLIT_RULES,
                                default_far, default_land)


def _from_exif(args) -> int:
    import PIL  # noqa: F401  (a photo that fails is skipped and counted; a missing Pillow must not be)

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
    import PIL  # noqa: F401  (as in _from_exif)

    from geocell.data.dataset import read_dataset
    from geocell.data.shards import pack

    if args.from_msgpack:
        return _pack_msgpack(args)
    if args.manifest is None or args.metadata:
        raise ValueError("give a manifest, or --from-msgpack DIR with --metadata META.csv")
    manifest = read_dataset(args.manifest, image_root=args.image_root)
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


def _pack_msgpack(args) -> int:
    from geocell.data.msgpack_import import pack_msgpack

    if args.manifest is not None or not args.metadata:
        raise ValueError("--from-msgpack DIR takes --metadata META.csv (IMG_ID,LAT,LON,...) "
                         "and no manifest")
    summary = pack_msgpack(args.from_msgpack, args.metadata, args.output,
                           shard_size=args.shard_size, shorter_side=args.shorter_side or None,
                           max_side=args.max_side, quality=args.quality, workers=args.workers,
                           progress=not args.quiet)
    print(f"{summary['records']} records read; {summary['count']} images packed into "
          f"{len(summary['shards'])} shards in {args.output}; {summary['skipped']} broken images "
          f"(listed in {args.output}/pack_report.csv)")
    unmatched = summary["unmatched"]
    if unmatched:
        print(f"{sum(unmatched.values())} records not packed (listed in {summary['report']}):")
        for reason, n in sorted(unmatched.items(), key=lambda kv: (-kv[1], kv[0])):
            print(f"  {n:8d}  {reason}")
    return 0 if summary["count"] else 1


def _download(args) -> int:
    from geocell.data.download import download, format_summary

    try:
        summary = download(args.urls, args.output, metadata=args.metadata,
                           url_column=args.url_column, id_column=args.id_column,
                           shorter_side=args.shorter_side or None, max_side=args.max_side,
                           quality=args.quality, shard_size=args.shard_size,
                           processes=args.processes, threads=args.threads, timeout=args.timeout,
                           retries=args.retries, distributor=args.distributor,
                           urls_per_staging_shard=args.urls_per_staging_shard,
                           flickr_size=args.flickr_size, workers=args.workers,
                           progress=not args.quiet)
    except KeyboardInterrupt:
        print("geocell data download: interrupted; run the same command again to resume",
              file=sys.stderr)
        return 130
    print(format_summary(summary))
    return 0 if summary["packed"] else 1


def _earth(args) -> int:
    from geocell.data.earth import build_earth, scene_dataset_path

    n_far = default_far(args.n) if args.far is None else args.far
    n_land = default_land(args.n) if args.land is None else args.land
    path = build_earth(args.output, n=args.n, size=args.size, seed=args.seed, split_rule=args.split,
                       locations=args.locations, progress=not args.quiet, workers=args.workers,
                       n_scenes=0 if args.locations else args.scenes, n_far=0 if args.locations else n_far,
                       n_land=0 if args.locations else n_land)
    scenes = scene_dataset_path(args.output)
    print(f"Earth dataset written: {path}" + (f" (scene dataset for the scene helper: {scenes})" if scenes else ""))
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

    p = sub.add_parser("pack", help="WebDataset tar shards (+ DALI index files) from a manifest "
                                    "or GeoEstimation's msgpack shards")
    p.add_argument("manifest", nargs="?", default=None)
    p.add_argument("--from-msgpack", metavar="DIR", default=None,
                   help="GeoEstimation's msgpack shards (shard_N.msg) instead of a manifest")
    p.add_argument("--metadata", default=None,
                   help="with --from-msgpack: the metadata CSV (IMG_ID,LAT,LON[,S3_Label,...])")
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

    p = sub.add_parser("download", help="download photos from a URL list (img2dataset) into shards")
    p.add_argument("urls", help="CSV: url + lat/lng columns, or GeoEstimation's image_id,url list")
    p.add_argument("-o", "--output", required=True, help="folder for the shards (resumable)")
    p.add_argument("--metadata", default=None,
                   help="metadata CSV joined on the id (IMG_ID,LAT,LON[,S3_Label,...])")
    p.add_argument("--url-column", default=None, help="URL column (default: url)")
    p.add_argument("--id-column", default=None, help="id column (default: image_id, id, ...)")
    p.add_argument("--shorter-side", type=int, default=320, help="shorter side at most this (0: keep)")
    p.add_argument("--max-side", type=int, default=None, help="longer side at most this")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of resized photos")
    p.add_argument("--shard-size", type=int, default=5000, help="images per shard")
    p.add_argument("--processes", type=int, default=1, help="download processes (default 1)")
    p.add_argument("--threads", type=int, default=4,
                   help="connections per process (default 4: polite to one host)")
    p.add_argument("--timeout", type=float, default=10, help="seconds per request")
    p.add_argument("--retries", type=int, default=0, help="retries of a failed request")
    p.add_argument("--distributor", choices=("multiprocessing", "pyspark", "ray"),
                   default="multiprocessing", help="img2dataset's distributor (default multiprocessing)")
    p.add_argument("--urls-per-staging-shard", type=int, default=1000,
                   help="URLs per img2dataset shard: the unit a resumed run redoes")
    p.add_argument("--flickr-size", default="",
                   help="Flickr size suffix for staticflickr URLs (z: 640 px, as GeoEstimation)")
    p.add_argument("--workers", type=int, default=2, help="packing processes")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_download)

    p = sub.add_parser("earth", help="the built-in Earth dataset (Blue Marble patches at MP-16 locations)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--n", type=int, default=DEFAULT_N, help=f"patches (default {DEFAULT_N}; default locations only)")
    p.add_argument("--scenes", type=int, default=DEFAULT_N_SCENES,
                   help=f"patches of the scene dataset beside it, for the scene helper (default {DEFAULT_N_SCENES}; "
                        "0: none; default locations only)")
    p.add_argument("--far", type=int, default=None,
                   help=f"far places added to val and test: drawn over the land, away from every training photo "
                        f"(default: {DEFAULT_N_FAR} for {DEFAULT_N} patches, as many per patch otherwise; 0: none; "
                        "default locations only)")
    p.add_argument("--land", type=int, default=None,
                   help=f"land places added to train: drawn over the land, at least {LAND_BUFFER_KM:g} km from every val/test place "
                        f"(default: {DEFAULT_N_LAND} for {DEFAULT_N} patches, as many per patch otherwise; 0: none; "
                        "default locations only)")
    p.add_argument("--size", type=int, default=128, help="patch size in pixels")
    p.add_argument("--seed", type=int, default=0, help="seed of the locations and the split (default 0)")
    p.add_argument("--split", choices=SPLIT_RULES, default="held-out",
                   help="val/test: places never seen in training, from 15 to 1,000 km away blocks (default), "
                        "'remote' (1,000 km blocks, no patch overlapping a training one) or a random draw")
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

