"""Circles in an import graph (module -> the modules it imports), as readable trails."""

from __future__ import annotations


def circles(graph: dict[str, set[str]]) -> list[str]:
    """Every circle a depth-first walk meets, as "a -> b -> a"; [] for an acyclic graph."""
    state: dict[str, str] = {}
    found: list[str] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                found.append(" -> ".join(trail[trail.index(dep):] + [node, dep]) if dep in trail else f"{node} -> {dep}")
            elif dep not in state:
                visit(dep, trail + [node])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found
