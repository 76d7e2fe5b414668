"""session.py: how many torch threads each local model actor gets."""

from __future__ import annotations

import os

import pytest

from jobs.pipeline import session


@pytest.fixture
def four_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


def test_local_actors_share_the_cores_this_process_may_run_on(four_cores):
    assert [session.local_threads(count) for count in (1, 2, 3, 4, 8)] == [4, 2, 1, 1, 1]


@pytest.mark.parametrize(("value", "threads"), [("1", 1), ("3", 3), ("16", 4), ("0", 4), ("", 4), ("two", 4)])
def test_omp_num_threads_caps_each_actor(four_cores, monkeypatch, value, threads):
    """A number above 0 caps the threads (torch starts with it too); anything else is ignored."""
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    assert session.local_threads(1) == threads
