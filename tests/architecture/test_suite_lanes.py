"""xdist_lanes.py: the modules it names exist, each in one lane, and each worker's next module."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import xdist_lanes
from xdist_lanes import COMPUTE_LANE, RAY_LANE, LaneScheduling

REPO = Path(__file__).resolve().parents[2]


def test_every_module_named_exists_in_one_lane():
    named = [*RAY_LANE, *COMPUTE_LANE]
    assert [m for m in named if not (REPO / m).is_file()] == []
    assert len(set(named)) == len(named)


class _Node:
    def __init__(self, name: str) -> None:
        self.gateway = SimpleNamespace(id=name)


def test_each_worker_takes_its_lane_then_fillers_then_the_other_lanes_shortest(monkeypatch):
    monkeypatch.setattr(xdist_lanes, "RAY_LANE", ("r1", "r2"))
    monkeypatch.setattr(xdist_lanes, "COMPUTE_LANE", ("c1", "c2"))
    given = []
    monkeypatch.setattr(xdist_lanes.LoadFileScheduling, "_assign_work_unit",
                        lambda self, node: given.append((node.gateway.id, self.workqueue.popitem(last=False)[0])))
    ray_node, compute_node = (_Node(i) for i in ("gw0", "gw1"))
    scheduler = LaneScheduling.__new__(LaneScheduling)
    scheduler.assigned_work = {compute_node: {}, ray_node: {}}  # its nodes
    scheduler.workqueue = OrderedDict((m, {}) for m in ("f1", "c2", "r2", "c1", "f2", "r1"))
    for node in (compute_node, ray_node, ray_node, ray_node, ray_node, ray_node):
        scheduler._assign_work_unit(node)
    assert given == [("gw1", "c1"), ("gw0", "r1"), ("gw0", "r2"), ("gw0", "f1"), ("gw0", "f2"), ("gw0", "c2")]
