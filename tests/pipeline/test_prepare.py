"""prepare.py: the read stage of a SAM job imports neither torch nor the models.

It runs in Ray worker processes that never run a model; importing torch, torchvision and
segment_anything there cost about 3 s of CPU per worker (the stage's rows themselves:
test_stages.py, test_k_concepts.py)."""

from __future__ import annotations

import pickle

import numpy as np
from PIL import Image

from fresh_python import fresh_python
from jobs.pipeline.job import PreparedJob
from jobs.spec import JobSpec, ModelSpec
from persam_core.concept import Concept
from persam_core.methods.frame_resize import frame_resize
from persam_core.methods.registry import FRAME_MODEL, FRAME_STRETCH
from persam_core.modeling.families import input_format

HEAVY = ("torch", "torchvision", "segment_anything", "sam2", "timm")


def test_a_sam_jobs_read_stage_resizes_both_frames_without_torch(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(30, 40, 3), dtype=np.uint8)).save(path)
    feature = np.ones(256, np.float32) / 16
    job = PreparedJob(JobSpec("segment", ModelSpec("tiny")), "tiny:0",
                      (Concept("mug", "persam", feature, feature, "tiny:0").to_json(),))
    code = ("import pickle, sys; from jobs.pipeline.prepare import prepare_chunk; "
            "from jobs.pipeline.payload import unpack_chunk; import numpy as np; "
            "from persam_core.methods.frame_resize import frame_resize; "
            f"job = pickle.loads(bytes.fromhex({pickle.dumps(job).hex()!r})); "
            f"out = prepare_chunk({{'shard': 0, 'chunk': 0, 'urls': [{str(path)!r}], 'previous': []}}, job); "
            "chunk = unpack_chunk(out['meta'], out['arrays']); "
            "stretched = frame_resize('stretch', 'tiny')(np.zeros((30, 40, 3), np.uint8)); "
            "print(chunk.items[0].error, chunk.items[0].input_size, stretched.input_size, "
            f"sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert fresh_python(code).strip() == "None (768, 1024) (1024, 1024) []"


def test_each_frame_resizes_as_its_owner_says():
    image = np.random.default_rng(1).integers(0, 256, size=(50, 20, 3), dtype=np.uint8)
    for model_type in ("tiny", "tiny_sam2"):
        ours, theirs = frame_resize(FRAME_MODEL, model_type)(image), input_format(model_type).resize(image)
        assert np.array_equal(ours.pixels, theirs.pixels) and ours.original_size == (50, 20)
    stretched = frame_resize(FRAME_STRETCH, "tiny")(image)
    assert stretched.pixels.shape == (1024, 1024, 3) and stretched.original_size == (50, 20)
