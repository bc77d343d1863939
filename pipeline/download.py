"""Stage ``download``: bring one dataset into the raw-data area, verified.

Order of looking: the raw area itself (nothing is fetched when the data is there and
its digest matches), then the mirror directory (``$SEG_DATA_MIRROR``), then the
network. Whatever the way, files land in a staging directory beside the target and
are renamed into place only once verified. A small receipt (dataset name, tree
digest, file count) is the stage's DVC output; the raw area is versioned by data.dvc.

    python -m pipeline.download --raw data/raw --receipt data/download.json
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from pathlib import Path

from pipeline.config import paths
from pipeline.config.params import DownloadParams, load_params
from pipeline.data import fetch
from pipeline.data.sources import EXPORT_REQUIRES, EXPORTS, SOURCES, Source
from pipeline.utils.io import write_json_atomic

log = logging.getLogger("pipeline.download")

FOLDER_INCLUDE = ("images/**/*", "masks/**/*")
VERIFIED_SUFFIX = ".verified.json"   # digest recorded beside a dataset with no published one


class DatasetError(RuntimeError):
    """Raw data that is missing or does not match what its source promises."""


def included_files(root: Path, include: tuple[str, ...]) -> list[Path]:
    return sorted({p for pattern in include for p in root.glob(pattern) if p.is_file()})


def fetch_dataset(
    source: Source, raw_dir: Path, mirror: Path | None = None, *, retries: int = 3,
    timeout_s: float = 60.0, downloads: Path | None = None,
) -> tuple[Path, str]:
    """Make ``raw_dir/<source.name>`` hold the verified dataset; returns (path, how).

    Archives are downloaded to ``downloads`` (default: ``downloads/`` beside ``raw_dir``),
    outside the staging folder, so that a failed or killed run leaves its ``.part`` file
    for the next run to resume; an archive is deleted once extracted and verified.
    """
    downloads = downloads or raw_dir.parent / paths.DOWNLOADS_DIR.name
    dest = raw_dir / source.name
    if dest.is_dir() and _verified_in_place(source, dest):
        return dest, "already present and verified"
    raw_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=raw_dir, prefix=f".staging-{source.name}-") as tmp:
        staging = Path(tmp) / source.name
        how = _fill_staging(source, staging, Path(tmp), mirror, downloads, retries, timeout_s)
        digest = fetch.tree_digest(staging, included_files(staging, source.include))
        if source.tree_sha256 is not None and digest != source.tree_sha256:
            raise DatasetError(
                f"{source.name} from {how}: content digest {digest} does not match the "
                f"expected {source.tree_sha256}; nothing was written to {dest}"
            )
        fetch.replace_dir(staging, dest)
    if source.tree_sha256 is None:   # remember what was verified, for the next run
        write_json_atomic(raw_dir / (source.name + VERIFIED_SUFFIX), {"tree_sha256": digest})
    return dest, how


def _verified_in_place(source: Source, dest: Path) -> bool:
    expected = source.tree_sha256
    record = dest.with_name(source.name + VERIFIED_SUFFIX)
    if expected is None and record.exists():
        expected = json.loads(record.read_text())["tree_sha256"]
    if expected is None:
        return False
    return fetch.tree_digest(dest, included_files(dest, source.include)) == expected


def _fill_staging(
    source: Source, staging: Path, tmp: Path, mirror: Path | None, downloads: Path, retries: int,
    timeout_s: float,
) -> str:
    """Put the source's files under ``staging`` from the mirror or the network."""
    if mirror is not None:
        tree = mirror / source.name
        if tree.is_dir() and included_files(tree, source.include):
            _copy_files(tree, staging, included_files(tree, source.include))
            return f"mirror {tree}"
        archives = [_mirror_archive(mirror, source, a.filename) for a in source.archives]
        if all(archives):
            _extract_all(source, list(zip(source.archives, archives, strict=True)), staging, tmp)
            return f"mirror archives in {mirror}"
        log.warning("%s: mirror %s holds neither %s/ nor its archives; using the network",
                    source.name, mirror, source.name)
    fetched = []
    for archive in source.archives:
        log.info("downloading %s", archive.url)
        path = fetch.download(archive.url, downloads / archive.filename, archive.checksum,
                              retries=retries, timeout_s=timeout_s)
        fetched.append((archive, path))
    _extract_all(source, fetched, staging, tmp)
    for _, path in fetched:
        path.unlink()
    return "the network"


