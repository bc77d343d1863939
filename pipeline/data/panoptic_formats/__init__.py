"""Panoptic importers, one module per format, each listing a raw dataset into a
``common.Listing`` (classes with isthing, images with their label files, the reader of a
label file, problems found on the way): COCO panoptic exports, ADE20K's seg PNGs, and any
semantic dataset with ``prepare.thing_classes``."""

from __future__ import annotations

from pathlib import Path

from pipeline.config.params import PANOPTIC_DATASETS, SEMANTIC_DATASETS, PrepareParams
from pipeline.data.instance_formats.common import assign_splits, check_unique_ids
from pipeline.data.panoptic_formats import ade20k, coco, semantic
from pipeline.data.panoptic_formats.common import Listing

LISTERS = {"coco_panoptic": coco.list_images, "ade20k": ade20k.list_images}


def list_dataset(dataset: str, root: Path, cfg: PrepareParams) -> Listing:
    """The dataset's listing with every image's split and id set, duplicate ids marked."""
    if dataset in SEMANTIC_DATASETS:
        listing = semantic.list_images(dataset, Path(root), cfg)     # the dataset's own splits and ids
    elif dataset in PANOPTIC_DATASETS:
        listing = LISTERS[dataset](Path(root), cfg)
        assign_splits(listing.images, cfg)
    else:
        raise ValueError(f"download.dataset {dataset!r} cannot be prepared as panoptic: use one of "
                         f"{', '.join(PANOPTIC_DATASETS + SEMANTIC_DATASETS)}")
    check_unique_ids(listing.images)
    listing.images.sort(key=lambda r: (r.split, r.id, r.rel))
    return listing
