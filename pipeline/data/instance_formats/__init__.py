"""Instance-segmentation importers, one module per format, each listing a raw dataset into
a ``common.Listing`` (classes, images with their instances, problems found on the way)."""

from __future__ import annotations

from pathlib import Path

from pipeline.config.params import PrepareParams
from pipeline.data.instance_formats import coco, dsb2018, labelme, via, yolo
from pipeline.data.instance_formats.common import Listing, assign_splits, check_unique_ids

LISTERS = {"dsb2018": dsb2018.list_images, "coco": coco.list_images, "labelme": labelme.list_images,
           "via": via.list_images, "yolo": yolo.list_images}


def list_dataset(dataset: str, root: Path, cfg: PrepareParams) -> Listing:
    """The dataset's listing with every image's split and id set, duplicate ids marked."""
    listing = LISTERS[dataset](Path(root), cfg)
    assign_splits(listing.images, cfg)
    check_unique_ids(listing.images)
    listing.images.sort(key=lambda r: (r.split, r.id, r.rel))
    return listing
