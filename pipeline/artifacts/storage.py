"""Where the state that every node of a cluster must see lives: a local folder (the default) or
an S3-compatible object store.

Settings, from the environment (they say where things are, not what is trained: a run's identity
does not depend on them); the names are in ``pipeline.config.paths``:

- ``SEG_STORAGE_URI``: ``s3://bucket/prefix`` or a local folder. Unset: the repository's own
  folders, as on a laptop (``ray_results/``, ``data/prepared``, ``mlruns/``).
- ``SEG_S3_ENDPOINT_URL``: the endpoint of an S3-compatible store (MinIO, Ceph, moto, a cloud's
  S3 API); unset: AWS's own. Credentials and region: the usual ``AWS_ACCESS_KEY_ID``,
  ``AWS_SECRET_ACCESS_KEY`` (``AWS_SESSION_TOKEN``), ``AWS_DEFAULT_REGION``.

Under the root: ``prepared/<digest>/`` the prepared shards Ray Data reads (``publish_dir``,
uploaded once per content), ``ray_results/<run>/`` Ray Train's checkpoints and the run's own
files, ``mlflow/`` the artifact store of ``make mlflow-server``, ``dvc/`` the DVC remote of
``make storage-remote``.

A ``Location`` is a folder on either kind of storage (a ``pyarrow.fs`` filesystem and a path on
it), with the few operations the stages need; a file appears whole or not at all (a local file
is written to a temporary name and renamed; an object store's put is atomic).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from pipeline.config import paths

if TYPE_CHECKING:
    import pyarrow.fs

S3 = "s3"
COMPLETE_MARKER = "_COMPLETE"     # written last into a published folder: its file list


class StorageError(RuntimeError):
    """The storage settings name something that cannot be used: reported once, before Ray
    starts, naming the URI and the setting."""


@dataclass(frozen=True)
class Storage:
    """The root of the shared storage: ``uri`` an ``s3://`` URI or a local folder."""

    uri: str
    endpoint: str | None = None

    @property
    def remote(self) -> bool:
        return urlparse(self.uri).scheme == S3

    def filesystem(self) -> pyarrow.fs.FileSystem:
        import pyarrow.fs

        if not self.remote:
            return pyarrow.fs.LocalFileSystem()
        options = {"connect_timeout": 5.0, "request_timeout": 30.0,
                   "retry_strategy": pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=3)}
        if self.endpoint:
            endpoint = urlparse(self.endpoint)
            options |= {"endpoint_override": endpoint.netloc or endpoint.path,
                        "scheme": endpoint.scheme or "https"}
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        if region:
            options["region"] = region
        return pyarrow.fs.S3FileSystem(**options)

    @property
    def bucket(self) -> str | None:
        return urlparse(self.uri).netloc if self.remote else None

    def root(self) -> str:
        """The root as a path on ``filesystem()``: ``bucket/prefix``, or an absolute local path."""
        if self.remote:
            parsed = urlparse(self.uri)
            return posixpath.join(parsed.netloc, parsed.path.strip("/")).rstrip("/")
        return str(Path(self.uri).expanduser().resolve())

    def location(self, *parts: str) -> Location:
        return Location(self.filesystem(), posixpath.join(self.root(), *parts), self)

    def uri_of(self, *parts: str) -> str:
        """The URI of a path under the root, as other tools take it (``s3://...`` or a local path)."""
        path = posixpath.join(self.root(), *parts)
        return f"s3://{path}" if self.remote else path


def storage_from_env() -> Storage | None:
    """The storage ``$SEG_STORAGE_URI`` names (with ``$SEG_S3_ENDPOINT_URL``), or None."""
    uri = os.environ.get(paths.ENV_STORAGE_URI, "").strip()
    if not uri:
        return None
    scheme = urlparse(uri).scheme
    if scheme not in ("", S3, "file"):
        raise StorageError(f"{paths.ENV_STORAGE_URI}={uri!r}: expected s3://bucket/prefix or a local "
                           f"folder, not a {scheme}:// URI")
    if scheme == S3 and not urlparse(uri).netloc:
        raise StorageError(f"{paths.ENV_STORAGE_URI}={uri!r}: the URI names no bucket (s3://bucket/prefix)")
    endpoint = os.environ.get(paths.ENV_S3_ENDPOINT_URL, "").strip() or None
    if endpoint and urlparse(endpoint).scheme not in ("http", "https"):
        raise StorageError(f"{paths.ENV_S3_ENDPOINT_URL}={endpoint!r}: expected an http:// or https:// URL")
    return Storage(uri.removeprefix("file://"), endpoint)


