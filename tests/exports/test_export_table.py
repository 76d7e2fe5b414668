"""Export kinds are one table of exporters with one signature: a kind added to the table from
the tests folder alone is offered by the CLI, checked like the others and run."""

from __future__ import annotations

import importlib
import inspect
import json

from export_data import ok, run_cli, small_lake
from jobs.exports import EXPORTS, ExportKind


def test_every_exporter_takes_one_request():
    for kind in EXPORTS.values():
        module, function = kind.exporter.split(":")
        assert list(inspect.signature(getattr(importlib.import_module(module), function)).parameters) == ["request"]


def test_a_kind_added_to_the_table_runs_through_the_cli(tmp_path, monkeypatch):
    kind = ExportKind("row-counts", "rows per concept", "toy_export:export_row_counts", "counts.json")
    monkeypatch.setitem(EXPORTS, kind.name, kind)
    lake = small_lake(tmp_path)
    out = tmp_path / "counts.json"
    assert "row counts of" in ok(run_cli(["export", "row-counts", "--masks", str(lake.masks), "--output", str(out)]))
    assert sum(json.loads(out.read_text()).values()) > 0
    taken = tmp_path / "a-folder"
    taken.mkdir()  # a one-file kind refuses an existing folder, as coco does
    assert run_cli(["export", "row-counts", "--masks", str(lake.masks), "--output", str(taken)]).rc == 3
