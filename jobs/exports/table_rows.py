"""The masks of a `persam segment --table` output, served as rows.py's MaskDataset serves a
folder's: rows image by image, each image's rows together, sorted by (image_uri, concept,
instance), in groups of at most GROUP_IMAGES images.

The table's current snapshot is read once as Arrow (pipeline/output.py's reader, the one
every reader of an output uses), so the snapshot is consistent for the whole export, and
memory grows with the table: for tables beyond one machine's memory, read them with a lake
engine (docs/iceberg.md).
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterator, Sequence

from jobs.exports.rows import ExportError
from jobs.pipeline.output import mask_output
from jobs.storage.schema import CONCEPT, ERROR, IMAGE_URI, INSTANCE

GROUP_IMAGES = 1000  # images per list `shards` yields (a folder's shard size, by default)
Log = Callable[[str], None]


class TableMaskDataset:
    """The rows of --table NAMESPACE.TABLE [--catalog NAME] (MaskDataset's interface)."""

    def __init__(self, table: str, catalog: str | None = None, log: Log | None = print):
        self.output = mask_output(None, table, catalog)
        self.shown, self.log, self.skipped = self.output.shown, log, {}
        if self.output.read_record() is None:  # another tool's table is refused by read_record itself
            raise ExportError(f"{self.shown}: no such table; pass the --table (and --catalog) of `persam segment`")

    def shards(self, columns: Sequence[str] | None = None) -> Iterator[list[dict]]:
        wanted = None if columns is None else {*columns, IMAGE_URI, CONCEPT, ERROR}
        rows = self.output.rows(wanted).sort_by([(IMAGE_URI, "ascending"), (CONCEPT, "ascending")]).to_pylist()
        rows.sort(key=lambda r: (r[IMAGE_URI], r[CONCEPT], r.get(INSTANCE) or 0))
        images = [list(group) for _, group in itertools.groupby(rows, key=lambda r: r[IMAGE_URI])]
        for start in range(0, len(images), GROUP_IMAGES):
            yield [row for image in images[start:start + GROUP_IMAGES] for row in image]

    def images(self, columns: Sequence[str] | None = None) -> Iterator[tuple[str, list[dict]]]:
        for rows in self.shards(columns):
            for uri, group in itertools.groupby(rows, key=lambda r: r[IMAGE_URI]):
                yield uri, list(group)
