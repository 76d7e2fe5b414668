"""Which worker of `make test` (pytest-xdist, `--dist loadfile`) runs which test module.

xdist hands out whole modules in the order it collected them, fullest first. Two costs made
that slow here: the longest modules came last (one worker ran on alone), and the modules
that run Ray often ran on both workers at once, where the second waits for the first's turn
(tests/ray_turns.py) with its CPU idle. Lanes instead: the first worker takes the modules whose
time goes to Ray (start-ups, actors, child processes that run it), the others the long CPU-bound
modules, each list longest first; then every worker takes the other modules, and last what is
left of the other lane. Module times: docs/performance.md. A module missing from both lists
runs as a filler; tests/architecture checks that every module named here exists.
"""

from __future__ import annotations

from xdist.scheduler import LoadFileScheduling

RAY_LANE = (
    "tests/commands/test_bench.py",
    "tests/commands/test_signals.py",
    "tests/pipeline/test_embedded_ray.py",
    "tests/commands/test_s3_and_faults.py",
    "tests/pipeline/test_sam2_jobs.py",
    "tests/commands/test_eval.py",
    "tests/commands/test_cluster_submit.py",
    "tests/commands/test_json_stderr.py",
    "tests/commands/test_segment.py",
    "tests/commands/test_cache_and_rank_jobs.py",
    "tests/pipeline/test_stages.py",
)
COMPUTE_LANE = (
    "tests/commands/test_gfsam_jobs.py",
    "tests/commands/test_eval_fewshot.py",
    "tests/core/test_fidelity.py",
    "tests/core/test_cascade.py",
    "tests/pipeline/test_compile_cache.py",
    "tests/core/methods/test_gfsam_oracle.py",
    "tests/core/speed/test_decoder_speed.py",
    "tests/core/methods/test_gfsam_oracle_match.py",
    "tests/pipeline/test_host_memory.py",
    "tests/commands/test_table_cli.py",
    "tests/core/test_sam2_persam.py",
    "tests/pipeline/test_commit_faults.py",
    "tests/core/methods/test_gfsam_batch.py",
    "tests/core/video/test_sam2_memory.py",
)


class LaneScheduling(LoadFileScheduling):
    """LoadFileScheduling that picks each worker's next module by its lane (module docstring)."""

    def _assign_work_unit(self, node) -> None:
        first = min(self.nodes, key=lambda n: n.gateway.id)
        own, other = (RAY_LANE, COMPUTE_LANE) if node is first else (COMPUTE_LANE, RAY_LANE)
        listed = {*RAY_LANE, *COMPUTE_LANE}
        choices = ([m for m in own if m in self.workqueue]
                   + [m for m in self.workqueue if m not in listed]
                   + [m for m in reversed(other) if m in self.workqueue])  # the other lane's shortest first
        # the base class takes the queue's first module: put the choice there
        self.workqueue.move_to_end(choices[0], last=False)
        super()._assign_work_unit(node)
