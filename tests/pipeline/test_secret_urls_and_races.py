"""Two guarantees of the job: credentials in a manifest's URLs never reach the output, and
two identical runs racing on one output both succeed.

Both run through the CLI with `--runner local` (the product's stages in this process), so
a `memory://` store can hold the images whose URLs carry credentials."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from jobs.pipeline import commit
from jobs.storage.schema import ERROR, IMAGE_URI, mask_row, rows_to_table

MODEL = ["--model-type", "tiny", "--checkpoint", "random:0", "--device", "cpu"]
SECRET = "sEcReT-KeY-1234"


@pytest.fixture()
def concept(perseg_sample, tmp_path) -> Path:
    out = tmp_path / "cat.json"
    assert main(["fit", *MODEL, "--image", str(perseg_sample / "Images/cat/00.jpg"),
                 "--mask", str(perseg_sample / "Annotations/cat/00.png"), "--name", "cat", "--out", str(out)]) == 0
    return out


def _everything_written(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


def test_manifest_urls_with_credentials_are_read_but_never_stored_or_printed(perseg_sample, concept, tmp_path, capsys):
    memory = fsspec.filesystem("memory")
    photo = (perseg_sample / "Images/cat/01.jpg").read_bytes()
    readable = [f"memory://reader:{SECRET}@lake/a.jpg", f"memory://lake/b.jpg?X-Amz-Signature={SECRET}&X-Amz-Date=1"]
    for url in readable:
        memory.pipe(url, photo)
    missing = f"memory://reader:{SECRET}@lake/gone.jpg"
    manifest, output = tmp_path / "images.txt", tmp_path / "masks"
    manifest.write_text("\n".join([*readable, missing]) + "\n")
    capsys.readouterr()
    try:
        # the missing image is an error row: 1 of 3 failed, above --max-error-rate 0.05 (exit 4, committed)
        assert main(["segment", *MODEL, "--runner", "local", "--concept", str(concept),
                     "--input", str(manifest), "--output", str(output)]) == 4
    finally:
        for url in readable:
            memory.rm(url)
    printed = capsys.readouterr()
    rows = pq.read_table(output).to_pylist()
    assert sorted(r[IMAGE_URI] for r in rows) == ["memory://lake/a.jpg", "memory://lake/b.jpg", "memory://lake/gone.jpg"]
    assert [r[IMAGE_URI] for r in rows if r[ERROR]] == ["memory://lake/gone.jpg"]  # read, except the missing one
    assert SECRET.encode() not in _everything_written(output)
    assert SECRET not in printed.out + printed.err


def test_carried_rows_come_from_an_identical_run_that_committed_first(tmp_path):
    output = str(tmp_path / "out")
    urls = ["a.jpg", "b.jpg"]
    old = rows_to_table([mask_row(u, "cat", "persam", "fp", "sha-" + u) for u in urls])
    old_path = commit.commit_shard(output, 0, "0" * 12, old, None, "cat")
    # the other run recomputed b, carried a, published the new digest, removed the old file
    done = commit.commit_shard(output, 0, "1" * 12, old, None, "cat")
    Path(old_path).unlink()
    computed = rows_to_table([mask_row("b.jpg", "cat", "persam", "fp", "sha-b.jpg", area=7)])
    with pytest.raises(ValueError, match="rerun the job"):  # without the published file: a clear error
        commit.assemble_shard(0, [computed], {"a.jpg"}, [old_path], urls, ["cat"])
    table, removed = commit.assemble_shard(0, [computed], {"a.jpg"}, [old_path], urls, ["cat"], published=done)
    assert table.column(IMAGE_URI).to_pylist() == urls and removed == 0
    assert table.num_rows == 2 and isinstance(table, pa.Table)


def test_two_identical_runs_after_a_change_both_succeed(perseg_sample, concept, tmp_path, monkeypatch):
    """The second run plans against the state before the first one's commit (as two runs
    started at once do): its superseded file is gone by the time it commits."""
    images, output = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    for name in ("01", "02"):
        (images / f"{name}.jpg").write_bytes((perseg_sample / f"Images/cat/{name}.jpg").read_bytes())
    argv = ["segment", *MODEL, "--runner", "local", "--concept", str(concept), "--input", str(images),
            "--output", str(output)]
    assert main(argv) == 0
    (images / "02.jpg").write_bytes((perseg_sample / "Images/duck_toy/01.jpg").read_bytes())

    first = {}
    real_plan = commit.plan_shards

    def plan_once(*args, **kwargs):  # both runs get the plan made before either commits
        if "plan" not in first:
            first["plan"] = real_plan(*args, **kwargs)
        return first["plan"]

    monkeypatch.setattr(commit, "plan_shards", plan_once)
    assert main(argv) == 0
    assert main(argv) == 0  # its superseded file was removed by the first run
    rows = pq.read_table(output).to_pylist()
    assert sorted(r[IMAGE_URI] for r in rows) == sorted(str(p) for p in images.iterdir())
    assert len(list(output.rglob("part-*.parquet"))) == 1
    record = json.loads((output / "_persam_job.json").read_text())
    assert record["num_shards"] == 1


def test_secrets_in_every_url_flag_never_reach_output_files_or_messages(perseg_sample, concept, tmp_path, capsys):
    """--concept, --output and --cache URLs with userinfo (the memory store keeps it as part
    of the path, so the run works): the secret is in no message and no file's content."""
    memory = fsspec.filesystem("memory")
    base = f"memory://user:{SECRET}@bucket"
    memory.pipe(f"{base}/concepts/cat.json", concept.read_bytes())
    memory.pipe(f"{base}/photos/a.jpg", (perseg_sample / "Images/cat/01.jpg").read_bytes())
    manifest = tmp_path / "images.txt"
    manifest.write_text(f"{base}/photos/a.jpg\n{base}/photos/missing.jpg\n")
    argv = ["segment", *MODEL, "--runner", "local", "--concept", f"{base}/concepts/cat.json", "--input", str(manifest),
            "--output", f"{base}/masks", "--cache", f"{base}/cache", "--max-error-rate", "1"]  # one image is missing
    capsys.readouterr()
    try:
        assert main(argv) == 0
        assert main(argv) == 0  # a rerun reads the job record and the cache back
        written = [memory.cat_file(p) for p in memory.find(f"{base}/masks") + memory.find(f"{base}/cache")]
    finally:
        memory.rm(f"{base}", recursive=True)
    printed = capsys.readouterr()
    assert len(written) >= 3  # job record, a part file, cache files
    assert all(SECRET.encode() not in data for data in written)
    assert SECRET not in printed.out + printed.err and "memory://bucket/masks" in printed.out


