"""What every instance importer produces, and the per-image work they share.

An importer (one module per format) lists a raw dataset into a ``Listing``: the class
names, one ``ImageRecord`` per image (its instances as geometry, the problems found while
reading the annotation files) and the problems that belong to no image (a label file
without an image). ``inspect_image``, run in worker processes, then decodes each image and
turns its instances into COCO RLE masks at the image's displayed size, checking them.

Geometry is rasterised by pycocotools (``frPyObjects``): COCO's own definition of a
polygon's pixels, the one COCOeval applies to polygon truth, so that an export's polygons
and their RLE agree exactly. Coordinates are pixel edges: (0, 0) is the top-left corner
of the first pixel, (W, H) the bottom-right corner of the last (COCO, LabelMe and VIA
agree). Rectangles become 4-corner polygons; circles and ellipses become polygons with a
vertex about every pixel of their outline.

Problems come in two scopes, each reported by file and reason:
- an image problem (missing or unreadable image, a size that disagrees with the
  annotation, a polygon outside the image by more than 1 px, an unknown class, a
  duplicate id) makes the image unusable: lenient mode skips the image;
- an instance problem (a degenerate polygon, an empty mask, a shape that is not a
  region) concerns geometry that holds no pixels: lenient mode drops that polygon or
  instance and keeps the image with its other instances.
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.config.params import PrepareParams
from pipeline.config.paths import SPLITS
from pipeline.data.datasets import Sample, assign_split
from pipeline.data.images import orientation

IGNORE_LABEL = "__ignore__"          # LabelMe's (and our VIA) label for regions left out of scoring
BACKGROUND_LABEL = "_background_"    # LabelMe's class list and its COCO export hold one: not a class
OUTSIDE_TOLERANCE = 1.0              # px a drawn vertex may lie outside the image (then clipped)
QUARTER_TURNS = {5, 6, 7, 8}
Image.MAX_IMAGE_PIXELS = 16384 * 16384

# Region kinds
POLYGON = "polygon"        # vertices someone drew: x0, y0, x1, y1, ... (checked against the image)
OUTLINE = "outline"        # a polygon we generated (circle, ellipse): clipped without complaint
RLE = "rle"                # a COCO RLE dict, counts compressed (str) or not (list)
MASK_FILE = "mask_file"    # path of a binary mask image of the image's size (DSB 2018)
MASK_PATCH = "mask_patch"  # (x0, y0, base64 PNG): LabelMe 5's mask shape, placed at x0, y0


@dataclass(frozen=True)
class Region:
    kind: str
    data: object


@dataclass
class InstanceSpec:
    cls: int                           # index into the listing's classes
    regions: list[Region]
    where: str                         # names the annotation in messages: "a.json shape 3 (person)"
    iscrowd: bool = False


@dataclass
class ImageRecord:
    rel: str                           # image (or annotation file) path relative to the root
    image: Path | None                 # where the image should be (it may be missing)
    instances: list[InstanceSpec] = field(default_factory=list)
    ignore: list[Region] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)            # found while listing: skip image
    instance_problems: list[str] = field(default_factory=list)   # found while listing: dropped
    size: tuple[int, int] | None = None   # (height, width) the annotation declares
    normalised: bool = False           # polygon coordinates are 0..1 of width and height (YOLO)
    embedded: bytes | None = None      # image bytes carried by the annotation (LabelMe imageData)
    official: str | None = None        # the split the export's folders or file names give
    split: str = ""
    id: str = ""

    def sample(self) -> Sample:
        return Sample(self.split, self.id, self.image or Path(self.rel), None)


@dataclass
class Listing:
    classes: tuple[str, ...]
    images: list[ImageRecord]
    problems: list[dict] = field(default_factory=list)   # {"file", "reasons"}: no image to skip
    warnings: list[dict] = field(default_factory=list)   # {"files", "reason"[, "examples"]}


@dataclass
class Inspected:
    """One image after ``inspect_image``: masks as compressed COCO RLE counts at native size."""

    sample: Sample
    problems: list[str] = field(default_factory=list)      # image problems: the image is skipped
    dropped: list[str] = field(default_factory=list)       # instance problems: geometry dropped
    height: int = 0
    width: int = 0
    image_sha1: str = ""
    instances: list[tuple[int, bool, bytes]] = field(default_factory=list)   # (class, iscrowd, counts)
    ignore: bytes | None = None
    hist: None = None        # what pipeline.prepare.find_problems reads of a semantic inspection


class RegionProblem(Exception):
    def __init__(self, reason: str, image_level: bool):
        super().__init__(reason)
        self.reason, self.image_level = reason, image_level


# -- splits and ids -------------------------------------------------------------------

SPLIT_WORDS = {"train": "train", "training": "train", "val": "val", "valid": "val",
               "validation": "val", "test": "test", "testing": "test"}


def split_named(rel: str) -> str | None:
    """The split a path's folders (or, failing that, the file's stem) name: ``train2017/``,
    ``val/``, ``instances_val2017.json``; None when none or several do."""
    path = PurePosixPath(rel)
    for parts in (path.parent.parts, (path.stem,)):
        found = {SPLIT_WORDS[w] for part in parts for w in re.findall(r"[a-z]+", part.lower())
                 if w in SPLIT_WORDS}
        if len(found) == 1:
            return found.pop()
        if found:
            return None
    return None


def assign_splits(records: list[ImageRecord], cfg: PrepareParams) -> None:
    """Set each record's split and id.

    Official splits are kept where the export has a train split: images of its val/test
    folders stay there, and a split it lacks is carved out of train by hash
    (``prepare.val_fraction`` / ``test_fraction``, as for VOC). Without a train folder
    (COCO128's lone ``train2017/`` counts as train, and then carving gives val and test)
    every image is split by hash. Ids (unless the importer gave one) are the paths below the
    folder all images share, without suffix and without a split folder that gave the split,
    ``/`` written ``__``.
    """
    present = {r.official for r in records} - {None}
    carve = tuple(s for s in SPLITS[1:] if s not in present) if "train" in present else SPLITS[1:]
    for r in records:
        if "train" in present and r.official in ("val", "test"):
            r.split = r.official
        else:
            drawn = assign_split(r.rel, cfg)
            r.split = drawn if drawn in carve else "train"
    stems = [PurePosixPath(r.rel).with_suffix("").parts for r in records]
    common = 0
    if len(stems) > 1:
        while all(len(s) > common + 1 and s[common] == stems[0][common] for s in stems):
            common += 1
    elif stems:
        common = len(stems[0]) - 1
    for r, parts in zip(records, stems, strict=True):
        parts = parts[common:]
        if "train" in present and r.official:      # the split folder says no more than the split
            parts = [p for i, p in enumerate(parts)
                     if i == len(parts) - 1 or split_named(f"{p}/x") != r.official] or parts
        r.id = r.id or "__".join(parts)


def check_unique_ids(records: list[ImageRecord]) -> None:
    """Two images with one id in one split (two JSON files naming one image file, two
    images of one stem): each is an image problem naming the other."""
    groups = defaultdict(list)
    for r in records:
        groups[(r.split, r.id)].append(r)
    for group in groups.values():
        if len(group) > 1:
            for r in group:
                others = ", ".join(o.rel for o in group if o is not r)
                r.problems.append(f"duplicate image id {r.id!r}: also listed as {others}")


def load_classes_txt(path: Path, drop: Iterable[str] = (IGNORE_LABEL, BACKGROUND_LABEL)) -> tuple[str, ...]:
    drop = set(drop)
    return tuple(n.strip() for n in path.read_text().splitlines() if n.strip() and n.strip() not in drop)


# -- geometry -------------------------------------------------------------------------

def rectangle(x0: float, y0: float, x1: float, y1: float) -> tuple[float, ...]:
    xa, xb, ya, yb = min(x0, x1), max(x0, x1), min(y0, y1), max(y0, y1)
    return (xa, ya, xb, ya, xb, yb, xa, yb)


def ellipse(cx: float, cy: float, rx: float, ry: float, theta: float = 0.0) -> tuple[float, ...]:
    """A polygon with a vertex about every pixel of the ellipse's outline (at least 16);
    ``theta`` turns it, in radians, clockwise on screen (VIA's convention)."""
    n = max(16, int(np.ceil(2 * np.pi * max(abs(rx), abs(ry)))))
    t = np.arange(n) * (2 * np.pi / n)
    x, y = rx * np.cos(t), ry * np.sin(t)
    c, s = np.cos(theta), np.sin(theta)
    return tuple(np.stack([cx + c * x - s * y, cy + s * x + c * y], axis=1).ravel().tolist())


def _polygon_rle(region: Region, h: int, w: int, normalised: bool) -> dict:
    from pycocotools import mask as cocomask

    flat = np.asarray(region.data, dtype=np.float64).ravel()
    if flat.size % 2:
        raise RegionProblem(f"polygon with an odd number of coordinates ({flat.size})", True)
    pts = flat.reshape(-1, 2)
    if normalised:
        pts = pts * (w, h)
    if len(pts) < 3:
        raise RegionProblem(f"degenerate polygon: {len(pts)} point(s), at least 3 needed", False)
    if not np.isfinite(pts).all():
        raise RegionProblem("polygon with a coordinate that is not a finite number", True)
    area = 0.5 * abs(np.dot(pts[:, 0], np.roll(pts[:, 1], 1)) - np.dot(pts[:, 1], np.roll(pts[:, 0], 1)))
    if area == 0:
        raise RegionProblem("degenerate polygon: zero area", False)
    if region.kind == POLYGON:
        lo, hi = pts.min(axis=0), pts.max(axis=0)
        if (lo < -OUTSIDE_TOLERANCE).any() or hi[0] > w + OUTSIDE_TOLERANCE or hi[1] > h + OUTSIDE_TOLERANCE:
            raise RegionProblem(
                f"polygon outside the image: x {lo[0]:.1f}..{hi[0]:.1f}, y {lo[1]:.1f}..{hi[1]:.1f} "
                f"in an image of {w}x{h} (more than {OUTSIDE_TOLERANCE:g} px out)", True)
    pts = np.clip(pts, 0, (w, h))
    return cocomask.frPyObjects([pts.ravel().tolist()], h, w)[0]


def _rle_region(data: dict, h: int, w: int) -> dict:
    from pycocotools import mask as cocomask

    try:
        size = [int(v) for v in data["size"]]
        counts = data["counts"]
    except (KeyError, TypeError, ValueError):
        raise RegionProblem("RLE segmentation without 'size' [h, w] and 'counts'", True) from None
    if size != [h, w]:
        raise RegionProblem(f"RLE of size {size[1]}x{size[0]} on an image of {w}x{h}", True)
    try:
        if isinstance(counts, list):
            if sum(int(c) for c in counts) != h * w:
                raise ValueError(f"counts sum to {sum(counts)}, not {h * w} pixels")
            rle = cocomask.frPyObjects({"size": size, "counts": [int(c) for c in counts]}, h, w)
        elif isinstance(counts, str | bytes):
            rle = {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
            # Re-encoding gives the canonical bytes and proves the counts decode to h x w pixels.
            decoded = cocomask.decode(rle)
            rle = cocomask.encode(np.asfortranarray(decoded))
        else:
            raise ValueError(f"counts of type {type(counts).__name__}")
    except (ValueError, TypeError, UnicodeEncodeError) as exc:
        raise RegionProblem(f"unreadable RLE: {exc}", True) from None
    return rle


def _mask_rle(array: np.ndarray, h: int, w: int, what: str) -> dict:
    from pycocotools import mask as cocomask

    if array.ndim == 3:
        array = array[..., :3].max(axis=2) if array.shape[2] >= 3 else array[..., 0]
    if array.shape != (h, w):
        raise RegionProblem(f"mask size mismatch: {what} is {array.shape[1]}x{array.shape[0]}, "
                            f"the image {w}x{h}", True)
    return cocomask.encode(np.asfortranarray((array > 0).astype(np.uint8)))


def _read_mask(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise RegionProblem(f"unreadable mask {path.name}: {exc}", True) from None


def _patch_rle(data: tuple, h: int, w: int) -> dict:
    from pycocotools import mask as cocomask

    x0, y0, encoded = data
    try:
        with Image.open(io.BytesIO(base64.b64decode(encoded))) as im:
            patch = np.asarray(im.convert("L")) > 0
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise RegionProblem(f"unreadable mask shape: {exc}", True) from None
    x, y = int(round(x0)), int(round(y0))
    ph, pw = patch.shape
    if x < 0 or y < 0 or x + pw > w + OUTSIDE_TOLERANCE or y + ph > h + OUTSIDE_TOLERANCE:
        raise RegionProblem(f"mask shape at x {x}, y {y} of {pw}x{ph} outside the image of {w}x{h}", True)
    full = np.zeros((h, w), np.uint8)
    full[y:y + ph, x:x + pw] = patch[:h - y, :w - x]
    return cocomask.encode(np.asfortranarray(full))


def region_rle(region: Region, h: int, w: int, normalised: bool = False) -> dict:
    """One region -> a compressed COCO RLE of (h, w); raises ``RegionProblem``."""
    if region.kind in (POLYGON, OUTLINE):
        return _polygon_rle(region, h, w, normalised)
    if region.kind == RLE:
        return _rle_region(region.data, h, w)
    if region.kind == MASK_FILE:
        path = Path(region.data)
        return _mask_rle(_read_mask(path), h, w, f"mask {path.name}")
    if region.kind == MASK_PATCH:
        return _patch_rle(region.data, h, w)
    raise ValueError(f"unknown region kind {region.kind!r}")


def union(rles: list[dict]) -> dict:
    from pycocotools import mask as cocomask

    return rles[0] if len(rles) == 1 else cocomask.merge(rles, intersect=False)


# -- per image ------------------------------------------------------------------------

def read_image_bytes(record: ImageRecord) -> bytes:
    """The image file's bytes, else those the annotation embeds; FileNotFoundError if neither."""
    if record.image is not None and record.image.is_file():
        return record.image.read_bytes()
    if record.embedded is not None:
        return record.embedded
    raise FileNotFoundError(record.image or record.rel)


def inspect_image(record: ImageRecord) -> Inspected:
    """Decode one image and rasterise its instances; never raises for bad data."""
    from pycocotools import mask as cocomask

    result = Inspected(record.sample(), problems=list(record.problems),
                       dropped=list(record.instance_problems))
    try:
        data = read_image_bytes(record)
        result.image_sha1 = hashlib.sha1(data).hexdigest()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            turn = orientation(im)
            w, h = im.size
            if turn in QUARTER_TURNS:
                w, h = h, w
    except FileNotFoundError as exc:
        result.problems.append(f"missing image {exc.args[0]}")
        return result
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError) as exc:
        result.problems.append(f"unreadable image: {exc}")
        return result
    result.height, result.width = h, w
    if record.size is not None and tuple(record.size) != (h, w):
        stored = (" (the size it is stored at: its EXIF orientation "
                  f"{turn} turns it; annotations must be drawn on the displayed image)"
                  if turn in QUARTER_TURNS and tuple(record.size) == (w, h) else "")
        result.problems.append(f"image size mismatch: the annotation says {record.size[1]}x"
                               f"{record.size[0]}, the image is {w}x{h}{stored}")
    kept = []
    for inst in record.instances:
        rles = []
        for region in inst.regions:
            try:
                rles.append(region_rle(region, h, w, record.normalised))
            except RegionProblem as p:
                (result.problems if p.image_level else result.dropped).append(f"{inst.where}: {p.reason}")
        if not rles:
            continue
        rle = union(rles)
        if cocomask.area(rle) == 0:
            result.dropped.append(f"{inst.where}: empty mask (no pixel inside the image)")
            continue
        kept.append((inst.cls, inst.iscrowd, rle["counts"]))
    ignore = []
    for region in record.ignore:
        try:
            ignore.append(region_rle(region, h, w, record.normalised))
        except RegionProblem as p:
            (result.problems if p.image_level else result.dropped).append(f"ignore region: {p.reason}")
    if not result.problems:
        result.instances = kept
        result.ignore = union(ignore)["counts"] if ignore else None
    return result
