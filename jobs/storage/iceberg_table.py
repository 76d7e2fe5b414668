"""An Apache Iceberg table as a mask output: the catalog, the table, its rows (pyiceberg).

Catalogs: `--catalog NAME` names a catalog of pyiceberg's own configuration
(`.pyiceberg.yaml`, or `PYICEBERG_CATALOG__<NAME>__URI` / `__TYPE` / `__WAREHOUSE` ...),
read when the catalog is opened (not when pyiceberg was imported), so pyiceberg owns every
setting. Without one: the embedded default, a SQL catalog on SQLite with a local warehouse
under `PERSAM_CACHE/iceberg/` (`catalog.db`, `warehouse/`).

The table: MASK_SCHEMA's columns (schema.py owns them; pyiceberg derives the Iceberg schema
from it), partitioned by identity on `concept`. Table properties (`persam.*`) hold the job's
records and, per committed shard, its digest: `persam.shard.<concept>.<shard>` = digest.
Each commit's snapshot summary names its concept, shard and digest (and the job's
provenance). Pipeline/table_output.py runs the commit protocol on these pieces.

A shard's rows in a partition are the rows of its images: those whose URL the job's stable
hash (commit.shard_of) puts in that shard. No column is added for it, so the table's
schema stays MASK_SCHEMA.

Refs: where the folder output names a shard's part file, the table names it by a ref that
reads like one, `iceberg://<catalog>/<namespace.table>/concept=<name>/part-<shard>-<digest>.parquet`
(catalog empty: the embedded one). A ref holds no URI and no credential: only names.
`read_ref` reads a shard's current rows, so the pipeline's readers of previous rows
(carry-over, unchanged images) read a table as they read a folder.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pyarrow as pa

from jobs.storage.outputs import OutputError
from jobs.storage.redaction import scrub, secrets_in
from jobs.storage.schema import CONCEPT, IMAGE_URI, MASK_SCHEMA, partition_folder
from jobs.storage.sharding import shard_of

REF_SCHEME = "iceberg://"  # (schema.REF_READERS hands refs of this scheme to read_ref)
# Identifiers every engine (Spark, Trino, DuckDB, Athena) takes unquoted: NAMESPACE[.SUB].TABLE
TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")
JOB_PROPERTY = "persam.job"  # the job record (job_record.JobRecord.to_json)
CONCEPT_PROPERTY = "persam.concept."  # + name: the concept's record
SHARD_PROPERTY = "persam.shard."  # + <concept>.<shard>: the digest committed
# pyiceberg re-applies a failed append on its own; our commit re-checks the shard's digest
# first (an identical run may have committed it), so the table's writers do not retry blindly.
NO_BLIND_RETRY = {"commit.retry.num-retries": "0"}
EMBEDDED = "embedded"  # how messages name the default catalog
_SECRET_KEYS = ("secret", "password", "token", "credential", "key")


def embedded_location() -> Path:
    """The embedded default catalog's folder: PERSAM_CACHE/iceberg."""
    from jobs.storage.checkpoints import cache_dir  # (here: the module loads the model registry, torch)

    return cache_dir() / "iceberg"


def shown_table(name: str, catalog: str | None) -> str:
    """How messages name a table: by names only (a catalog's URI may hold credentials)."""
    return f"table {name} (catalog {catalog or EMBEDDED})"


def check_table_name(name: str) -> tuple[str, str]:
    """--table NAMESPACE.TABLE -> (namespace, table); one line otherwise."""
    if not isinstance(name, str) or not TABLE_NAME.fullmatch(name):
        raise OutputError(f"--table {name!r}: give NAMESPACE.TABLE (letters, digits and '_', "
                          "e.g. masks.cats); the namespace is created when missing")
    namespace, _, table = name.rpartition(".")
    return namespace, table


def _catalog_properties(name: str) -> dict:
    from pyiceberg.utils.config import Config

    return Config().get_catalog_config(name) or {}  # read now: the environment may have changed since import