def test_a_folder_input_with_credentials_is_listed_read_and_stored_redacted(perseg_sample, concept, capsys):
    """memory:// keeps userinfo as part of its paths: the listed images keep the input's form,
    so their names are redacted and the URL with credentials is used for the read only."""
    memory = fsspec.filesystem("memory")
    base = f"memory://user:{SECRET}@lake"
    memory.pipe(f"{base}/photos/a.jpg", (perseg_sample / "Images/cat/01.jpg").read_bytes())
    capsys.readouterr()
    try:
        assert main(["segment", *MODEL, "--runner", "local", "--concept", str(concept), "--input", f"{base}/photos",
                     "--output", f"{base}/masks"]) == 0
        part = next(p for p in memory.find(f"{base}/masks") if "/part-" in p)
        rows = pq.read_table(memory.open(part)).to_pylist()
        written = [memory.cat_file(p) for p in memory.find(f"{base}/masks")]
    finally:
        memory.rm(base, recursive=True)
    assert [(r[IMAGE_URI], r[ERROR]) for r in rows] == [("memory://lake/photos/a.jpg", None)]
    assert all(SECRET.encode() not in data for data in written)
    printed = capsys.readouterr()
    assert SECRET not in printed.out + printed.err


@pytest.mark.parametrize("flag", ["--output", "--cache"])
def test_a_refused_url_is_named_without_its_secret(concept, tmp_path, capsys, flag):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    url = f"file://{blocker}/sub?token={SECRET}" if flag == "--cache" else f"https://user:{SECRET}@host/out"
    argv = ["segment", *MODEL, "--runner", "local", "--concept", str(concept), "--input", str(tmp_path),
            "--output", str(tmp_path / "out"), flag, url]
    assert main(argv) == 3  # bad input
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and SECRET not in err and "Traceback" not in err
