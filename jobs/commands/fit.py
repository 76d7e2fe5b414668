"""`persam fit`: reference image(s) + mask(s) -> a concept file."""

from __future__ import annotations

import logging
import time
from typing import Sequence

import numpy as np
from fsspec.core import url_to_fs

from persam_core.families import as_backbone
from persam_core.concept import Concept, ConceptError, persam_f_target_feature, persam_targets, reference_cells
from persam_core.persam_f import DEFAULT_EPOCHS, fit_mask_weights
from persam_core.predictor import encode_images

from jobs.pipeline.job_record import check_concept_names
from jobs.pipeline.progress import describe_left
from jobs.pipeline.session import resolve_device
from jobs.spec import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_PROGRESS_INTERVAL, JobSpec
from jobs.storage.checkpoints import load_model, random_weights_note
from jobs.storage.files import NotAFileError, read_file_bytes, write_atomically
from jobs.storage.images import decode_image, decode_mask
from jobs.storage.outputs import check_output_file, probe_writable
from jobs.storage.redaction import redact

logger = logging.getLogger(__name__)


def _read(url: str, what: str, storage_options: dict | None) -> bytes:
    try:  # a regular file of at most the default byte limit (a FIFO would block)
        return read_file_bytes(url, storage_options, DEFAULT_MAX_IMAGE_BYTES, shown=redact(url))
    except NotAFileError as error:
        raise ConceptError(str(error)) from None
    except Exception as error:
        raise ConceptError(f"{redact(url)}: cannot read the {what} ({type(error).__name__}); check the path") from None


class FitProgress:
    """PerSAM-F's `on_epoch` callback: a line every `interval` seconds with the epoch, the
    loss and the time left (epochs cost the same, so the rate so far predicts the rest)."""

    def __init__(self, epochs: int, interval: float, log) -> None:
        self.epochs, self.interval, self.log = epochs, interval, log
        self.started = self.last = time.monotonic()

    def __call__(self, epoch: int, loss: float) -> None:
        now = time.monotonic()
        done = epoch + 1
        if now - self.last < self.interval or done == self.epochs:
            return
        self.last = now
        elapsed = now - self.started
        left = elapsed / done * (self.epochs - done)
        self.log(f"PerSAM-F: epoch {done}/{self.epochs}, loss {loss:.4f}, {elapsed:.0f} s so far, "
                 f"{describe_left(left)} left")


def fit_concept(
    sam, fingerprint: str, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], method: str, name: str,
    epochs: int, mask_sources: Sequence[str], references: Sequence[str], log=logger.info,
    progress_interval: float = DEFAULT_PROGRESS_INTERVAL,
) -> Concept:
    """Shots (images [H, W, 3] uint8, masks [H, W] bool) -> the concept; cells of all shots pooled.
    `sam`: a SAM or SAM 2 model, whose own transform resizes the images and the masks.
    PerSAM-F logs its progress every `progress_interval` seconds."""
    encoded = encode_images(sam, [as_backbone(sam).resize(image) for image in images])
    cells = reference_cells(encoded, masks, mask_sources, model=sam)
    target_feature, target_embedding = persam_targets(cells)
    weights = None
    if method == "persam-f":
        target_feature = persam_f_target_feature(cells)
        fit_started = time.perf_counter()
        sizes = ", ".join(f"{m.shape[1]}x{m.shape[0]}" for m in masks)
        log(f"PerSAM-F: fitting {epochs} epochs on {len(masks)} shot(s) ({sizes} px)")
        weights, losses = fit_mask_weights(sam, encoded, masks, target_feature, epochs=epochs,
                                           on_epoch=FitProgress(epochs, progress_interval, log))
        log(f"PerSAM-F: {epochs} epochs in {time.perf_counter() - fit_started:.1f} s, "
            f"loss {losses[0]:.4f} -> {losses[-1]:.4f}, weights {[round(float(w), 4) for w in weights]}")
    return Concept(
        name=name,
        method=method,
        target_feature=target_feature.detach().cpu().numpy().astype(np.float32),
        target_embedding=target_embedding.detach().cpu().numpy().astype(np.float32),
        model_fingerprint=fingerprint,
        mask_weights=weights,
        references=tuple(references),
    )


def run_fit(spec: JobSpec, log=logger.info) -> Concept:
    """Encode the shots, pool their kept cells, fit PerSAM-F if asked, write the concept."""
    device = resolve_device(spec.model.device)
    if len(spec.images) != len(spec.masks) or not spec.images:
        raise ConceptError("give one --mask for every --image (several pairs = several shots)")
    check_concept_names("--name", (spec.name or "",))  # the partition folder's rule, checked before any work
    check_output_file(spec.out, "--out", spec.storage_options, f"{spec.name}.json")
    fs, path = url_to_fs(spec.out, **spec.storage_options)
    probe_writable(fs, path.rsplit("/", 1)[0] if "/" in path else ".", spec.out, "--out")
    images = [decode_image(_read(u, "image", spec.storage_options), redact(u)) for u in spec.images]
    masks = [decode_mask(_read(u, "mask", spec.storage_options), redact(u)) for u in spec.masks]
    for mask, url in zip(masks, spec.masks):
        if mask.all():
            logger.warning(f"{redact(url)}: mask covers the whole image; the concept will be the whole scene")

    model = load_model(spec.model.model_type, spec.model.checkpoint, spec.storage_options)
    note = random_weights_note(spec.model.checkpoint)
    if note:
        log(f"note: {note}")
    started = time.perf_counter()
    concept = fit_concept(model.sam.to(device), model.fingerprint, images, masks, spec.method, spec.name,
                          spec.epochs or DEFAULT_EPOCHS, [redact(u) for u in spec.masks], [redact(u) for u in spec.images], log,
                          spec.progress_interval)
    # A killed or failing write must never leave a half concept that `segment` would then refuse.
    write_atomically(spec.out, concept.to_json().encode("utf-8"), spec.storage_options)
    log(f"concept {concept.name!r} ({concept.method}, {len(images)} shot(s)) -> {redact(spec.out)} "
        f"in {time.perf_counter() - started:.1f} s")
    return concept

