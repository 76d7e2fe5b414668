"""session.py: how many torch threads each local model actor gets; what the CPU stages reserve."""

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


def test_cpu_stages_keep_their_reservations_where_cpus_are_plenty():
    assert session.stage_cpus(16, 1) == session.stage_cpus(2.5, 1) == (1.0, 0.5)


@pytest.mark.parametrize(("total", "actors"), [(2, 1), (1, 0.5), (2, 1.75), (3, 2), (1, 1)])
def test_a_finish_task_always_fits_beside_a_running_prepare_task(total, actors):
    """Where prepare could take the last free CPU, Ray Data ran every prepare task before the
    first finish task: a 2-core machine committed nothing until the whole input was read."""
    prepare, finish = session.stage_cpus(total, actors)
    assert 0 < finish < prepare <= 1 and prepare == pytest.approx(2 * finish)
    assert prepare + finish <= max(total - actors, 0.01) + 1e-9
