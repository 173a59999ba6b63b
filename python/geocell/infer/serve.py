"""``geocell serve``: a local web page and a JSON API to locate photos with one checkpoint.

The page is one self-contained HTML document (inline CSS and JS; no fonts, tiles or other
outside assets), so it works offline. The API:

- ``POST /api/predict`` (multipart: ``image``, optional ``top_k``, ``mass``) -> the same
  record as ``Geolocator.predict(...).to_dict()``; the photo's EXIF GPS, when it has one,
  comes in the ``X-Geocell-Exif-Gps`` header (``lat,lng``).
- ``POST /api/map`` (same fields) -> the probability map as a PNG.
- ``GET /api/health`` -> the checkpoint's name and format version.

With a retrieval index beside the checkpoint (``<stem>.retrieval.npz``) or given by ``--index``,
the best guess and the credible region are the hybrid's (``--no-retrieval``: the cells alone).

Errors are JSON ``{"error": "..."}`` with a 4xx status. The model is loaded once; every
prediction runs in a worker thread, one at a time under a lock, so the event loop stays free
and concurrent requests cannot mix results. At most ``MAX_DECODES`` uploads are decoded at
once, each straight into the network's small input: a decoded photo (up to about 600 MB on the
way for 50 Mpx) is never held by a request waiting for the model.
"""


import argparse
import html
import io
import os
import sys
import tempfile
import threading

from geocell.data.images import MAX_PIXELS, ImageTooLarge, check_pixels  # one pixel rule
from geocell.infer.regions import MAX_TOP_K  # one top-k limit for the CLI and the web API

MAX_UPLOAD_BYTES = 25 * 1024 * 1024
FORM_SLACK_BYTES = 64 * 1024          # room for the other form fields and multipart headers
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_DECODES = 2                       # uploads decoded at the same time (each up to ~700 MB at 50 Mpx)


