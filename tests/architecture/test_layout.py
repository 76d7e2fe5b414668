"""The shape of `jobs/`: imports only run down the layers, no circle, one owner per contract.

Layers, lowest first: storage (URLs, bytes, images, checkpoints, the output schema) <- the
job spec <- pipeline (session, stages, actors, commit, cache) <- commands (and exports)
<- cli. persam_core sits below all of them and imports none of them (test_purity.py).
"""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import pytest

from import_graph import circles

from jobs.storage.schema import MASK_SCHEMA, RANKING_SCHEMA

JOBS = Path(__file__).resolve().parents[2] / "jobs"
LAYERS = {"storage": 0, "logs": 0, "spec": 1, "pipeline": 2, "commands": 3, "exports": 3,
          "cli": 4, "cli_parser": 4, "demo": 5}
MAX_LINES = 400


def _module(path: Path) -> str:
    parts = path.relative_to(JOBS.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    return LAYERS[module.split(".")[1]]


def _imports(path: Path) -> set[str]:
    """Every jobs module `path` imports, at any depth (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("jobs"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("jobs"))
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; write `from jobs.<package>.<module> import ...`")
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in JOBS.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules and m != name and m != "jobs"}
            for name, path in modules.items()}


def test_every_module_belongs_to_a_layer():
    assert all(len(m.split(".")) > 1 and m.split(".")[1] in LAYERS for m in _graph() if m != "jobs")


def test_imports_never_run_up_the_layers():
    upward = [f"{m} -> {d}" for m, deps in _graph().items() if m != "jobs" for d in deps
              if _layer(d) > _layer(m) and not d.endswith("__init__")]
    assert upward == []


def test_no_import_circle():
    assert circles(_graph()) == []


COLUMNS = set(MASK_SCHEMA.names) | set(RANKING_SCHEMA.names)
# Words that are columns *and* something else, where the other meaning is meant.
NOT_A_COLUMN = {
    ("cli.py", "rank"): "the `persam rank` command",
    ("cli_parser.py", "rank"): "the `persam rank` command",
    ("commands/dry_run.py", "model_fingerprint"): "a key of the job record (read only, for the dry run)",
    ("commands/segment.py", "model_fingerprint"): "a key of the job record (read only, before the weights load)",
    ("cli.py", "error"): "the word of the final error line and its log level",
    ("logs.py", "error"): "a log level",
    ("pipeline/commit.py", "model_fingerprint"): "a key of the job record, a file commit.py owns",
    ("pipeline/job_record.py", "model_fingerprint"): "a key of the job record, a file job_record.py owns",
    ("pipeline/compute.py", "score"): "the task named in 'score failed: ...' error texts",
    ("pipeline/payload.py", "error"): "a key of the chunk header, a format payload.py owns",
    ("pipeline/payload.py", "similarity"): "an array of the actor's results, a format payload.py owns",
    ("pipeline/payload.py", "point"): "an array of the actor's results, a format payload.py owns",
    ("exports/label_studio.py", "score"): "Label Studio's own field of a prediction and of a region",
}


def _string_literals(path: Path) -> list[tuple[int, str]]:
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    out = []
    for token in tokens:
        if token.type == tokenize.STRING and not token.string.startswith(('"""', "'''", 'f"', "f'")):
            try:
                out.append((token.start[0], ast.literal_eval(token.string)))
            except ValueError:
                continue
    return out


@pytest.mark.parametrize("path", sorted(JOBS.rglob("*.py")), ids=lambda p: str(p.relative_to(JOBS)))
def test_columns_are_spelled_only_by_the_schema_module(path):
    if path.relative_to(JOBS) == Path("storage/schema.py"):
        return
    name = str(path.relative_to(JOBS))
    spelled = [f"line {line}: {value!r}" for line, value in _string_literals(path)
               if value in COLUMNS and (name, value) not in NOT_A_COLUMN]
    assert spelled == [], "use the constants of jobs/storage/schema.py"


@pytest.mark.parametrize("path", sorted(JOBS.rglob("*.py")), ids=lambda p: str(p.relative_to(JOBS)))
def test_modules_stay_small(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES
