"""`persam fit`: reference image(s) + mask(s) -> a concept file."""

from __future__ import annotations

import logging
import time

from fsspec.core import url_to_fs

from persam_core.methods.registry import ConceptError, FitModels, Shots, get_method

from jobs.pipeline.job_record import check_concept_names
from jobs.pipeline.progress import describe_left
from jobs.pipeline.session import resolve_device
from jobs.spec import DEFAULT_MAX_IMAGE_BYTES, JobSpec
from jobs.storage.checkpoints import load_model, random_weights_note
from jobs.storage.dinov2_checkpoints import load_dinov2, random_dinov2_note
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


def fit_models(spec: JobSpec, device, log=logger.info) -> FitModels:
    """The models a fit may ask for, each loaded on first ask (SAM from --model-type /
    --checkpoint, DINOv2 from --dinov2 / --dinov2-checkpoint), random weights announced."""

    def sam():
        model = load_model(spec.model.model_type, spec.model.checkpoint, spec.storage_options)
        note = random_weights_note(spec.model.checkpoint)
        if note:
            log(f"note: {note}")
        return model.sam.to(device), model.fingerprint

    def dinov2():
        model, fingerprint = load_dinov2(spec.model.dinov2, spec.model.dinov2_checkpoint, device, spec.storage_options)
        note = random_dinov2_note(spec.model.dinov2_checkpoint)
        if note:
            log(f"note: {note}")
        return spec.model.dinov2, model, fingerprint

    return FitModels(sam, dinov2)


def fit_concept(models: FitModels, method: str, shots: Shots, log=logger.info):
    """Shots -> the concept of `method` (the registry's fit)."""
    return get_method(method).fit(shots, models, log)


def fit_progress(interval: float, log=logger.info):
    """progress(epochs) -> an on_epoch callback logging every `interval` seconds (iterative fits)."""
    return lambda epochs: FitProgress(epochs, interval, log)


def run_fit(spec: JobSpec, log=logger.info):
    """Read the shots, fit the concept of --method (registry), write it -> the concept."""
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

    started = time.perf_counter()
    shots = Shots(spec.name, images, masks, [redact(u) for u in spec.images], [redact(u) for u in spec.masks],
                  spec.epochs, fit_progress(spec.progress_interval, log))
    concept = fit_concept(fit_models(spec, device, log), spec.method, shots, log)
    # A killed or failing write must never leave a half concept that `segment` would then refuse.
    write_atomically(spec.out, concept.to_json().encode("utf-8"), spec.storage_options)
    log(f"concept {concept.name!r} ({concept.method}, {len(images)} shot(s)) -> {redact(spec.out)} "
        f"in {time.perf_counter() - started:.1f} s")
    return concept