def catalog_secrets(properties: dict) -> set[str]:
    """What a message about a catalog must not show: URL userinfo and queries of its
    settings, and every value of a key that names a secret."""
    hidden = {v for k, v in properties.items() if any(s in str(k).lower() for s in _SECRET_KEYS)}
    return secrets_in(properties.values()) | secrets_in(hidden, every_string=True)


def _twice(opening):
    """A SQL catalog creates its own tables when it first opens: two runs opening a new one at
    once race to create them, and the loser's error says only that they exist now."""
    try:
        return opening()
    except Exception:
        return opening()


def open_catalog(name: str | None):
    """The catalog `name` of pyiceberg's configuration, or the embedded default (None)."""
    from pyiceberg.catalog import load_catalog
    from pyiceberg.catalog.sql import SqlCatalog

    if name is None:
        folder = embedded_location()
        (folder / "warehouse").mkdir(parents=True, exist_ok=True)
        return _twice(lambda: SqlCatalog("persam", uri=f"sqlite:///{folder / 'catalog.db'}",
                                         warehouse=(folder / "warehouse").as_uri()))
    properties = _catalog_properties(name)
    try:
        return _twice(lambda: load_catalog(name, **properties))
    except Exception as error:  # a missing URI, an unknown type, an unreachable service
        reason = scrub(str(error).splitlines()[0] if str(error) else "", catalog_secrets(properties))
        raise OutputError(f"--catalog {name}: cannot open the catalog ({type(error).__name__}: {reason}); configure "
                          f"it in .pyiceberg.yaml or PYICEBERG_CATALOG__{name.upper()}__URI / __TYPE / __WAREHOUSE") \
            from None


def load_table(catalog, name: str):
    """The table, or None when it does not exist."""
    from pyiceberg.exceptions import NoSuchNamespaceError, NoSuchTableError

    try:
        return catalog.load_table(name)
    except (NoSuchTableError, NoSuchNamespaceError):
        return None


def create_table(catalog, name: str, properties: dict[str, str]):
    """Create the table (and its namespace) with `properties` set at creation, create-only:
    of two runs creating it at once one does, the other loads it -> the table."""
    namespace, _ = check_table_name(name)
    try:
        catalog.create_namespace_if_not_exists(namespace)
    except Exception:  # another run created it between the look and the insert (SQL: an IntegrityError)
        if not catalog.namespace_exists(namespace):
            raise
    try:
        transaction = catalog.create_table_transaction(name, schema=MASK_SCHEMA,
                                                       properties={**NO_BLIND_RETRY, **properties})
        with transaction.update_spec() as spec:
            spec.add_identity(CONCEPT)  # one partition per concept, as the folder output's concept=<name>/
        transaction.commit_transaction()
    except Exception:  # TableAlreadyExistsError, or the catalog's own kind of it under a race
        if load_table(catalog, name) is None:
            raise
    return catalog.load_table(name)


def shard_key(concept: str, shard: int) -> str:
    return f"{SHARD_PROPERTY}{concept}.{shard:05d}"


@dataclass(frozen=True)
class TableRef:
    """One shard's rows in one concept partition, named like a part file."""

    catalog: str | None
    table: str
    concept: str
    shard: int
    digest: str

    def __str__(self) -> str:
        return (f"{REF_SCHEME}{self.catalog or ''}/{self.table}/{partition_folder(self.concept)}/"
                f"part-{self.shard:05d}-{self.digest}.parquet")

    @classmethod
    def parse(cls, ref: str) -> "TableRef | None":
        if not ref.startswith(REF_SCHEME):
            return None
        match = re.fullmatch(r"([^/]*)/([^/]+)/concept=([^/]+)/part-(\d+)-([0-9a-f]{12})\.parquet",
                             ref[len(REF_SCHEME):])
        if match is None:
            return None
        catalog, table, concept, shard, digest = match.groups()
        return cls(catalog or None, table, concept, int(shard), digest)


