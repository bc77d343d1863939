"""The prepared dataset's storage: Parquet shards of encoded image and mask bytes.

Layout: ``<prepared>/<split>/part-NNNNN.parquet``, rows sorted by id, columns
``id`` (string), ``image`` (encoded PNG/JPEG bytes), ``mask`` (PNG, mode L, class
indices), ``height``/``width`` (int32), ``image_format`` (string). Ray Data reads
the shards with ``ray.data.read_parquet``; pandas, pyarrow and the dashboard read
them directly.

Instance datasets (``task: instance``, ``INSTANCE_SCHEMA``) replace ``mask`` with
``instances``, a list per image of {class (0-based, no background), box (x0, y0, x1, y1
in pixels, the mask's tight box), iscrowd, rle (compressed COCO RLE counts of the row's
height x width)}, and add ``ignore``: null, or the RLE counts of the image's ignore regions.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

if TYPE_CHECKING:
    from pipeline.metrics.instance import Instances

SCHEMA = pa.schema([
    ("id", pa.string()),
    ("image", pa.binary()),
    ("mask", pa.binary()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("image_format", pa.string()),
])
INSTANCE_TYPE = pa.struct([
    ("class", pa.int32()),
    ("box", pa.list_(pa.float32(), 4)),
    ("iscrowd", pa.bool_()),
    ("rle", pa.binary()),
])
INSTANCE_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("image", pa.binary()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("image_format", pa.string()),
    ("instances", pa.list_(INSTANCE_TYPE)),
    ("ignore", pa.binary()),
])
# Panoptic datasets (``task: panoptic``): ``panoptic`` is a COCO panoptic PNG (RGB, segment id
# R + 256 G + 256^2 B, 0 = void) of the row's height x width, ``segments`` each segment id's
# class (0-based), iscrowd, area (pixels) and box (x0, y0, x1, y1, the tight box).
SEGMENT_TYPE = pa.struct([
    ("id", pa.int32()),
    ("class", pa.int32()),
    ("iscrowd", pa.bool_()),
    ("area", pa.int64()),
    ("box", pa.list_(pa.float32(), 4)),
])
PANOPTIC_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("image", pa.binary()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("image_format", pa.string()),
    ("panoptic", pa.binary()),
    ("segments", pa.list_(SEGMENT_TYPE)),
])
ROW_GROUP_ROWS = 16   # small row groups let readers stream a few images at a time
# Encoded PNG/JPEG does not compress further: spend no CPU on the binary columns.
COMPRESSION = {"id": "zstd", "image": "none", "mask": "none", "height": "zstd",
               "width": "zstd", "image_format": "zstd"}
# RLE counts are text-like and compress; nested columns are named by their leaf paths.
INSTANCE_COMPRESSION = {"id": "zstd", "image": "none", "height": "zstd", "width": "zstd",
                        "image_format": "zstd", "instances.list.element.class": "zstd",
                        "instances.list.element.box.list.element": "zstd",
                        "instances.list.element.iscrowd": "zstd",
                        "instances.list.element.rle": "zstd", "ignore": "zstd"}
# Panoptic PNGs are compressed already.
PANOPTIC_COMPRESSION = {"id": "zstd", "image": "none", "height": "zstd", "width": "zstd",
                        "image_format": "zstd", "panoptic": "none",
                        **{f"segments.list.element.{leaf}": "zstd"
                           for leaf in ("id", "class", "iscrowd", "area", "box.list.element")}}


def _compression(schema: pa.Schema) -> dict[str, str]:
    for known, compression in ((INSTANCE_SCHEMA, INSTANCE_COMPRESSION),
                               (PANOPTIC_SCHEMA, PANOPTIC_COMPRESSION)):
        if schema is known:
            return compression
    return COMPRESSION


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def write_shard(rows: list[dict], path: Path, schema: pa.Schema = SCHEMA) -> Path:
    """Write ``rows`` (already sorted by id) as one Parquet shard of ``schema``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(
        table, path, row_group_size=ROW_GROUP_ROWS,
        compression=_compression(schema),
        use_dictionary=["image_format"], write_statistics=["id", "height", "width"],
    )
    return path


def shard_paths(prepared: Path, split: str) -> list[Path]:
    paths = sorted((Path(prepared) / split).glob("part-*.parquet"))
    if not paths:
        raise FileNotFoundError(f"{Path(prepared) / split}: no part-*.parquet shards")
    return paths


def read_split(prepared: Path, split: str, columns: list[str] | None = None) -> pa.Table:
    return pa.concat_tables(pq.read_table(p, columns=columns) for p in shard_paths(prepared, split))


def decode_image(data: bytes) -> np.ndarray:
    """Encoded bytes -> (H, W, 3) uint8 RGB."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def decode_mask(data: bytes) -> np.ndarray:
    """Prepared mask bytes -> (H, W) uint8 class indices (ignore label as recorded)."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im)


def iter_samples(prepared: Path, split: str) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(id, image (H, W, 3) uint8, mask (H, W) uint8) for every row of a split."""
    for path in shard_paths(prepared, split):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=ROW_GROUP_ROWS):
            for row in batch.to_pylist():
                yield row["id"], decode_image(row["image"]), decode_mask(row["mask"])


def decode_instances(row: dict) -> Instances:
    """A prepared instance row (``INSTANCE_SCHEMA``) -> its truth as ``Instances``: masks as
    {"size": [h, w], "counts": str} COCO RLE, boxes x0, y0, x1, y1, ``iscrowd`` 0/1."""
    from pipeline.metrics.instance import Instances

    h, w = int(row["height"]), int(row["width"])
    items = row["instances"] if row["instances"] is not None else []
    return Instances(
        height=h, width=w,
        classes=[int(i["class"]) for i in items],
        boxes=[[float(v) for v in i["box"]] for i in items],
        masks=[{"size": [h, w], "counts": bytes(i["rle"]).decode("ascii")} for i in items],
        iscrowd=[int(bool(i["iscrowd"])) for i in items],
    )


def iter_instance_samples(prepared: Path, split: str) -> Iterator[tuple[str, np.ndarray, Instances]]:
    """(id, image (H, W, 3) uint8, ``Instances``) for every row of an instance split."""
    for path in shard_paths(prepared, split):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=ROW_GROUP_ROWS):
            for row in batch.to_pylist():
                yield row["id"], decode_image(row["image"]), decode_instances(row)


def decode_panoptic(row: dict):
    """A prepared panoptic row (``PANOPTIC_SCHEMA``) -> its truth as ``Panoptic``."""
    from pipeline.metrics.panoptic_types import Panoptic, Segment, decode_png

    segments = [Segment(id=int(s["id"]), category=int(s["class"]), iscrowd=bool(s["iscrowd"]))
                for s in (row["segments"] or [])]
    return Panoptic(ids=decode_png(row["panoptic"]), segments=segments)


def iter_panoptic_samples(prepared: Path, split: str):
    """(id, image (H, W, 3) uint8, ``Panoptic``) for every row of a panoptic split."""
    for path in shard_paths(prepared, split):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=ROW_GROUP_ROWS):
            for row in batch.to_pylist():
                yield row["id"], decode_image(row["image"]), decode_panoptic(row)
