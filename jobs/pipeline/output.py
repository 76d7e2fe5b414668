"""Where a job's masks go: a folder of Parquet (commit.py) or an Apache Iceberg table
(table_output.py), behind one seam. Commands ask the seam, never a layout.

Both answer the same questions, so one planning (commit.plan_output) serves both:
- `check(record)`: the run's job record against the stored one, read only, before work;
- `open(record, log)`: record the job (or check it) -> (record, {partition: {shard: {digest: ref}}});
  a ref names one shard's rows in one partition (a part file's path, or a table ref that
  reads like one), and schema.read_parts reads either: carry-over and counts need no branch;
- `commit_shard(...)`: publish a shard's rows of one partition, replacing its older version
  so that no reader sees both;
- `remove(refs, log)`: delete superseded shards; `ref(...)`: where a shard's commit will be;
- `read_only(concepts)`: what the output holds, nothing written or swept (--dry-run);
- `rows(columns)`: every row as Arrow (readers: eval; exports read `dataset`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import pyarrow as pa
from fsspec.core import url_to_fs

from jobs.pipeline import commit
from jobs.pipeline.job_record import JobRecord
from jobs.pipeline.output_files import partition_root
from jobs.pipeline.supersede import plan_recovery
from jobs.pipeline.table_output import TableOutput
from jobs.storage.outputs import OutputError
from jobs.storage.redaction import redact
from jobs.storage.schema import MASK_SCHEMA, read_parts

Committed = dict[int, dict[str, str]]
Log = Callable[[str], None]


class Output(Protocol):
    shown: str  # how messages name it (no credentials)
    many_waves: bool  # takes the shards of a manifest's later waves
    storage_options: dict

    def read_record(self, concepts: Sequence[str] | None = None) -> dict | None: ...
    def check(self, record: JobRecord) -> JobRecord: ...
    def open(self, record: JobRecord, log: Log | None = None) -> tuple[JobRecord, dict[str, Committed]]: ...
    def read_only(self, concepts: Sequence[str]) -> tuple[dict | None, dict[str, Committed]]: ...
    def ref(self, shard: int, digest: str, partition: str) -> str: ...
    def commit_shard(self, shard: int, digest: str, rows: pa.Table, partition: str,
                     metadata: dict[str, str] | None = None, previous: list[str] | None = None,
                     log: Log | None = None) -> str | None: ...
    def remove(self, refs: list[str], log: Log | None = None) -> list[str]: ...
    def rows(self, columns: Sequence[str] | None = None) -> pa.Table: ...


@dataclass
class FolderOutput:
    """A folder (any fsspec URL) of Hive-partitioned Parquet: commit.py's protocol, unchanged."""

    url: str
    storage_options: dict = field(default_factory=dict)
    many_waves = True

    @property
    def shown(self) -> str:
        return redact(self.url)

    def read_record(self, concepts: Sequence[str] | None = None) -> dict | None:
        return commit.read_job_record(self.url, self.storage_options, concepts)

    def check(self, record: JobRecord) -> JobRecord:
        return commit.check_output(self.url, record, self.storage_options)

    def open(self, record: JobRecord, log: Log | None = None) -> tuple[JobRecord, dict[str, Committed]]:
        return commit.open_output(self.url, record, self.storage_options, log)

    def read_only(self, concepts: Sequence[str]) -> tuple[dict | None, dict[str, Committed]]:
        """The part files as the run will find them once it finished or discarded what a killed
        run left staged (supersede.plan_recovery: the run's own decision, made read only)."""
        record, committed = commit.read_output(self.url, list(concepts), self.storage_options)
        fs, _ = url_to_fs(self.url, **(self.storage_options or {}))
        found = {}
        for partition, shards in committed.items():
            folder = url_to_fs(partition_root(self.url, partition), **(self.storage_options or {}))[1].rstrip("/")
            found[partition] = plan_recovery(fs, folder).apply_to(shards) if fs.isdir(folder) else shards
        return record, found

    def ref(self, shard: int, digest: str, partition: str) -> str:
        return commit.part_path(self.url, shard, digest, self.storage_options, partition)

    def commit_shard(self, shard: int, digest: str, rows: pa.Table, partition: str,
                     metadata: dict[str, str] | None = None, previous: list[str] | None = None,
                     log: Log | None = None) -> str | None:
        return commit.commit_shard(self.url, shard, digest, rows, self.storage_options, partition, metadata,
                                   previous, log)

    def remove(self, refs: list[str], log: Log | None = None) -> list[str]:
        return commit.remove_files(self.url, refs, self.storage_options, log)

    def rows(self, columns: Sequence[str] | None = None) -> pa.Table:
        table = read_parts(commit.part_files(self.url, self.storage_options), self.storage_options, columns)
        names = MASK_SCHEMA.names if columns is None else [c for c in MASK_SCHEMA.names if c in columns]
        return MASK_SCHEMA.empty_table().select(names) if table is None else table


def mask_output(output: str | None = None, table: str | None = None, catalog: str | None = None,
                storage_options: dict | None = None) -> Output:
    """--output URL, or --table NAMESPACE.TABLE [--catalog NAME] (exactly one of them)."""
    if table is not None and output is not None:
        raise OutputError("--table and --output: give one of them (a table of a catalog, or a folder)")
    if table is None and catalog is not None:
        raise OutputError(f"--catalog {catalog}: names the catalog of a --table; give --table NAMESPACE.TABLE")
    if table is not None:
        return TableOutput(table, catalog)
    if output is None:
        raise OutputError("give --output (a folder) or --table NAMESPACE.TABLE")
    return FolderOutput(output, dict(storage_options or {}))


def output_of(spec) -> Output:
    """The mask output of a JobSpec (segment): its --table wins over an --output (eval
    hands its segment job a masks folder beside the metrics; with --table, the table)."""
    if spec.table is not None:
        return mask_output(None, spec.table, spec.catalog)
    return mask_output(spec.output, None, spec.catalog, spec.storage_options)


def read_rows(masks: str | None = None, table: str | None = None, catalog: str | None = None,
              storage_options: dict | None = None, columns: Sequence[str] | None = None) -> pa.Table:
    """The rows of a segment output as Arrow, from --masks (a folder) or --table/--catalog."""
    return mask_output(masks, table, catalog, storage_options).rows(columns)
