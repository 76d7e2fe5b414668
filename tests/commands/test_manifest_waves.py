"""A manifest is planned and run in bounded waves, resumably and exactly once (with
`--runner local`: the waves are the driver's, the same on Ray)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cli_tools import LOCAL, MODEL
from jobs.cli import main
from jobs.storage import listing
from jobs.storage.schema import read_part


def _rows(output: Path) -> list[dict]:
    return [row for p in sorted(output.rglob("part-*.parquet")) for row in read_part(str(p)).to_pylist()]


def test_manifest_in_waves_resumes_and_drops_removed_images(tmp_path, perseg_sample, tiny_concept, monkeypatch, capsys):
    monkeypatch.setattr(listing, "MANIFEST_WAVE_IMAGES", 4)  # 9 images: 3 waves of at most 4
    images = sorted(str(p) for p in (perseg_sample / "Images").glob("*/*.jpg"))
    manifest, output = tmp_path / "images.txt", tmp_path / "masks"
    manifest.write_text("\n".join(images) + "\n")
    argv = ["segment", *MODEL, *LOCAL, "--concept", str(tiny_concept), "--input", str(manifest),
            "--output", str(output)]

    assert main(argv) == 0
    rows = _rows(output)
    assert sorted(r["image_uri"] for r in rows) == images
    assert capsys.readouterr().out.count("images x 1 concepts") == 3  # one plan per wave

    assert main(argv) == 0  # rerun: nothing to do
    assert "0 shards written" in capsys.readouterr().out.strip().splitlines()[-1]

    manifest.write_text("\n".join(images[:5]) + "\n")  # the last wave's images leave the lake
    assert main(argv) == 0
    assert "4 removed" in capsys.readouterr().out.strip().splitlines()[-1]
    assert sorted(r["image_uri"] for r in _rows(output)) == images[:5]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_manifests_stream_with_an_optional_version_column(tmp_path, suffix):
    import pyarrow as pa

    from jobs.storage.listing import list_images

    path = tmp_path / f"m{suffix}"
    if suffix == ".csv":
        path.write_text("image_uri,version\ns3://b/a.jpg,e1\ns3://b/c.jpg,e2\n")
    else:
        pq.write_table(pa.table({"image_uri": ["s3://b/a.jpg", "s3://b/c.jpg"], "version": ["e1", "e2"]}), path)
    assert list(list_images(str(path))) == [("s3://b/a.jpg", "e1"), ("s3://b/c.jpg", "e2")]
