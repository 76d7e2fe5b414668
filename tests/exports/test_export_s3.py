"""Exports from and to object storage: `--output s3://…` lands in the bucket (no local `s3:`
folder), images are read from the bucket, credentials appear in no file and no line."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from cli_tools import ACCESS_KEY, SECRET_KEY
from export_data import ok, run_cli, small_lake

OPTIONS = json.dumps({"key": ACCESS_KEY, "secret": SECRET_KEY})


def lake_in_s3(s3, tmp_path) -> str:
    """The small lake with its photos and masks in s3://lake/ (image_uri rewritten to match)."""
    lake = small_lake(tmp_path / "local")
    if s3.exists("lake"):
        s3.rm("lake", recursive=True)
    s3.mkdir("lake")
    s3.put(str(lake.photos), "lake/photos", recursive=True)
    for path in lake.masks.glob("*.parquet"):
        table = pq.read_table(path)
        uris = [u.replace(str(lake.photos), "s3://lake/photos") for u in table.column("image_uri").to_pylist()]
        table = table.set_column(0, table.schema.field(0), pa.array(uris, pa.string()))
        with s3.open(f"lake/masks/{path.name}", "wb") as handle:
            pq.write_table(table, handle)
    return "s3://lake/masks/"


def test_every_kind_writes_into_the_bucket_and_no_secret_leaks(s3, tmp_path, monkeypatch):
    masks = lake_in_s3(s3, tmp_path)
    s3.rm("lake/photos/garden/cat.png")  # one missing image: a line, the rest exported
    monkeypatch.chdir(tmp_path)
    outputs = {"coco": "s3://lake/exports/coco.json", "label-studio": "s3://lake/exports/tasks.json",
               "hf-dataset": "s3://lake/exports/hf/", "overlays": "s3://lake/exports/review/",
               "subjects": "s3://lake/exports/subjects/"}
    printed = []
    for kind, output in outputs.items():
        result = run_cli(["export", kind, "--masks", masks, "--output", output, "--storage-options", OPTIONS])
        printed += [ok(result), result.err]
    assert not (tmp_path / "s3:").exists()  # fsspec wrote to the bucket, not to a local folder
    written = s3.find("lake/exports")
    assert {"lake/exports/coco.json", "lake/exports/tasks.json", "lake/exports/tasks.label_config.xml",
            "lake/exports/hf/README.md", "lake/exports/review/index.html"} <= set(written)
    assert sum(p.startswith("lake/exports/review/thumbs/") for p in written) == 4  # cat.png's 2 cards are missing
    assert not [p for p in written if ".tmp-" in p]
    coco = json.loads(s3.cat("lake/exports/coco.json"))
    assert coco["info"]["image_root"] == "s3://lake/photos"
    assert {i["file_name"] for i in coco["images"]} == {"garden/cat.png", "garden/dog.png", "house/both.jpg"}
    assert "missing: s3://lake/photos/garden/cat.png: image not found" in "".join(printed)
    texts = printed + [s3.cat(p).decode("utf-8", "replace") for p in written if not p.endswith(".jpg")]
    assert not [t for t in texts if ACCESS_KEY in t or SECRET_KEY in t]


def test_credentials_in_the_images_url_never_reach_the_export(s3, tmp_path):
    masks = lake_in_s3(s3, tmp_path)
    images = f"s3://{ACCESS_KEY}:{SECRET_KEY}@elsewhere/photos"  # a moved location with userinfo
    out = tmp_path / "review"
    result = run_cli(["export", "overlays", "--masks", masks, "--output", str(out), "--images", images])
    lines = ok(result).splitlines()
    problems = [line for line in lines if line.split(":")[0] in ("missing", "unreadable")]
    assert len(problems) == 3 and all("s3://elsewhere/photos/" in line for line in problems)
    tasks = tmp_path / "tasks.json"
    ok(run_cli(["export", "label-studio", "--masks", masks, "--output", str(tasks), "--images", images]))
    for text in (result.out, result.err, (out / "index.html").read_text(), tasks.read_text()):
        assert ACCESS_KEY not in text and SECRET_KEY not in text
