"""Shard commit protocol: every (image, concept) row lands exactly once.

Layout (job_record.py): one Hive partition per concept,
`<output>/concept=<name>/part-<shard>-<digest>.parquet`, each partition running the
protocol below on its own, so adding a concept adds a partition and leaves the others'
files untouched.

1. The job's images are split into `num_shards` shards by a stable hash of the URL
   (sha1, not Python's salted hash), so a rerun regroups them identically. The shard
   count and the job's identity (model fingerprint, settings; the concepts' content in
   their partitions' records) are recorded once (job_record.py); a rerun reads the shard
   count back and refuses a different identity.
2. A shard is committed by publishing `<partition>/part-<shard>-<digest>.parquet` in one
   atomic step: temp file + rename on local file systems, a single whole-object PUT on
   object stores (readers never see a partial object). `<digest>` hashes the shard's
   sorted image URLs and their version tokens from the listing (ETag, or size + mtime),
   so the file name says exactly which images, in which version, it covers.
3. A rerun first finishes or rolls back the superseding files a killed run left staged
   (supersede.py), then lists the part files of each of its concepts' partitions. A shard
   whose current digest is published in every partition is skipped; any other shard (new
   images, removed images, never finished, a new concept) is recomputed whole for the
   concepts whose partition lacks its digest (the encoder runs once per image for all of
   them). A shard with older files in a partition replaces them by supersede.py's protocol:
   staged in `_pending/`, the old files removed, only then the new one published, so no
   reader ever sees two versions of a shard. Interrupted writes leave only hidden
   `.*.tmp-*` files, which no reader matches (dataset readers skip `.`-files). So whichever
   process dies, no row is lost or duplicated once a run finishes (docs/guarantees-output.md).
4. A shard is computed in chunks (jobs/pipeline/run.py); the driver publishes it once, after
   its last chunk arrived, keeping one copy of a chunk that a retried task delivered
   twice. Rows of unchanged images (same URL, same content) are carried over from the
   shard's previous files (an image is unchanged when it has good rows for every concept
   being computed); a shard's rows are ordered by URL, concept, instance.

Provenance: every part file carries key-value metadata `persam.*` (version, model type,
fingerprint, concept digests, settings, layout, created time), see JobRecord.parquet_metadata.

Two jobs writing the same output at once compute the same shards and publish the same
names with the same content (each stages its own copy): the last rename/PUT wins and
nothing is duplicated, only work is wasted; a file the other run already removed counts as
removed. Different jobs on one output are refused by the records, also two that start at
once: records are created create-only and read back (_settle), so one of them wins.

Stale temp files: a publish writes its temp file in one go and renames it at once, so a
temp file of ours (`.<our name>.tmp-<hex>`) untouched for STALE_TEMP_SECONDS (one hour)
belongs to a publish that died; the next run's open_output deletes it. Younger ones may
belong to a live writer on another machine (whose liveness we cannot see) and are left.

Foreign files: only `part-<shard>-<digest>.parquet` files holding our schema (a subset of
MASK_SCHEMA's columns, same types; without the concept column in a partition) in the job's
partitions are ours. Anything else in the output
(`notes.parquet`, a look-alike part file of another schema, an unreadable one) is reported
in one line and left alone: never read as rows, never deleted. Partitions of concepts not
in this run are neither listed nor touched.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
import time
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from jobs.pipeline.job_record import (
    BY_CONCEPT, CONCEPT_FILE, JOB_FILE, JobRecord, agreed, check_concept_names, check_concept_record,
    CONCEPT_RECORD, JOB_RECORD, checked_record, shown_path,
)
from jobs.pipeline.output_files import (
    output_tables, parse_part_path, part_files, partition_root, read_job_record, read_output, shard_name,
    shard_of_path,
)
from jobs.pipeline.shards import Shard
from jobs.pipeline.supersede import (
    PENDING_FOLDER, left_behind, promote, recover, remove_ours, remove_quietly, stage, supersedes_metadata,
)
from jobs.storage.files import as_given, create_only, is_machine_failure, make_folder, publish_bytes
from jobs.storage.outputs import OutputError
from jobs.storage.sharding import shard_of  # re-exported: callers use commit.shard_of
from jobs.storage.schema import (
    IMAGE_URI, MASK_SCHEMA, PARTITION_PREFIX, image_uris, ordered_rows, partition_folder, partition_rows, read_parts,
    select_rows_of,
)

# names of the record and the files, re-exported: callers (commands, tests) use them as commit.*
__all__ = ["BY_CONCEPT", "JOB_FILE", "JobRecord", "output_tables", "part_files", "read_job_record",
           "read_output", "shard_name"]
# Temp files of our own publishes (publish_bytes: hidden); another tool's `*.tmp-*` is foreign.
TEMP_FILE = re.compile(r"^\.(part-\d+-[0-9a-f]{12}\.parquet|_persam_job\.json|_persam_concept\.json)\.tmp-[0-9a-f]+$")
Committed = dict[int, dict[str, str]]  # one partition's part files: {shard: {digest: path}}
# A publish writes its temp file in one go and renames it within seconds: an hour without
# a write means its writer died (mtime, not pids: writers may be on other machines).
STALE_TEMP_SECONDS = 3600.0
Log = Callable[[str], None]


def urls_digest(urls: list[str], tokens: dict[str, str] | None = None) -> str:
    """Digest of a shard's images: their URLs and version tokens (ETag or size + mtime)."""
    tokens = tokens or {}
    return hashlib.sha1("\n".join(f"{u}\t{tokens.get(u, '')}" for u in sorted(urls)).encode()).hexdigest()[:12]


