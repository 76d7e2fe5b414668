"""Fixtures for data-lake tests: a real S3 endpoint (moto server) on loopback."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from lake_tools import ACCESS_KEY, SECRET_KEY, run_persam


@pytest.fixture(scope="session")
def s3_endpoint():
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture()
def s3_env(s3_endpoint, monkeypatch):
    """The standard AWS variables, pointing s3fs (in this process and children) at moto."""
    values = {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return dict(os.environ)


@pytest.fixture()
def s3(s3_env):
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    return s3fs.S3FileSystem()


@pytest.fixture(scope="session")
def tiny_concept(tmp_path_factory, perseg_sample) -> Path:
    """A PerSAM concept fitted on the sample cat with tiny random weights."""
    out = tmp_path_factory.mktemp("concept") / "cat.json"
    result = run_persam(["fit", "--model-type", "tiny", "--checkpoint", "random:0",
                         "--image", str(perseg_sample / "Images/cat/00.jpg"),
                         "--mask", str(perseg_sample / "Annotations/cat/00.png"),
                         "--method", "persam", "--name", "cat", "--out", str(out)], dict(os.environ))
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture()
def many_images(tmp_path, perseg_sample) -> Path:
    """12 JPEGs (the sample images, each twice) in a flat folder."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for copy in range(2):
        for path in sorted((perseg_sample / "Images").glob("*/*.jpg")):
            shutil.copy(path, folder / f"{path.parent.name}_{path.stem}_{copy}.jpg")
    # 9 sample images x 2 = 18; keep the job short
    for extra in sorted(folder.iterdir())[12:]:
        extra.unlink()
    return folder
