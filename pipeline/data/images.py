"""Untrusted image bytes -> an (H, W, 3) uint8 RGB array, or a clear refusal.

Used where images arrive from outside (the HTTP API, the client, uploads). Checks, in
order, each with its own ``ImageError`` (``status`` 4xx and a message naming what was
wrong and what is accepted):

1. the body is not empty and not larger than ``max_bytes``;
2. the declared content type, when there is one, is an accepted image type;
3. the bytes are an image in an accepted format (checked from the bytes themselves,
   whatever was declared);
4. width x height is at most ``max_pixels``, read from the header before any pixel is
   decoded (decompression bombs never reach memory);
5. the pixels decode completely (truncated files are refused, not padded with grey).

Between 4 and 5 an optional ``admit(pixels)`` callback may refuse the image (the serving
replica's pixel budget, ``pipeline.serving.service``) before any pixel is decoded.

The EXIF Orientation tag is honoured (``PIL.ImageOps.exif_transpose``): a phone photo
stored sideways with orientation 6 or 8 comes out as it is displayed, upright, which is
what the person who took it, a browser and a labelling tool all see.

Channel layouts are converted to RGB: grey, grey + alpha, RGBA (alpha dropped, i.e. as
if on black), palette, CMYK, and 16-bit grey or RGB (scaled to 8 bits). The first frame
of a multi-frame file (animated WebP, multi-page TIFF) is used.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "TIFF": "image/tiff", "BMP": "image/bmp",
           "WEBP": "image/webp"}
CONTENT_TYPES = {*FORMATS.values(), "image/jpg", "image/x-ms-bmp", "image/x-bmp"}
# Declared types that say nothing about the format: the bytes decide.
GENERIC_TYPES = {"application/octet-stream", "image/*", ""}


class ImageError(ValueError):
    """Bytes that are not an acceptable image; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000


def media_type(content_type: str | None) -> str:
    """``image/png; charset=x`` -> ``image/png`` (lower case); None -> ''."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def decode_image(data: bytes, content_type: str | None = None, limits: ImageLimits = ImageLimits(),
                 admit: Callable[[int], None] | None = None) -> np.ndarray:
    """Checked bytes -> (H, W, 3) uint8 RGB, turned upright by its EXIF orientation.

    Raises ``ImageError``; ``admit(width * height)``, called once the header has passed
    the checks and before decoding, may raise its own refusal."""
    if not data:
        raise ImageError("empty body: send the image bytes (PNG, JPEG, TIFF, BMP or WebP)")
    if len(data) > limits.max_bytes:
        raise ImageError(f"body of {len(data):,} bytes is larger than the limit of {limits.max_bytes:,}",
                         status=413)
    declared = media_type(content_type)
    if declared not in CONTENT_TYPES and declared not in GENERIC_TYPES:
        raise ImageError(f"content type {declared!r} is not an accepted image type; accepted: "
                         f"{', '.join(sorted(FORMATS.values()))}", status=415)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError("the body is not an image in a readable format (PNG, JPEG, TIFF, BMP, WebP)",
                         status=415) from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ImageError(f"image has more than the limit of {limits.max_pixels:,} pixels",
                         status=413) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"the image header cannot be read: {exc}") from None
    with image:
        if image.format not in FORMATS:
            raise ImageError(f"image format {image.format} is not accepted; accepted: "
                             f"{', '.join(FORMATS)}", status=415)
        width, height = image.size
        if width * height > limits.max_pixels:
            raise ImageError(f"image of {width}x{height} = {width * height:,} pixels is larger than "
                             f"the limit of {limits.max_pixels:,}", status=413)
        if width < 1 or height < 1:
            raise ImageError(f"image of {width}x{height} has no pixels")
        if admit is not None:
            admit(width * height)
        try:
            image.seek(0)
            image.load()
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageError(f"the {image.format} image is corrupt or truncated: {exc}") from None
        return to_rgb(upright(image))


def orientation(image: Image.Image) -> int:
    """The EXIF Orientation tag (1 = as stored; 6 and 8 = turned a quarter; 1 if absent)."""
    return int(image.getexif().get(ExifTags.Base.Orientation, 1) or 1)


def upright(image: Image.Image) -> Image.Image:
    """``image`` as displayed: turned and mirrored as its EXIF Orientation says (itself if 1)."""
    if orientation(image) == 1:
        return image
    return ImageOps.exif_transpose(image)


def to_rgb(image: Image.Image) -> np.ndarray:
    """Any PIL mode -> (H, W, 3) uint8 RGB, 16-bit data scaled rather than clipped."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        grey = np.asarray(image, dtype=np.int64)
        top = 65535 if mode.startswith("I;16") or grey.max() > 255 else 255
        grey = (np.clip(grey, 0, top) * 255 // top).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode in ("RGB;16", "RGBA;16") or (mode == "RGB" and np.asarray(image).dtype != np.uint8):
        return (np.asarray(image, dtype=np.uint32)[..., :3] >> 8).astype(np.uint8)
    if mode == "F":
        grey = np.asarray(image, dtype=np.float32)
        raise ImageError(f"floating-point image ({grey.dtype}) is not accepted: send 8- or 16-bit pixels")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return np.asarray(image.convert("RGB"), dtype=np.uint8)
