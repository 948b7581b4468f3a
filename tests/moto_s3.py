"""A moto S3 server on 127.0.0.1 for the tests that read or write s3:// (never any other address).

s3fs caches one filesystem per set of arguments, and a root given as a bare URL (``s3://bucket/x``) takes its endpoint
from the environment only when that instance is first built; a cached instance would keep pointing at a server that a
previous test already stopped. So the cache is cleared when the server starts and again when it stops.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest

CREDENTIALS = dict(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1")


@contextlib.contextmanager
def moto_s3(*buckets: str) -> Iterator[str]:
    """Start a server, point this process's environment (and so every process started from it) at it, create
    ``buckets``; yield the endpoint URL. On exit the buckets are removed (moto's state outlives its server), the
    server stops and the environment is restored."""
    moto_server = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = dict(CREDENTIALS, AWS_ENDPOINT_URL_S3=endpoint, FSSPEC_S3_ENDPOINT_URL=endpoint)
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
    try:
        for bucket in buckets:
            fs.mkdir(bucket)
        yield endpoint
    finally:
        for bucket in buckets:
            fs.rm(bucket, recursive=True)
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
