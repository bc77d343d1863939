"""Pictures of predictions in the dataset's palette, for people and the dashboard.

- ``colorize``: class-index mask -> RGB in the palette (the ignore label in ``IGNORE_RGB``).
- ``error_map``: correct pixels black, wrong ones red, ignored ones grey.
- ``blend``: an image with a coloured mask laid over it.
- ``panel``: image / truth / prediction / error side by side, titled, with a legend.
- ``palette_png``: a mask as a palette PNG: the pixel values stay class indices, viewers
  show the colours.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import cv2
import numpy as np
from PIL import Image

IGNORE_RGB = (0, 0, 0)
CORRECT_RGB = (0, 0, 0)
WRONG_RGB = (230, 25, 25)
IGNORED_RGB = (128, 128, 128)
FONT = cv2.FONT_HERSHEY_SIMPLEX


def lookup_table(palette: Sequence[Sequence[int]]) -> np.ndarray:
    """(256, 3) uint8: the palette's colours, ``IGNORE_RGB`` for every other value."""
    table = np.tile(np.array(IGNORE_RGB, np.uint8), (256, 1))
    table[: len(palette)] = np.asarray(palette, np.uint8)
    return table


def colorize(mask: np.ndarray, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """(H, W) uint8 class indices -> (H, W, 3) uint8 RGB."""
    return lookup_table(palette)[mask]


def error_map(truth: np.ndarray, pred: np.ndarray, ignore_index: int | None) -> np.ndarray:
    out = np.zeros((*truth.shape, 3), np.uint8)
    out[truth != pred] = WRONG_RGB
    if ignore_index is not None:
        out[truth == ignore_index] = IGNORED_RGB
    return out


def blend(image: np.ndarray, colours: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    return cv2.addWeighted(image, 1.0 - alpha, colours, alpha, 0.0)


def palette_png(mask: np.ndarray, palette: Sequence[Sequence[int]], fast: bool = False) -> bytes:
    """``fast``: zlib level 1 (about 10x quicker, files about 3x larger), for answers
    on the wire rather than files kept on disk."""
    im = Image.fromarray(mask, mode="P")
    im.putpalette(lookup_table(palette).reshape(-1).tolist())
    buf = io.BytesIO()
    im.save(buf, format="PNG", **({"compress_level": 1} if fast else {"optimize": True}))
    return buf.getvalue()


def png(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"could not encode a {image.shape} image as PNG")
    return data.tobytes()


def jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError(f"could not encode a {image.shape} image as JPEG")
    return data.tobytes()


def legend(names: Sequence[str], palette: Sequence[Sequence[int]], width: int,
           extra: Sequence[tuple[str, Sequence[int]]] = ()) -> np.ndarray:
    """A white strip of colour swatches and names, wrapped to ``width`` pixels."""
    entries = list(zip(names, palette, strict=True)) + list(extra)
    scale, thick, swatch, pad, line = 0.45, 1, 14, 8, 22
    items, x, y = [], pad, pad
    for name, rgb in entries:
        (tw, _), _ = cv2.getTextSize(name, FONT, scale, thick)
        step = swatch + 6 + tw + 2 * pad
        if x + step > width and x > pad:
            x, y = pad, y + line
        items.append((name, rgb, x, y))
        x += step
    strip = np.full((y + line + pad // 2, width, 3), 255, np.uint8)
    for name, rgb, x, y in items:
        cv2.rectangle(strip, (x, y), (x + swatch, y + swatch), tuple(int(c) for c in rgb), -1)
        cv2.rectangle(strip, (x, y), (x + swatch, y + swatch), (0, 0, 0), 1)
        cv2.putText(strip, name, (x + swatch + 6, y + swatch - 2), FONT, scale, (0, 0, 0), thick, cv2.LINE_AA)
    return strip


def titled(image: np.ndarray, title: str) -> np.ndarray:
    bar = np.full((24, image.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, title, (6, 17), FONT, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([bar, image])


def panel(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, names: Sequence[str],
          palette: Sequence[Sequence[int]], ignore_index: int | None, title: str = "") -> np.ndarray:
    """Image | truth | prediction | errors over a legend, as one RGB picture."""
    views = [
        titled(image, title or "image"),
        titled(blend(image, colorize(truth, palette), 0.6), "truth"),
        titled(blend(image, colorize(pred, palette), 0.6), "prediction"),
        titled(blend(image, error_map(truth, pred, ignore_index), 0.7), "errors"),
    ]
    gap = np.full((views[0].shape[0], 4, 3), 255, np.uint8)
    row = np.hstack([v for view in views for v in (view, gap)][:-1])
    key = legend(names, palette, row.shape[1], extra=[("wrong", WRONG_RGB), ("ignored", IGNORED_RGB)])
    return np.vstack([row, key])
