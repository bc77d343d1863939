"""What every panoptic importer produces, and the per-image work they share.

An importer (one module per format) lists a raw dataset into a ``Listing``: the classes
with ``isthing`` and colours, one ``PanopticRecord`` per image (its image and label file,
problems found while listing), the problems that belong to no image (a label file without
an image), and a ``reader``: the function that turns one record's label file into
``Labels``, segment keys per pixel and each key's class. ``inspect_image`` (in worker
processes) reads the image and the labels and checks them; ``convert_labels`` then gives a
prepared row's segment ids, renumbered, resized and measured.

Problems, each naming the label file and the segment:
- an image problem (missing or unreadable image or label, sizes that disagree, a segment id
  in the PNG that the annotation lacks, a category outside the class list, one segment id
  listed twice, an instance id on a stuff class, a duplicate id) makes the image unusable:
  lenient mode skips the image;
- a segment problem (a segment listed without a pixel) leaves that entry out and keeps
  the image (``"skipped": "segments"`` in problems.json).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from scipy import ndimage

from pipeline.data.datasets import Sample
from pipeline.data.instance_formats.common import ImageRecord
from pipeline.data.instance_formats.common import inspect_image as inspect_image_file


class LabelError(Exception):
    """A label file that cannot be read at all (an image problem)."""


@dataclass
class PanopticRecord:
    rel: str                            # image path relative to the root (messages, split, id)
    image: Path | None                  # where the image should be (it may be missing)
    label: Path | None                  # the label file (PNG); None: none, and ``problems`` say why
    info: object = None                 # what the reader needs beyond the file (COCO: segments_info)
    problems: list[str] = field(default_factory=list)   # found while listing: skip the image
    official: str | None = None         # the split the export's folders or file names give
    split: str = ""
    id: str = ""

    def sample(self) -> Sample:
        return Sample(self.split, self.id, self.image or Path(self.rel), self.label)


@dataclass
class Labels:
    """One label file read at its own size.

    ``keys``: (H, W) int64, a segment key per pixel, 0 = void (no segment); ``segments``: key ->
    (class index, iscrowd) for every key with pixels; ``problems`` make the image unusable,
    ``dropped`` are segments listed without a pixel (left out); ``voided`` counts the thing
    components of a semantic mask too small to be instances (made void)."""

    keys: np.ndarray
    segments: dict[int, tuple[int, bool]]
    problems: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    voided: int = 0


Reader = Callable[[PanopticRecord], Labels]


@dataclass
class Listing:
    classes: tuple[str, ...]
    isthing: tuple[bool, ...]
    palette: tuple[tuple[int, int, int], ...]
    ignore_index: int
    reader: Reader
    images: list[PanopticRecord]
    problems: list[dict] = field(default_factory=list)   # {"file", "reasons"}: no image to skip
    warnings: list[dict] = field(default_factory=list)   # {"files", "reason"}
    notes: list[str] = field(default_factory=list)       # what the card says of how labels were read


@dataclass
class Inspected:
    sample: Sample
    problems: list[str] = field(default_factory=list)   # image problems: the image is skipped
    dropped: list[str] = field(default_factory=list)    # segment problems: those entries left out
    image_sha1: str = ""


def read_label_png(path: Path | None) -> np.ndarray:
    """A label PNG's pixels as stored (no palette or mode conversion); raises ``LabelError``."""
    if path is None or not path.is_file():
        raise LabelError(f"missing label {path}" if path else "missing label")
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError) as exc:
        raise LabelError(f"unreadable label {path.name}: {exc}") from None


def rgb_channels(array: np.ndarray, path: Path, what: str) -> np.ndarray:
    """(H, W, >= 3) -> (H, W, 3) int64; raises ``LabelError`` naming ``what`` the file should be."""
    if array.ndim != 3 or array.shape[2] < 3:
        raise LabelError(f"{path.name}: {what} is an RGB PNG, this one has "
                         f"{1 if array.ndim == 2 else array.shape[2]} channel(s)")
    return array[..., :3].astype(np.int64)


