"""The commit protocol on an Apache Iceberg table (the folder output's is commit.py's).

Both outputs share the planning (commit.plan_output): the table answers with the same
{partition: {shard: {digest: ref}}} a folder does (refs: iceberg_table.TableRef), so a rerun
skips committed shards, recomputes changed ones and carries over unchanged images' rows
exactly as on a folder. What differs is how a shard is published:

- One Iceberg transaction per (shard, concept partition): it deletes the shard's old rows
  (those of its images, commit.shard_of), appends its new rows and sets the table property
  `persam.shard.<concept>.<shard>` to the shard's digest; the catalog applies it as one
  metadata swap, so a reader sees the shard before or after, never both versions and never
  half of it. Its snapshots' summaries name the concept, shard and digest, with the job's
  provenance (JobRecord.parquet_metadata).
- Races: the catalog's optimistic concurrency decides. A transaction built on a snapshot
  that is no longer current fails (CommitFailedException; the table is created with
  pyiceberg's blind re-append switched off); the loser reloads the table and finds its
  digest committed (an identical run did the work: nothing more to do) or retries on the
  new snapshot, deleting what is now there. So two identical runs end with one copy.
- Records: the job record is a table property set when the table is created (create-only:
  of two runs creating it, one does), each concept's record a property set when absent and
  read back; a different job, or a concept of the same name with other contents, is
  refused before any work, as on a folder (job_record.agreed / check_concept_record).
  Catalogs cannot make a property create-only, so each shard commit checks the concept's
  record again on the snapshot it builds on: of two runs that recorded two contents under
  one name at the same instant, the later commit stops.

Manifests of several waves (listing.MANIFEST_WAVE_IMAGES) number shards across waves;
a table finds a shard's rows by the hash alone, so it takes one wave (the folder output
takes any number).
"""

from __future__ import annotations

import json
import random
import time
from typing import Callable, Sequence

import pyarrow as pa

from jobs.pipeline.job_record import (
    BY_CONCEPT, CONCEPT_RECORD, JOB_RECORD, META_PREFIX, JobRecord, agreed, check_concept_names, check_concept_record,
    checked_record,
)
from jobs.storage.files import is_machine_failure
from jobs.storage.iceberg_table import (
    CONCEPT_PROPERTY, JOB_PROPERTY, NO_BLIND_RETRY, TableRef, check_table_name, committed_shards, create_table,
    load_table, open_catalog, shard_key, shard_rows, shown_table, table_rows,
)
from jobs.storage.outputs import OutputError
from jobs.storage.schema import CONCEPT, IMAGE_URI

Committed = dict[int, dict[str, str]]
Log = Callable[[str], None]
# Commits racing on one table: each lost race costs one reload; this many in a row means
# the table is contended beyond reason (or broken): the run stops, the next one resumes.
MAX_TRIES = 20


def _summary(concept: str, shard: int, digest: str, metadata: dict[str, str] | None) -> dict[str, str]:
    return {**(metadata or {}), "persam.concept": concept, "persam.shard": str(shard), "persam.digest": digest}


