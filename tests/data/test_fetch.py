"""pipeline.data.fetch against a real HTTP server on 127.0.0.1 and real archives built here."""

from __future__ import annotations

import hashlib
import io
import os
import random
import tarfile
import zipfile
from pathlib import Path

import pytest

from pipeline.data import fetch

SIZE = 200_000   # bigger than one socket buffer, so a cut-off transfer really is partial
CUT = 70_001


@pytest.fixture
def payload() -> bytes:
    return random.Random(0).randbytes(SIZE)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# -- download ----------------------------------------------------------------------

@pytest.mark.parametrize("algo", ["sha256", "md5"])
def test_clean_download_verifies_checksum_and_leaves_no_part(server, payload, tmp_path, algo):
    url = server.add("/data.bin", payload)
    dest = tmp_path / "dl" / "data.bin"

    out = fetch.download(url, dest, f"{algo}:{hashlib.new(algo, payload).hexdigest()}", retries=0)

    assert out == dest
    assert dest.read_bytes() == payload
    assert leftovers(dest.parent) == ["data.bin"]
    assert [(r.range, r.status) for r in server.requests] == [(None, 200)]


def test_checksum_digest_is_case_insensitive(server, payload, tmp_path):
    url = server.add("/data.bin", payload)
    dest = fetch.download(url, tmp_path / "data.bin", "sha256:" + hashlib.sha256(payload).hexdigest().upper())
    assert dest.read_bytes() == payload


def test_interrupted_transfer_resumes_with_range(server, payload, tmp_path):
    url = server.add("/data.bin", payload, drop_after=CUT)
    dest = tmp_path / "data.bin"

    fetch.download(url, dest, sha256(payload), retries=2)

    assert dest.read_bytes() == payload
    assert [(r.range, r.status, r.sent) for r in server.requests] == [
        (None, 200, CUT),
        (f"bytes={CUT}-", 206, SIZE - CUT),
    ]
    assert leftovers(tmp_path) == ["data.bin"]


def test_interrupted_chunked_transfer_resumes(server, tmp_path):
    # Hosts that build the file on the fly (GitHub's branch zips) send no Content-Length;
    # a drop inside a chunk surfaces as http.client.IncompleteRead, not as an OSError.
    # Two read buffers' worth, cut in the second, so that some bytes are on disk to resume from.
    payload = random.Random(1).randbytes(2 * fetch.CHUNK + 1000)
    cut = fetch.CHUNK + 12_345
    url = server.add("/data.bin", payload, drop_after=cut, chunked=True)
    dest = tmp_path / "data.bin"

    fetch.download(url, dest, sha256(payload), retries=2)

    assert dest.read_bytes() == payload
    first, second = server.requests
    assert first.range is None
    start = int(second.range.removeprefix("bytes=").removesuffix("-"))
    assert 0 < start <= cut
    assert (second.status, second.sent) == (206, len(payload) - start)
    assert leftovers(tmp_path) == ["data.bin"]


def test_leftover_part_from_earlier_run_is_resumed(server, payload, tmp_path):
    url = server.add("/data.bin", payload)
    dest = tmp_path / "data.bin"
    (tmp_path / "data.bin.part").write_bytes(payload[:CUT])

    fetch.download(url, dest, sha256(payload), retries=0)

    assert dest.read_bytes() == payload
    assert [(r.range, r.status, r.sent) for r in server.requests] == [(f"bytes={CUT}-", 206, SIZE - CUT)]
    assert leftovers(tmp_path) == ["data.bin"]


def test_complete_part_answered_416_is_kept(server, payload, tmp_path):
    url = server.add("/data.bin", payload)
    dest = tmp_path / "data.bin"
    (tmp_path / "data.bin.part").write_bytes(payload)

    fetch.download(url, dest, sha256(payload), retries=0)

    assert dest.read_bytes() == payload
    assert [(r.range, r.status) for r in server.requests] == [(f"bytes={SIZE}-", 416)]


