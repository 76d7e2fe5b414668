"""persam_core's import graph has no circle (function-level imports and the families'
lazily loaded implementations included), no module of the product outgrows 400 lines, and
the README stays a newcomer's page whose links all resolve."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from fresh_python import fresh_python
from import_graph import circles

REPO = Path(__file__).resolve().parents[2]
CORE = REPO / "persam_core"
MAX_LINES = 400
README_MAX_LINES = 200


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def core_graph() -> dict[str, set[str]]:
    """persam_core module -> the persam_core modules it imports, at any depth, plus the
    implementation modules that `module_implementation("...")` loads on first use."""
    paths = {_module_name(p): p for p in CORE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                target = _resolve(name, node, path.name == "__init__.py")
                targets = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif (isinstance(node, ast.Call) and getattr(node.func, "id", "") == "module_implementation"
                  and node.args and isinstance(node.args[0], ast.Constant)):
                targets = [node.args[0].value]
            edges |= {t for t in targets if t in paths and t != name}
        graph[name] = edges
    return graph


def test_persam_core_has_no_import_circle():
    assert circles(core_graph()) == []


def test_the_graph_holds_lazy_imports():
    """The check is not vacuous: function-level imports and lazily loaded family implementations are edges."""
    graph = core_graph()
    assert "persam_core.modeling.sam_backbone" in graph["persam_core.modeling.sam_family"]
    assert "persam_core.modeling.sam_family" in graph["persam_core.modeling.families"]  # through module_implementation


@pytest.mark.parametrize("path", sorted(CORE.rglob("*.py")),  # jobs/: test_layout.py
                         ids=lambda p: str(p.relative_to(REPO)))
def test_product_modules_stay_small(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def test_readme_is_short_and_opens_with_demo_and_test():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES
    commands = [line.split("#")[0].strip() for line in lines[:8] if line.startswith("make ")]
    assert commands[:2] == ["make demo", "make test"]


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("page", ["README.md", "CHANGELOG.md", "ARCHITECTURE.md",
                                  *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))])
def test_every_relative_link_resolves(page):
    path = REPO / page
    broken = [target for target in LINK.findall(path.read_text())
              if "://" not in target and not (path.parent / target).exists()]
    assert broken == []


def test_the_package_exports_what_a_python_user_needs_without_loading_torch_first():
    code = ("import sys, persam_core; assert 'torch' not in sys.modules, 'persam_core loaded torch'; "
            "[getattr(persam_core, name) for name in persam_core.__all__]; print(len(persam_core.__all__))")
    assert int(fresh_python(code)) >= 10


@pytest.mark.slow  # builds the tiny SAM in a fresh interpreter
def test_the_readme_python_example_runs():
    text = (REPO / "README.md").read_text()
    start = text.index("```python\n") + len("```python\n")
    snippet = text[start:text.index("```", start)]
    assert fresh_python(snippet, timeout=600).startswith("(600, 800)")
