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


import html
import importlib.resources
import io
import os
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
                 max_pixels: int = MAX_PIXELS, index=None, retrieval: bool = True, geolocator=None):
        """``geolocator``: the Geolocator of ``checkpoint_path`` already loaded (``device``,
        ``index`` and ``retrieval`` then unused)."""
        from geocell.infer.predict import Geolocator
        from geocell.model.checkpoint import FORMAT_VERSION

        self.checkpoint_path = os.fspath(checkpoint_path)
        self.checkpoint_name = os.path.basename(self.checkpoint_path)
        # refuses unsafe files and any format version but this one
        # and, with retrieval, an index made by another checkpoint
        self.geo = geolocator if geolocator is not None else Geolocator.from_checkpoint(
            self.checkpoint_path, device=device, index=index, retrieval=retrieval)
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

# The page: one self-contained HTML document, package data (infer/static/index.html) with
# __CHECKPOINT__, __FORMAT__, __MAXK__, __MAXMB__ and __MAXMPX__ filled in by render_page.
PAGE_FILE = "index.html"


def page_template() -> str:
    return importlib.resources.files("geocell.infer").joinpath("static", PAGE_FILE).read_text(encoding="utf-8")


# Nothing from elsewhere: scripts and styles only inline, images only from here or blob: URLs.
CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
       "img-src 'self' blob:; connect-src 'self'; base-uri 'none'; form-action 'none'")


def render_page(service: Service) -> str:
    return (page_template().replace("__CHECKPOINT__", html.escape(service.checkpoint_name))
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
        max_pixels: int = MAX_PIXELS, index=None, retrieval: bool = True, geolocator=None):
    """The ASGI app serving one checkpoint (loaded now, once; or given loaded as ``geolocator``).

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
                      max_pixels=max_pixels, index=index, retrieval=retrieval, geolocator=geolocator)
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