class TableOutput:
    """A mask output in Iceberg table `name` of catalog `catalog` (None: the embedded one)."""

    many_waves = False

    def __init__(self, name: str, catalog: str | None = None):
        check_table_name(name)
        self.name, self.catalog_name, self.shown = name, catalog, shown_table(name, catalog)
        self.storage_options: dict = {}
        self._catalog = None

    @property
    def catalog(self):
        if self._catalog is None:
            self._catalog = open_catalog(self.catalog_name)
        return self._catalog

    def _load(self):
        return load_table(self.catalog, self.name)

    # -- records -----------------------------------------------------------------------------
    def _stored(self, properties: dict[str, str], concepts: Sequence[str] | None) -> dict:
        text = properties.get(JOB_PROPERTY)
        if text is None:
            raise OutputError(f"{self.shown}: holds no persam job record (table property {JOB_PROPERTY}): another "
                              "tool's table; pass another --table")
        stored = checked_record(f"{self.shown} property {JOB_PROPERTY}", text, JOB_RECORD)
        if stored.get("layout") != BY_CONCEPT:
            raise OutputError(f"{self.shown}: its job record is not of a partitioned output; pass another --table")
        names = [k[len(CONCEPT_PROPERTY):] for k in properties if k.startswith(CONCEPT_PROPERTY)]
        stored["concepts"] = {
            name: checked_record(f"{self.shown} property {CONCEPT_PROPERTY}{name}", properties[CONCEPT_PROPERTY + name],
                                 CONCEPT_RECORD)
            for name in names if concepts is None or name in concepts}
        return stored

    def read_record(self, concepts: Sequence[str] | None = None) -> dict | None:
        """The job record with {"concepts": {name: record}}; None for a table not there yet."""
        table = self._guarded(self._load)
        return None if table is None else self._stored(table.properties, concepts)

    def check(self, record: JobRecord) -> JobRecord:
        """The checks `open` makes, read only (every run before work, and --dry-run)."""
        check_concept_names(self.shown, record.concepts)
        stored = self.read_record(record.concepts)
        return record if stored is None else self._agreed(stored, record)

    def _agreed(self, stored: dict, record: JobRecord) -> JobRecord:
        """job_record's checks of a stored job against this run's, as for a folder; its advice
        names the flag of a table."""
        try:
            record = agreed(self.shown, stored, record)
            for concept, concept_record in stored["concepts"].items():
                check_concept_record(self.shown, concept, concept_record, record)
        except OutputError as error:
            raise OutputError(str(error).replace("--output", "--table")) from None
        return record

    def open(self, record: JobRecord, log: Log | None = None) -> tuple[JobRecord, dict[str, Committed]]:
        """Create the table or check it -> (the job's record, {concept: {shard: {digest: ref}}})."""
        record = self.check(record)

        def opened():
            from pyiceberg.exceptions import CommitFailedException

            for tries in range(MAX_TRIES):
                table = self._load() or create_table(self.catalog, self.name, {JOB_PROPERTY: record.to_json()})
                missing = {CONCEPT_PROPERTY + c: record.concept_json(c) for c in record.concepts
                           if CONCEPT_PROPERTY + c not in table.properties}
                if any(table.properties.get(k) != v for k, v in NO_BLIND_RETRY.items()):
                    missing.update(NO_BLIND_RETRY)
                if not missing:
                    return table
                try:
                    with table.transaction() as transaction:
                        transaction.set_properties(missing)
                except CommitFailedException:  # another run recorded first: read its records back
                    time.sleep(random.uniform(0.01, 0.05) * (tries + 1))
            raise OutputError(f"{self.shown}: its records could not be written ({MAX_TRIES} commit races lost); "
                              "rerun the job")

        table = self._guarded(opened)
        stored = self._stored(table.properties, record.concepts)  # read back: another run may have written first
        record = self._agreed(stored, record)
        return record, committed_shards(table.properties, self.catalog_name, self.name, record.concepts)

    def read_only(self, concepts: Sequence[str]) -> tuple[dict | None, dict[str, Committed]]:
        """(record or None, committed shards of `concepts`), nothing created (--dry-run)."""
        table = self._guarded(self._load)
        if table is None:
            return None, {}
        stored = self._stored(table.properties, concepts)
        return stored, committed_shards(table.properties, self.catalog_name, self.name, concepts)

    # -- commits -----------------------------------------------------------------------------
    def ref(self, shard: int, digest: str, partition: str) -> str:
        return str(TableRef(self.catalog_name, self.name, partition, shard, digest))

    def commit_shard(self, shard: int, digest: str, rows: pa.Table, partition: str,
                     metadata: dict[str, str] | None = None, previous: list[str] | None = None,
                     log: Log | None = None) -> str:
        """Replace the shard's rows in `partition` by `rows` and record its digest, in one
        transaction (module docstring) -> its ref. Already committed by an identical run: done."""
        if not partition:
            raise OutputError(f"{self.shown}: a table holds partitioned rows only")
        from pyiceberg.expressions import And, EqualTo, In

        key, summary = shard_key(partition, shard), _summary(partition, shard, digest, metadata)
        ours = json.loads((metadata or {}).get(f"{META_PREFIX}concept_digests", "{}")).get(partition)

        def attempt(table) -> None:
            self._same_concept(table.properties, partition, ours)  # on the snapshot this commit builds on
            # a shard never committed has no rows (its rows and its digest are committed together),
            # so only a recomputed one reads its partition's URLs to find its old rows
            old = set() if key not in table.properties else set(
                shard_rows(table, partition, shard, [IMAGE_URI]).column(IMAGE_URI).to_pylist())
            transaction = table.transaction()
            if old:
                transaction.delete(And(EqualTo(CONCEPT, partition), In(IMAGE_URI, sorted(old))),
                                   snapshot_properties=summary)
            if rows.num_rows:
                transaction.append(rows, snapshot_properties=summary)
            transaction.set_properties({key: digest})
            transaction.commit_transaction()

        self._until_committed(lambda table: table.properties.get(key) == digest, attempt, f"shard {shard}")
        return self.ref(shard, digest, partition)

    def _same_concept(self, properties: dict[str, str], concept: str, digest: str | None) -> None:
        """The partition's record still names this run's concept: a run of another concept of
        the same name that recorded it meanwhile wins, this one stops before mixing rows."""
        text = properties.get(CONCEPT_PROPERTY + concept)
        if digest is None or text is None:
            return
        stored = checked_record(f"{self.shown} property {CONCEPT_PROPERTY}{concept}", text, CONCEPT_RECORD)
        if stored.get("digest") != digest:
            raise OutputError(f"{self.shown}: concept {concept!r} there has other contents (digest "
                              f"{stored.get('digest')}, given {digest}), recorded by another run meanwhile; give "
                              "the re-fitted concept another name or use another --table")

    def remove(self, refs: list[str], log: Log | None = None) -> list[str]:
        """Delete the rows of superseded shards (no longer in the input); a shard already
        removed or recommitted by another run counts as removed -> [] (a table has no foreign files)."""
        from pyiceberg.expressions import And, EqualTo, In

        for ref in map(TableRef.parse, refs):
            if ref is None:
                continue
            key = shard_key(ref.concept, ref.shard)

            def attempt(table, ref=ref, key=key) -> None:
                old = shard_rows(table, ref.concept, ref.shard, [IMAGE_URI]).column(IMAGE_URI).to_pylist()
                transaction = table.transaction()
                if old:
                    transaction.delete(And(EqualTo(CONCEPT, ref.concept), In(IMAGE_URI, sorted(set(old)))),
                                       snapshot_properties=_summary(ref.concept, ref.shard, ref.digest, {"persam.removed": "true"}))
                transaction.remove_properties(key)
                transaction.commit_transaction()

            self._until_committed(lambda table, key=key, ref=ref: table.properties.get(key) != ref.digest, attempt,
                                  f"shard {ref.shard}")
        return []

    def _until_committed(self, done: Callable, attempt: Callable, what: str) -> None:
        """Run `attempt(table)` on the current snapshot until `done(table)` holds (module docstring)."""
        from pyiceberg.exceptions import CommitFailedException

        for tries in range(MAX_TRIES):
            table = self._guarded(self._load)
            if table is None:
                raise OutputError(f"{self.shown}: the table was dropped during the run; rerun the job")
            if done(table):
                return
            try:
                self._guarded(lambda: attempt(table))
                return
            except CommitFailedException:  # another commit landed first: look again
                time.sleep(random.uniform(0.01, 0.05) * (tries + 1))
        raise OutputError(f"{self.shown}: {what} lost {MAX_TRIES} commit races in a row; rerun the job "
                          "(committed shards are kept)")

    def _guarded(self, action: Callable):
        """`action()`, a catalog's or store's failure turned into one line (no URI: it may hold credentials)."""
        from pyiceberg.exceptions import CommitFailedException

        try:
            return action()
        except (OutputError, CommitFailedException):
            raise
        except (OSError, ValueError) as error:
            if is_machine_failure(error):
                raise
            raise OutputError(f"{self.shown}: cannot read or write the table ({type(error).__name__}); check "
                              "--catalog's configuration and the warehouse's permissions") from None
        except Exception as error:  # sqlalchemy's, a REST catalog's: their texts may quote the catalog URI
            raise OutputError(f"{self.shown}: the catalog failed ({type(error).__name__}); check --catalog's "
                              "configuration") from None

    # -- readers -----------------------------------------------------------------------------
    def rows(self, columns: Sequence[str] | None = None) -> pa.Table:
        """Every row of the table's current snapshot, MASK_SCHEMA's types."""
        table = self._guarded(self._load)
        if table is None:
            raise OutputError(f"{self.shown}: no such table; pass the --table of `persam segment`")
        self._stored(table.properties, None)  # another tool's table is refused, not read as ours
        return self._guarded(lambda: table_rows(table, None, columns))