def _mirror_archive(mirror: Path, source: Source, filename: str) -> Path | None:
    for candidate in (mirror / source.name / filename, mirror / filename):
        if candidate.is_file():
            return candidate
    return None


def _extract_all(source: Source, archives: list, staging: Path, tmp: Path) -> None:
    for archive, path in archives:
        if archive.checksum is not None:   # verified before anything is extracted
            fetch.verify_checksum(path, archive.checksum)
        unpacked = tmp / f"unpacked-{archive.filename}"
        fetch.safe_extract(path, unpacked)
        root = unpacked / archive.subdir
        if not root.is_dir():
            raise DatasetError(f"{archive.filename}: expected folder {archive.subdir!r} inside")
        _move_files(root, staging, included_files(root, source.include))
        shutil.rmtree(unpacked)


def _copy_files(src_root: Path, dst_root: Path, files: list[Path]) -> None:
    for f in files:
        target = dst_root / f.relative_to(src_root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, target)


def _move_files(src_root: Path, dst_root: Path, files: list[Path]) -> None:
    for f in files:
        target = dst_root / f.relative_to(src_root)
        target.parent.mkdir(parents=True, exist_ok=True)
        f.replace(target)


def folder_source(folder: Path, dataset: str = "folder") -> Source:
    """A user's folder: ``images/`` and ``masks/`` (optionally split subfolders) for
    ``folder``, or an annotation export (``coco``, ``labelme``, ``via``, ``yolo``: see
    ``pipeline.data.sources.EXPORTS``)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"download.folder {folder}: not a directory")
    if dataset == "folder":
        for sub in ("images", "masks"):
            if not (folder / sub).is_dir():
                raise DatasetError(f"download.folder {folder}: expected a subfolder {sub}/")
        return Source(name="folder", archives=(), include=FOLDER_INCLUDE)
    for pattern in EXPORT_REQUIRES[dataset]:
        if not any(p.is_file() for p in folder.glob(pattern)):
            raise DatasetError(
                f"download.folder {folder}: a {dataset} export needs files matching {pattern!r} "
                f"(it is made of {', '.join(EXPORTS[dataset][:3])}, ...)"
            )
    return Source(name=dataset, archives=(), include=EXPORTS[dataset])


def fetch_folder(folder: Path, raw_dir: Path, dataset: str = "folder") -> tuple[Path, str]:
    """Copy a user's folder (``folder_source``) into ``raw_dir/<dataset>`` so that data.dvc
    versions it."""
    source = folder_source(folder, dataset)
    dest = raw_dir / source.name
    files = included_files(folder, source.include)
    digest = fetch.tree_digest(folder, files)
    if dest.is_dir() and fetch.tree_digest(dest, included_files(dest, source.include)) == digest:
        return dest, "already present and verified"
    raw_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=raw_dir, prefix=f".staging-{source.name}-") as tmp:
        staging = Path(tmp) / source.name
        _copy_files(folder, staging, files)
        fetch.replace_dir(staging, dest)
    return dest, f"folder {folder}"


def receipt(dataset: str, root: Path, include: tuple[str, ...]) -> dict:
    """What the stage records: determined by the content alone, not by how it arrived."""
    files = included_files(root, include)
    return {
        "dataset": dataset,
        "path": root.as_posix(),
        "tree_sha256": fetch.tree_digest(root, files),
        "files": len(files),
        "bytes": sum(f.stat().st_size for f in files),
    }


def run(cfg: DownloadParams, raw_dir: Path, receipt_path: Path) -> dict:
    if cfg.dataset == "folder" or cfg.dataset in EXPORTS:
        root, how = fetch_folder(Path(cfg.folder), raw_dir, cfg.dataset)
        include = folder_source(root, cfg.dataset).include
    else:
        source = SOURCES[cfg.dataset]
        root, how = fetch_dataset(source, raw_dir, paths.data_mirror(),
                                  retries=cfg.retries, timeout_s=cfg.timeout_s)
        include = source.include
    record = receipt(cfg.dataset, root, include)
    write_json_atomic(receipt_path, record)
    log.info("%s: %d files, %.1f MB in %s (%s)", cfg.dataset, record["files"],
             record["bytes"] / 1e6, root, how)
    return record


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", type=Path, default=paths.RAW_DIR)
    parser.add_argument("--receipt", type=Path, default=paths.DOWNLOAD_RECEIPT)
    parser.add_argument("--params", type=Path, default=paths.PARAMS_FILE)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    cfg = load_params(DownloadParams, args.params)
    run(cfg, args.raw, args.receipt)


if __name__ == "__main__":
    main()