def shard_count(num_images: int, shard_size: int) -> int:
    return max(1, math.ceil(num_images / max(1, shard_size)))


@dataclass
class ShardPlan:
    """Shards to run (their partitions left empty) and what the output already holds."""

    to_run: list[Shard]
    up_to_date: int
    superseded: list[str]  # files of shards whose images changed, deleted after the new publish


def _root(output: str, storage_options: dict | None):
    fs, root = url_to_fs(output, **(storage_options or {}))
    return fs, root.rstrip("/")


def report_foreign(paths: list[str], log: Log | None) -> None:
    """One line for files persam did not write (base names only: the output URL may hold secrets)."""
    if paths and log is not None:
        names = sorted(os.path.basename(p.rstrip("/")) for p in paths)
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        log(f"note: the output holds {len(names)} files persam did not write, left alone: {shown}")


def _age_seconds(info: dict, now: float) -> float | None:
    """Seconds since the listing entry was last modified; None when the store does not say."""
    modified = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("updated")
    if isinstance(modified, datetime):
        modified = modified.timestamp()
    elif isinstance(modified, str):
        try:
            modified = datetime.fromisoformat(modified.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return now - float(modified) if isinstance(modified, (int, float)) else None


def _scan_folder(fs, folder: str, now: float, allowed: set[str], foreign: list[str]) -> Committed:
    """One listing of a folder: part files by shard; stale temp files swept; other files except
    `allowed` names collected in `foreign`."""
    committed: Committed = {}
    for info in fs.ls(folder, detail=True):
        path = info["name"]
        name = os.path.basename(path.rstrip("/"))
        parsed = parse_part_path(path) if info.get("type") != "directory" else None
        if parsed is not None:
            committed.setdefault(parsed[0], {})[parsed[1]] = path
        elif TEMP_FILE.match(name):
            age = _age_seconds(info, now)
            if age is not None and age > STALE_TEMP_SECONDS:
                remove_quietly(fs, path)
        elif name not in allowed and name != PENDING_FOLDER:
            foreign.append(path)
    return committed


def _scan_output(fs, root: str, record: JobRecord, log: Log | None) -> dict[str, Committed]:
    """The part files of the job's partitions -> {partition: {shard: {digest: path}}}. Other
    concepts' partitions are not even listed."""
    foreign: list[str] = []
    now = time.time()
    for concept in record.concepts:  # before the listing: what it finishes is planned as committed
        foreign += recover(fs, f"{root}/{partition_folder(concept)}")
    top: list[str] = []  # in the root, part files are not ours: another tool's, or a copy
    _scan_folder(fs, root, now, {JOB_FILE}, top)
    foreign += [p for p in top if not os.path.basename(p.rstrip("/")).startswith(PARTITION_PREFIX)]
    committed = {}
    for concept in record.concepts:
        folder = f"{root}/{partition_folder(concept)}"
        committed[concept] = _scan_folder(fs, folder, now, {CONCEPT_FILE}, foreign) if fs.isdir(folder) else {}
    report_foreign(foreign, log)
    return committed


def _settle(fs, path: str, shown: str, data: bytes, kind: str) -> dict:
    """A record: created when absent, create-only (of two runs racing to create it, one does;
    files.create_only), then read back and validated whoever wrote it -> its fields."""
    if not fs.exists(path):
        create_only(fs, path, data)
    return checked_record(shown, fs.cat_file(path), kind)


def _record_concepts(fs, root: str, output: str, record: JobRecord) -> None:
    """Each concept's partition record: written when absent, then checked against this run's
    concept, so a run that lost the race to another concept of the same name is refused."""
    check_concept_names(output, record.concepts)
    for concept in record.concepts:
        where = f"{partition_folder(concept)}/{CONCEPT_FILE}"
        stored = _settle(fs, f"{root}/{where}", shown_path(output, where), record.concept_json(concept).encode(),
                         CONCEPT_RECORD)
        check_concept_record(output, concept, stored, record)


def check_output(output: str, record: JobRecord, storage_options: dict | None = None) -> JobRecord:
    """The checks open_output makes, read only: every run makes them before any work, and
    --dry-run makes the very same. The stored records validated (job_record.checked_record),
    this run's against them, the concept names -> the job's record (the stored shard count,
    where the output has a record)."""
    check_concept_names(output, record.concepts)
    stored = read_job_record(output, storage_options, record.concepts)
    if stored is None:
        return record
    record = agreed(output, stored, record)
    for concept, concept_record in stored["concepts"].items():
        check_concept_record(output, concept, concept_record, record)
    return record


def open_output(
    output: str, record: JobRecord, storage_options: dict | None = None, log: Log | None = None
) -> tuple[JobRecord, dict[str, Committed]]:
    """Record the job (or read back an earlier run's and check it) -> (the job's record,
    {partition: {shard: {digest: path}}}). Sweeps stale temp files of dead publishes and
    reports foreign files (module docstring)."""
    fs, root = _root(output, storage_options)
    try:
        record = check_output(output, record, storage_options)  # before anything is written
        make_folder(fs, root)  # local only: on s3fs a makedirs would create a missing bucket
        stored = _settle(fs, f"{root}/{JOB_FILE}", shown_path(output, JOB_FILE), record.to_json().encode(), JOB_RECORD)
        record = agreed(output, stored, record)  # another run may have created it first
        _record_concepts(fs, root, output, record)
        committed = _scan_output(fs, root, record, log)
    except OutputError:
        raise
    except (OSError, PermissionError, ValueError) as error:
        if is_machine_failure(error):  # a full disk is no unwritable --output
            raise
        raise OutputError(f"{output}: cannot write the output ({type(error).__name__}); pass a writable --output") from None
    return record, committed


def plan_shards(
    urls: list[str], num_shards: int, committed: dict[int, dict[str, str]], tokens: dict[str, str] | None = None
) -> ShardPlan:
    """Group `urls` into shards; keep those published with their current digest."""
    groups: dict[int, list[str]] = {}
    for url in urls:
        groups.setdefault(shard_of(url, num_shards), []).append(url)
    to_run, up_to_date, superseded = [], 0, []
    for shard in sorted(set(groups) | set(committed)):
        members = sorted(groups.get(shard, []))
        digest = urls_digest(members, tokens) if members else ""
        published = committed.get(shard, {})
        superseded += [path for d, path in published.items() if d != digest]
        if digest in published:
            up_to_date += 1
        elif members:
            to_run.append(Shard(shard, tuple(members), digest))
    return ShardPlan(to_run, up_to_date, superseded)


def remove_files(output: str, paths: list[str], storage_options: dict | None = None,
                 log: Log | None = None) -> list[str]:
    """Delete our superseded part files. One already gone (a concurrent identical run removed
    it) counts as removed; one not holding our schema is foreign: reported and kept -> those."""
    fs, _ = _root(output, storage_options)
    foreign = remove_ours(fs, paths)
    report_foreign(foreign, log)
    return foreign


def part_path(output: str, shard: int, digest: str, storage_options: dict | None, partition: str) -> str:
    """Where shard `shard` of `digest` is published in `output`'s `partition`."""
    fs, root = _root(partition_root(output, partition), storage_options)
    return as_given(fs, output)(f"{root}/{shard_name(shard, digest)}")


def commit_shard(output: str, shard: int, digest: str, table: pa.Table, storage_options: dict | None,
                 partition: str, metadata: dict[str, str] | None = None,
                 previous: list[str] | None = None, log: Log | None = None) -> str | None:
    """Write one shard's rows of `partition` (a concept's name) as one Parquet file without the
    concept column (its folder names it) with `metadata` as key-value metadata, published atomically
    -> its path. With `previous` (the shard's older files there), by supersede.py's protocol:
    staged, the old files removed, then published -> None when one of ours could not be
    removed (the staged file waits for the next run's recovery)."""
    fs, root = _root(partition_root(output, partition), storage_options)
    table = partition_rows(table)
    metadata = {**(metadata or {}), **(supersedes_metadata(previous) if previous else {})}
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    path = f"{root}/{shard_name(shard, digest)}"
    if not previous:
        publish_bytes(fs, path, buffer.getvalue())
        return path
    staged = stage(fs, root, shard_name(shard, digest), buffer.getvalue())
    foreign = remove_files(output, previous, storage_options, log) or []  # (module lookup: tests stub it)
    if left_behind(fs, previous, foreign):
        if log is not None:
            log(f"note: shard {shard}'s older file could not be removed; its new version waits in "
                f"{PENDING_FOLDER}/ for the next run")
        return None
    promote(fs, staged, path)
    return path


def assemble_shard(
    shard: int, computed: list[pa.Table], carried_urls: set[str], previous: list[str], urls: list[str], concepts: list[str],
    storage_options: dict | None = None, published: str | None = None,
) -> tuple[pa.Table, int]:
    """A shard's rows: those computed now plus those of `carried_urls` copied from its
    `previous` files, ordered by the shard's URL order, concept order, instance
    -> (rows, images of the previous files no longer in the shard).

    `published`: the path this shard's commit will have. When an identical run committed
    it first and so removed the previous files, the carried rows are read from it: same
    digest, so the same images in the same versions."""
    tables = [t.select(MASK_SCHEMA.names).cast(MASK_SCHEMA) for t in computed]
    removed = 0
    if previous:
        old = read_parts(previous, storage_options, None if carried_urls else [IMAGE_URI])
        old_urls = set(image_uris(old))
        removed = len(old_urls - set(urls))
        if carried_urls and old is not None:
            tables.append(select_rows_of(old, carried_urls))
    lost = carried_urls - {u for t in tables for u in image_uris(t)}
    if lost and published is not None:
        done = read_parts([published], storage_options)
        if done is not None:
            tables.append(select_rows_of(done, lost))
    table = pa.concat_tables(tables) if tables else MASK_SCHEMA.empty_table()
    missing = set(urls) - set(image_uris(table))
    if missing:  # e.g. the previous file vanished between the prepare and the commit
        raise OutputError(f"{', '.join(previous) or f'shard {shard}'}: rows of {len(missing)} unchanged "
                          "images could not be read back; rerun the job (they will be recomputed)")
    return ordered_rows(table, urls, concepts), removed


@dataclass
class OutputPlan:
    """One wave's work over the job's partitions.

    shards: the shards to run, each with the partitions lacking its digest and their
    superseded files (Shard.partitions, Shard.previous_by_partition).
    committed: {partition: shards already committed}; skipped: shards committed in every
    partition; dropped: superseded files of shards not rerun in their partition (deleted at once)."""

    shards: list[Shard]
    committed: dict[str, int]
    skipped: int
    dropped: list[str]


def plan_output(urls: list[str], num_shards: int, committed: dict[str, Committed],
                tokens: dict[str, str] | None = None) -> OutputPlan:
    """plan_shards per partition, merged per shard: a shard runs once, for every partition that lacks it."""
    runs: dict[int, Shard] = {}
    partitions: dict[int, list[str]] = {}
    previous: dict[int, dict[str, list[str]]] = {}
    counts, dropped = {}, []
    for partition, shards in committed.items():
        plan = plan_shards(urls, num_shards, shards, tokens)
        counts[partition] = plan.up_to_date
        for s in plan.to_run:
            runs.setdefault(s.shard, s)
            partitions.setdefault(s.shard, []).append(partition)
        for path in plan.superseded:
            shard = shard_of_path(path)
            if partition in partitions.get(shard, ()):
                previous.setdefault(shard, {}).setdefault(partition, []).append(path)
            else:
                dropped.append(path)
    shards = [replace(runs[s], partitions=tuple(partitions[s]),
                      previous_by_partition={p: tuple(paths) for p, paths in previous.get(s, {}).items()})
              for s in sorted(runs)]
    occupied = {shard_of(u, num_shards) for u in urls}
    return OutputPlan(shards, counts, len(occupied - set(runs)), dropped)
