"""``geocell serve``: a local web page and JSON API to locate photos with one checkpoint
(the app: :mod:`geocell.infer.serve`)."""

from __future__ import annotations

import argparse
import os
import sys

from geocell._internal.extras import missing_extra, needs_extra_message
from geocell.commands._checkpoint import add_checkpoint_arguments, load_geolocator
from geocell.infer.serve import LOCAL_HOSTS, app


def is_local(host: str) -> bool:
    return host in LOCAL_HOSTS or host.startswith("127.")


def url_for(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("", "0.0.0.0") else ("localhost" if host == "::" else host)
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="geocell serve",
        description="A local web page and JSON API to locate photos with one checkpoint. "
                    "Binds 127.0.0.1 (this machine only) unless told otherwise.")
    add_checkpoint_arguments(ap)
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    ap.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import fastapi  # noqa: F401  (checked before the checkpoint is loaded, as uvicorn)
        import uvicorn
    except ImportError as exc:
        print(needs_extra_message("serve", exc, missing_extra(exc) or "serve"), file=sys.stderr)
        return 2
    if not 0 <= args.port <= 65535:
        print(f"geocell serve: --port must be in 0..65535, got {args.port}", file=sys.stderr)
        return 2
    geo = load_geolocator(args, "serve")
    if geo is None:
        return 1
    try:
        asgi = app(args.checkpoint, geolocator=geo)
    except ImportError as exc:
        print(needs_extra_message("serve", exc, missing_extra(exc) or "serve"), file=sys.stderr)
        return 2
    if not is_local(args.host):
        print(f"geocell serve: WARNING: binding {args.host} makes this server reachable from other "
              "machines. It has no authentication: anyone who can reach it can upload photos and "
              "use the model. Bind 127.0.0.1 unless you mean that.", file=sys.stderr)
    print(f"geocell serve: {os.path.basename(args.checkpoint)} at {url_for(args.host, args.port)}  "
          "(Ctrl+C to stop)", flush=True)
    uvicorn.run(asgi, host=args.host, port=args.port, log_level=args.log_level)
    return 0
