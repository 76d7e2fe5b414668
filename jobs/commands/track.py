"""`persam track`: one concept through video clips in object storage, with SAM 2's memory.

    --input: a clip (a folder / prefix of frames, in name order) or a folder of clips (each
    sub-folder holding frames); frames are any IMAGE_EXTENSIONS file, one size per clip
    -> one model actor call per clip (--runner local: in this process), frames decoded one at
       a time (persam_core.video.sam2_memory.MemoryTracker.from_concept): the concept starts at the
       first frame where its presence reaches --min-similarity, SAM 2's memory propagates it,
       PerSAM's prior re-prompts it where SAM 2 loses it
    -> <output>/<clip>/<frame stem>.png (L mode, 255 = the concept) for every frame, and
       <output>/track.json: per clip its frames, the first frame found and the re-prompts.
"""

from __future__ import annotations

import logging

import io
import json
import os
import time

import numpy as np
import torch
from fsspec.core import url_to_fs
from PIL import Image

from persam_core.modeling.families import families, family_of
from persam_core.video.sam2_memory import MemorySettings, MemoryTracker, video_predictor

from jobs.commands.eval_video import ClipFrames, run_clip_local, run_clip_pool
from jobs.pipeline.job_checks import load_checked_model
from jobs.pipeline.session import resolve_device
from jobs.spec import JobSpec
from jobs.storage.checkpoints import load_model, random_weights_note
from jobs.storage.concept_files import read_concepts
from jobs.storage.files import as_given, folder_entries, join_url, write_atomically
from jobs.storage.images import IMAGE_EXTENSIONS
from jobs.storage.outputs import check_output_folder
from jobs.storage.redaction import redact

logger = logging.getLogger(__name__)


class TrackError(ValueError):
    """Input that cannot be tracked; the message says what to do."""


def scan_clips(url: str, storage_options: dict | None = None) -> list[dict]:
    """--input -> [{"name", "frames": [url]}]: the folder itself if it holds frames, else its sub-folders that do."""
    fs, root = url_to_fs(url, **(storage_options or {}))
    root, given = root.rstrip("/"), as_given(fs, url)
    if not fs.isdir(root):
        raise TrackError(f"{redact(url)}: not a folder; pass a clip's folder of frames or a folder of clip folders")

    def frames(folder: str) -> list[str]:
        return [given(f"{folder}/{f}") for f in folder_entries(fs, folder)[1] if f.lower().endswith(IMAGE_EXTENSIONS)]

    own = frames(root)
    clips = [{"name": os.path.basename(root), "frames": own}] if own else \
        [{"name": name, "frames": frames(f"{root}/{name}")} for name in folder_entries(fs, root)[0]]
    clips = [clip for clip in clips if clip["frames"]]
    if not clips:
        raise TrackError(f"{redact(url)}: no frames ({', '.join(IMAGE_EXTENSIONS)}) in it or its sub-folders")
    return clips


def _write_mask(url: str, mask: np.ndarray, storage_options: dict | None) -> None:
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buffer, format="PNG")
    write_atomically(url, buffer.getvalue(), storage_options)


class TrackWorker:
    """Ray actor (or in process): SAM 2's video predictor and the concept loaded once; `run` tracks one clip."""

    def __init__(self, spec: JobSpec, expected_fingerprint: str, threads: int) -> None:
        torch.set_num_threads(max(1, threads))
        model = load_checked_model(spec, expected_fingerprint).sam.to(resolve_device(spec.model.device))
        self.predictor = video_predictor(model, spec.model.model_type)
        self.concept = read_concepts(spec.concepts, spec.storage_options)[0]
        self.settings = MemorySettings() if spec.min_similarity is None else MemorySettings(min_similarity=spec.min_similarity)
        self.storage = spec.storage_options

    def run(self, clip: dict, output: str) -> dict:
        started = time.perf_counter()
        tracker = MemoryTracker(self.predictor, ClipFrames(clip["frames"], self.storage), self.settings)
        target = torch.as_tensor(self.concept.target_feature), torch.as_tensor(self.concept.target_embedding)
        for index, labels in tracker.from_concept(*target):
            stem = os.path.splitext(clip["frames"][index].rstrip("/").rsplit("/", 1)[-1])[0]
            _write_mask(join_url(output, f"{clip['name']}/{stem}.png"), labels == 1, self.storage)
        found = [index for index, _ in tracker.prompted]
        return {"name": clip["name"], "frames": len(clip["frames"]), "found_at": found[0] if found else None,
                "reprompts": found[1:], "seconds": round(time.perf_counter() - started, 1)}


def run_track(spec: JobSpec, log=logger.info) -> dict:
    if not family_of(spec.model.model_type).tracks_with_memory:
        able = ", ".join(t for f in families() if f.tracks_with_memory for t in f.official_checkpoints)
        raise TrackError(f"--model-type {spec.model.model_type}: persam track follows the concept with SAM 2's "
                         f"memory; pass a SAM 2 model type ({able})")
    concepts = read_concepts(spec.concepts, spec.storage_options)
    if len(concepts) != 1:
        raise TrackError(f"--concept: {len(concepts)} concepts given; persam track follows one concept per run")
    check_output_folder(spec.output, "--output", spec.storage_options)  # before the model loads
    clips = scan_clips(spec.input, spec.storage_options)
    log(f"track: {len(clips)} clips, {sum(len(c['frames']) for c in clips)} frames")
    fingerprint = load_model(spec.model.model_type, spec.model.checkpoint, spec.storage_options).fingerprint
    concepts[0].require_fingerprint(fingerprint, redact(spec.concepts[0]))
    note = random_weights_note(spec.model.checkpoint)
    if note:
        log(f"note: {note}")
    if spec.runner == "local":
        results = run_clip_local(TrackWorker, spec, clips, fingerprint, spec.output)
    else:
        results = run_clip_pool(TrackWorker, spec, clips, fingerprint, spec.output, error_type=TrackError)
    summary = dict(concept=concepts[0].name, model_type=spec.model.model_type, model_fingerprint=fingerprint,
                   clips=sorted(results, key=lambda r: r["name"]), **({"note": note} if note else {}))
    write_atomically(join_url(spec.output, "track.json"), json.dumps(summary, indent=1).encode(), spec.storage_options)
    return summary
