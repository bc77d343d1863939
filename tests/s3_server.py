"""A real S3-compatible server on 127.0.0.1 (moto's server mode, ``ThreadedMotoServer``), for
tests of the shared storage: pyarrow, boto3, DVC and MLflow talk to it over HTTP.

    with S3Server() as s3:
        s3.make_bucket("seg")
        os.environ.update(s3.env("s3://seg/prefix"))
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from tests.factories import free_port

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}


class S3Server:
    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None

    def __enter__(self) -> S3Server:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.server is not None:
            self.server.stop()

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def make_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def env(self, uri: str) -> dict[str, str]:
        """The settings that point the pipeline at ``uri`` on this server."""
        from pipeline.config import paths

        return CREDENTIALS | {paths.ENV_STORAGE_URI: uri, paths.ENV_S3_ENDPOINT_URL: self.endpoint}


@contextlib.contextmanager
def authenticating() -> Iterator[None]:
    """Within: the server checks credentials like IAM (moto accepts any otherwise), so keys it
    never issued are refused."""
    from moto import settings

    before = settings.INITIAL_NO_AUTH_ACTION_COUNT
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
    try:
        yield
    finally:
        settings.INITIAL_NO_AUTH_ACTION_COUNT = before