class UploadError(Exception):
    """A request the server refuses: its HTTP status and a message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# ----------------------------------------------------------------------------- requests


def parse_options(form) -> tuple[int, float]:
    """top_k and mass from the form, validated (UploadError 422 otherwise)."""
    raw_k, raw_mass = form.get("top_k"), form.get("mass")
    top_k, mass = 5, 0.9
    if raw_k not in (None, ""):
        try:
            top_k = int(str(raw_k))
        except ValueError:
            raise UploadError(422, f"top_k must be an integer, got {str(raw_k)[:40]!r}") from None
        if not 1 <= top_k <= MAX_TOP_K:
            raise UploadError(422, f"top_k must be between 1 and {MAX_TOP_K}, got {top_k}")
    if raw_mass not in (None, ""):
        try:
            mass = float(str(raw_mass))
        except ValueError:
            raise UploadError(422, f"mass must be a number, got {str(raw_mass)[:40]!r}") from None
        if not 0.0 < mass <= 1.0:  # also refuses nan
            raise UploadError(422, f"mass must be in (0, 1], got {raw_mass}")
    return top_k, mass


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS):
    """(RGB PIL image, EXIF (lat, lng) or None) from an upload's bytes.

    The pixel count is checked from the header, before anything is decoded."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    if not data:
        raise UploadError(400, "the uploaded file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is lower
            im = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as exc:
        raise UploadError(413, f"image too large: {exc}") from None
    except UnidentifiedImageError:
        raise UploadError(415, "not an image (JPEG, PNG, WebP, BMP, TIFF or GIF expected)") from None
    except Exception as exc:
        raise UploadError(400, f"cannot read the image header: {type(exc).__name__}: {exc}") from None
    with im:
        try:
            check_pixels(im.width, im.height, max_pixels)
        except ImageTooLarge as exc:
            raise UploadError(413, str(exc)) from None
        truth = None
        try:
            from geocell.data.exif import gps_from_exif

            truth = tuple(float(v) for v in gps_from_exif(im.getexif()))
        except Exception:  # no GPS block, or EXIF the reader does not understand
            truth = None
        try:
            from geocell.data.images import exif_orientation, to_rgb8, upright

            orientation = exif_orientation(im)
            im.load()
            rgb = upright(to_rgb8(im), orientation)
            rgb = rgb.copy() if rgb is im else rgb
        except Exception as exc:  # truncated or corrupt pixel data
            raise UploadError(400, f"cannot decode the image: {type(exc).__name__}: {exc}") from None
    return rgb, truth


def _return_freed_memory() -> None:
    """glibc keeps freed blocks under its dynamic mmap threshold (which grows to 32 MB) in each
    thread's heap: Pillow's 16 MB image blocks then stay mapped after every decode, a few
    hundred MB per request thread. A fixed 1 MB threshold hands large frees back at once."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: its allocator's own policy
        pass


def _map_title(name: str, pred) -> str:
    lat, lng = pred.best_guess
    short = name if len(name) <= 48 else name[:45] + "..."
    short = short.replace("$", r"\$")  # matplotlib reads $...$ as mathtext
    return (f"{short}: best guess {lat:.3f}, {lng:.3f}; "
            f"{pred.region_mass:.0%} region {pred.region_area_km2:,.0f} km²")


class Service:
    """One loaded Geolocator; predictions and map drawing, each serialised by its own lock."""

    def __init__(self, checkpoint_path, *, device=None, max_upload_bytes: int = MAX_UPLOAD_BYTES,
                 max_pixels: int = MAX_PIXELS, index=None, retrieval: bool = True):
        from geocell.infer.predict import Geolocator
        from geocell.model.checkpoint import FORMAT_VERSION

        self.checkpoint_path = os.fspath(checkpoint_path)
        self.checkpoint_name = os.path.basename(self.checkpoint_path)
        # refuses unsafe files and any format version but this one
        # and, with retrieval, an index made by another checkpoint
        self.geo = Geolocator.from_checkpoint(self.checkpoint_path, device=device, index=index,
                                              retrieval=retrieval)
        self.format_version = FORMAT_VERSION
        self.max_upload_bytes = int(max_upload_bytes)
        self.max_pixels = int(max_pixels)
        self._model_lock = threading.Lock()
        self._map_lock = threading.Lock()  # pyplot is not thread-safe
        self._decode_slots = threading.BoundedSemaphore(MAX_DECODES)
        _return_freed_memory()
        self._transform = self.geo.transform("none")
        # fill the lazy per-cell caches now, not inside the first requests
        for p in range(len(self.geo.partitions)):
            self.geo.tokens(p)
        self.geo.fine_areas_km2  # noqa: B018

    def health(self) -> dict:
        from geocell._version import __version__

        return {"status": "ok", "checkpoint": self.checkpoint_name,
                "format_version": self.format_version, "geocell_version": str(__version__),
                "partitionings": list(self.geo.partition_names), "fine_cells": len(self.geo.fine),
                "scenes": list(self.geo.scene_names), "device": str(self.geo.device),
                "retrieval": len(self.geo.retrieval) if self.geo.hybrid is not None else None,
                "max_upload_bytes": self.max_upload_bytes, "max_pixels": self.max_pixels}

    def prepare(self, data: bytes):
        """(the network's input, EXIF (lat, lng) or None) of an upload; at most MAX_DECODES at
        once, and the decoded photo is freed before the slot is."""
        with self._decode_slots:
            rgb, truth = decode_image(data, self.max_pixels)
            try:
                return self._transform(rgb), truth
            except ImageTooLarge as exc:
                raise UploadError(413, str(exc)) from None
            finally:
                rgb.close()

    def predict(self, name: str, image, top_k: int, mass: float, keep_probs: bool = False):
        """``image``: an input from ``prepare`` (a (3, S, S) tensor) or anything Geolocator.predict takes."""
        import torch

        with self._model_lock:
            if isinstance(image, torch.Tensor) and image.ndim == 3 and image.dtype == torch.float32:
                pred = self.geo.predict_inputs([name], image[None], top_k, mass=mass,
                                               keep_probs=keep_probs)[0]
            else:
                pred = self.geo.predict(image, top_k=top_k, mass=mass, keep_probs=keep_probs)
        pred.image = name
        return pred

    def draw_map(self, pred, truth) -> bytes:
        import numpy as np

        from geocell.infer.maps import draw_probability_map

        top = pred.best_guess
        with self._map_lock, tempfile.TemporaryDirectory(prefix="geocell-map-") as tmp:
            path = os.path.join(tmp, "map.png")
            draw_probability_map(path, np.asarray(self.geo.fine.cells, dtype=np.uint64),
                                 pred.fine_probs, top1=top, truth=truth,
                                 region=pred.region_cell_ids, title=_map_title(pred.image, pred))
            with open(path, "rb") as f:
                return f.read()


# ----------------------------------------------------------------------------- the page

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>geocell: locate photos</title>
<style>
body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 1100px; padding: 1em; color: #222; }
header { display: flex; justify-content: space-between; align-items: baseline; flex-wrap: wrap; }
.note { background: #fff4e0; border: 1px solid #e0b060; padding: .5em .8em; border-radius: 4px; }
#drop { border: 2px dashed #888; border-radius: 6px; padding: 2em; text-align: center; margin: 1em 0; cursor: pointer; }
#drop.over { background: #eef6ff; border-color: #36c; }
.opts label { margin-right: 1em; }
.card { border: 1px solid #ccc; border-radius: 6px; padding: .8em; margin: 1em 0; }
.card h3 { margin: 0 0 .4em 0; word-break: break-all; }
.card .err { color: #b00; }
.card img.map { width: 100%; height: auto; border: 1px solid #ddd; min-height: 2em; }
table { border-collapse: collapse; margin: .4em 0; }
td, th { border-bottom: 1px solid #eee; padding: .15em .6em; text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f4f4f4; }
td.l, th.l { text-align: left; }
.row { display: flex; gap: 1.5em; flex-wrap: wrap; }
.muted { color: #666; }
</style>
</head>
<body>
<header>
<h1>geocell: where was this photo taken?</h1>
<div class="muted">checkpoint: <b id="ckpt">__CHECKPOINT__</b> (format __FORMAT__)</div>
</header>
<p class="note"><b>Must not be used to locate people without their consent.</b>
This is for your own photos or collections whose owners, and the people in them, agreed to it.
The result is a guess, often a confident-looking wrong one: check the credible region's area.</p>
<div id="drop" tabindex="0">Drop photos here, or click to choose files
<input id="files" type="file" accept="image/*" multiple hidden></div>
<div class="opts">
<label>top-k <input id="topk" type="number" min="1" max="__MAXK__" value="5" style="width:4em"></label>
<label>credible mass <input id="mass" type="number" min="0.01" max="1" step="0.01" value="0.9" style="width:5em"></label>
<span class="muted">Photos are sent only to this server (up to __MAXMB__ MB, __MAXMPX__ Mpx each).</span>
</div>
<div id="results"></div>
<script>
"use strict";
const drop = document.getElementById("drop"), input = document.getElementById("files");
const results = document.getElementById("results");
let queue = Promise.resolve();

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}
function pct(p) { return (100 * p).toFixed(p >= 0.001 ? 1 : 3) + " %"; }
function km2(a) { return Math.round(a).toLocaleString() + " km\\u00b2"; }
function haversine(a, b) {
  const r = Math.PI / 180, dlat = (b[0] - a[0]) * r, dlng = (b[1] - a[1]) * r;
  const h = Math.sin(dlat / 2) ** 2 + Math.cos(a[0] * r) * Math.cos(b[0] * r) * Math.sin(dlng / 2) ** 2;
  return 2 * 6371 * Math.asin(Math.min(1, Math.sqrt(h)));
}
function table(head, rows) {
  const t = el("table"), tr = el("tr");
  head.forEach((h, i) => tr.appendChild(el("th", h, i === 0 ? "l" : "")));
  t.appendChild(tr);
  rows.forEach(r => {
    const row = el("tr");
    r.forEach((v, i) => row.appendChild(el("td", String(v), i === 0 ? "l" : "")));
    t.appendChild(row);
  });
  return t;
}
function form(file) {
  const f = new FormData();
  f.append("image", file, file.name);
  f.append("top_k", document.getElementById("topk").value);
  f.append("mass", document.getElementById("mass").value);
  return f;
}
async function errorText(resp) {
  try { return (await resp.json()).error || resp.statusText; } catch (e) { return resp.statusText; }
}
function show(card, rec, truth) {
  const c = rec.credible_region, t = rec.hierarchical_top1, b = rec.best_guess || t;
  const how = rec.retrieval ? " (hybrid, retrieval weight " + rec.retrieval.weight.toFixed(2) + "; top cell p = "
                            : " (p = ";
  const best = card.appendChild(el("p", "best guess: " + b.lat.toFixed(4) + ", " + b.lng.toFixed(4) +
    how + pct(t.probability) + ", cell " + t.cell + ", level " + t.level + ")"));
  Object.assign(best.dataset, {role: "best", lat: b.lat, lng: b.lng, cell: t.cell});
  if (truth) {
    card.appendChild(el("p", "EXIF GPS: " + truth[0].toFixed(4) + ", " + truth[1].toFixed(4) +
      "; best guess is " + Math.round(haversine(truth, [b.lat, b.lng])).toLocaleString() + " km away"))
      .dataset.role = "exif";
  }
  card.appendChild(el("p", pct(c.mass) + " credible region: " + c.num_cells + " cells, " +
    km2(c.area_km2) + " (holds " + pct(c.covered) + ")"));
  const row = el("div", undefined, "row");
  const left = el("div");
  left.appendChild(el("b", "top-" + rec.top_k.length + " cells"));
  left.appendChild(table(["#", "lat", "lng", "probability", "cell"],
    rec.top_k.map((g, i) => [i + 1, g.lat.toFixed(4), g.lng.toFixed(4), pct(g.probability), g.cell])))
    .dataset.role = "top-k";
  row.appendChild(left);
  if (rec.scenes.length) {
    const right = el("div");
    right.appendChild(el("b", "scene"));
    right.appendChild(table(["scene", "probability"], rec.scenes.map(s => [s.name, pct(s.probability)])));
    row.appendChild(right);
  }
  card.appendChild(row);
}
async function locate(file) {
  const card = el("div", undefined, "card");
  card.dataset.image = file.name;  // data-* attributes: stable hooks for scripts and tests
  card.dataset.state = "locating";
  card.appendChild(el("h3", file.name));
  const status = el("p", "locating...", "muted");
  card.appendChild(status);
  results.prepend(card);
  try {
    const resp = await fetch("api/predict", {method: "POST", body: form(file)});
    if (!resp.ok) { status.textContent = "error: " + await errorText(resp); status.className = "err"; card.dataset.state = "error"; return; }
    const gps = resp.headers.get("X-Geocell-Exif-Gps");
    const truth = gps ? gps.split(",").map(Number) : null;
    show(card, await resp.json(), truth);
    status.textContent = "drawing the map...";
    const m = await fetch("api/map", {method: "POST", body: form(file)});
    if (!m.ok) { status.textContent = "map: " + await errorText(m); status.className = "err"; card.dataset.state = "error"; return; }
    const img = el("img", undefined, "map");
    img.alt = "probability map of " + file.name;
    img.src = URL.createObjectURL(await m.blob());
    card.appendChild(img);
    await img.decode();
    status.remove();
    card.dataset.state = "done";
  } catch (e) {
    status.textContent = "error: " + e; status.className = "err"; card.dataset.state = "error";
  }
}
function add(files) {
  for (const f of files) queue = queue.then(() => locate(f));
}
drop.addEventListener("click", () => input.click());
drop.addEventListener("keydown", e => { if (e.key === "Enter" || e.key === " ") input.click(); });
input.addEventListener("change", () => { add(input.files); input.value = ""; });
drop.addEventListener("dragover", e => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", e => { e.preventDefault(); drop.classList.remove("over"); add(e.dataTransfer.files); });
</script>
</body>
</html>
"""

# Nothing from elsewhere: scripts and styles only inline, images only from here or blob: URLs.
CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
       "img-src 'self' blob:; connect-src 'self'; base-uri 'none'; form-action 'none'")


def render_page(service: Service) -> str:
    return (PAGE.replace("__CHECKPOINT__", html.escape(service.checkpoint_name))
                .replace("__FORMAT__", str(service.format_version))
                .replace("__MAXK__", str(MAX_TOP_K))
                .replace("__MAXMB__", f"{service.max_upload_bytes / (1024 * 1024):g}")
                .replace("__MAXMPX__", f"{service.max_pixels / 1e6:g}"))


# ----------------------------------------------------------------------------- the app


SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                    (b"content-security-policy", CSP.encode())]


