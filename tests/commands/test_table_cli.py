"""`--table` / `--catalog` on the command line: a catalog configured exactly as pyiceberg's
users do (environment variables), the embedded default, export and eval reading a table
as they read a folder, an S3 warehouse on the loopback S3 endpoint, credentials never
shown, and the flag errors. Jobs run the tiny random model with `--runner local`."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from cli_tools import LOCAL, MODEL, SECRET_KEY, ACCESS_KEY, assert_one_error_line, run_cli
from input_tools import fit_concept, write_scenes
from jobs.pipeline.output import read_rows
from jobs.storage.iceberg_table import open_catalog
from jobs.storage.schema import CONCEPT, IMAGE_URI, INSTANCE, MASK_SCHEMA

KEY = (IMAGE_URI, CONCEPT, INSTANCE)


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("table-job")
    write_scenes(folder / "images", [f"{i}.jpg" for i in range(4)])
    return folder / "images", fit_concept(folder / "concepts", "thing")


@pytest.fixture()
def lake(tmp_path, monkeypatch) -> Path:
    """The catalog `lake` as the acceptance checks configure it."""
    monkeypatch.setenv("PYICEBERG_CATALOG__LAKE__TYPE", "sql")
    monkeypatch.setenv("PYICEBERG_CATALOG__LAKE__URI", f"sqlite:///{tmp_path}/catalog.db")
    monkeypatch.setenv("PYICEBERG_CATALOG__LAKE__WAREHOUSE", f"file://{tmp_path}/warehouse")
    monkeypatch.setenv("PERSAM_CACHE", str(tmp_path / "cache"))
    return tmp_path


def _segment(job, *where: str, extra: tuple[str, ...] = ()):
    images, concept = job
    return run_cli(["segment", *MODEL, *LOCAL, "--concept", str(concept), "--input", str(images), "--shard-size", "2",
                    *where, *extra])


def _keys(table) -> Counter:
    return Counter(zip(*(table.column(c).to_pylist() for c in KEY)))


def _coco(path: Path) -> dict:
    """A COCO file by image name (ids follow the reading order, which differs between outputs)."""
    coco = json.loads(path.read_text())
    names = {image["id"]: image["file_name"] for image in coco["images"]}
    categories = {c["id"]: c["name"] for c in coco["categories"]}
    by_name: dict[str, list] = {name: [] for name in names.values()}
    for annotation in coco["annotations"]:
        by_name[names[annotation["image_id"]]].append(
            (categories[annotation["category_id"]], json.dumps(annotation["segmentation"]), annotation["bbox"]))
    return {name: sorted(found) for name, found in by_name.items()}


@pytest.mark.slow
def test_a_lake_catalog_from_the_environment_and_export_reads_it_as_a_folder(job, lake):
    first = _segment(job, "--table", "masks.cats", "--catalog", "lake")
    assert first.rc == 0, first.err
    assert "-> table masks.cats (catalog lake)" in first.out
    again = _segment(job, "--table", "masks.cats", "--catalog", "lake")
    assert again.rc == 0 and "0 shards written" in again.out
    assert (lake / "catalog.db").exists() and list((lake / "warehouse").rglob("*.parquet"))

    folder = lake / "folder"
    assert _segment(job, "--output", str(folder)).rc == 0
    table_rows = read_rows(table="masks.cats", catalog="lake")
    folder_rows = read_rows(masks=str(folder))
    assert _keys(table_rows) == _keys(folder_rows) and max(_keys(table_rows).values()) == 1
    assert table_rows.schema == MASK_SCHEMA

    # readers outside persam: pyiceberg -> Arrow and pandas, by name
    table = open_catalog("lake").load_table("masks.cats")
    frame = table.scan().to_pandas()
    assert len(frame) == folder_rows.num_rows and set(frame[CONCEPT]) == {"thing"}
    assert table.scan().to_arrow().num_rows == folder_rows.num_rows

    result = run_cli(["export", "coco", "--table", "masks.cats", "--catalog", "lake", "--output", str(lake / "t.json")])
    assert result.rc == 0, result.err
    assert run_cli(["export", "coco", "--masks", str(folder), "--output", str(lake / "f.json")]).rc == 0
    assert _coco(lake / "t.json") == _coco(lake / "f.json") and _coco(lake / "t.json")


@pytest.mark.slow
def test_the_embedded_catalog_is_the_default_and_dry_run_reads_it(job, lake):
    result = _segment(job, "--table", "masks.default")
    assert result.rc == 0, result.err
    assert (lake / "cache" / "iceberg" / "catalog.db").exists()  # PERSAM_CACHE/iceberg
    dry = _segment(job, "--table", "masks.default", extra=("--dry-run",))
    assert dry.rc == 0 and "output table masks.default (catalog embedded) (existing output" in dry.out
    assert "0 shards to run" in dry.out


@pytest.mark.slow
def test_eval_reads_its_masks_from_a_table_as_from_a_folder(perseg_sample, lake, monkeypatch):
    base = ["eval", *MODEL, *LOCAL, "--data", str(perseg_sample)]
    folder = run_cli([*base, "--output", str(lake / "folder-eval")])
    assert folder.rc == 0, folder.err
    table = run_cli([*base, "--output", str(lake / "table-eval"), "--table", "evals.perseg", "--catalog", "lake"])
    assert table.rc == 0, table.err
    assert not (lake / "table-eval" / "masks").exists()  # the masks went into the table
    metrics = [json.loads((lake / f / "metrics.json").read_text()) for f in ("folder-eval", "table-eval")]
    for key in ("miou", "biou"):
        assert metrics[0][key] == pytest.approx(metrics[1][key])


@pytest.mark.slow
def test_an_s3_warehouse_on_the_loopback_endpoint(job, lake, s3_endpoint, s3, monkeypatch, capsys):
    s3.mkdir("iceberg-lake")
    for key, value in {"TYPE": "sql", "URI": f"sqlite:///{lake}/s3catalog.db", "WAREHOUSE": "s3://iceberg-lake/wh",
                       "S3__ENDPOINT": s3_endpoint, "S3__ACCESS_KEY_ID": ACCESS_KEY,
                       "S3__SECRET_ACCESS_KEY": SECRET_KEY, "S3__REGION": "us-east-1"}.items():
        monkeypatch.setenv(f"PYICEBERG_CATALOG__S3LAKE__{key}", value)
    result = _segment(job, "--table", "masks.cats", "--catalog", "s3lake")
    assert result.rc == 0, result.err
    assert s3.find("iceberg-lake/wh")  # data and metadata files in the bucket
    rows = read_rows(table="masks.cats", catalog="s3lake")
    assert rows.num_rows == 4 and max(_keys(rows).values()) == 1
    assert open_catalog("s3lake").load_table("masks.cats").scan().to_pandas()[IMAGE_URI].nunique() == 4
    exported = run_cli(["export", "coco", "--table", "masks.cats", "--catalog", "s3lake",
                        "--output", str(lake / "s3.json")])
    assert exported.rc == 0, exported.err
    printed = result.out + result.err + exported.out + exported.err + "".join(capsys.readouterr())
    assert SECRET_KEY not in printed and SECRET_KEY not in (lake / "s3.json").read_text()


def test_a_catalog_holding_credentials_fails_in_one_line_without_them(job, lake, monkeypatch):
    secret = "pAsSwOrD-1234-sEcReT"
    monkeypatch.setenv("PYICEBERG_CATALOG__BROKEN__TYPE", "sql")
    monkeypatch.setenv("PYICEBERG_CATALOG__BROKEN__URI", f"postgresql+nodriver://admin:{secret}@127.0.0.1:9/lake")
    monkeypatch.setenv("PYICEBERG_CATALOG__BROKEN__WAREHOUSE", f"s3://key:{secret}@bucket/wh")
    result = _segment(job, "--table", "masks.cats", "--catalog", "broken")
    line = assert_one_error_line(result, "--catalog broken")
    assert result.rc == 3 and secret not in result.out + result.err, line
    result = run_cli(["export", "coco", "--table", "masks.cats", "--catalog", "broken", "--output",
                      str(lake / "x.json")])
    assert result.rc == 3 and secret not in result.out + result.err


def test_the_flag_errors(job, lake):
    with pytest.raises(SystemExit) as usage:  # argparse's usage error: exit 2, one line
        _segment(job, "--table", "masks.cats", "--output", str(lake / "out"))
    assert usage.value.code == 2
    assert "masks" not in (p.name for p in lake.iterdir())
    lone = _segment(job, "--output", str(lake / "out"), "--catalog", "lake")
    assert assert_one_error_line(lone, "--catalog lake", "--table") and lone.rc == 3
    bad = _segment(job, "--table", "cats")
    assert assert_one_error_line(bad, "--table 'cats'", "NAMESPACE.TABLE") and bad.rc == 3
    missing = run_cli(["export", "coco", "--table", "masks.none", "--catalog", "lake", "--output",
                       str(lake / "x.json")])
    assert assert_one_error_line(missing, "table masks.none (catalog lake)") and missing.rc == 3
    with pytest.raises(SystemExit) as usage:
        run_cli(["export", "coco", "--output", str(lake / "x.json")])
    assert usage.value.code == 2


@pytest.mark.slow
def test_unchanged_images_of_a_changed_shard_are_carried_from_the_table(job, lake):
    """The pipeline's own readers of a shard's previous rows (prepare's unchanged images, the
    committer's carried rows) read them from the table."""
    from input_tools import scene_bytes
    from jobs.storage.sharding import shard_of

    images = lake / "images"
    paths = write_scenes(images, [f"{i}.jpg" for i in range(4)])
    where = ("--table", "masks.carry", "--catalog", "lake")
    assert run_cli(["segment", *MODEL, *LOCAL, "--concept", str(job[1]), "--input", str(images), "--shard-size", "2",
                    *where]).rc == 0
    shards = Counter(shard_of(str(p), 2) for p in paths)
    changed = next(p for p in paths if shards[shard_of(str(p), 2)] > 1)
    changed.write_bytes(scene_bytes(99))
    result = run_cli(["segment", *MODEL, *LOCAL, "--concept", str(job[1]), "--input", str(images), "--shard-size",
                      "2", *where])
    assert result.rc == 0, result.err
    carried = shards[shard_of(str(changed), 2)] - 1
    assert f"1 encoded, 0 from cache, {carried} unchanged" in result.out, result.out
    rows = read_rows(table="masks.carry", catalog="lake")
    assert _keys(rows) == Counter((str(p), "thing", 0) for p in paths)


@pytest.mark.slow
def test_rank_into_a_table_replaces_it_whole(job, lake):
    from jobs.storage.schema import RANK, RANKING_SCHEMA

    images, concept = job
    rank = ["rank", *MODEL, *LOCAL, "--concept", str(concept), "--input", str(images), "--top-k", "2",
            "--table", "rankings.thing", "--catalog", "lake"]
    dry = run_cli([*rank, "--dry-run"])
    assert dry.rc == 0 and "output table rankings.thing (catalog lake) (replaced whole)" in dry.out
    for _ in range(2):
        result = run_cli(rank)
        assert result.rc == 0, result.err
        assert "-> table rankings.thing (catalog lake)" in result.out
    table = open_catalog("lake").load_table("rankings.thing")
    ranking = table.scan().to_arrow()
    assert ranking.num_rows == 4 and sorted(ranking.column(RANK).to_pylist()) == [1, 2, 3, 4]
    assert ranking.schema.names == RANKING_SCHEMA.names
    masks = _segment(job, "--table", "rankings.thing", "--catalog", "lake")  # not a masks table
    assert masks.rc == 3 and "holds no persam job record" in masks.err
