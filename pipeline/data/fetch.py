"""Streamed HTTP download with resume, checksum verification and safe extraction.

Plain functions with no knowledge of datasets; ``pipeline.data.sources`` says what to
fetch and ``pipeline.download`` puts it in place.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from tqdm import tqdm

CHUNK = 1 << 20
ALGORITHMS = ("md5", "sha256")


class DownloadError(RuntimeError):
    """A transfer that failed for good: HTTP error, retries exhausted or bad checksum."""


class UnsafeArchiveError(RuntimeError):
    """An archive member that would land outside the extraction directory."""


def parse_checksum(checksum: str) -> tuple[str, str]:
    """``"sha256:ab12..."`` -> ``("sha256", "ab12...")``; the algorithm prefix is required."""
    algo, sep, digest = checksum.partition(":")
    if not sep or algo not in ALGORITHMS or not digest:
        raise ValueError(f"checksum {checksum!r}: expected 'md5:<hex>' or 'sha256:<hex>'")
    return algo, digest.lower()


def file_digest(path: Path, algo: str = "sha256") -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify_checksum(path: Path, checksum: str) -> None:
    """Raise ``DownloadError`` naming the file, expected and actual digest on mismatch."""
    algo, expected = parse_checksum(checksum)
    actual = file_digest(path, algo)
    if actual != expected:
        raise DownloadError(
            f"checksum mismatch for {path.name}: expected {algo} {expected}, got {actual}"
        )


def download(
    url: str, dest: Path, checksum: str | None, *, retries: int = 3, timeout_s: float = 60.0
) -> Path:
    """Download ``url`` to ``dest``, resuming a partial ``dest.part`` with an HTTP Range request.

    The bytes go to ``<dest>.part`` and are renamed to ``dest`` only after the checksum
    (``"md5:..."`` or ``"sha256:..."``) matches; on a mismatch both are deleted and
    ``DownloadError`` is raised. A dropped connection is retried ``retries`` times, each
    time resuming from the bytes already on disk.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            _transfer(url, part, timeout_s)
            break
        # http.client.HTTPException: a drop inside a chunked body raises IncompleteRead,
        # which is not an OSError.
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError,
                http.client.HTTPException) as exc:
            if isinstance(exc, urllib.error.HTTPError):
                exc.close()
            if isinstance(exc, urllib.error.HTTPError) and exc.code < 500:
                part.unlink(missing_ok=True)
                raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
            if attempt == retries:
                raise DownloadError(
                    f"{url}: transfer failed after {retries + 1} attempts "
                    f"({part.stat().st_size if part.exists() else 0} bytes kept in {part} "
                    f"for the next run to resume): {exc}"
                ) from exc
            time.sleep(min(2.0**attempt, 30.0) * 0.1)
    if checksum is not None:
        try:
            verify_checksum(part, checksum)
        except DownloadError as exc:
            part.unlink(missing_ok=True)
            raise DownloadError(f"{url}: {exc}; the download was deleted") from None
    os.replace(part, dest)
    return dest


def _transfer(url: str, part: Path, timeout_s: float) -> None:
    """One HTTP request appending to ``part``; raises on a short or dropped body."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # our partial file is already complete
            return
        raise
    with response:
        if have and response.status != 206:  # server ignored the Range: start over
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        mode = "ab" if have else "wb"
        with open(part, mode) as f, tqdm(
            total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
            desc=PurePosixPath(url).name[:40], disable=None, leave=False,
        ) as bar:
            while chunk := response.read(CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
        if total is not None and part.stat().st_size < total:
            raise ConnectionError(f"connection closed at {part.stat().st_size} of {total} bytes")


def safe_extract(archive: Path, target: Path) -> None:
    """Extract a .zip or .tar[.gz|.bz2|.xz] into ``target``, refusing any member that would
    land outside it (absolute paths, ``..``, links pointing out, device files)."""
    target = Path(target).resolve()
    target.mkdir(parents=True, exist_ok=True)
    name = archive.name.lower()
    if name.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                _check_inside(target, member, archive)
            zf.extractall(target)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            for member in tf.getmembers():
                _check_inside(target, member.name, archive)
                if member.issym() or member.islnk():
                    link_base = (target / member.name).parent if member.issym() else target
                    _check_inside(link_base, member.linkname, archive, base=target)
                elif not (member.isfile() or member.isdir()):
                    raise UnsafeArchiveError(f"{archive.name}: member {member.name!r} is a special file")
            # The "data" filter repeats these checks inside tarfile itself.
            tf.extractall(target, filter="data")
    else:
        raise ValueError(f"{archive}: not a zip or tar archive")


def _check_inside(root: Path, member: str, archive: Path, base: Path | None = None) -> None:
    base = base or root
    dest = (root / member).resolve()
    if PurePosixPath(member).is_absolute() or not dest.is_relative_to(base):
        raise UnsafeArchiveError(f"{archive.name}: member {member!r} would land outside {base}")


def tree_digest(root: Path, files: list[Path] | None = None) -> str:
    """sha256 over the sorted relative paths and sha256 of every file under ``root``.

    Identifies an extracted dataset by its content, independent of the archive that
    carried it (GitHub's generated zips, for example, are not byte-stable).
    """
    root = Path(root)
    files = sorted(files if files is not None else (p for p in root.rglob("*") if p.is_file()))
    h = hashlib.sha256()
    for path in files:
        rel = path.relative_to(root).as_posix()
        h.update(f"{rel}\0{file_digest(path)}\n".encode())
    return h.hexdigest()


def replace_dir(src: Path, dest: Path) -> None:
    """Move the finished directory ``src`` to ``dest``, replacing what is there, so that
    ``dest`` is never seen half-written."""
    dest = Path(dest)
    old = dest.with_name(dest.name + ".old")
    if dest.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
    os.replace(src, dest)
    shutil.rmtree(old, ignore_errors=True)
