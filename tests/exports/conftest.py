"""Fixtures of the export tests: an S3 endpoint (moto's server on loopback) for outputs on
object storage, with credentials that must never show up in an export or its log."""

from __future__ import annotations

import pytest

ACCESS_KEY, SECRET_KEY = "AKIAEXPORTTESTKEY01", "export-test-secret-value-01"


@pytest.fixture(scope="module")
def s3_url():
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture()
def s3(s3_url, monkeypatch):
    """An s3fs file system on the moto server; the AWS variables point this process at it."""
    import s3fs

    for key, value in {"AWS_ENDPOINT_URL": s3_url, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                       "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    return s3fs.S3FileSystem()
