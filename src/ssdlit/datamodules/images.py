"""Decode any image file to RGB uint8, and read image sizes from headers only.

Everything goes through Pillow: one decoder and one EXIF policy for every format
(``cv2.imread`` applies the EXIF orientation on its own and reads 16-bit files
differently; mixing the two would give two conventions).

What :func:`load_rgb` does with each kind of file:

- RGB: as is. Grayscale (``L``, ``1``): channel repeated three times.
- With alpha (``RGBA``, ``LA``, palette with transparency): composited over
  ``background`` (white by default), so transparent pixels never show hidden colours.
- Palette (``P``): expanded through the palette. CMYK, YCbCr, LAB, HSV: converted by Pillow.
- 16-bit grayscale (``I;16*``, ``I``): scaled to 8 bits by ``round(v / 257)`` (65535 -> 255),
  not clipped. 16-bit RGB(A) PNGs: Pillow itself keeps the high byte (``v >> 8``).
  Float (``F``): taken as 0..1 when its maximum is at most 1, else clipped to 0..255.
- EXIF orientation (JPEG, and PNG/WebP/TIFF with EXIF): applied with
  :func:`PIL.ImageOps.exif_transpose` when ``apply_exif`` is True, so the array is the
  image as a viewer displays it.

Truncated JPEGs. A JPEG missing the end of its data (common in files scraped from the web)
decodes as OpenCV and browsers show it: the rows still in the file as they are, the rest
filled in by the decoder. :func:`decode_image` says so (its second value), so that the
callers can note it in the data report (note ``truncated_image``). Only JPEGs are
decoded this way, and only when the one problem is the missing tail; Pillow's
``ImageFile.LOAD_TRUNCATED_IMAGES`` is set for that one retried load (under a lock) and
restored at once, never left on for the process.

Any other file that cannot be decoded (a missing or zero-byte file, garbage after a valid
header, a PNG cut in its pixel data) raises :class:`~ssdlit.datamodules.records.DataError`
naming the file (kind ``missing_image`` or ``unreadable_image``).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from ssdlit.datamodules.records import DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageHeader",
    "decode_image",
    "image_size",
    "load_rgb",
    "read_header",
    "to_rgb_array",
]

#: Extensions tried, in this order, when an annotation gives only an image id.
IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".tif",
    ".tiff",
    ".webp",
    ".JPG",
    ".JPEG",
    ".PNG",
)

_EXIF_ORIENTATION = 0x0112
_TRANSPOSING = frozenset({5, 6, 7, 8})  # orientations that swap width and height

# Pillow raises many kinds of errors on bad files: UnidentifiedImageError, OSError
# ("image file is truncated"), SyntaxError (broken headers), struct.error, ValueError,
# DecompressionBombError...; every one of them becomes a DataError naming the file.
_DECODE_ERRORS = (Exception,)

#: Formats whose tail-truncated files are decoded (what is there) instead of refused.
_TRUNCATION_TOLERANT = frozenset({"JPEG", "MPO"})
_TRUNCATED_MESSAGE = "image file is truncated"  # Pillow's OSError for a missing tail
_TRUNCATION_LOCK = threading.Lock()


@contextmanager
def _truncated_images_allowed() -> Iterator[None]:
    """Pillow's process-wide ``LOAD_TRUNCATED_IMAGES`` on for the enclosed load only."""
    with _TRUNCATION_LOCK:
        before = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = True
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = before


def _load_pixels(path: Path, im: Image.Image) -> tuple[Image.Image, bool]:
    """``im.load()``; a JPEG whose only fault is a missing tail is reopened and decoded as
    far as it goes. Returns the loaded image (the reopened one when retried; the caller
    closes it) and whether the file was truncated."""
    try:
        im.load()
        return im, False
    except OSError as exc:
        if im.format not in _TRUNCATION_TOLERANT or not str(exc).startswith(_TRUNCATED_MESSAGE):
            raise
    retry = Image.open(path)
    try:
        with _truncated_images_allowed():
            retry.load()
    except BaseException:
        retry.close()
        raise
    return retry, True


@dataclass(frozen=True)
class ImageHeader:
    """What the file header says, without decoding the pixels.

    Attributes:
        width, height: the size as displayed, i.e. after the EXIF orientation.
        stored_width, stored_height: the size of the stored pixel array.
        orientation: the EXIF orientation tag (1 when absent or invalid).
        format: Pillow's format name (``"JPEG"``, ``"PNG"``, ...).
        mode: Pillow's mode of the stored pixels (``"RGB"``, ``"L"``, ``"I;16"``, ...).
        truncated: the pixels were decoded (``read_header(decode=True)``) and the file is a
            tail-truncated JPEG, decoded as far as it goes (see the module docstring).
    """

    width: int
    height: int
    stored_width: int
    stored_height: int
    orientation: int
    format: str
    mode: str
    truncated: bool = False

    @property
    def transposed(self) -> bool:
        """True when the EXIF orientation swaps width and height."""
        return self.orientation in _TRANSPOSING


