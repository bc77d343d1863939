"""What each dataset's raw files look like: class lists, palettes and sample listing.

``list_samples`` turns a raw dataset folder into ``Sample`` records (split, id, image
path, mask path); ``class_spec`` gives the classes, palette, ignore label and any
raw-value remapping. Checking and converting the files is ``pipeline.prepare``'s job.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config.params import PrepareParams
from pipeline.config.paths import SPLITS

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm"}


@dataclass(frozen=True)
class ClassSpec:
    names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    ignore_index: int
    # Raw mask value -> class index (or ignore_index); None leaves values as they are.
    label_map: dict[int, int] | None = None
    mask_format: str = "index"      # "index" (one value per pixel) or "color" (RGB palette)

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def to_json(self) -> dict:
        return {
            "names": list(self.names),
            "palette": [list(c) for c in self.palette],
            "ignore_index": self.ignore_index,
            "num_classes": self.num_classes,
        }


@dataclass(frozen=True)
class Sample:
    split: str
    id: str
    image: Path
    mask: Path | None      # None: no mask file was found for this image
    extra: dict = field(default_factory=dict, compare=False)


def voc_palette(n: int) -> tuple[tuple[int, int, int], ...]:
    """The PASCAL VOC colour map: class bits spread over the high bits of R, G, B."""
    colours = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colours.append((r, g, b))
    return tuple(colours)


CAMVID_CLASSES = ClassSpec(
    names=("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence",
           "Car", "Pedestrian", "Bicyclist"),
    palette=((128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222),
             (128, 128, 0), (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0),
             (0, 128, 192)),
    ignore_index=11,
)
# Trimaps: 1 pet, 2 background, 3 border (ambiguous, ignored).
PET_CLASSES = ClassSpec(
    names=("background", "pet"), palette=((0, 0, 0), (255, 128, 0)), ignore_index=255,
    label_map={1: 1, 2: 0, 3: 255},
)
VOC_CLASSES = ClassSpec(
    names=("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
           "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
           "pottedplant", "sheep", "sofa", "train", "tvmonitor"),
    palette=voc_palette(21), ignore_index=255,
)
BUILTIN = {"camvid": CAMVID_CLASSES, "pet": PET_CLASSES, "voc": VOC_CLASSES}


def class_spec(dataset: str, cfg: PrepareParams) -> ClassSpec:
    """The dataset's classes; for ``folder`` they come from ``prepare.classes``."""
    if dataset in BUILTIN:
        given = [k for k in ("classes", "palette") if getattr(cfg, k) is not None]
        if given or cfg.mask_format != "index":
            raise ValueError(
                f"prepare.{(given or ['mask_format'])[0]} is only for dataset 'folder'; "
                f"{dataset} has its own class list"
            )
        return BUILTIN[dataset]
    if cfg.classes is None:
        raise ValueError("dataset 'folder' needs prepare.classes: the list of class names")
    if len(cfg.classes) < 2:
        raise ValueError("prepare.classes: dataset 'folder' needs at least 2 classes (with the "
                         "background); a one-class list is for instance datasets")
    palette = cfg.palette or voc_palette(len(cfg.classes))
    if cfg.ignore_index < len(cfg.classes):
        raise ValueError(
            f"prepare.ignore_index {cfg.ignore_index} collides with class "
            f"{cfg.classes[cfg.ignore_index]!r}; use a value >= {len(cfg.classes)}"
        )
    return ClassSpec(tuple(cfg.classes), tuple(tuple(c) for c in palette), cfg.ignore_index,
                     mask_format=cfg.mask_format)


def assign_split(key: str, cfg: PrepareParams, splits: tuple[str, ...] = SPLITS) -> str:
    """A deterministic split from a hash of the seed and the sample key.

    Stable when samples are added or removed: each sample's split depends on itself only.
    """
    u = int(hashlib.sha1(f"{cfg.seed}:{key}".encode()).hexdigest()[:12], 16) / 16**12
    if "test" in splits and u < cfg.test_fraction:
        return "test"
    if u < cfg.test_fraction + cfg.val_fraction:
        return "val"
    return "train"


def list_samples(dataset: str, root: Path, cfg: PrepareParams) -> list[Sample]:
    return LISTERS[dataset](Path(root), cfg)


def _read_list(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: split list not found")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def _camvid(root: Path, cfg: PrepareParams) -> list[Sample]:
    samples = []
    for split in SPLITS:
        # Lines hold "image annot" with a stale absolute prefix: only the names matter.
        for entry in _read_list(root / f"{split}.txt"):
            name = Path(entry).name
            mask = root / f"{split}annot" / name
            samples.append(Sample(split, Path(name).stem, root / split / name,
                                  mask if mask.exists() else None))
    return samples


def _pet(root: Path, cfg: PrepareParams) -> list[Sample]:
    samples = []
    for list_name, official in (("trainval.txt", "trainval"), ("test.txt", "test")):
        for name in _read_list(root / "annotations" / list_name):
            split = "test" if official == "test" else assign_split(name, cfg, ("train", "val"))
            mask = root / "annotations" / "trimaps" / f"{name}.png"
            samples.append(Sample(split, name, root / "images" / f"{name}.jpg",
                                  mask if mask.exists() else None))
    return samples


def _voc(root: Path, cfg: PrepareParams) -> list[Sample]:
    # The official val split serves as our test split (VOC's test labels are not public);
    # our val split is carved out of the official train list.
    samples = []
    for list_name in ("train", "val"):
        for name in _read_list(root / "ImageSets" / "Segmentation" / f"{list_name}.txt"):
            split = "test" if list_name == "val" else assign_split(name, cfg, ("train", "val"))
            mask = root / "SegmentationClass" / f"{name}.png"
            samples.append(Sample(split, name, root / "JPEGImages" / f"{name}.jpg",
                                  mask if mask.exists() else None))
    return samples


def _folder(root: Path, cfg: PrepareParams) -> list[Sample]:
    """``images/`` and ``masks/``, either flat (split by hash) or with train/val/test folders.

    A mask matches an image with the same relative path and stem, any image suffix.
    """
    images_root, masks_root = root / "images", root / "masks"
    masks = {}
    for m in sorted(masks_root.rglob("*")):
        if m.is_file() and m.suffix.lower() in IMAGE_SUFFIXES:
            masks.setdefault(m.relative_to(masks_root).with_suffix("").as_posix(), m)
    presplit = any((images_root / s).is_dir() for s in SPLITS)
    samples = []
    for img in sorted(images_root.rglob("*")):
        if not img.is_file() or img.name.startswith("."):
            continue
        key = img.relative_to(images_root).with_suffix("").as_posix()
        if presplit:
            split, _, name = key.partition("/")
            if split not in SPLITS:
                continue
        else:
            split, name = assign_split(key, cfg), key
        samples.append(Sample(split, name.replace("/", "__"), img, masks.get(key)))
    if not samples:
        raise FileNotFoundError(f"{images_root}: no image files found")
    return samples


LISTERS = {"camvid": _camvid, "pet": _pet, "voc": _voc, "folder": _folder}
