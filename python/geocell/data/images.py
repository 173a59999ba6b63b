"""How a photo file becomes 8-bit RGB pixels: the one pixel limit and the one mode conversion,
used by ``data pack``, the torch loader, ``predict`` and ``serve``.

- The pixel count is read from the header (Pillow opens lazily) and checked before anything is
  decoded: a file claiming 65500 x 65500 pixels is refused without allocating 12 GB. So is an
  aspect ratio over ``MAX_ASPECT``: resizing the short side of a 1 x 2,000,000 strip to 37 px
  would make 37 x 74,000,000 pixels (``check_resized`` bounds the pixels after a resize).
- 16-bit images (modes ``I;16*``, ``I``) are scaled to 8 bits (v / 257, rounded), not clipped;
  grey, palette, CMYK and the other Pillow modes go through Pillow's conversion to RGB; an alpha
  channel is dropped (the stored colour is kept, as torchvision's and DALI's decoders do).
- Orientation (``ORIENTATION``, stored in every checkpoint's ``Preprocess``): the EXIF
  Orientation tag is applied (``upright``), as DALI's decoder does, so a phone photo taken
  upright is upright in training and in use whichever loader or inference path reads it.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np

# Larger images are refused: a decode stays under about 150 MB of RGB whatever a header claims.
MAX_PIXELS = 50_000_000

# Longer side / shorter side: wide panoramas (about 12:1) pass, pixel strips do not.
MAX_ASPECT = 25

# The one orientation rule (Preprocess.orientation): the EXIF Orientation tag is applied.
ORIENTATION = "exif"
_ORIENTATION_TAG = 0x0112

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


class ImageTooLarge(ValueError):
    """The header declares more pixels than ``MAX_PIXELS`` (nothing was decoded)."""


def check_pixels(width: int, height: int, max_pixels: int = MAX_PIXELS) -> None:
    if int(width) * int(height) > max_pixels:
        raise ImageTooLarge(f"image declares {width}x{height} = {width * height / 1e6:.1f} Mpx; "
                            f"the limit is {max_pixels / 1e6:g} Mpx")
    short, long = sorted((int(width), int(height)))
    if long > MAX_ASPECT * max(short, 1):
        raise ImageTooLarge(f"image declares {width}x{height}: aspect ratio {long / max(short, 1):,.0f}:1 "
                            f"is over the limit of {MAX_ASPECT}:1")


def check_resized(width: int, height: int, short_side: int, max_pixels: int = MAX_PIXELS) -> None:
    """Refuses a resize of the shorter side to ``short_side`` that would make over
    ``max_pixels`` pixels, before it allocates them."""
    short, long = sorted((max(int(width), 1), max(int(height), 1)))
    out = int(short_side) * (int(short_side) * long // short)
    if out > max_pixels:
        raise ImageTooLarge(f"image of {width}x{height} would be {out / 1e6:.1f} Mpx after resizing its "
                            f"shorter side to {short_side}; the limit is {max_pixels / 1e6:g} Mpx")


def check_regular_file(path) -> None:
    """Raises ValueError for a path that is not a regular file: opening a named pipe blocks
    until something writes to it, a device can be endless."""
    import stat

    mode = os.stat(path).st_mode  # a missing file: FileNotFoundError, as open would raise
    if not stat.S_ISREG(mode):
        raise ValueError(f"{os.fspath(path)}: not a regular file (a named pipe, device or folder is not opened)")


def open_checked(source, max_pixels: int = MAX_PIXELS, formats=None):
    """A lazily opened PIL image (path, file object or bytes) whose declared size is within
    ``max_pixels``; raises ImageTooLarge before decoding anything."""
    from PIL import Image

    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)):
        check_regular_file(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our limit is lower
            img = Image.open(source, formats=formats)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image too large: {exc}") from None
    try:
        check_pixels(img.width, img.height, max_pixels)
    except ImageTooLarge:
        img.close()
        raise
    return img


def to_rgb8(img):
    """An RGB (8 bits per channel) PIL image from a PIL image of any mode (see the module doc)."""
    from PIL import Image

    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _SIXTEEN_BIT or mode == "I":
        a = np.asarray(img)
        if mode == "I" and a.size and (int(a.min()) < 0 or int(a.max()) > 65535):
            raise ValueError(f"32-bit integer image with values outside 0..65535 (mode {mode})")
        grey = ((a.astype(np.uint32) * 2 + 257) // 514).astype(np.uint8)  # round(v / 257)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "F":
        raise ValueError("floating-point image (mode F) has no defined 8-bit scale")
    return img.convert("RGB")


def exif_orientation(img) -> int:
    """The EXIF Orientation (1..8) of an opened PIL image; 1 when absent or unreadable."""
    try:
        value = int(img.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # EXIF the reader does not understand: taken as stored
        return 1
    return value if 1 <= value <= 8 else 1


def upright(img, orientation: int):
    """``img`` turned by EXIF ``orientation`` (the same transposes as PIL.ImageOps.exif_transpose)."""
    from PIL import Image

    method = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
              6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}.get(int(orientation))
    return img if method is None else img.transpose(method)


def decode_rgb(source, max_pixels: int = MAX_PIXELS):
    """Decodes a path, file object or bytes into an upright RGB PIL image after checking the
    declared size (``open_checked``), converting the mode (``to_rgb8``) and applying the EXIF
    orientation (``upright``)."""
    with open_checked(source, max_pixels) as img:
        orientation = exif_orientation(img)
        img.load()
        out = upright(to_rgb8(img), orientation)
        return out.copy() if out is img else out  # closing img frees its pixels
