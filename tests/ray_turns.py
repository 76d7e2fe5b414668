"""The Ray turn and the shared Ray of `make test`'s workers (tests/conftest.py's fixtures use
them): one local Ray at a time across the workers, and one Ray for a test module's jobs."""

from __future__ import annotations

import fcntl
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from jobs.pipeline.session import stop_local_ray


class RayTurn:
    """One local Ray at a time across `make test`'s two xdist workers: two side by side share
    two CPUs (one such run lost an actor), and a cluster test's `ray stop --force` ends every
    Ray on the machine. A file lock, held while this process's Ray runs (SharedRay), or for
    the whole of a test or module marked `ray_processes` (its child processes run the CLI on
    Ray). Re-entrant: a module's turn covers its tests'."""

    def __init__(self) -> None:
        self.path: Path | None = None  # set under xdist only: a lone pytest needs no turns
        self.depth, self.file = 0, None

    def take(self) -> None:
        if self.path is None:
            return
        if self.depth == 0:
            self.file = open(self.path, "w")
            fcntl.flock(self.file, fcntl.LOCK_EX)
        self.depth += 1

    def give_back(self) -> None:
        if self.path is None:
            return
        self.depth -= 1
        if self.depth == 0:
            self.file.close()  # closing the file releases the lock


RAY_TURN = RayTurn()


class SharedRay:
    """The jobs of one test module that run in this process share one embedded local Ray, as
    Ray's own advice for test suites has it: starting Ray (its daemons, its Data actors, a
    worker that imports torch) costs more CPU than a tiny job (docs/performance.md). The
    module's first job starts it through the product's `start_ray`, in the Ray turn; later
    jobs find it running, as a caller's Ray, which `ray_session` leaves running. It stops,
    giving the turn back, after the module's last `slow` test (a job on Ray is one), at the
    module's end, or before a `ray_processes` test. A test marked `own_ray` (it times or
    watches Ray's own start) gets a Ray of its own, which the product starts and stops as in
    a real run.

    used: a job ran on Ray during the current test (the slow-mark check reads it)."""

    def __init__(self) -> None:
        self.used = self.own = self.running = self.own_turn = False
        self.last_slow: set[str] = set()  # node ids: the last slow test of each module

    def start(self, real_start) -> bool:
        """The product's start_ray for a job -> whether the job's ray_session stops its Ray."""
        self.used = True
        if self.own:  # (RAY_ADDRESS is never set here: _no_cluster)
            self.stop()
            if not self.own_turn:
                RAY_TURN.take()
                self.own_turn = True
            return real_start()
        if self.running and not ray_is_idle():
            self.stop()  # a failed job's actors still hold CPUs: a fresh Ray
        if not self.running:
            RAY_TURN.take()
            self.running = True
            try:
                real_start()
            except BaseException:
                self.stop()
                raise
        return False

    def stop(self) -> None:
        if self.running:
            self.running = False
            stop_local_ray()
            RAY_TURN.give_back()

    def test_ends(self, nodeid: str) -> None:
        self.own = False
        if self.own_turn:
            self.own_turn = False
            RAY_TURN.give_back()
        if nodeid in self.last_slow:
            self.stop()


SHARED_RAY = SharedRay()


def ray_is_idle(timeout: float = 30.0) -> bool:
    """Every CPU of the shared Ray free again (a failed job's actors can take a moment to go)."""
    import time

    import ray

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0.0) >= ray.cluster_resources().get("CPU", 0.0):
            return True
        time.sleep(0.1)
    return False


@contextmanager
def turn_if(wanted: bool) -> Iterator[None]:
    if wanted:
        SHARED_RAY.stop()  # its child processes' Rays run alone
        RAY_TURN.take()
    try:
        yield
    finally:
        if wanted:
            RAY_TURN.give_back()
