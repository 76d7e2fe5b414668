"""The job record of an output: what makes two runs the same job, and where the output came from.

The layout (`<output>/_persam_job.json` names it, BY_CONCEPT): one Hive partition per concept,
`<output>/concept=<name>/part-<shard>-<digest>.parquet`. The root record holds what all
concepts share and a rerun must agree on (shard count, model fingerprint, settings) plus
provenance (persam version, model type, checkpoint, input URL, created time); it is written
once, by the run that creates the output. Each partition holds its own record,
`concept=<name>/_persam_concept.json` (the concept's digest plus the same provenance),
written once, before the partition's first part file. A concept is added to an output by
writing its partition; nothing shared is rewritten, so two runs adding different concepts
at once cannot lose each other's record.

URLs are stored redacted (storage/redaction.py): credentials never reach a record.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata

from jobs.storage.outputs import OutputError
from jobs.storage.redaction import redact

JOB_FILE = "_persam_job.json"
CONCEPT_FILE = "_persam_concept.json"  # in each partition (underscore: Parquet readers skip it)
BY_CONCEPT = "by_concept"  # the `layout` every record and part file names (CHANGELOG.md)
JOB_RECORD, CONCEPT_RECORD = "job record", "concept record"  # the kinds of record checked_record validates
# A partition folder's name must survive every file system, object store and Hive reader
# unescaped; a leading letter keeps Hive readers from typing the partition as a number.
CONCEPT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,99}")  # always fullmatch: `$` passes "cat\n"
# Parquet key-value metadata keys of every part file.
META_PREFIX = "persam."
# A record's shard count: a positive int, bounded so that no record can make a run plan an
# absurd number of shards (part names keep five digits up to 99999 and grow beyond).
MAX_SHARDS = 10_000_000


def persam_version() -> str:
    try:
        return metadata.version("persam")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class JobRecord:
    """What makes two runs the same job: a rerun must agree on all of it but `provenance`.

    `settings`: the run settings that change rows (precision, instances, ...). `concept_digests`:
    {name: digest of the concept's content} (a concept re-fitted under the same name is another
    concept). `provenance`: persam version, model type, checkpoint, input URL (redacted), created."""

    num_shards: int
    concepts: tuple[str, ...]
    model_fingerprint: str
    settings: dict = field(default_factory=dict)
    concept_digests: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"layout": BY_CONCEPT, "num_shards": self.num_shards,
                           "model_fingerprint": self.model_fingerprint, "settings": self.settings,
                           **self.provenance}, indent=1)

    def concept_json(self, concept: str) -> str:
        """The record of `concept`'s partition."""
        return json.dumps({"name": concept, "digest": self.concept_digests.get(concept),
                           "model_fingerprint": self.model_fingerprint, "settings": self.settings,
                           **self.provenance}, indent=1)

    def parquet_metadata(self, concepts: list[str]) -> dict[str, str]:
        """Key-value metadata of a part file holding `concepts`' rows."""
        fields = {"version": self.provenance.get("persam_version") or persam_version(),
                  "model_type": self.provenance.get("model_type"), "model_fingerprint": self.model_fingerprint,
                  "concept_digests": json.dumps({c: self.concept_digests.get(c) for c in concepts}),
                  "settings": json.dumps(self.settings), "layout": BY_CONCEPT, "created": utc_now()}
        return {f"{META_PREFIX}{key}": str(value) for key, value in fields.items() if value is not None}


def _record_problem(stored: object, required: dict[str, tuple[type, ...]]) -> str | None:
    """What is wrong with a record read back (None: nothing): a JSON object with `required` keys
    of those types, `num_shards` (where required) a positive int within MAX_SHARDS."""
    if not isinstance(stored, dict):
        return "it is not a JSON object"
    for key, types in required.items():
        value = stored.get(key)
        if key not in stored or not isinstance(value, types) or isinstance(value, bool):
            names = " or ".join(t.__name__ for t in types)
            return f"{key!r} is {'missing' if key not in stored else f'not a {names}'}"
    shards = stored.get("num_shards")
    if "num_shards" in required and not 1 <= shards <= MAX_SHARDS:
        return f"'num_shards' {shards} is not between 1 and {MAX_SHARDS}"
    return None


def shown_path(output: str, name: str) -> str:
    """A record's path as errors show it (credentials redacted)."""
    return f"{redact(output).rstrip('/')}/{name}"


def checked_record(shown: str, text: bytes | str, kind: str = JOB_RECORD) -> dict:
    """A record read back (`kind`: JOB_RECORD (_persam_job.json), CONCEPT_RECORD (_persam_concept.json)),
    validated like a concept file -> its fields. OutputError (bad input) naming `shown` otherwise."""
    try:
        stored = json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError):
        stored, problem = None, "it is not valid JSON"
    else:
        problem = None
    if problem is None and kind == CONCEPT_RECORD:
        problem = _record_problem(stored, {"name": (str,), "model_fingerprint": (str,)})
        if problem is None and not isinstance(stored.get("digest"), (str, type(None))):
            problem = "'digest' is not a str"
    elif problem is None:
        problem = _record_problem(stored, {"layout": (str,), "num_shards": (int,), "model_fingerprint": (str,)})
        if problem is None and stored["layout"] != BY_CONCEPT:
            problem = f"'layout' {stored['layout']!r} is not {BY_CONCEPT!r}"
    if problem is None and not isinstance(stored.get("settings", {}), dict):
        problem = "'settings' is not an object"
    if problem is not None:
        raise OutputError(f"{shown}: not a valid persam {kind} ({problem}); it was changed or not written by "
                          "persam: delete it (the next run writes it anew) or use a new --output")
    return stored


def check_concept_names(output: str, names: tuple[str, ...]) -> None:
    """Concept names become partition folders (`concept=<name>`): refuse any that cannot be one."""
    bad = [n for n in names if not (isinstance(n, str) and CONCEPT_NAME.fullmatch(n))]
    if bad:
        raise OutputError(f"{output}: concept name {bad[0]!r} cannot name a partition folder (concept=<name>): "
                          "use letters, digits, '_', '-' and '.', starting with a letter (persam fit --name)")


def agreed(output: str, stored: dict, record: JobRecord) -> JobRecord:
    """The stored root record read back and checked against this run's -> the job's record
    (its shard count; this run's concepts). Raises OutputError for another job."""
    if stored["model_fingerprint"] != record.model_fingerprint or stored.get("settings", {}) != record.settings:
        raise OutputError(
            f"{output}: holds a job of model {stored['model_fingerprint']} with settings {stored.get('settings')}; "
            "concepts can be added only with the same model and settings: use another --output for a different job")
    return JobRecord(int(stored["num_shards"]), record.concepts, record.model_fingerprint, record.settings,
                     record.concept_digests, record.provenance)


def check_concept_record(output: str, concept: str, stored: dict, record: JobRecord) -> None:
    """A partition's stored record against this run's concept of that name."""
    digest = record.concept_digests.get(concept)
    if digest is not None and stored.get("digest") != digest:
        raise OutputError(f"{output}: concept {concept!r} there has other contents (digest {stored.get('digest')}, "
                          f"given {digest}); give the re-fitted concept another name or use another --output")
