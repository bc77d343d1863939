"""Per-sample checks and conversion, run in worker processes by ``pipeline.prepare``.

``inspect_sample`` decodes an image/mask pair and reports every problem by reason;
``convert_sample`` produces the canonical encoded bytes (RGB image, single-channel
``L`` PNG mask of class indices), passing the original bytes through untouched
whenever they already are canonical, which is what keeps prepare fast.

EXIF orientation: an image is taken as it is displayed (turned upright by its EXIF
Orientation tag, ``pipeline.data.images.upright``), as serving does and as labelling tools
show it (LabelMe records the displayed size; browsers turn photos too), so its mask must
have the displayed size. A turned image is re-encoded without the tag. A mask that
matches the stored (unturned) size of a quarter-turned photo is reported as a size
mismatch that says so: turning the mask to fit would be a guess.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.config.params import Resize
from pipeline.data.datasets import ClassSpec, Sample
from pipeline.data.images import orientation, upright

PASS_THROUGH_IMAGE_FORMATS = {"PNG", "JPEG"}
QUARTER_TURNS = {5, 6, 7, 8}        # EXIF orientations that swap width and height
# Huge masks or images (decompression bombs) fail loudly instead of exhausting memory.
Image.MAX_IMAGE_PIXELS = 16384 * 16384


class MaskError(ValueError):
    """A mask that cannot be read as class indices."""


@dataclass
class Inspection:
    sample: Sample
    problems: list[str] = field(default_factory=list)
    height: int = 0                 # as displayed (EXIF orientation applied)
    width: int = 0
    orientation: int = 1            # EXIF Orientation tag of the image (1: as stored)
    image_sha1: str = ""
    # Histogram of mask values 0..255 after the dataset's label map (None if unreadable).
    hist: np.ndarray | None = None


def decode_mask(data: bytes, spec: ClassSpec) -> np.ndarray:
    """Mask bytes -> (H, W) int64 class indices, before any 0/255 remapping.

    Index masks may be ``L``, ``P``, ``1``, 16-bit or an RGB image whose three channels
    are equal; colour masks are mapped through ``spec.palette``.
    """
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        mode = im.mode
        if spec.mask_format == "color":
            return _colours_to_index(np.asarray(im.convert("RGB")), spec)
        arr = np.asarray(im)
    if mode in ("L", "P", "I;16", "I;16B", "I;16L", "I") or mode == "1":
        mask = arr.astype(np.int64)
    elif mode in ("LA", "PA"):
        mask = arr[..., 0].astype(np.int64)
    elif mode in ("RGB", "RGBA"):
        rgb = arr[..., :3]
        if not ((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()):
            raise MaskError(
                f"colour ({mode}) mask where class indices were expected; for colour masks set "
                "prepare.mask_format: color and prepare.palette"
            )
        mask = rgb[..., 0].astype(np.int64)
    else:
        raise MaskError(f"unsupported mask mode {mode}")
    if spec.label_map is not None:
        lut = np.arange(max(256, int(mask.max()) + 1), dtype=np.int64)
        for raw, cls in spec.label_map.items():
            lut[raw] = cls
        mask = lut[mask]
    return mask


def _colours_to_index(rgb: np.ndarray, spec: ClassSpec) -> np.ndarray:
    codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    palette = np.array([(r << 16) | (g << 8) | b for r, g, b in spec.palette], dtype=np.int64)
    order = np.argsort(palette)
    pos = np.clip(np.searchsorted(palette[order], codes), 0, len(palette) - 1)
    found = palette[order][pos] == codes
    if not found.all():
        unknown = np.unique(codes[~found])[:5]
        shown = ", ".join(f"({c >> 16}, {(c >> 8) & 255}, {c & 255})" for c in unknown)
        raise MaskError(f"{int((~found).sum())} pixels have colours not in the palette: {shown}")
    return order[pos].astype(np.int64)


def inspect_sample(sample: Sample, spec: ClassSpec) -> Inspection:
    """Decode one pair and list its problems; never raises for bad data."""
    result = Inspection(sample)
    try:
        data = sample.image.read_bytes()
        result.image_sha1 = hashlib.sha1(data).hexdigest()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            result.orientation = orientation(im)
            result.width, result.height = im.size
            if result.orientation in QUARTER_TURNS:
                result.width, result.height = im.height, im.width
    except UnidentifiedImageError:
        result.problems.append("unreadable image: not in a format Pillow can read")
        return result
    except (OSError, Image.DecompressionBombError, ValueError) as exc:
        result.problems.append(f"unreadable image: {exc}")
        return result
    if sample.mask is None:
        result.problems.append("missing mask")
        return result
    try:
        mask = decode_mask(sample.mask.read_bytes(), spec)
    except MaskError as exc:
        result.problems.append(f"bad mask {sample.mask}: {exc}")
        return result
    except UnidentifiedImageError:
        result.problems.append(f"unreadable mask {sample.mask}: not in a format Pillow can read")
        return result
    except (OSError, Image.DecompressionBombError, ValueError) as exc:
        result.problems.append(f"unreadable mask {sample.mask}: {exc}")
        return result
    if mask.shape != (result.height, result.width):
        turned = ""
        if result.orientation in QUARTER_TURNS and mask.shape == (result.width, result.height):
            turned = (f"; the image has EXIF orientation {result.orientation}: it is displayed "
                      f"{result.width}x{result.height} but stored {result.height}x{result.width}, and the "
                      "mask fits the image as stored: masks must be drawn on the displayed image")
        result.problems.append(
            f"image/mask size mismatch: image {result.width}x{result.height}, "
            f"mask {mask.shape[1]}x{mask.shape[0]} ({sample.mask}){turned}"
        )
        return result
    if mask.max() > 255 or mask.min() < 0:
        result.problems.append(
            f"label values outside 0..255 in {sample.mask} (min {mask.min()}, max {mask.max()})"
        )
        return result
    result.hist = np.bincount(mask.ravel(), minlength=256)
    return result


def invalid_values(hist: np.ndarray, spec: ClassSpec) -> list[int]:
    """Mask values present that are neither a class index nor the ignore label."""
    present = np.flatnonzero(hist)
    return [int(v) for v in present if v >= spec.num_classes and v != spec.ignore_index]


def target_size(height: int, width: int, resize: Resize) -> tuple[int, int]:
    """(height, width) after the resize policy."""
    if resize.mode == "none":
        return height, width
    if resize.mode == "fixed":
        return resize.size
    side = min(height, width) if resize.mode == "shorter_side" else max(height, width)
    scale = resize.size / side
    return max(1, round(height * scale)), max(1, round(width * scale))


def convert_sample(
    sample: Sample, spec: ClassSpec, resize: Resize, binary_255: bool
) -> dict:
    """One prepared row: encoded image and mask bytes, size and image format.

    ``binary_255`` maps mask value 255 to class 1 (binary masks saved as 0/255).
    """
    image_bytes, fmt, (h, w), (out_h, out_w) = convert_image(sample.image.read_bytes(), resize)
    resized = (out_h, out_w) != (h, w)
    mask_bytes = sample.mask.read_bytes()
    with Image.open(io.BytesIO(mask_bytes)) as m:
        canonical = m.format == "PNG" and m.mode == "L"
    if not canonical or spec.label_map or spec.mask_format != "index" or binary_255 or resized:
        mask = decode_mask(mask_bytes, spec)
        if binary_255:
            mask[mask == 255] = 1
        mask_im = Image.fromarray(mask.astype(np.uint8))  # 2-D uint8 -> mode L
        if resized:
            mask_im = mask_im.resize((out_w, out_h), Image.Resampling.NEAREST)
        mask_bytes = _encode(mask_im, "PNG")
    return {"id": sample.id, "image": image_bytes, "mask": mask_bytes, "height": out_h,
            "width": out_w, "image_format": fmt}


def convert_image(data: bytes, resize: Resize) -> tuple[bytes, str, tuple[int, int], tuple[int, int]]:
    """Encoded image bytes -> (canonical bytes, format, displayed (h, w), output (h, w)).

    Canonical: upright (EXIF orientation applied), RGB (grey, RGBA, palette converted), PNG
    or JPEG, resized (bilinear) as ``resize`` says; already canonical bytes pass through.
    """
    with Image.open(io.BytesIO(data)) as stored:
        fmt, turned = stored.format, orientation(stored) != 1
        im = upright(stored)                 # a new image when turned (it has no format)
        mode, (w, h) = im.mode, im.size
        out_h, out_w = target_size(h, w, resize)
        resized = (out_h, out_w) != (h, w)
        if resized or turned or fmt not in PASS_THROUGH_IMAGE_FORMATS or mode != "RGB":
            rgb = im.convert("RGB")
            if resized:
                rgb = rgb.resize((out_w, out_h), Image.Resampling.BILINEAR)
            fmt = "JPEG" if fmt == "JPEG" else "PNG"
            data = _encode(rgb, fmt)
    return data, fmt.lower(), (h, w), (out_h, out_w)


def _encode(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        im.save(buf, format="JPEG", quality=95)
    else:
        im.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
