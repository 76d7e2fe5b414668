"""persam_core is pure torch + numpy: no Ray, no fsspec/s3fs, no pyarrow.

The core runs inside Ray actors, the CLI and notebooks alike; importing a distributed or
storage stack from it would tie the method to the pipeline (and slow every import).
"""

from __future__ import annotations

import ast
import json
import pkgutil
from pathlib import Path

import persam_core

from fresh_python import fresh_python

FORBIDDEN = ("ray", "fsspec", "s3fs", "pyarrow")
PACKAGE_DIR = Path(persam_core.__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent


def module_names() -> list[str]:
    return ["persam_core"] + [f"persam_core.{m.name}" for m in pkgutil.iter_modules([str(PACKAGE_DIR)])]


def test_importing_every_module_loads_none_of_the_pipeline_stack() -> None:
    """A fresh interpreter, so nothing imported by other tests can hide or fake a hit."""
    script = (
        "import importlib, json, sys\n"
        f"for name in {module_names()!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})))\n"
    )
    loaded = json.loads(fresh_python(script).strip().splitlines()[-1])
    assert loaded == [], f"persam_core pulled in {loaded}"


def _imported_roots(tree: ast.AST) -> set[str]:
    """Top-level names of every import, including importlib.import_module("x") / __import__("x")."""
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                roots.add(node.args[0].value.split(".")[0])
    return roots


def test_source_imports_none_of_the_pipeline_stack() -> None:
    sources = sorted(PACKAGE_DIR.rglob("*.py"))
    assert sources, PACKAGE_DIR
    offenders = {
        str(path.relative_to(REPO_ROOT)): sorted(_imported_roots(ast.parse(path.read_text(), str(path))) & {*FORBIDDEN})
        for path in sources
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_static_scan_catches_forbidden_imports() -> None:
    """The scanner itself works (otherwise the test above proves nothing)."""
    code = "import ray.data\nfrom fsspec import open\nimport importlib\nimportlib.import_module('pyarrow.parquet')\n"
    assert _imported_roots(ast.parse(code)) >= {"ray", "fsspec", "pyarrow"}
