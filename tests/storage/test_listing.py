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


# ---------------------------------------------------------------------------- issue 29: inputs that broke jobs

from cli_tools import run_cli  # noqa: E402
from input_tools import fit_concept, output_rows, segment, write_scenes  # noqa: E402
from jobs.storage import listing  # noqa: E402
from jobs.storage.listing import credential_free, waves  # noqa: E402


@pytest.fixture(scope="module")
def concept(tmp_path_factory):
    return fit_concept(tmp_path_factory.mktemp("concept"))


REPEATS = [
    [0, 1, 2, 3, 0, 4],  # line 1 again on line 5, in the second wave
    [0, 1, 2, 0, 0, 0, 3, 4, 2, 1],  # repeats in the same wave and in later waves
    [0, 1, 2, 3, 4, 5, 6, 0],  # the first image again in the last wave, alone
    [0, 0, 0, 0, 0, 0, 0, 1],  # whole waves of repeats
]


@pytest.mark.parametrize("lines", REPEATS)
def test_a_manifest_repeat_in_any_wave_is_planned_once(tmp_path, monkeypatch, lines):
    monkeypatch.setattr(listing, "MANIFEST_WAVE_IMAGES", 3)
    manifest = tmp_path / "images.txt"
    manifest.write_text("\n".join(f"/lake/{i}.jpg" for i in lines) + "\n")
    planned = [u for wave in waves(str(manifest)) for u in wave]
    assert sorted(planned) == sorted(f"/lake/{i}.jpg" for i in set(lines))  # each image in exactly one wave


def test_a_manifest_repeat_in_a_later_wave_is_run_once(tmp_path, concept, monkeypatch):
    monkeypatch.setattr(listing, "MANIFEST_WAVE_IMAGES", 3)
    images = [str(p) for p in write_scenes(tmp_path / "lake", [f"{i}.jpg" for i in range(5)])]
    manifest, output = tmp_path / "images.txt", tmp_path / "out"
    manifest.write_text("\n".join(images[i] for i in [0, 1, 2, 3, 0, 4, 4]) + "\n")
    for _ in range(2):  # the rerun finds every image committed once
        result = segment(concept, str(manifest), output)
        assert result.rc == 0, result.err
        assert sorted(r["image_uri"] for r in output_rows(output)) == images


def test_one_image_under_renewed_signatures_is_one_image_across_waves(monkeypatch, tmp_path):
    monkeypatch.setattr(listing, "MANIFEST_WAVE_IMAGES", 2)
    signed = [f"s3://b/{k}.jpg?X-Amz-Signature={s}" for k, s in (("a", 1), ("b", 2), ("c", 3), ("a", 4), ("b", 5))]
    manifest = tmp_path / "m.txt"
    manifest.write_text("\n".join(signed) + "\n")
    named = [name for wave in waves(str(manifest)) for name in credential_free(wave)[0]]
    assert named == ["s3://b/a.jpg", "s3://b/b.jpg", "s3://b/c.jpg"]


@pytest.mark.parametrize("text", [
    "\ufeffimage_uri\n{a}\n{b}\n",  # Excel's "CSV UTF-8"
    "\ufeffimage_uri,version\n{a},e1\n{b},e2\n",
    "\ufeff\"image_uri\"\r\n{a}\r\n{b}\r\n",
    "\ufeffid,path\n1,{a}\n2,{b}\n",
])
def test_a_csv_manifest_with_a_bom_finds_its_header(tmp_path, text):
    a, b = str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")
    path = tmp_path / "m.csv"
    path.write_bytes(text.format(a=a, b=b).encode("utf-8"))
    assert list(list_image_urls(str(path))) == [a, b]


@pytest.mark.parametrize("text", ["\ufeff{a}\n{b}\n", "\ufeff# comment\n{a}\n{b}\n"])
def test_a_text_manifest_with_a_bom_reads_its_first_line(tmp_path, text):
    a, b = str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")
    path = tmp_path / "m.txt"
    path.write_bytes(text.format(a=a, b=b).encode("utf-8"))
    assert list(list_image_urls(str(path))) == [a, b]


