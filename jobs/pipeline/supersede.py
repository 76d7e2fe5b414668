"""Replacing a published shard without ever showing a reader two versions of it.

A shard whose images changed is recomputed and its new file supersedes the old ones. Were
the new file published first and the old ones removed after, a kill in between would leave
both for every reader (rows twice). So, in one partition folder:

1. stage: the new file is written whole to `<folder>/_pending/<part name>.<token>`. Readers
   never list it: dataset readers (pyarrow, pandas, Spark) skip `_`-prefixed folders, and
   its name does not end in `.parquet`, so `**/*.parquet` globs (DuckDB) do not match it
   either. Its footer names the files it supersedes (`persam.supersedes`).
2. remove: the superseded files are deleted (files of another schema are foreign: kept).
3. promote: only once none of ours is left, the staged file is moved to its public name
   (a rename locally; on object stores one copy, which creates the whole object at once,
   then the staged copy is deleted).

Between 2 and 3 a reader sees no version of the shard (its rows are missing for that
instant, never doubled). A kill anywhere leaves the staged file, and the next run's
`recover` (before it plans) finishes or rolls back each one:
- its version is already public (killed after the copy of 3): the staged copy is deleted;
- every public file of its shard is one it supersedes (killed before or within 2, or
  before 3): those are removed and it is promoted: the rows in flight are not lost;
- another version was published after it: it is stale and deleted.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import dataclass, field
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.pipeline.output_files import SUPERSEDES_KEY, parse_part_path
from jobs.storage.files import move_file, publish_bytes
from jobs.storage.schema import is_our_schema, partition_concept

PENDING_FOLDER = "_pending"
# <part name>.<token>: the token keeps two runs staging the same shard from overwriting each other
PENDING_FILE = re.compile(r"^(part-\d+-[0-9a-f]{12}\.parquet)\.([0-9a-f]{16})$")
Log = Callable[[str], None]


def staged_path(folder: str, name: str) -> str:
    return f"{folder}/{PENDING_FOLDER}/{name}.{uuid.uuid4().hex[:16]}"


def supersedes_metadata(previous: list[str]) -> dict[str, str]:
    """Footer metadata of a file replacing `previous` (paths)."""
    return {SUPERSEDES_KEY.decode(): json.dumps(sorted(os.path.basename(p) for p in previous))}


def remove_quietly(fs, path: str) -> None:
    """Remove `path`; one already gone (another run removed it first) counts as removed."""
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def part_schema(fs, path: str) -> pa.Schema | None:
    """The Parquet schema of `path` (footer only); None when it is not Parquet; FileNotFoundError if gone."""
    try:
        with fs.open(path, "rb") as handle:
            return pq.ParquetFile(handle).schema_arrow
    except FileNotFoundError:
        raise
    except Exception:
        return None


def remove_ours(fs, paths: list[str]) -> list[str]:
    """Delete those of `paths` that are our part files -> the others (foreign: kept)."""
    foreign = []
    for path in paths:
        try:
            schema = part_schema(fs, path)
        except FileNotFoundError:
            continue
        partitioned = partition_concept(path) is not None
        if parse_part_path(path) is None or schema is None or not is_our_schema(schema, partitioned):
            foreign.append(path)
            continue
        remove_quietly(fs, path)
    return foreign


def left_behind(fs, previous: list[str], foreign: list[str]) -> list[str]:
    """Those of our `previous` files still published (step 3 waits for none)."""
    return [p for p in previous if p not in foreign and fs.exists(p)]


def stage(fs, folder: str, name: str, data: bytes) -> str:
    """Step 1 -> the staged file's path."""
    path = staged_path(folder, name)
    publish_bytes(fs, path, data)
    return path


def promote(fs, staged: str, target: str) -> None:
    """Step 3. A staged file already moved by another run's recovery counts as promoted."""
    try:
        move_file(fs, staged, target)
    except FileNotFoundError:
        if not fs.exists(target):
            raise


def _superseded_names(fs, path: str) -> set[str] | None:
    try:
        with fs.open(path, "rb") as handle:
            metadata = pq.ParquetFile(handle).schema_arrow.metadata or {}
        return set(json.loads(metadata.get(SUPERSEDES_KEY, b"[]")))
    except Exception:
        return None


@dataclass
class Recovery:
    """What `recover` does in one folder, decided read only (a dry run plans with it)."""

    finish: list[tuple[str, str, list[str]]] = field(default_factory=list)  # (staged, public name, files it replaces)
    discard: list[str] = field(default_factory=list)  # staged files already public, or stale
    foreign: list[str] = field(default_factory=list)  # files in `_pending/` that are not ours: left alone

    def apply_to(self, shards: dict[int, dict[str, str]]) -> dict[int, dict[str, str]]:
        """A folder's listing {shard: {digest: path}} as it will be once recovered."""
        shards = {s: dict(files) for s, files in shards.items()}
        for _, target, replaced in self.finish:
            shard, digest = parse_part_path(target)
            files = shards.setdefault(shard, {})
            for path in replaced:
                files.pop(parse_part_path(path)[1], None)
            files[digest] = target
        return shards


def plan_recovery(fs, folder: str) -> Recovery:
    """Decide, for every staged file of `folder`, whether the next run finishes or discards it
    (module docstring). Hidden temp files of a write in flight are not looked at."""
    plan = Recovery()
    try:
        staged = sorted(fs.ls(f"{folder}/{PENDING_FOLDER}", detail=False))
    except FileNotFoundError:
        return plan
    if not staged:
        return plan
    public: dict[int, dict[str, str]] = {}
    for path in fs.ls(folder, detail=False):
        parsed = parse_part_path(path)
        if parsed is not None:
            public.setdefault(parsed[0], {})[parsed[1]] = path
    for path in staged:
        name = os.path.basename(path.rstrip("/"))
        if name.startswith("."):
            continue
        match = PENDING_FILE.match(name)
        if match is None or (supersedes := _superseded_names(fs, path)) is None:
            plan.foreign.append(path)
            continue
        shard, digest = parse_part_path(match.group(1))
        here = public.get(shard, {})
        if digest in here or not all(os.path.basename(p) in supersedes for p in here.values()):
            plan.discard.append(path)  # already public, or a later version is: nothing to finish
            continue
        target = f"{folder}/{match.group(1)}"
        plan.finish.append((path, target, list(here.values())))
        public[shard] = {digest: target}
    return plan


def recover(fs, folder: str) -> list[str]:
    """Finish or roll back every staged file of `folder` (plan_recovery) -> the files in
    `_pending/` that are not ours (left alone)."""
    plan = plan_recovery(fs, folder)
    for path in plan.discard:
        remove_quietly(fs, path)
    for staged, target, replaced in plan.finish:
        kept = remove_ours(fs, replaced)
        if left_behind(fs, replaced, kept):
            continue  # re-published under us by a live run: its own commit finishes it
        promote(fs, staged, target)
    return plan.foreign
