"""The names of an output's files and the readers of its rows (layout: pipeline/commit.py).

    <output>/_persam_job.json                         the job record (job_record.py)
    <output>/concept=<name>/_persam_concept.json      a concept's record
    <output>/concept=<name>/part-<shard>-<digest>.parquet   its rows, without the concept column

    <output>/concept=<name>/_pending/part-<shard>-<digest>.parquet.<token>
                                                      a superseding shard in flight (supersede.py)

Everything that reads an output (eval, exports, benchmarks) goes through `part_files` /
`output_tables` (exports: `one_version`), so a layout change is made here once. Readers see
one version per shard: the commit protocol never publishes two (supersede.py), and where
two are found anyway (two different jobs racing on one output) `one_version` keeps one.
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from jobs.pipeline.job_record import CONCEPT_FILE, CONCEPT_RECORD, JOB_FILE, checked_record, shown_path
from jobs.storage.files import as_given
from jobs.storage.schema import PARTITION_PREFIX, partition_folder, read_part

PART_FILE = re.compile(r"^part-(\d+)-([0-9a-f]{12})\.parquet$")
# Footer key of a part file that replaced others: the names of the files it superseded (JSON list).
SUPERSEDES_KEY = b"persam.supersedes"
CREATED_KEY = b"persam.created"


def shard_name(shard: int, digest: str) -> str:
    return f"part-{shard:05d}-{digest}.parquet"


def parse_part_path(path: str) -> tuple[int, str] | None:
    """(shard, digest) of a published part file's path; None for any other file."""
    match = PART_FILE.match(os.path.basename(path))
    return (int(match.group(1)), match.group(2)) if match else None


def shard_of_path(path: str) -> int:
    return parse_part_path(path)[0]


def partition_root(output: str, partition: str) -> str:
    """The folder of `partition` (a concept's name)."""
    return f"{output.rstrip('/')}/{partition_folder(partition)}"


def _footer(fs, path: str) -> dict[bytes, bytes]:
    """A part file's key-value metadata; {} when unreadable."""
    try:
        with fs.open(path, "rb") as handle:
            return pq.ParquetFile(handle).schema_arrow.metadata or {}
    except Exception:
        return {}


def _newest(fs, paths: list[str]) -> str:
    """The version of one shard a reader keeps among several published: not named in another's
    superseded list, then the latest `persam.created`, then modification time, then name."""
    footers = {p: _footer(fs, p) for p in paths}
    superseded = set()
    for footer in footers.values():
        try:
            superseded |= set(json.loads(footer.get(SUPERSEDES_KEY, b"[]")))
        except ValueError:
            pass
    candidates = [p for p in paths if os.path.basename(p) not in superseded] or paths

    def rank(path: str) -> tuple:
        try:
            modified = fs.modified(path).timestamp()
        except Exception:
            modified = 0.0
        return footers[path].get(CREATED_KEY, b""), modified, path

    return max(candidates, key=rank)


def one_version(fs, paths: list[str]) -> list[str]:
    """`paths` with one part file per (folder, shard) where several versions of a shard are
    published; other files kept as they are. Reads footers only of the shards found twice."""
    groups: dict[tuple[str, int], list[str]] = {}
    for path in paths:
        parsed = parse_part_path(path)
        if parsed is not None:
            groups.setdefault((os.path.dirname(path.rstrip("/")), parsed[0]), []).append(path)
    dropped: set[str] = set()
    for group in groups.values():
        if len(group) > 1:
            dropped |= set(group) - {_newest(fs, group)}
    return [p for p in paths if p not in dropped]


def part_files(output: str, storage_options: dict | None = None) -> list[str]:
    """The published part files of an output, one per shard of each partition, in partition
    then shard order (for readers: eval, exports, benchmarks): those of every `concept=<name>/`
    partition (part files in the root are not persam's)."""
    fs, root = url_to_fs(output, **(storage_options or {}))
    root, paths = root.rstrip("/"), []
    for info in fs.ls(root, detail=True):
        name = os.path.basename(info["name"].rstrip("/"))
        if info.get("type") == "directory" and name.startswith(PARTITION_PREFIX):
            paths += [p for p in fs.ls(info["name"], detail=False) if parse_part_path(p) is not None]
    return [as_given(fs, output)(p) for p in one_version(fs, sorted(paths))]


def output_tables(output: str, storage_options: dict | None = None,
                  columns: Sequence[str] | None = None) -> Iterator[pa.Table]:
    """The rows of an output, one table per part file (bounded memory), every table with
    MASK_SCHEMA's columns (the concept column restored in partitions); files that are not
    ours are skipped."""
    for path in part_files(output, storage_options):
        table = read_part(path, storage_options, columns)
        if table is not None:
            yield table


def read_job_record(output: str, storage_options: dict | None = None,
                    concepts: Sequence[str] | None = None) -> dict | None:
    """The output's root record, with {"concepts": {name: partition record}} (those of
    `concepts` only, when given), every record validated (job_record.checked_record)
    -> None when the output has no record."""
    fs, root = url_to_fs(output, **(storage_options or {}))
    root = root.rstrip("/")
    try:
        text = fs.cat_file(f"{root}/{JOB_FILE}")
    except FileNotFoundError:
        return None
    stored = checked_record(shown_path(output, JOB_FILE), text)
    if concepts is None:
        paths = sorted(fs.glob(f"{root}/{PARTITION_PREFIX}*/{CONCEPT_FILE}"))
    else:
        paths = [p for c in concepts if fs.exists(p := f"{root}/{partition_folder(c)}/{CONCEPT_FILE}")]
    records = [checked_record(shown_path(output, p[len(root) + 1:]), fs.cat_file(p), CONCEPT_RECORD) for p in paths]
    stored["concepts"] = {r["name"]: r for r in records}
    return stored


def read_output(output: str, concepts: list[str], storage_options: dict | None = None) -> tuple[dict | None, dict[str, dict[int, dict[str, str]]]]:
    """What an output holds, read only (dry runs): its root record with the concept records
    (None: a new output) and the part files of `concepts`' partitions -> (record, {partition: {shard: {digest: path}}}). Nothing is written or swept."""
    fs, root = url_to_fs(output, **(storage_options or {}))
    root = root.rstrip("/")
    stored = read_job_record(output, storage_options, concepts)
    if stored is None:
        return None, {}
    folders = {c: f"{root}/{partition_folder(c)}" for c in concepts}
    committed: dict[str, dict[int, dict[str, str]]] = {}
    for partition, folder in folders.items():
        shards: dict[int, dict[str, str]] = {}
        for info in fs.ls(folder, detail=True) if fs.isdir(folder) else []:
            parsed = parse_part_path(info["name"]) if info.get("type") != "directory" else None
            if parsed is not None:
                shards.setdefault(parsed[0], {})[parsed[1]] = info["name"]
        committed[partition] = shards
    return stored, committed