@pytest.mark.parametrize("content", [b"hello", b"PAR1", b"PAR1" + b"\0" * 64 + b"PAR1", b"image_uri\na.jpg\n", b""])
def test_a_manifest_named_parquet_that_is_not_parquet_is_one_line_naming_it(tmp_path, concept, content):
    manifest = tmp_path / "images.parquet"
    manifest.write_bytes(content)
    for dry_run in ((), ("--dry-run",)):
        result = segment(concept, str(manifest), tmp_path / "out", *dry_run)
        assert result.rc == 3, result.err
        lines = result.err.strip().splitlines()
        assert len(lines) == 1 and str(manifest) in lines[0] and "manifest" in lines[0], lines


def test_s3_input_without_permission_is_one_line_naming_the_redacted_url(s3, tmp_path, concept, monkeypatch):
    """Every S3 call answered 403 (as for credentials without s3:ListBucket / s3:GetObject):
    exit 3 (access is configuration), one line naming the URL without its credentials."""
    import s3fs
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    s3.mkdir("denied")  # its own bucket: the moto server outlives each test
    s3.pipe("denied/photos/a.jpg", b"x")
    s3.pipe("denied/list.txt", b"s3://denied/photos/a.jpg\n")

    async def forbidden(self, method, *args, **kwargs):
        error = ClientError({"Error": {"Code": "403", "Message": "Forbidden"}}, method)
        raise translate_boto_error(error)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", forbidden)
    for given in ("s3://KEY:SeCrEt99@denied/photos/", "s3://denied/list.txt?X-Amz-Signature=SiGnAtUrE9",
                  "s3://denied/photos/*.jpg", "s3://denied/photos/a.jpg", "s3://denied/m.csv", "s3://denied/m.parquet"):
        s3fs.S3FileSystem.clear_instance_cache()
        result = segment(concept, given, tmp_path / "out")
        assert result.rc == 3, result.err
        lines = result.err.strip().splitlines()
        assert len(lines) == 1 and "access denied" in lines[0] and "s3://denied/" in lines[0], lines
        assert "SeCrEt99" not in result.err and "SiGnAtUrE9" not in result.err


NOT_UTF8 = [b"caf\xe9.jpg", b"\xff\xfe.png", b"ok-\xc3(.jpg", b"\x80\x81\x82.jpeg"]


def test_file_names_that_are_not_utf8_are_one_error_row_each(tmp_path, concept):
    lake, output = tmp_path / "lake", tmp_path / "out"
    good = write_scenes(lake, ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "f.jpg"])
    bad = [os.path.join(os.fsencode(lake), raw) for raw in NOT_UTF8]
    for path in bad:
        with open(path, "wb") as handle:
            handle.write(good[0].read_bytes())
    shown = sorted(str(lake) + "/" + raw.decode("utf-8", "backslashreplace") for raw in NOT_UTF8)
    dry = segment(concept, str(lake), output, "--dry-run")
    assert dry.rc == 0 and "10 images" in dry.out, dry.err
    result = segment(concept, str(lake), output, "--max-error-rate", "0.5")
    assert result.rc == 0, result.err
    rows = {r["image_uri"]: r["error"] for r in output_rows(output)}
    assert sorted(rows) == sorted([*map(str, good), *shown])
    assert sorted(u for u, e in rows.items() if e) == shown and all("not valid UTF-8" in rows[u] for u in shown)
    manifest = tmp_path / "m.txt"  # manifest lines that are not UTF-8: the same error rows
    manifest.write_bytes(b"\n".join([os.fsencode(good[1]), *bad]) + b"\n")
    again = segment(concept, str(manifest), tmp_path / "out2", "--max-error-rate", "1")
    assert again.rc == 0, again.err
    assert sorted(r["image_uri"] for r in output_rows(tmp_path / "out2") if r["error"]) == shown
