"""DSB 2018 (BBBC038) stage-1 test folders: ``stage1_test/<id>/images/<id>.png`` and one
binary mask PNG per nucleus in ``stage1_test/<id>/masks/`` (0 / 255). One class,
``nucleus``. There is no official split of this folder: it is drawn by hash."""

from __future__ import annotations

from pathlib import Path

from pipeline.config.params import PrepareParams
from pipeline.data.instance_formats.common import MASK_FILE, ImageRecord, InstanceSpec, Listing, Region

CLASSES = ("nucleus",)


def list_images(root: Path, cfg: PrepareParams) -> Listing:
    if cfg.classes is not None:
        raise ValueError("prepare.classes is not for dataset dsb2018: its one class is 'nucleus'; "
                         "set prepare.classes to null")
    base = root / "stage1_test"
    if not base.is_dir():
        raise FileNotFoundError(f"{base}: no stage1_test/ folder (a folder per image) in {root}")
    listing = Listing(CLASSES, [])
    for folder in sorted(p for p in base.iterdir() if p.is_dir()):
        images = sorted((folder / "images").glob("*.png"))
        if len(images) != 1:
            listing.problems.append({"file": str(folder), "reasons": [
                f"expected one image in {folder.name}/images/, found {len(images)}"]})
            continue
        masks = sorted((folder / "masks").glob("*.png"))
        listing.images.append(ImageRecord(
            rel=f"stage1_test/{folder.name}", image=images[0], id=folder.name,
            instances=[InstanceSpec(0, [Region(MASK_FILE, str(m))], f"masks/{m.name}") for m in masks],
        ))
    if not listing.images and not listing.problems:
        raise FileNotFoundError(f"{base}: no image folders")
    return listing