def stuff_with_instances(segments: dict[int, tuple[int, bool]], isthing: tuple[bool, ...],
                         names: tuple[str, ...], where: str) -> list[str]:
    """A stuff class with more than one segment in one image: a problem per class."""
    by_class: dict[int, list[int]] = {}
    for key, (cls, _) in segments.items():
        if not isthing[cls]:
            by_class.setdefault(cls, []).append(key)
    return [f"{where}: stuff class {names[c]!r} has {len(keys)} segments (ids {sorted(keys)[:10]}); "
            "stuff takes one segment per image, an instance id on a stuff class is an error"
            for c, keys in sorted(by_class.items()) if len(keys) > 1]


def inspect_image(record: PanopticRecord, reader: Reader) -> Inspected:
    """Read one image and its labels and list every problem; never raises for bad data."""
    # The image is read and checked as instance datasets' are (missing, unreadable, EXIF turns).
    image = inspect_image_file(ImageRecord(rel=record.rel, image=record.image, problems=list(record.problems),
                                           split=record.split, id=record.id))
    result = Inspected(record.sample(), problems=image.problems, image_sha1=image.image_sha1)
    if not image.height or record.label is None:      # no label: the listing has said why
        return result
    try:
        labels = reader(record)
    except LabelError as exc:
        result.problems.append(str(exc))
        return result
    h, w = image.height, image.width
    lh, lw = labels.keys.shape
    if (lh, lw) != (h, w):
        turned = (" (it fits the image turned a quarter: labels must be drawn on the image as displayed, "
                  "after its EXIF orientation)" if (lh, lw) == (w, h) else "")
        result.problems.append(f"image/label size mismatch: image {w}x{h}, label {lw}x{lh} "
                               f"({record.label}){turned}")
    result.problems.extend(labels.problems)
    result.dropped.extend(labels.dropped)
    return result


def renumber(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Segment keys -> (ids, keys of ids): (H, W) int32 ids 1..N numbered in the order of
    each segment's first pixel in row-major order (0 stays void), and the (N,) key of id
    i + 1. The numbering depends on the pixels alone, not on the format's ids."""
    present, first, inverse = np.unique(keys.ravel(), return_index=True, return_inverse=True)
    segment = np.flatnonzero(present != 0)
    order = segment[np.argsort(first[segment], kind="stable")]
    rank = np.zeros(len(present), np.int32)
    rank[order] = np.arange(1, len(order) + 1, dtype=np.int32)
    return rank[inverse.ravel()].reshape(keys.shape), present[order]


def convert_labels(labels: Labels, out: tuple[int, int]) -> tuple[np.ndarray, list[dict], int]:
    """(ids (h, w) int32, segment rows, segments a downscale left without a pixel) at size
    ``out`` (h, w): ids nearest-neighbour resized as semantic masks are (PIL's, which samples
    pixel centres), each row's area and tight box (x0, y0, x1, y1) measured afterwards."""
    ids, keys = renumber(labels.keys)
    before = len(keys)
    if ids.shape != tuple(out):
        small = Image.fromarray(ids).resize((out[1], out[0]), Image.Resampling.NEAREST)
        ids, kept = renumber(np.asarray(small, dtype=np.int64))
        keys = keys[kept - 1]
    areas = np.bincount(ids.ravel(), minlength=len(keys) + 1)[1:]
    rows = []
    for i, (box, key) in enumerate(zip(ndimage.find_objects(ids, max_label=len(keys)), keys, strict=True)):
        cls, crowd = labels.segments[int(key)]
        ys, xs = box
        rows.append({"id": i + 1, "class": cls, "iscrowd": crowd, "area": int(areas[i]),
                     "box": [float(xs.start), float(ys.start), float(xs.stop), float(ys.stop)]})
    return ids, rows, before - len(keys)
