"""The checkpoint arguments of the commands that load a Geolocator (evaluate, predict, serve)
and the step that loads it or says why not."""

from __future__ import annotations

import argparse
import sys

CHECKPOINT_HELP = "a geocell checkpoint (.pt)"
INDEX_HELP = "retrieval index of training photos (default: <checkpoint stem>.retrieval.npz when present)"


def add_checkpoint_arguments(parser: argparse.ArgumentParser, *, checkpoint_help: str = CHECKPOINT_HELP,
                             index_help: str = INDEX_HELP) -> None:
    """--checkpoint, --index, --no-retrieval and --device, as Geolocator.from_checkpoint takes them."""
    parser.add_argument("--checkpoint", required=True, help=checkpoint_help)
    parser.add_argument("--index", metavar="NPZ", help=index_help)
    parser.add_argument("--no-retrieval", action="store_true",
                        help="the cells alone, even when an index is present")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")


def load_geolocator(args: argparse.Namespace, command: str):
    """The Geolocator of ``args.checkpoint`` (with its index unless --no-retrieval), its notes
    printed; None after one line saying why it cannot be loaded (the caller exits with 1)."""
    from geocell.infer.predict import Geolocator

    try:
        geo = Geolocator.from_checkpoint(args.checkpoint, device=args.device, index=args.index,
                                         retrieval=not args.no_retrieval)
    except Exception as exc:  # unreadable, unsafe or incompatible file: say which and why
        print(f"geocell {command}: cannot load {args.checkpoint}: {exc}", file=sys.stderr)
        return None
    for note in geo.notes:
        print(f"geocell {command}: {note}", file=sys.stderr)
    return geo
