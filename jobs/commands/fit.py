"""`persam fit`: reference image(s) + mask(s) -> a concept file."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import fsspec
import numpy as np

from persam_core.concept import Concept, ConceptError, persam_f_target_feature, persam_targets, reference_cells
from persam_core.persam_f import fit_mask_weights
from persam_core.predictor import encode_images
from persam_core.preprocess import resize_longest_side

from jobs.storage.checkpoints import load_model, random_weights_note, redact
from jobs.storage.images import decode_image, decode_mask
from jobs.storage.listing import read_bytes
from jobs.storage.outputs import check_output_file, write_atomically


@dataclass
class FitOptions:
    model_type: str
    checkpoint: str
    images: Sequence[str]
    masks: Sequence[str]
    method: str
    name: str
    out: str
    epochs: int = 1000
    device: str = "cpu"
    storage_options: dict | None = None


def _read(url: str, what: str, storage_options: dict | None) -> bytes:
    try:
        return read_bytes(url, storage_options)
    except Exception as error:
        raise ConceptError(f"{redact(url)}: cannot read the {what} ({type(error).__name__}); check the path") from None


def _check_writable(out: str, storage_options: dict | None) -> None:
    fs, path = fsspec.core.url_to_fs(out, **(storage_options or {}))
    parent = path.rsplit("/", 1)[0] if "/" in path else "."
    try:
        fs.makedirs(parent, exist_ok=True)
        probe = f"{path}.probe"
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except Exception as error:
        raise ConceptError(f"{redact(out)}: --out is not writable ({type(error).__name__}); pass a writable path") from None


def fit_concept(
    sam, fingerprint: str, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], method: str, name: str,
    epochs: int, mask_sources: Sequence[str], references: Sequence[str], log=print,
) -> Concept:
    """Shots (images [H, W, 3] uint8, masks [H, W] bool) -> the concept; cells of all shots pooled."""
    encoded = encode_images(sam, [resize_longest_side(image) for image in images])
    cells = reference_cells(encoded, masks, mask_sources)
    target_feature, target_embedding = persam_targets(cells)
    weights = None
    if method == "persam-f":
        target_feature = persam_f_target_feature(cells)
        fit_started = time.perf_counter()
        weights, losses = fit_mask_weights(sam, encoded, masks, target_feature, epochs=epochs)
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


def run_fit(options: FitOptions, log=print) -> Concept:
    """Encode the shots, pool their kept cells, fit PerSAM-F if asked, write the concept."""
    if len(options.images) != len(options.masks) or not options.images:
        raise ConceptError("give one --mask for every --image (several pairs = several shots)")
    if not options.name or any(ch in options.name for ch in "/\\\0") or options.name in (".", ".."):
        raise ConceptError(f"--name {options.name!r}: use a plain name without '/', '\\\\' or '..'")
    check_output_file(options.out, "--out", options.storage_options, f"{options.name}.json")
    _check_writable(options.out, options.storage_options)
    images = [decode_image(_read(u, "image", options.storage_options), redact(u)) for u in options.images]
    masks = [decode_mask(_read(u, "mask", options.storage_options), redact(u)) for u in options.masks]
    for mask, url in zip(masks, options.masks):
        if mask.all():
            log(f"warning: {redact(url)}: mask covers the whole image; the concept will be the whole scene")

    model = load_model(options.model_type, options.checkpoint, options.storage_options)
    note = random_weights_note(options.checkpoint)
    if note:
        log(f"note: {note}")
    started = time.perf_counter()
    concept = fit_concept(model.sam.to(options.device), model.fingerprint, images, masks, options.method, options.name,
                          options.epochs, [redact(u) for u in options.masks], [redact(u) for u in options.images], log)
    # A killed or failing write must never leave a half concept that `segment` would then refuse.
    write_atomically(options.out, concept.to_json().encode("utf-8"), options.storage_options)
    log(f"concept {concept.name!r} ({concept.method}, {len(images)} shot(s)) -> {redact(options.out)} "
        f"in {time.perf_counter() - started:.1f} s")
    return concept

