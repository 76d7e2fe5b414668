"""The masks dataset of `persam segment`, read shard by shard (bounded memory at any size).

Files: every `*.parquet` under the masks URL, recursively, so Hive partitions such as
`concept=<name>/` are read too (their `concept` may live in the folder name instead of the
file); paths with a part starting with `_` or `.` are not data. A file is ours when its
footer has REQUIRED_COLUMNS with `mask_rle` a `{size, counts}` struct. Any other Parquet
file (`notes.parquet`, another tool's table, a part-named file of another schema, an
unreadable one) is skipped with one line naming it; a dataset with no file of ours is an
ExportError, raised before any export file is published.

Shards: part files with the same shard number (`part-<shard>-<digest>.parquet`) hold the
same images (one file, or one per concept partition); such a group is read together and
its rows sorted by (image_uri, concept, instance), so each image's rows come together.
Where a partition holds two versions of one shard (two different jobs racing on one
output), only one is read (output_files.one_version).
Files not named like part files are read one row group at a time. So an export holds one
shard's rows (at most shard size x concepts x instances small RLE rows) at a time.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from jobs.pipeline.commit import parse_part_path
from jobs.pipeline.output_files import one_version
from jobs.storage.redaction import redact
from jobs.storage.schema import (
    AREA, BBOX, CONCEPT, CONTENT_SHA256, ERROR, HEIGHT, IMAGE_URI, INSTANCE, MASK_RLE, METHOD, MODEL_FINGERPRINT, POINT,
    PRESENT, SCORE, SIMILARITY, WIDTH, partition_concept,
)

REQUIRED_COLUMNS = (IMAGE_URI, CONCEPT, WIDTH, HEIGHT, MASK_RLE, BBOX, AREA, SCORE, ERROR)
# Columns later schema versions added: absent in a file -> None in its rows.
OPTIONAL_COLUMNS = (METHOD, INSTANCE, PRESENT, SIMILARITY, POINT, MODEL_FINGERPRINT, CONTENT_SHA256)
Log = Callable[[str], None]


class ExportError(ValueError):
    """A masks dataset that cannot be exported; the message says what to do."""


@dataclass(frozen=True)
class _Piece:
    path: str
    concept: str | None  # from a `concept=<name>/` folder


def usable(row: dict) -> bool:
    """A row with a mask worth exporting: no error, present, not empty."""
    return row[ERROR] is None and row[MASK_RLE] is not None and row.get(PRESENT) is not False and row[AREA] > 0


def foreign_reason(schema: pa.Schema, partition_concept: str | None) -> str | None:
    """Why a Parquet file is not a masks file of ours; None when it is."""
    names = set(schema.names)
    missing = [c for c in REQUIRED_COLUMNS if c not in names and not (c == CONCEPT and partition_concept)]
    if missing:
        return f"lacks the columns {missing}"
    rle = schema.field(MASK_RLE).type
    if not pa.types.is_struct(rle) or not {"size", "counts"} <= {rle.field(i).name for i in range(rle.num_fields)}:
        return "its mask_rle column is not a {size, counts} struct"
    return None


class MaskDataset:
    """The rows of a masks URL (a folder or one Parquet file), one shard at a time."""

    def __init__(self, url: str, storage_options: dict | None = None, log: Log | None = print):
        self.url, self.shown, self.log = url, redact(url), log
        self.skipped: dict[str, str] = {}  # path -> reason, each reported once
        self._read_any = False
        try:
            self.fs, root = url_to_fs(url, **(storage_options or {}))
            root = root.rstrip("/") or root
            if not self.fs.exists(root):
                raise ExportError(f"{self.shown}: not found; pass the --output of `persam segment`")
            paths = sorted(self._data_files(root)) if self.fs.isdir(root) else [root]
        except ExportError:
            raise
        except (OSError, ValueError) as error:
            raise ExportError(f"{self.shown}: cannot read the masks Parquet ({type(error).__name__}); "
                              "pass the --output of `persam segment`") from None
        if not paths:
            raise ExportError(f"{self.shown}: no Parquet files found; pass the --output of `persam segment`")
        self._groups = self._group(root, paths)

    def _data_files(self, root: str) -> list[str]:
        found = []
        for path in self.fs.find(root):
            relative = path[len(root):].lstrip("/")
            if relative.endswith(".parquet") and not any(p.startswith(("_", ".")) for p in relative.split("/")):
                found.append(path)
        return one_version(self.fs, found)  # two versions of a shard found: one is read (output_files.py)

    @staticmethod
    def _group(root: str, paths: list[str]) -> list[tuple[bool, list[_Piece]]]:
        """[(is a shard of part files, pieces)]: part files by shard number, then the other files."""
        shards: dict[int, list[_Piece]] = {}
        others = []
        for path in paths:
            piece = _Piece(path, partition_concept(path[len(root):]))  # relative: the root's own name never counts
            parsed = parse_part_path(path)
            if parsed is None:
                others.append((False, [piece]))
            else:
                shards.setdefault(parsed[0], []).append(piece)
        return [(True, shards[k]) for k in sorted(shards)] + others

    def _skip(self, path: str, reason: str) -> None:
        if path not in self.skipped:
            self.skipped[path] = reason
            if self.log is not None:
                self.log(f"skipped: {os.path.basename(path)} in {self.shown}: not a masks file of persam ({reason})")

    def _piece_rows(self, piece: _Piece, columns: set[str] | None, by_row_group: bool) -> Iterator[list[dict]]:
        """The rows of one file (whole, or row group by row group); a foreign file yields nothing."""
        if piece.path in self.skipped:
            return
        try:
            handle = self.fs.open(piece.path, "rb")
        except Exception as error:  # gone since the listing, no permission: reported, not fatal
            self._skip(piece.path, f"unreadable: {type(error).__name__}")
            return
        with handle:
            try:
                parquet = pq.ParquetFile(handle)
                reason = foreign_reason(parquet.schema_arrow, piece.concept)
            except Exception as error:  # not Parquet, truncated
                reason = f"unreadable: {type(error).__name__}"
            if reason:
                self._skip(piece.path, reason)
                return
            for row_group in range(parquet.num_row_groups) if by_row_group else [None]:
                yield self._read(parquet, piece, columns, row_group)

    @staticmethod
    def _rows(table: pa.Table, piece: _Piece, columns: set[str] | None) -> list[dict]:
        rows = table.to_pylist()
        absent = [c for c in (columns or (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS)) if c not in table.column_names]
        for row in rows:
            for column in absent:
                row[column] = piece.concept if column == CONCEPT else None
        return rows

    def _read(self, parquet: pq.ParquetFile, piece: _Piece, columns: set[str] | None, row_group: int | None) -> list[dict]:
        present = None if columns is None else [c for c in parquet.schema_arrow.names if c in columns]
        try:
            table = parquet.read(columns=present) if row_group is None else parquet.read_row_group(row_group, columns=present)
        except Exception as error:
            self._skip(piece.path, f"unreadable: {type(error).__name__}")
            return []
        self._read_any = True
        return self._rows(table, piece, columns)

    def shards(self, columns: Sequence[str] | None = None) -> Iterator[list[dict]]:
        """Rows shard by shard, each shard sorted by (image_uri, concept, instance); `columns`
        (plus image_uri, concept, error) are read, absent optional ones are None."""
        wanted = None if columns is None else {*columns, IMAGE_URI, CONCEPT, ERROR}
        for is_shard, pieces in self._groups:
            if is_shard:  # the files of one shard number together: an image's rows in one list
                batches = [[row for p in pieces for rows in self._piece_rows(p, wanted, False) for row in rows]]
            else:
                batches = self._piece_rows(pieces[0], wanted, True)
            for rows in batches:
                if rows:
                    yield sorted(rows, key=lambda r: (r[IMAGE_URI], r[CONCEPT], r.get(INSTANCE) or 0))
        if not self._read_any:
            reasons = sorted(set(self.skipped.values()))
            raise ExportError(f"{self.shown}: no masks Parquet of `persam segment` found"
                              f"{' (' + '; '.join(reasons[:3]) + ')' if reasons else ''}; "
                              "pass the --output of `persam segment`")

    def images(self, columns: Sequence[str] | None = None) -> Iterator[tuple[str, list[dict]]]:
        """(image_uri, its rows) image by image, shard by shard."""
        for rows in self.shards(columns):
            for uri, group in itertools.groupby(rows, key=lambda r: r[IMAGE_URI]):
                yield uri, list(group)
