"""The prepared dataset's storage: Parquet shards of encoded image and mask bytes.

Layout: ``<prepared>/<split>/part-NNNNN.parquet``, rows sorted by id, columns
``id`` (string), ``image`` (encoded PNG/JPEG bytes), ``mask`` (PNG, mode L, class
indices), ``height``/``width`` (int32), ``image_format`` (string). Ray Data reads
the shards with ``ray.data.read_parquet``; pandas, pyarrow and the dashboard read
them directly.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

SCHEMA = pa.schema([
    ("id", pa.string()),
    ("image", pa.binary()),
    ("mask", pa.binary()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("image_format", pa.string()),
])
ROW_GROUP_ROWS = 16   # small row groups let readers stream a few images at a time
# Encoded PNG/JPEG does not compress further: spend no CPU on the binary columns.
COMPRESSION = {"id": "zstd", "image": "none", "mask": "none", "height": "zstd",
               "width": "zstd", "image_format": "zstd"}


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def write_shard(rows: list[dict], path: Path) -> Path:
    """Write ``rows`` (already sorted by id) as one Parquet shard."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    pq.write_table(
        table, path, row_group_size=ROW_GROUP_ROWS, compression=COMPRESSION,
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
