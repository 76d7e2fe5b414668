"""`persam bench --job`'s start-up figures: the time to a job's first result, cold and warm.

With a compiled encoder, the K = 1 job runs twice more, each on a Ray of its own whose actors
get an empty inductor cache folder of their own, against one compile cache
(pipeline/compile_cache.py) that is empty for the first (cold start: the actor compiles and
saves) and filled for the second (warm start: the actor loads the artifacts). Figures:
`start_{cold,warm}_first_result_s` (from the job's start, Ray started), `start_*_s` (the
whole job) and `start_*_ray_s` (Ray's start). On a cluster (RAY_ADDRESS) the actors keep
their nodes' own inductor caches, so the cold figure may be warmer than a fresh node's.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from jobs.commands.bench_tools import progress
from jobs.pipeline.session import ray_session

# inductor's local cache folder: read in each actor's process, which a local Ray starts with
# the driver's environment
INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def start_ups(root: Path, run_job: Callable[[str, Path], dict]) -> dict:
    """run_job(compile cache, output folder) -> a bench job's figures (bench_job._job); the
    job cold, then warm, under `root` -> their start-up figures."""
    figures, compiled = {}, str(root / "compile-cache")
    before = os.environ.get(INDUCTOR_CACHE_ENV)
    try:
        for phase in ("cold", "warm"):
            os.environ[INDUCTOR_CACHE_ENV] = str(root / f"inductor-{phase}")
            progress(f"job with 1 concept, {phase} start")
            ray_started = time.perf_counter()
            with ray_session():
                figures[f"start_{phase}_ray_s"] = round(time.perf_counter() - ray_started, 2)
                job = run_job(compiled, root / f"out-{phase}")
            figures[f"start_{phase}_first_result_s"] = job["first_result_s"]
            figures[f"start_{phase}_s"] = job["s"]
            progress(f"job with 1 concept, {phase} start: first result after {job['first_result_s']} s")
    finally:
        if before is None:
            os.environ.pop(INDUCTOR_CACHE_ENV, None)
        else:
            os.environ[INDUCTOR_CACHE_ENV] = before
    return figures
