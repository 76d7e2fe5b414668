"""The driver's side of the pipeline: gather the chunks of each shard, hand complete shards on.

Chunks arrive in any order and, after a retried task, possibly twice: the first copy of
each (shard, chunk) is kept, later copies are dropped. When the last chunk of a shard has
arrived, `on_shard(shard, chunks in chunk order)` runs on a small thread pool (a commit
is I/O: it must not stall the stream of results), exactly once per shard.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Generic, TypeVar

from jobs.pipeline.payload import FinishedChunk
from jobs.pipeline.shards import Shard

COMMIT_THREADS = 4
Result = TypeVar("Result")


class ShardGatherer(Generic[Result]):
    """shards: {shard id: the shard}, split in chunks of at most `chunk_size` images (run.plan_chunks)."""

    def __init__(self, shards: dict[int, Shard], chunk_size: int,
                 on_shard: Callable[[Shard, list[FinishedChunk]], Result], threads: int = COMMIT_THREADS) -> None:
        self.shards, self.chunk_size, self.on_shard = shards, chunk_size, on_shard
        self.received: dict[int, dict[int, FinishedChunk]] = {}  # chunks of shards still incomplete
        self.done: set[int] = set()  # shards handed on
        self.futures: list[Future] = []
        self.running: list[Future] = []  # handed on, not yet seen finished
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="commit")

    def add(self, chunk: FinishedChunk) -> bool:
        """A chunk's result -> False if it is a duplicate."""
        self._raise_failed()
        shard, index = chunk.shard, chunk.chunk
        if shard in self.done or index in self.received.get(shard, {}):  # a copy from a retried task
            return False
        parts = self.received.setdefault(shard, {})
        parts[index] = chunk
        if len(parts) == self.shards[shard].chunk_count(self.chunk_size):
            del self.received[shard]
            self.done.add(shard)
            future = self.pool.submit(self.on_shard, self.shards[shard], [parts[i] for i in range(len(parts))])
            self.futures.append(future)
            self.running.append(future)
        return True

    def _raise_failed(self) -> None:
        """Stop the job at the first failed commit instead of computing on for nothing."""
        for future in self.running:
            if future.done() and future.exception() is not None:
                raise future.exception()
        self.running = [f for f in self.running if not f.done()]

    def results(self) -> list[Result]:
        """Wait for every handed-on shard -> on_shard's results; the first failure is raised."""
        incomplete = [s for s in self.shards if s not in self.done]
        if incomplete:
            raise RuntimeError(f"shards {sorted(incomplete)[:5]} did not receive all their chunks; rerun the job")
        return [future.result() for future in self.futures]

    def __enter__(self) -> "ShardGatherer":
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True, cancel_futures=exc[0] is not None)
