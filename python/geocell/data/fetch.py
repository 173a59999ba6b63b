"""One URL's fetch for ``geocell data download``, bounded in bytes and in total seconds.

img2dataset reads a whole response with ``r.read()`` under an idle timeout: an endless
image/jpeg body grows without limit, and a body dripping a byte every few seconds never trips
the timeout. ``BoundedDownloader`` is img2dataset's Downloader whose processes fetch with
``download_image`` below instead (the class is pickled by reference to this module, so the
spawned processes import it, and the replacement, too)."""

from __future__ import annotations

import contextlib
import io
import os
import time
import urllib.request

# Decoding a hostile "image" must not allocate gigabytes: OpenCV's own limit is 2**30 pixels.
MAX_IMAGE_PIXELS = 2**27  # what img2dataset (and OpenCV, which it decodes with) may decode

# Set before img2dataset is imported (below), which imports albumentations and OpenCV, and
# before it starts its processes, which inherit the environment.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no version check over the network at import
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_IMAGE_PIXELS))
os.environ.setdefault("WANDB_MODE", "disabled")

MAX_URL_BYTES = 40 * 1024 * 1024  # one photo; a larger body is refused, not stored
_CHUNK = 1 << 16
_USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"


def fetch(url: str, timeout: float, max_bytes: int = MAX_URL_BYTES, headers=None):
    """(the response, its body) of ``url``; raises ValueError past ``max_bytes`` bytes or
    ``timeout`` seconds in all (connect, headers and body together, not between reads)."""
    deadline = time.monotonic() + float(timeout)
    request = urllib.request.Request(url, data=None, headers=dict(headers or {"User-Agent": _USER_AGENT}))
    with urllib.request.urlopen(request, timeout=timeout) as r:
        declared = r.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > max_bytes:
            raise ValueError(f"body of {int(declared):,} bytes declared, over the limit of {max_bytes:,}")
        body = bytearray()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ValueError(f"not complete within {timeout:g} s (total per URL)")
            with contextlib.suppress(AttributeError, OSError):
                r.fp.raw._sock.settimeout(min(float(timeout), left))  # the wait for the next bytes
            try:
                chunk = r.read1(_CHUNK)
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise ValueError(f"not complete within {timeout:g} s (total per URL)") from None
                raise
            if not chunk:
                return r, bytes(body)
            body += chunk
            if len(body) > max_bytes:
                raise ValueError(f"body over the limit of {max_bytes:,} bytes")


def download_image(row, timeout, user_agent_token, disallowed_header_directives):
    """img2dataset's download_image (same arguments and result) with fetch's bounds."""
    from img2dataset.downloader import is_disallowed

    key, url = row
    agent = _USER_AGENT
    if user_agent_token:
        agent += f" (compatible; {user_agent_token}; +https://github.com/rom1504/img2dataset)"
    try:
        r, body = fetch(url, timeout, headers={"User-Agent": agent})
        if disallowed_header_directives and is_disallowed(r.headers, user_agent_token,
                                                          disallowed_header_directives):
            return key, None, "Use of image disallowed by X-Robots-Tag directive"
        return key, io.BytesIO(body), None
    except Exception as err:  # noqa: BLE001 - img2dataset records the message per URL
        return key, None, str(err)


def _install() -> None:
    import img2dataset.downloader as downloader

    downloader.download_image = download_image  # download_image_with_retry looks it up here


try:
    from img2dataset.downloader import Downloader as _Downloader
except ImportError:  # img2dataset not installed: geocell data download says so where it is used
    _Downloader = object
else:
    _install()


class BoundedDownloader(_Downloader):
    """img2dataset's Downloader; importing this module (as each spawned process does to unpickle
    it) makes its fetches bounded."""


@contextlib.contextmanager
def bounded_img2dataset():
    """While inside, img2dataset.download builds a BoundedDownloader."""
    import sys

    import img2dataset  # noqa: F401 - its package's 'main' attribute is the function, not the module

    main = sys.modules["img2dataset.main"]
    previous = main.Downloader
    main.Downloader = BoundedDownloader
    try:
        yield
    finally:
        main.Downloader = previous