def check(storage: Storage) -> None:
    """Raise ``StorageError`` unless the storage can be written: for S3, an endpoint that
    answers, a bucket that exists and credentials it takes (one small object written and
    deleted); for a local folder, a folder that can be made and written."""
    where = f"{paths.ENV_STORAGE_URI}={storage.uri}"
    if not storage.remote:
        try:
            probe = storage.location(f".probe-{uuid.uuid4().hex}")
            probe.write_bytes(b"")
            probe.delete()
        except OSError as exc:
            raise StorageError(f"{where}: the folder cannot be written ({exc})") from exc
        return
    import boto3
    import botocore.config
    import botocore.exceptions

    endpoint = f" at {paths.ENV_S3_ENDPOINT_URL}={storage.endpoint}" if storage.endpoint else " (AWS S3)"
    client = boto3.client(S3, endpoint_url=storage.endpoint, config=botocore.config.Config(
        connect_timeout=5, read_timeout=15, retries={"max_attempts": 1}))
    key = posixpath.join(storage.root().partition("/")[2], f".probe-{uuid.uuid4().hex}")
    try:
        client.head_bucket(Bucket=storage.bucket)
        client.put_object(Bucket=storage.bucket, Key=key, Body=b"")
        client.delete_object(Bucket=storage.bucket, Key=key)
    except botocore.exceptions.EndpointConnectionError as exc:
        raise StorageError(f"{where}: the endpoint{endpoint} cannot be reached ({exc})") from exc
    except botocore.exceptions.NoCredentialsError as exc:
        raise StorageError(f"{where}: no credentials (set AWS_ACCESS_KEY_ID and "
                           "AWS_SECRET_ACCESS_KEY)") from exc
    except botocore.exceptions.ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("404", "NoSuchBucket") or status == 404:
            raise StorageError(f"{where}: bucket {storage.bucket!r} does not exist{endpoint}") from exc
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch") or status == 403:
            raise StorageError(f"{where}: access denied to bucket {storage.bucket!r}{endpoint} with these "
                               f"credentials (AWS_ACCESS_KEY_ID; {code or status})") from exc
        raise StorageError(f"{where}: {code or status}: {exc}") from exc


@dataclass(frozen=True)
class Location:
    """A folder (or file) on a storage's filesystem."""

    fs: pyarrow.fs.FileSystem
    path: str
    storage: Storage | None = None

    @classmethod
    def local(cls, path: Path | str) -> Location:
        import pyarrow.fs

        return cls(pyarrow.fs.LocalFileSystem(), str(Path(path).resolve()))

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    def child(self, *parts: str) -> Location:
        return Location(self.fs, posixpath.join(self.path, *parts), self.storage)

    def uri(self) -> str:
        remote = self.storage is not None and self.storage.remote
        return f"s3://{self.path}" if remote else self.path

    def _info(self):
        return self.fs.get_file_info(self.path)

    def is_file(self) -> bool:
        import pyarrow.fs

        return self._info().type == pyarrow.fs.FileType.File

    def exists(self) -> bool:
        import pyarrow.fs

        return self._info().type != pyarrow.fs.FileType.NotFound

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        """The whole file or nothing: a local file goes to a temporary sibling first."""
        import pyarrow.fs

        if isinstance(self.fs, pyarrow.fs.LocalFileSystem):
            from pipeline.utils.io import write_bytes_atomic

            write_bytes_atomic(Path(self.path), data)
            return
        with self.fs.open_output_stream(self.path) as f:     # an object store has no folders to make
            f.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def delete(self) -> None:
        import pyarrow.fs

        info = self._info()
        if info.type == pyarrow.fs.FileType.Directory:
            self.fs.delete_dir(self.path)
        elif info.type == pyarrow.fs.FileType.File:
            self.fs.delete_file(self.path)

    def files(self) -> list[str]:
        """The names of the files directly in this folder, sorted (none when it is missing)."""
        import pyarrow.fs

        if self._info().type != pyarrow.fs.FileType.Directory:
            return []
        infos = self.fs.get_file_info(pyarrow.fs.FileSelector(self.path))
        return sorted(i.base_name for i in infos if i.type == pyarrow.fs.FileType.File)


def content_digest(files: list[Path], root: Path) -> str:
    """sha256 over each file's path relative to ``root`` and its bytes, in path order."""
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        file_digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                file_digest.update(chunk)
        digest.update(file_digest.digest())
    return digest.hexdigest()


def publish_dir(folder: Path, files: list[Path], storage: Storage, prefix: str) -> Location:
    """``files`` (under ``folder``) copied to ``<root>/<prefix>/<content digest>/`` once: a folder
    already published with the same content is used as it is (its ``_COMPLETE`` marker, written
    last, lists the files). Returns the published folder."""
    import pyarrow.fs

    folder = Path(folder)
    target = storage.location(prefix, content_digest(files, folder)[:16])
    marker = target.child(COMPLETE_MARKER)
    names = [str(p.relative_to(folder)) for p in sorted(files)]
    if marker.is_file() and marker.read_text().splitlines() == names:
        return target
    local = pyarrow.fs.LocalFileSystem()
    for path, name in zip(sorted(files), names, strict=True):
        dest = target.child(name)
        if not storage.remote:
            target.fs.create_dir(posixpath.dirname(dest.path), recursive=True)
        pyarrow.fs.copy_files(str(path), dest.path, source_filesystem=local, destination_filesystem=target.fs)
    marker.write_text("\n".join(names))
    return target
