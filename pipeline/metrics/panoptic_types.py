"""A panoptic labelling: every pixel a segment id, every segment a class (and for thing
classes, an instance of its own).

``Panoptic.ids`` is an (H, W) int32 map of segment ids, 0 where no segment is (void);
``Panoptic.segments`` lists each id's class (0-based index into the dataset's classes),
whether it is a crowd region and, for predictions, its score. Stuff classes have at most
one segment per image; thing classes one per object.

COCO's panoptic PNGs store a segment id in the RGB of each pixel, ``id = R + 256 G +
256^2 B`` (``rgb_to_ids``, ``ids_to_rgb``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

VOID = 0            # the segment id of pixels that belong to no segment
MAX_SEGMENT_ID = 256 ** 3 - 1


@dataclass(frozen=True)
class Segment:
    id: int                     # the value of its pixels in ``Panoptic.ids`` (> 0)
    category: int               # 0-based class index
    iscrowd: bool = False       # truth only: a crowd region, neither matched nor counted
    score: float | None = None  # predictions of thing segments


@dataclass
class Panoptic:
    ids: np.ndarray                                   # (H, W) int32 segment ids, VOID = none
    segments: list[Segment] = field(default_factory=list)

    @property
    def height(self) -> int:
        return int(self.ids.shape[0])

    @property
    def width(self) -> int:
        return int(self.ids.shape[1])

    def category_map(self, void: int) -> np.ndarray:
        """(H, W) int64 class index per pixel; ``void`` where no segment is."""
        by_id = {s.id: s.category for s in self.segments}
        present, inverse = np.unique(self.ids, return_inverse=True)
        lut = np.array([by_id.get(int(i), void) for i in present], dtype=np.int64)
        return lut[inverse].reshape(self.ids.shape)

    def semantic(self, ignore_index: int) -> np.ndarray:
        """The semantic view: (H, W) uint8 class indices, ``ignore_index`` on void and crowd pixels."""
        cls = self.category_map(ignore_index)
        crowd = [s.id for s in self.segments if s.iscrowd]
        if crowd:
            cls[np.isin(self.ids, crowd)] = ignore_index
        return cls.astype(np.uint8)


def rgb_to_ids(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 COCO panoptic colours -> (H, W) int32 segment ids."""
    rgb = np.asarray(rgb, dtype=np.int32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def ids_to_rgb(ids: np.ndarray) -> np.ndarray:
    """(H, W) segment ids -> (H, W, 3) uint8 COCO panoptic colours."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() > MAX_SEGMENT_ID):
        raise ValueError(f"segment ids must lie in 0..{MAX_SEGMENT_ID}")
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)


def encode_png(ids: np.ndarray) -> bytes:
    """Segment ids -> the bytes of a COCO panoptic PNG (RGB)."""
    buf = io.BytesIO()
    Image.fromarray(ids_to_rgb(ids), mode="RGB").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """The bytes of a COCO panoptic PNG -> (H, W) int32 segment ids."""
    with Image.open(io.BytesIO(data)) as im:
        if im.mode != "RGB":
            raise ValueError(f"a COCO panoptic PNG is RGB, not {im.mode}")
        return rgb_to_ids(np.asarray(im))
