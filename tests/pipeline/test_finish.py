"""finish.py: the CPU stage after the model actor imports neither torch nor the models.

Each CPU stage runs in Ray worker processes of its own; importing torch, segment_anything
and timm there cost about 4 s of CPU and a few hundred MB per worker for a stage that makes
RLE and Arrow rows (the stage's rows themselves: test_stages.py, test_k_concepts.py)."""

from __future__ import annotations

import pickle

import numpy as np

from fresh_python import fresh_python
from jobs.pipeline.job import PreparedJob
from jobs.spec import JobSpec, ModelSpec
from persam_core.concept import Concept

HEAVY = ("torch", "torchvision", "segment_anything", "sam2", "timm")


def test_the_finish_stage_and_its_job_load_without_torch():
    feature = np.ones(256, np.float32) / 16
    job = PreparedJob(JobSpec("segment", ModelSpec("tiny")), "tiny:0",
                      (Concept("mug", "persam", feature, feature, "tiny:0").to_json(),))
    code = ("import pickle, sys; import jobs.pipeline.finish; "
            f"job = pickle.loads(bytes.fromhex({pickle.dumps(job).hex()!r})); "
            "assert job.labels() == [('mug', 'persam')] and job.cache() is None, job.labels(); "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert fresh_python(code).strip() == "[]"
