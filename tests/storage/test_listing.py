"""jobs.storage.listing (--input: folders, globs, manifests) and jobs.storage.files' atomic publish."""

from __future__ import annotations

import csv
import os

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.storage.files import publish_bytes
from jobs.storage.listing import InputError, is_image_name, list_image_urls
from jobs.storage.schema import rows_to_table

# ---------------------------------------------------------------------------- inputs

# Relative paths, deliberately created out of order; the ones after None are not images.
IMAGES = [
    "z.jpg", "A.JPG", "m.Png", "c.jpeg", "d.webp", "e.bmp", "f.tif", "g.TIFF",
    "b_dir/y.png", "b_dir/x.JPEG", "a_dir/sub/deep.jpg", "a_dir/k.jpg", "c_dir/x.gif",
]
NOT_IMAGES = ["notes.txt", "meta.json", "README", "photo.jpg.bak", "a_dir/labels.csv", "b_dir/.DS_Store", "c_dir/x.svg"]


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "lake"
    for relative in IMAGES + NOT_IMAGES:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    return root


def expected_walk_order(root) -> list[str]:
    """Files of a directory (sorted) before its subdirectories (sorted, depth first)."""
    found = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories.sort()
        found.extend(os.path.join(directory, name) for name in sorted(files) if is_image_name(name))
    return found


def test_directory_listing_is_recursive_case_insensitive_and_sorted(tree):
    urls = list(list_image_urls(str(tree)))
    assert sorted(os.path.relpath(u, tree) for u in urls) == sorted(IMAGES)
    assert urls == expected_walk_order(tree)
    assert urls == list(list_image_urls(str(tree) + "/"))  # a trailing slash changes nothing
    assert urls == list(list_image_urls(str(tree)))  # deterministic


def test_relative_directory_gives_absolute_paths(tree, monkeypatch):
    monkeypatch.chdir(tree.parent)
    urls = list(list_image_urls("lake"))
    assert urls == expected_walk_order(tree)
    assert all(os.path.isabs(u) for u in urls)


def test_file_url_keeps_its_protocol(tree):
    urls = list(list_image_urls(f"file://{tree}"))
    assert urls == [f"file://{u}" for u in expected_walk_order(tree)]


def test_single_file_input(tree):
    assert list(list_image_urls(str(tree / "z.jpg"))) == [str(tree / "z.jpg")]


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="not found"):
        list(list_image_urls(str(tmp_path / "nowhere")))


def test_glob(tree):
    urls = list(list_image_urls(f"{tree}/*"))
    top_level = sorted(str(tree / name) for name in IMAGES if "/" not in name)
    assert urls == top_level  # directories and non-images are skipped, order is sorted
    deep = list(list_image_urls(f"{tree}/**/*.jpg"))
    assert str(tree / "a_dir/sub/deep.jpg") in deep and str(tree / "a_dir/k.jpg") in deep
    assert deep == sorted(deep)


def test_txt_manifest(tmp_path):
    manifest = tmp_path / "list.txt"
    manifest.write_text("# images to label\ns3://b/one.jpg\n\n  /data/two.png  \ngs://c/three.webp\n")
    assert list(list_image_urls(str(manifest))) == ["s3://b/one.jpg", "/data/two.png", "gs://c/three.webp"]


def test_csv_manifest_with_a_url_column(tmp_path):
    manifest = tmp_path / "list.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "image_uri", "label"])
        writer.writerows([[1, "s3://b/one.jpg", "cat"], [2, "s3://b/two, with comma.jpg", "dog"], [3, "", "x"]])
    assert list(list_image_urls(str(manifest))) == ["s3://b/one.jpg", "s3://b/two, with comma.jpg"]


def test_csv_manifest_without_header(tmp_path):
    manifest = tmp_path / "LIST.CSV"
    manifest.write_text("s3://b/one.jpg,10\ns3://b/two.jpg,20\n")
    assert list(list_image_urls(str(manifest))) == ["s3://b/one.jpg", "s3://b/two.jpg"]


@pytest.mark.parametrize("column", ["image_uri", "uri", "url", "path"])
def test_parquet_manifest(tmp_path, column):
    manifest = tmp_path / "list.parquet"
    pq.write_table(pa.table({"size": [1, 2, 3], column: ["s3://b/1.jpg", None, "s3://b/3.png"]}), manifest)
    assert list(list_image_urls(str(manifest))) == ["s3://b/1.jpg", "s3://b/3.png"]


def test_parquet_manifest_falls_back_to_the_first_column(tmp_path):
    manifest = tmp_path / "list.parquet"
    pq.write_table(pa.table({"key": ["a.jpg", "b.jpg"], "other": [1, 2]}), manifest)
    assert list(list_image_urls(str(manifest))) == ["a.jpg", "b.jpg"]


def test_masks_output_is_a_valid_manifest(tmp_path):
    """A previous job's Parquet (image_uri column) can drive the next one."""
    manifest = tmp_path / "previous.parquet"
    rows = [{"image_uri": f"s3://b/{i}.jpg", "concept": "cat", "area": 0} for i in range(3)]
    pq.write_table(rows_to_table(rows), manifest)
    assert list(list_image_urls(str(manifest))) == [f"s3://b/{i}.jpg" for i in range(3)]


# ---------------------------------------------------------------------------- publishing bytes


def test_publish_bytes_local_is_atomic_and_leaves_no_temp_files(tmp_path):
    fs = fsspec.filesystem("file")
    target = tmp_path / "deep" / "dir" / "part-00001.parquet"
    publish_bytes(fs, str(target), b"first")
    assert target.read_bytes() == b"first"
    publish_bytes(fs, str(target), b"second version")
    assert target.read_bytes() == b"second version"
    assert sorted(p.name for p in target.parent.iterdir()) == ["part-00001.parquet"]


def test_publish_bytes_object_store():
    fs = fsspec.filesystem("memory")
    publish_bytes(fs, "/persam-test/out/part-00002.parquet", b"payload")
    assert fs.cat_file("/persam-test/out/part-00002.parquet") == b"payload"
    assert fs.ls("/persam-test/out", detail=False) == ["/persam-test/out/part-00002.parquet"]
    fs.rm("/persam-test", recursive=True)
