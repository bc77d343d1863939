"""pipeline.download: a tiny fake dataset served over real HTTP on 127.0.0.1, or from a mirror."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from pipeline import download
from pipeline.config import paths
from pipeline.config.params import default_params
from pipeline.data import fetch
from pipeline.data.sources import Archive, Source

NAME = "tiny"
SUBDIR = "tiny-main/data"
# What the dataset is made of; README.md is in the archive but not in the dataset.
FILES = {
    "images/a.png": b"\x89PNG image a",
    "images/b.png": b"\x89PNG image b",
    "masks/a.png": b"\x89PNG mask a",
    "masks/b.png": b"\x89PNG mask b",
}
INCLUDE = ("images/*.png", "masks/*.png")


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def tar_gz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def archive_bytes() -> bytes:
    members = {f"{SUBDIR}/{rel}": data for rel, data in FILES.items()}
    members["tiny-main/README.md"] = b"not part of the dataset"
    return tar_gz(members)


@pytest.fixture
def expected_digest(tmp_path) -> str:
    root = write_tree(tmp_path / "expected", FILES)
    digest = fetch.tree_digest(root, download.included_files(root, INCLUDE))
    shutil.rmtree(root)
    return digest


@pytest.fixture
def source(server, archive_bytes, expected_digest) -> Source:
    url = server.add("/tiny.tar.gz", archive_bytes)
    archive = Archive(url=url, filename="tiny.tar.gz",
                      checksum="sha256:" + hashlib.sha256(archive_bytes).hexdigest(), subdir=SUBDIR)
    return Source(name=NAME, archives=(archive,), include=INCLUDE, tree_sha256=expected_digest)


@pytest.fixture
def raw(tmp_path) -> Path:
    return tmp_path / "raw"


def staging_leftovers(raw: Path) -> list[str]:
    return sorted(p.name for p in raw.glob(".staging-*")) if raw.exists() else []


# -- fetch_dataset -----------------------------------------------------------------

def test_network_fetch_lands_verified_dataset(server, source, raw):
    dest, how = download.fetch_dataset(source, raw, mirror=None, retries=0)

    assert how == "the network"
    assert dest == raw / NAME
    assert read_tree(dest) == FILES   # README.md left out by the include globs
    assert staging_leftovers(raw) == []
    assert sorted(p.name for p in raw.iterdir()) == [NAME]
    assert len(server.requests) == 1


def test_network_fetch_resumes_a_dropped_archive(server, source, raw, archive_bytes):
    cut = len(archive_bytes) // 2
    server.add("/tiny.tar.gz", archive_bytes, drop_after=cut)

    dest, how = download.fetch_dataset(source, raw, retries=1)

    assert how == "the network"
    assert read_tree(dest) == FILES
    assert [r.range for r in server.requests] == [None, f"bytes={cut}-"]


def test_a_failed_run_leaves_its_partial_download_for_the_next_run(server, source, raw, archive_bytes):
    cut = len(archive_bytes) // 3
    server.add("/tiny.tar.gz", archive_bytes, drop_after=cut)
    with pytest.raises(fetch.DownloadError, match="for the next run to resume"):
        download.fetch_dataset(source, raw, retries=0)
    assert not (raw / NAME).exists()
    part = raw.parent / "downloads" / "tiny.tar.gz.part"
    assert part.stat().st_size == cut

    dest, _ = download.fetch_dataset(source, raw, retries=0)     # a new run

    assert read_tree(dest) == FILES
    assert [r.range for r in server.requests] == [None, f"bytes={cut}-"]
    assert list((raw.parent / "downloads").iterdir()) == []      # archive removed once extracted


def test_second_fetch_downloads_nothing(server, source, raw):
    download.fetch_dataset(source, raw, retries=0)
    count = len(server.requests)

    dest, how = download.fetch_dataset(source, raw, retries=0)

    assert how == "already present and verified"
    assert len(server.requests) == count
    assert read_tree(dest) == FILES


def test_damaged_raw_copy_is_fetched_again(server, source, raw):
    dest, _ = download.fetch_dataset(source, raw, retries=0)
    (dest / "masks" / "a.png").write_bytes(b"damaged")

    _, how = download.fetch_dataset(source, raw, retries=0)

    assert how == "the network"
    assert len(server.requests) == 2
    assert read_tree(dest) == FILES
    assert not (raw / f"{NAME}.old").exists()


def test_without_published_digest_the_verified_one_is_remembered(server, source, raw):
    source = dataclasses.replace(source, tree_sha256=None)

    download.fetch_dataset(source, raw, retries=0)
    record = json.loads((raw / f"{NAME}{download.VERIFIED_SUFFIX}").read_text())
    _, how = download.fetch_dataset(source, raw, retries=0)

    assert record["tree_sha256"] == fetch.tree_digest(raw / NAME)
    assert how == "already present and verified"
    assert len(server.requests) == 1


def test_mirror_tree_is_used_without_http(server, source, raw, tmp_path):
    mirror = tmp_path / "mirror"
    write_tree(mirror / NAME, FILES | {"extra/notes.txt": b"ignored"})

    dest, how = download.fetch_dataset(source, raw, mirror=mirror, retries=0)

    assert how == f"mirror {mirror / NAME}"
    assert read_tree(dest) == FILES
    assert server.requests == []
    assert staging_leftovers(raw) == []


@pytest.mark.parametrize("where", ["top", "dataset-folder"])
def test_mirror_archive_is_used_without_http(server, source, raw, tmp_path, archive_bytes, where):
    mirror = tmp_path / "mirror"
    folder = mirror if where == "top" else mirror / NAME
    folder.mkdir(parents=True)
    (folder / source.archives[0].filename).write_bytes(archive_bytes)

    dest, how = download.fetch_dataset(source, raw, mirror=mirror, retries=0)

    assert how == f"mirror archives in {mirror}"
    assert read_tree(dest) == FILES
    assert server.requests == []


def test_mirror_without_the_dataset_falls_back_to_network(server, source, raw, tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()

    _, how = download.fetch_dataset(source, raw, mirror=mirror, retries=0)

    assert how == "the network"
    assert len(server.requests) == 1


def test_corrupted_mirror_raises_and_writes_nothing(server, source, raw, tmp_path):
    mirror = tmp_path / "mirror"
    write_tree(mirror / NAME, FILES | {"images/b.png": b"\x89PNG image B"})   # one byte differs

    with pytest.raises(download.DatasetError) as info:
        download.fetch_dataset(source, raw, mirror=mirror, retries=0)

    assert source.tree_sha256 in str(info.value)
    assert str(mirror / NAME) in str(info.value)
    assert not (raw / NAME).exists()
    assert staging_leftovers(raw) == []
    assert server.requests == []


def test_corrupted_mirror_archive_fails_its_checksum(server, source, raw, tmp_path, archive_bytes):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "tiny.tar.gz").write_bytes(archive_bytes[:-1] + bytes([archive_bytes[-1] ^ 1]))

    with pytest.raises(fetch.DownloadError, match="checksum mismatch for tiny.tar.gz"):
        download.fetch_dataset(source, raw, mirror=mirror, retries=0)

    assert not (raw / NAME).exists()
    assert staging_leftovers(raw) == []
    assert server.requests == []


def test_archive_failing_checksum_on_server_leaves_nothing(server, source, raw):
    bad = dataclasses.replace(source.archives[0], checksum="sha256:" + "0" * 64)
    source = dataclasses.replace(source, archives=(bad,))

    with pytest.raises(fetch.DownloadError, match="checksum mismatch"):
        download.fetch_dataset(source, raw, retries=0)

    assert not (raw / NAME).exists()
    assert staging_leftovers(raw) == []
    assert list(raw.iterdir()) == []


def test_archive_without_expected_subdir_raises(server, source, raw):
    moved = dataclasses.replace(source.archives[0], subdir="elsewhere")
    source = dataclasses.replace(source, archives=(moved,))

    with pytest.raises(download.DatasetError, match="'elsewhere'"):
        download.fetch_dataset(source, raw, retries=0)

    assert not (raw / NAME).exists()
    assert staging_leftovers(raw) == []


# -- fetch_folder ------------------------------------------------------------------

@pytest.fixture
def folder(tmp_path) -> Path:
    return write_tree(tmp_path / "mine", {
        "images/train/1.png": b"img1", "images/val/2.png": b"img2",
        "masks/train/1.png": b"msk1", "masks/val/2.png": b"msk2",
        "notes.txt": b"not copied",
    })


def test_fetch_folder_copies_then_is_a_noop_then_recopies_on_change(folder, raw):
    dest, how = download.fetch_folder(folder, raw)
    assert how == f"folder {folder}"
    assert dest == raw / "folder"
    assert read_tree(dest) == {k: v for k, v in read_tree(folder).items() if k != "notes.txt"}

    marker = dest / "images" / "train" / "1.png"
    first_inode = marker.stat().st_ino
    _, how = download.fetch_folder(folder, raw)
    assert how == "already present and verified"
    assert marker.stat().st_ino == first_inode   # nothing was rewritten

    (folder / "masks" / "val" / "2.png").write_bytes(b"msk2 fixed")
    _, how = download.fetch_folder(folder, raw)
    assert how == f"folder {folder}"
    assert (dest / "masks" / "val" / "2.png").read_bytes() == b"msk2 fixed"
    assert staging_leftovers(raw) == []


def test_fetch_folder_without_masks_names_masks(tmp_path, raw):
    folder = write_tree(tmp_path / "mine", {"images/1.png": b"img1"})

    with pytest.raises(download.DatasetError, match="masks/"):
        download.fetch_folder(folder, raw)

    assert not raw.exists()


# -- main --------------------------------------------------------------------------

def test_main_end_to_end_writes_receipt(folder, tmp_path, raw, monkeypatch):
    monkeypatch.delenv(paths.ENV_DATA_MIRROR, raising=False)
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps(default_params({"download": {"dataset": "folder", "folder": str(folder)}})))
    receipt_path = tmp_path / "out" / "download.json"

    download.main(["--raw", str(raw), "--receipt", str(receipt_path), "--params", str(params)])

    record = json.loads(receipt_path.read_text())
    files = download.included_files(raw / "folder", download.FOLDER_INCLUDE)
    assert record["dataset"] == "folder"
    assert record["files"] == len(files) == 4
    assert record["tree_sha256"] == fetch.tree_digest(raw / "folder", files)
    assert record["tree_sha256"] == fetch.tree_digest(
        folder, download.included_files(folder, download.FOLDER_INCLUDE))
    assert record["bytes"] == sum(f.stat().st_size for f in files)


# -- paths.data_mirror -------------------------------------------------------------

def test_data_mirror_missing_directory_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.ENV_DATA_MIRROR, str(tmp_path / "no-such-mirror"))
    with pytest.raises(FileNotFoundError, match="SEG_DATA_MIRROR"):
        paths.data_mirror()


def test_data_mirror_set_or_unset(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.ENV_DATA_MIRROR, str(tmp_path))
    assert paths.data_mirror() == tmp_path
    monkeypatch.setenv(paths.ENV_DATA_MIRROR, "  ")
    assert paths.data_mirror() is None
    monkeypatch.delenv(paths.ENV_DATA_MIRROR)
    assert paths.data_mirror() is None


# -- instance exports --------------------------------------------------------------

@pytest.mark.parametrize("dataset, files, kept", [
    ("coco", {"annotations.json": b"{}", "JPEGImages/a.JPG": b"a", "notes/x.json": b"{}"},
     {"annotations.json", "JPEGImages/a.JPG"}),
    ("labelme", {"labels.txt": b"car", "ann/a.json": b"{}", "ann/a.png": b"a", "readme.md": b"x"},
     {"labels.txt", "ann/a.json", "ann/a.png"}),
    ("via", {"train/via_region_data.json": b"{}", "train/b.jpeg": b"b"},
     {"train/via_region_data.json", "train/b.jpeg"}),
    ("yolo", {"images/train2017/a.jpg": b"a", "labels/train2017/a.txt": b"0 0 0 1 0 1 1",
              "labels/train2017.cache": b"x", "data.yaml": b"names: [a]", "README.txt": b"x"},
     {"images/train2017/a.jpg", "labels/train2017/a.txt", "data.yaml"}),
])
def test_an_export_is_copied_with_its_own_files_and_receipt(tmp_path, raw, monkeypatch, dataset, files,
                                                             kept):
    folder = write_tree(tmp_path / "export", files)
    monkeypatch.delenv(paths.ENV_DATA_MIRROR, raising=False)
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps(default_params({"download": {"dataset": dataset, "folder": str(folder)}})))
    receipt_path = tmp_path / "download.json"

    download.main(["--raw", str(raw), "--receipt", str(receipt_path), "--params", str(params)])

    assert set(read_tree(raw / dataset)) == kept
    record = json.loads(receipt_path.read_text())
    assert record["dataset"] == dataset and record["files"] == len(kept)
    _, how = download.fetch_folder(folder, raw, dataset)
    assert how == "already present and verified"


def test_an_export_without_its_annotation_files_is_refused(tmp_path, raw):
    folder = write_tree(tmp_path / "export", {"images/a.jpg": b"a"})
    with pytest.raises(download.DatasetError, match="yolo export needs files matching 'labels/"):
        download.fetch_folder(folder, raw, "yolo")
    with pytest.raises(download.DatasetError, match="coco export needs files matching"):
        download.fetch_folder(folder, raw, "coco")
    assert not raw.exists()


def test_dsb2018_source_is_the_public_archive_checked_by_its_tree_digest():
    from pipeline.data.sources import SOURCES

    dsb = SOURCES["dsb2018"]
    assert dsb.archives[0].url.startswith("https://github.com/yuanqing811/DSB2018_stage1_test/")
    assert dsb.archives[0].subdir == "DSB2018_stage1_test-master" and len(dsb.tree_sha256) == 64


def test_the_dsb2018_source_is_fetched_through_the_mirror_logic(tmp_path, raw):
    from pipeline.data.sources import DSB2018

    mirror = tmp_path / "mirror"
    write_tree(mirror / "dsb2018", {"stage1_test/x/images/x.png": b"i", "stage1_test/x/masks/m.png": b"m",
                                    "README.md": b"not included"})
    tree = mirror / "dsb2018"
    digest = fetch.tree_digest(tree, download.included_files(tree, DSB2018.include))
    dest, how = download.fetch_dataset(dataclasses.replace(DSB2018, tree_sha256=digest), raw, mirror)
    assert how == f"mirror {mirror / 'dsb2018'}" and set(read_tree(dest)) == {
        "stage1_test/x/images/x.png", "stage1_test/x/masks/m.png"}
    with pytest.raises(download.DatasetError, match="does not match"):     # the real digest: not this data
        download.fetch_dataset(DSB2018, tmp_path / "raw2", mirror)