class _BodyLimit:
    """ASGI middleware: refuses request bodies over ``limit`` bytes with 413, from the
    Content-Length header when there is one, else while the body streams in (the route's
    UploadError handler answers). Adds the security headers to every response."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _send_json(send, 413, {"error": _too_large(self.limit)})
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise UploadError(413, _too_large(self.limit))
            return message

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = dict(message, headers=list(message.get("headers") or []) + SECURITY_HEADERS)
            await send(message)

        await self.app(scope, limited_receive, send_with_headers)


def _too_large(limit: int) -> str:
    return f"upload too large; the limit is {limit / (1024 * 1024):.0f} MB"


async def _send_json(send, status: int, body: dict) -> None:
    import json

    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close")] + SECURITY_HEADERS})
    await send({"type": "http.response.body", "body": data})


def app(checkpoint_path=None, *, device=None, max_upload_bytes: int = MAX_UPLOAD_BYTES,
        max_pixels: int = MAX_PIXELS, index=None, retrieval: bool = True):
    """The ASGI app serving one checkpoint (loaded now, once).

    Without ``checkpoint_path`` the ``GEOCELL_CHECKPOINT`` environment variable names it, so
    any ASGI server can start it: ``GEOCELL_CHECKPOINT=model.pt uvicorn --factory
    geocell.infer.serve:app``.
    """
    from fastapi import FastAPI, Request  # evaluated here: the handlers are annotated with it
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException as StarletteHTTPException

    if checkpoint_path is None:
        checkpoint_path = os.environ.get("GEOCELL_CHECKPOINT")
        if not checkpoint_path:
            raise ValueError("no checkpoint: pass checkpoint_path or set GEOCELL_CHECKPOINT")
    service = Service(checkpoint_path, device=device, max_upload_bytes=max_upload_bytes,
                      max_pixels=max_pixels, index=index, retrieval=retrieval)
    page = render_page(service)
    api = FastAPI(title="geocell", version=str(service.health()["geocell_version"]),
                  docs_url=None, redoc_url=None, openapi_url=None)  # the docs page loads from a CDN
    api.state.service = service

    @api.exception_handler(UploadError)
    async def _upload_error(request, exc: UploadError):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @api.exception_handler(Exception)
    async def _internal_error(request, exc):  # logged by the server; the client gets JSON too
        return JSONResponse({"error": f"internal error: {type(exc).__name__}"}, status_code=500)

    async def read_upload(request: Request):
        form = await request.form(max_files=1, max_fields=8)
        try:
            upload = form.get("image")
            if not isinstance(upload, UploadFile):
                raise UploadError(400, "expected a multipart form with the photo in the field 'image'")
            top_k, mass = parse_options(form)
            data = await upload.read(service.max_upload_bytes + 1)
            if len(data) > service.max_upload_bytes:
                raise UploadError(413, _too_large(service.max_upload_bytes))
            name = os.path.basename(upload.filename or "upload")[:200] or "upload"
        finally:
            await form.close()
        image, truth = await run_in_threadpool(service.prepare, data)
        return name, image, truth, top_k, mass

    @api.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    @api.get("/api/health")
    async def health():
        return service.health()

    @api.post("/api/predict")
    async def predict(request: Request):
        name, image, truth, top_k, mass = await read_upload(request)
        pred = await run_in_threadpool(service.predict, name, image, top_k, mass)
        headers = {"X-Geocell-Exif-Gps": f"{truth[0]:.6f},{truth[1]:.6f}"} if truth else {}
        return JSONResponse(pred.to_dict(), headers=headers)

    @api.post("/api/map")
    async def map_png(request: Request):
        name, image, truth, top_k, mass = await read_upload(request)
        pred = await run_in_threadpool(service.predict, name, image, top_k, mass, True)
        png = await run_in_threadpool(service.draw_map, pred, truth)
        return Response(png, media_type="image/png")

    return _BodyLimit(api, service.max_upload_bytes + FORM_SLACK_BYTES)


# ----------------------------------------------------------------------------- the command


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
    ap.add_argument("--checkpoint", required=True, help="a geocell checkpoint (.pt)")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    ap.add_argument("--index", metavar="NPZ", help="retrieval index of training photos (default: "
                    "<checkpoint stem>.retrieval.npz when present)")
    ap.add_argument("--no-retrieval", action="store_true", help="the cells alone, even when an index is present")
    ap.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return ap


def main(argv: "list[str] | None" = None) -> int:
    from geocell.cli import missing_extra, needs_extra_message

    args = build_parser().parse_args(argv)
    try:
        import uvicorn
    except ImportError as exc:
        print(needs_extra_message("serve", exc, missing_extra(exc) or "serve"), file=sys.stderr)
        return 2
    if not 0 <= args.port <= 65535:
        print(f"geocell serve: --port must be in 0..65535, got {args.port}", file=sys.stderr)
        return 2
    try:
        asgi = app(args.checkpoint, device=args.device, index=args.index, retrieval=not args.no_retrieval)
    except ImportError as exc:
        print(needs_extra_message("serve", exc, missing_extra(exc) or "serve"), file=sys.stderr)
        return 2
    except Exception as exc:  # unreadable, unsafe or incompatible file: say which and why
        print(f"geocell serve: cannot load {args.checkpoint}: {exc}", file=sys.stderr)
        return 1
    if not is_local(args.host):
        print(f"geocell serve: WARNING: binding {args.host} makes this server reachable from other "
              "machines. It has no authentication: anyone who can reach it can upload photos and "
              "use the model. Bind 127.0.0.1 unless you mean that.", file=sys.stderr)
    print(f"geocell serve: {os.path.basename(args.checkpoint)} at {url_for(args.host, args.port)}  "
          "(Ctrl+C to stop)", flush=True)
    uvicorn.run(asgi, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