def test_server_ignoring_range_restarts_from_zero(server, payload, tmp_path):
    url = server.add("/data.bin", payload, honour_range=False)
    dest = tmp_path / "data.bin"
    # Garbage in the part file: appending the full body to it would give the wrong bytes.
    (tmp_path / "data.bin.part").write_bytes(b"x" * CUT)

    fetch.download(url, dest, sha256(payload), retries=0)

    assert dest.read_bytes() == payload
    assert [(r.range, r.status) for r in server.requests] == [(f"bytes={CUT}-", 200)]


def test_checksum_mismatch_names_file_and_leaves_nothing(server, payload, tmp_path):
    url = server.add("/data.bin", payload)
    dest = tmp_path / "dl" / "data.bin"
    wrong = "0" * 64

    with pytest.raises(fetch.DownloadError) as info:
        fetch.download(url, dest, f"sha256:{wrong}", retries=0)

    msg = str(info.value)
    assert "data.bin" in msg
    assert f"expected sha256 {wrong}" in msg
    assert f"got {hashlib.sha256(payload).hexdigest()}" in msg
    assert not dest.exists()
    assert leftovers(dest.parent) == []


def test_http_404_fails_at_once_naming_url_and_status(server, tmp_path):
    url = server.url("/missing.tar.gz")
    dest = tmp_path / "missing.tar.gz"

    with pytest.raises(fetch.DownloadError) as info:
        fetch.download(url, dest, None, retries=5)

    assert url in str(info.value)
    assert "404" in str(info.value)
    assert len(server.requests) == 1   # a client error is not retried
    assert leftovers(tmp_path) == []


def test_http_5xx_is_retried_then_fails(server, tmp_path):
    url = server.fail("/flaky.bin", 503)

    with pytest.raises(fetch.DownloadError, match="after 2 attempts") as info:
        fetch.download(url, tmp_path / "flaky.bin", None, retries=1)

    assert url in str(info.value)
    assert [r.status for r in server.requests] == [503, 503]


# -- parse_checksum ----------------------------------------------------------------

@pytest.mark.parametrize("bad", ["d41d8cd98f00b204e9800998ecf8427e", "sha1:abc", "sha256:", ":abc", ""])
def test_parse_checksum_requires_known_algorithm_prefix(bad):
    with pytest.raises(ValueError, match="md5:<hex>"):
        fetch.parse_checksum(bad)


def test_parse_checksum_splits_and_lowercases():
    assert fetch.parse_checksum("md5:ABCdef") == ("md5", "abcdef")


# -- safe_extract ------------------------------------------------------------------

