"""An export kind from the tests folder alone: one JSON file counting the rows per concept."""

from __future__ import annotations

import json

from jobs.exports.request import ExportRequest
from jobs.exports.sink import atomic_file


def export_row_counts(request: ExportRequest) -> str:
    counts: dict[str, int] = {}
    for rows in request.dataset.shards(["concept"]):
        for row in rows:
            counts[row["concept"]] = counts.get(row["concept"], 0) + 1
    with atomic_file(request.output, request.storage_options) as handle:
        handle.write(json.dumps(counts, sort_keys=True).encode())
    return f"row counts of {len(counts)} concepts -> {request.output}"