def _unreadable(path: Path, exc: BaseException) -> DataError:
    reason = str(exc) or type(exc).__name__
    return DataError("unreadable_image", path, "", f"cannot read the image: {reason}")


def _missing(path: Path) -> DataError:
    return DataError("missing_image", path, "", "image file not found")


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a malformed EXIF block: treat as unrotated
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def read_header(path: str | Path, *, decode: bool = False) -> ImageHeader:
    """Read the size, EXIF orientation, format and mode of an image file.

    Only the header is read unless ``decode`` is True, in which case the pixels are
    decoded too (and thrown away) so that a file that cannot be decoded is caught now (a
    tail-truncated JPEG decodes: ``truncated`` is then True).

    Raises:
        DataError: ``missing_image`` or ``unreadable_image``, naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise _missing(path)
    truncated = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns on odd EXIF / large images
            with Image.open(path) as im:
                stored_w, stored_h = im.size
                orientation = _orientation(im)
                fmt, mode = im.format or "", im.mode
                if decode:
                    loaded, truncated = _load_pixels(path, im)
                    if loaded is not im:
                        loaded.close()
    except DataError:
        raise
    except _DECODE_ERRORS as exc:
        raise _unreadable(path, exc) from exc
    w, h = (stored_h, stored_w) if orientation in _TRANSPOSING else (stored_w, stored_h)
    return ImageHeader(w, h, stored_w, stored_h, orientation, fmt, mode, truncated)


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of the image as displayed (EXIF orientation applied), header only."""
    header = read_header(path)
    return header.width, header.height


def to_rgb_array(
    im: Image.Image, *, background: tuple[int, int, int] = (255, 255, 255)
) -> np.ndarray:
    """Convert a decoded Pillow image of any mode to uint8 ``[H, W, 3]`` RGB.

    See the module docstring for what happens to each mode.
    """
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8)
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(im).astype(np.float64)
        gray = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        arr = np.nan_to_num(arr, nan=0.0, posinf=255.0, neginf=0.0)
        if arr.size and arr.max() <= 1.0:
            arr = arr * 255.0
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    has_alpha = mode in ("PA", "La", "RGBa", "LA") or (
        mode in ("P", "L", "RGB") and "transparency" in im.info
    )
    if has_alpha:
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        rgba = np.asarray(im, dtype=np.float32)
        alpha = rgba[:, :, 3:4] / 255.0
        bg = np.asarray(background, dtype=np.float32).reshape(1, 1, 3)
        out = rgba[:, :, :3] * alpha + bg * (1.0 - alpha)
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if im.mode != "RGB":  # L, 1, CMYK, YCbCr, LAB, HSV, ...
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8)


def decode_image(
    path: str | Path,
    *,
    apply_exif: bool = True,
    background: tuple[int, int, int] = (255, 255, 255),
) -> tuple[np.ndarray, bool]:
    """Decode an image file to a C-contiguous uint8 ``[H, W, 3]`` RGB array.

    Args:
        path: the image file (any format Pillow reads).
        apply_exif: apply the EXIF orientation (the array is then the image as displayed).
        background: RGB colour that transparent pixels are composited over.

    Returns:
        ``(image, truncated)``: ``truncated`` is True for a tail-truncated JPEG, decoded as
        far as its data goes (see the module docstring).

    Raises:
        DataError: ``missing_image`` or ``unreadable_image`` (unknown format, corrupt data,
            a zero-byte file, a truncated file other than a JPEG's tail), naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise _missing(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as opened:
                loaded, truncated = _load_pixels(path, opened)
                try:
                    im = ImageOps.exif_transpose(loaded) if apply_exif else loaded
                    arr = to_rgb_array(im, background=background)
                finally:
                    if loaded is not opened:
                        loaded.close()
    except DataError:
        raise
    except _DECODE_ERRORS as exc:
        raise _unreadable(path, exc) from exc
    return np.ascontiguousarray(arr), truncated


def load_rgb(
    path: str | Path,
    *,
    apply_exif: bool = True,
    background: tuple[int, int, int] = (255, 255, 255),
) -> np.ndarray:
    """Decode an image file to a C-contiguous uint8 ``[H, W, 3]`` RGB array.

    :func:`decode_image` without the truncation flag (a tail-truncated JPEG decodes as far
    as its data goes).

    Raises:
        DataError: ``missing_image`` or ``unreadable_image``, naming the file.
    """
    return decode_image(path, apply_exif=apply_exif, background=background)[0]