def make_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def file_member(name: str, data: bytes = b"payload") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def link_member(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


@pytest.fixture
def work(tmp_path) -> Path:
    """The parent of the extraction target: it must hold nothing but the target afterwards."""
    (tmp_path / "archives").mkdir()
    (tmp_path / "work").mkdir()
    return tmp_path / "work"


def assert_nothing_escaped(work: Path, tmp_path: Path) -> None:
    assert leftovers(work) in ([], ["target"])
    if (work / "target").exists():
        assert list((work / "target").rglob("*")) == []
    assert leftovers(tmp_path) == ["archives", "work"]


@pytest.mark.parametrize("members", [
    pytest.param([file_member("ok.txt"), file_member("../evil.txt")], id="dotdot"),
    pytest.param([file_member("ok/../../evil.txt")], id="dotdot-inside"),
    pytest.param([link_member("link", "../evil.txt")], id="symlink-relative-out"),
    pytest.param([link_member("sub/link", "../../evil.txt")], id="symlink-nested-out"),
    pytest.param([link_member("hard", "../evil.txt", tarfile.LNKTYPE)], id="hardlink-out"),
    pytest.param([link_member("dir", ".."), file_member("dir/evil.txt")], id="symlink-then-write-through"),
])
def test_safe_extract_refuses_tar_escapes(tmp_path, work, members):
    archive = make_tar(tmp_path / "archives" / "bad.tar.gz", members)

    with pytest.raises(fetch.UnsafeArchiveError, match="bad.tar.gz"):
        fetch.safe_extract(archive, work / "target")

    assert_nothing_escaped(work, tmp_path)


def test_safe_extract_refuses_absolute_tar_member(tmp_path, work):
    outside = work / "evil.txt"
    archive = make_tar(tmp_path / "archives" / "abs.tar.gz", [file_member(str(outside))])
    with tarfile.open(archive) as tf:   # the member really is stored absolute
        assert tf.getnames() == [str(outside)]

    with pytest.raises(fetch.UnsafeArchiveError, match="would land outside"):
        fetch.safe_extract(archive, work / "target")

    assert not outside.exists()
    assert_nothing_escaped(work, tmp_path)


def test_safe_extract_refuses_absolute_symlink(tmp_path, work):
    archive = make_tar(tmp_path / "archives" / "abs-link.tar.gz", [link_member("link", str(work))])

    with pytest.raises(fetch.UnsafeArchiveError):
        fetch.safe_extract(archive, work / "target")

    assert_nothing_escaped(work, tmp_path)


def test_safe_extract_refuses_special_files(tmp_path, work):
    fifo = tarfile.TarInfo("pipe")
    fifo.type = tarfile.FIFOTYPE
    archive = make_tar(tmp_path / "archives" / "fifo.tar.gz", [(fifo, None)])

    with pytest.raises(fetch.UnsafeArchiveError, match="special file"):
        fetch.safe_extract(archive, work / "target")

    assert_nothing_escaped(work, tmp_path)


def test_safe_extract_refuses_zip_dotdot(tmp_path, work):
    archive = tmp_path / "archives" / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("fine.txt", b"ok")
        zf.writestr("../evil.txt", b"evil")

    with pytest.raises(fetch.UnsafeArchiveError, match="'../evil.txt'"):
        fetch.safe_extract(archive, work / "target")

    assert_nothing_escaped(work, tmp_path)


def test_safe_extract_extracts_normal_tar_and_zip(tmp_path, work):
    tar = make_tar(tmp_path / "archives" / "good.tar.gz", [
        file_member("ds/images/a.png", b"A"),
        file_member("ds/masks/a.png", b"M"),
        link_member("ds/latest.png", "images/a.png"),   # a link that stays inside is fine
    ])
    zip_path = tmp_path / "archives" / "good.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        zf.writestr("ds/images/b.png", b"B")

    fetch.safe_extract(tar, work / "target")
    fetch.safe_extract(zip_path, work / "target")

    root = work / "target" / "ds"
    assert (root / "images" / "a.png").read_bytes() == b"A"
    assert (root / "masks" / "a.png").read_bytes() == b"M"
    assert (root / "latest.png").read_bytes() == b"A"
    assert (root / "images" / "b.png").read_bytes() == b"B"
    assert leftovers(work) == ["target"]


def test_safe_extract_rejects_non_archive(tmp_path, work):
    not_archive = tmp_path / "archives" / "data.bin"
    not_archive.write_bytes(b"plain bytes")
    with pytest.raises(ValueError, match="not a zip or tar"):
        fetch.safe_extract(not_archive, work / "target")


# -- tree_digest -------------------------------------------------------------------

@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "tree"
    (root / "images").mkdir(parents=True)
    (root / "images" / "a.png").write_bytes(b"\x00\x01\x02\x03")
    (root / "images" / "b.png").write_bytes(b"\x04\x05\x06\x07")
    (root / "labels.txt").write_text("a\nb\n")
    return root


def test_tree_digest_changes_with_one_byte(tree):
    before = fetch.tree_digest(tree)
    path = tree / "images" / "b.png"
    data = bytearray(path.read_bytes())
    data[2] ^= 0x01
    path.write_bytes(bytes(data))

    assert fetch.tree_digest(tree) != before


def test_tree_digest_changes_with_rename_and_is_stable(tree):
    before = fetch.tree_digest(tree)
    assert fetch.tree_digest(tree) == before   # same content, same digest

    os.rename(tree / "images" / "b.png", tree / "images" / "c.png")
    renamed = fetch.tree_digest(tree)
    assert renamed != before

    os.rename(tree / "images" / "c.png", tree / "images" / "b.png")
    assert fetch.tree_digest(tree) == before


def test_tree_digest_covers_only_the_files_given(tree):
    listed = [tree / "images" / "a.png", tree / "images" / "b.png"]
    before = fetch.tree_digest(tree, listed)
    (tree / "labels.txt").write_text("changed")   # not in the list

    assert fetch.tree_digest(tree, listed) == before
    assert fetch.tree_digest(tree, list(reversed(listed))) == before   # order does not matter
