"""The embedded Ray's processes end with the driver, also when the driver is killed (kill -9).

Ray's fate-sharing covers what `ray.init` spawns itself (GCS, raylet, monitor, API server, log
monitor: PR_SET_PDEATHSIG, so the kernel kills them with the driver), and workers exit when
their raylet goes. Not the agents the raylet spawns (dashboard agent, runtime-env agent):
they notice the raylet's death at once, then spend about a minute trying to report it to the
dead GCS, still listening. So a small process watches: it is started after `ray.init` with the
pids Ray spawned, follows their descendants (by /proc, every half second), and when its stdin
reaches end of file — the driver closed it after `ray.shutdown`, or the driver died — kills
every one of them that is still running (checked by start time: a reused pid is left alone).

It runs in a session of its own, so a kill of the driver's process group or a terminal's
Ctrl-C leaves it to do its job, and it ignores SIGINT and SIGTERM; it exits once done.
Linux only (/proc); elsewhere `start_watchdog` does nothing.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path

POLL_SECONDS = 0.5
PROC = Path("/proc")


def _stat(pid: int) -> tuple[int, int] | None:
    """pid -> (parent pid, start time in clock ticks), None if it is gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) ", whatever comm holds
    return int(fields[1]), int(fields[19])


def _follow(watched: dict[int, int]) -> None:
    """Add every running descendant of a watched process to `watched` (pid -> start time)."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None:
                children.setdefault(stat[0], []).append((int(entry.name), stat[1]))
    queue = [pid for pid, started in watched.items() if (_stat(pid) or (0, -1))[1] == started]
    while queue:
        for child, started in children.get(queue.pop(), []):
            if child not in watched and child != os.getpid():
                watched[child] = started
                queue.append(child)


def _kill(watched: dict[int, int]) -> None:
    for pid, started in watched.items():
        stat = _stat(pid)
        if stat is not None and stat[1] == started:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def watch(roots: list[int]) -> None:
    """Follow `roots` and their descendants until stdin ends, then kill what still runs."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    watched = {pid: stat[1] for pid in roots if (stat := _stat(pid)) is not None}
    while True:
        _follow(watched)
        ready, _, _ = select.select([0], [], [], POLL_SECONDS)
        if ready and not os.read(0, 4096):
            break
    _kill(watched)


def children_of(pid: int) -> set[int]:
    """The running processes whose parent is `pid`."""
    if not PROC.is_dir():
        return set()
    found = set()
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None and stat[0] == pid:
            found.add(int(entry.name))
    return found


def start_watchdog(roots: set[int]) -> subprocess.Popen | None:
    """A watchdog over `roots` (and what they spawn) -> its process; close its stdin to end
    it (killing what is left). None where there is no /proc."""
    if not roots or not PROC.is_dir():
        return None
    package_root = str(Path(__file__).resolve().parents[2])  # so `-m jobs...` imports this checkout
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-m", "jobs.pipeline.watchdog", *map(str, sorted(roots))],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=env)


def stop_watchdog(process: subprocess.Popen | None) -> None:
    """The driver is done with Ray: the watchdog kills what is left and exits."""
    if process is None:
        return
    try:
        process.stdin.close()
        process.wait(timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        pass


if __name__ == "__main__":
    watch([int(pid) for pid in sys.argv[1:]])
