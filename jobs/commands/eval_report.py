"""What `persam eval` writes, for PerSeg and DAVIS alike: metrics.json, metrics.md, titles."""

from __future__ import annotations

import json

from jobs.spec import JobSpec
from jobs.storage.files import join_url, write_atomically


class EvalError(ValueError):
    """A dataset or output that cannot be evaluated; the message says what to do."""


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def title(spec: JobSpec, benchmark: str, note: str | None) -> str:
    text = f"{benchmark}: {spec.method}, {spec.model.model_type}"
    return f"{text} (random weights: not meaningful)" if note else text


def write_text(url: str, text: str, storage_options: dict | None) -> None:
    write_atomically(url, text.encode("utf-8"), storage_options)


def write_metrics(output: str, metrics: dict, markdown: str, storage_options: dict | None) -> None:
    write_text(join_url(output, "metrics.json"), json.dumps(metrics, indent=1), storage_options)
    write_text(join_url(output, "metrics.md"), markdown, storage_options)