def committed_shards(properties: dict[str, str], catalog: str | None, name: str,
                     concepts: Sequence[str]) -> dict[str, dict[int, dict[str, str]]]:
    """The shards committed in `concepts`' partitions -> {concept: {shard: {digest: ref}}}."""
    found: dict[str, dict[int, dict[str, str]]] = {c: {} for c in concepts}
    for key, digest in properties.items():
        if not key.startswith(SHARD_PROPERTY):
            continue
        concept, _, shard = key[len(SHARD_PROPERTY):].rpartition(".")
        if concept in found and shard.isdigit():
            found[concept][int(shard)] = {digest: str(TableRef(catalog, name, concept, int(shard), digest))}
    return found


def num_shards_of(properties: dict[str, str]) -> int:
    return int(json.loads(properties[JOB_PROPERTY])["num_shards"])


def table_rows(table, row_filter=None, columns: Sequence[str] | None = None) -> pa.Table:
    """Rows of the table's current snapshot, MASK_SCHEMA's types (`columns` of them only)."""
    from pyiceberg.expressions import AlwaysTrue

    names = list(MASK_SCHEMA.names if columns is None else [c for c in MASK_SCHEMA.names if c in columns])
    rows = table.scan(row_filter=row_filter or AlwaysTrue(), selected_fields=tuple(names)).to_arrow()
    return rows.select(names).cast(pa.schema([MASK_SCHEMA.field(n) for n in names]))


def shard_rows(table, concept: str, shard: int, columns: Sequence[str] | None = None) -> pa.Table:
    """The rows of `shard` in `concept`'s partition: its images' (commit.shard_of)."""
    from pyiceberg.expressions import EqualTo

    count = num_shards_of(table.properties)
    wanted = None if columns is None else list(dict.fromkeys([IMAGE_URI, *columns]))
    rows = table_rows(table, EqualTo(CONCEPT, concept), wanted)
    keep = pa.array([shard_of(u, count) == shard for u in rows.column(IMAGE_URI).to_pylist()], pa.bool_())
    rows = rows.filter(keep)
    return rows if columns is None else rows.select([c for c in rows.column_names if c in columns])


def read_ref(ref: str, columns: Sequence[str] | None = None) -> pa.Table | None:
    """A ref's shard rows as they are now (schema.read_parts' reader of table refs); None when
    the table or the shard is gone."""
    parsed = TableRef.parse(ref)
    if parsed is None:
        return None
    try:
        table = load_table(open_catalog(parsed.catalog), parsed.table)
        if table is None or shard_key(parsed.concept, parsed.shard) not in table.properties:
            return None
        return shard_rows(table, parsed.concept, parsed.shard, columns)
    except OutputError:
        return None


def replace_whole(catalog_name: str | None, name: str, rows: pa.Table, properties: dict[str, str]) -> str:
    """A table holding exactly `rows` (`persam rank`'s ranking: replaced whole at each run),
    created with `rows`' schema when missing; one overwrite snapshot -> how messages name it."""
    shown = shown_table(name, catalog_name)
    namespace, _ = check_table_name(name)
    catalog = open_catalog(catalog_name)
    try:
        catalog.create_namespace_if_not_exists(namespace)
        table = catalog.create_table_if_not_exists(name, schema=rows.schema, properties=properties)
        if JOB_PROPERTY in table.properties:
            raise OutputError(f"{shown}: holds the masks of `persam segment`; give the ranking another --table")
        if table.current_snapshot() is None:  # (an overwrite of nothing warns that it deleted nothing)
            table.append(rows, snapshot_properties=properties)
        else:
            table.overwrite(rows, snapshot_properties=properties)
    except OutputError:
        raise
    except Exception as error:  # the catalog's texts may quote its URI: the type only
        raise OutputError(f"{shown}: cannot write the ranking ({type(error).__name__}); check --catalog's "
                          "configuration, or use a new --table") from None
    return shown
