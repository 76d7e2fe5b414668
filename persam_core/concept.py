"""The concept: what one reference (or several shots) teaches, as a small non-pickle file.

PerSAM:   target embedding e = mean(T), target feature t = e / ||e||.
PerSAM-F: t = normalise(max(T) / 2 + mean(T) / 2), plus the three fitted mask weights.
T are the encoder features of the reference grid cells the mask keeps (all shots pooled).
The file is JSON: float32 values written as exact decimal doubles, read back bit-identical.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from persam_core.modeling.families import as_backbone
from .methods.registry import ConceptError, get_method, parse_concept_file
from persam_core.modeling.predictor import EncodedImage
from persam_core.modeling.preprocess import REFERENCE_MASK_VALUE, reference_mask_grid

FORMAT = "persam-concept/1"
FEATURE_DIM = 256

# Bounds on what a concept file may hold. t is written as e / ||e|| in float32, whose norm is 1
# within ~1e-7; 1e-3 leaves room for rounding yet catches a zeroed or rescaled vector (which
# would give similarity 0 or 1e23 and a NaN score downstream).
UNIT_NORM_TOLERANCE = 1e-3
# e is a mean of SAM encoder cells; the encoder's neck ends in a LayerNorm, so one cell has a
# norm of about sqrt(256) = 16 times its affine scale (16 with random weights, whose pooled e
# measures 8 to 10; the released weights' learnt scales keep it in the tens). A mean of cells is
# at most their largest norm, so 1e4 is a margin of hundreds; below 1e-6 the cells cancelled out
# and t = e / ||e|| is not determined.
EMBEDDING_NORM_RANGE = (1e-6, 1e4)
# PerSAM-F stores (1 - w1 - w2, w1, w2), which sums to 1 up to float32 rounding (~1e-7).
WEIGHT_SUM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Concept:
    """target_feature: [256] unit vector t; target_embedding: [256] e; mask_weights: [3] or None."""

    name: str
    method: str
    target_feature: np.ndarray
    target_embedding: np.ndarray
    model_fingerprint: str
    mask_weights: np.ndarray | None = None
    references: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> str:
        document = {
            "format": FORMAT,
            "name": self.name,
            "method": self.method,
            "model_fingerprint": self.model_fingerprint,
            "target_feature": [float(v) for v in self.target_feature],
            "target_embedding": [float(v) for v in self.target_embedding],
            "mask_weights": None if self.mask_weights is None else [float(v) for v in self.mask_weights],
            "references": list(self.references),
        }
        return json.dumps(document, indent=1)

    @classmethod
    def from_json(cls, text: str, source: str = "concept") -> "Concept":
        return cls.from_document(parse_concept_file(text, source), source)

    @classmethod
    def from_document(cls, document: dict, source: str = "concept") -> "Concept":
        """A parsed concept file -> the concept, its method's payload checked (registry)."""
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise ConceptError(f"{source}: not a {FORMAT} file; re-create it with `persam fit`")
        try:
            concept = cls(
                name=str(document["name"]),
                method=str(document["method"]),
                target_feature=_vector(document["target_feature"], FEATURE_DIM, "target_feature"),
                target_embedding=_vector(document["target_embedding"], FEATURE_DIM, "target_embedding"),
                model_fingerprint=str(document["model_fingerprint"]),
                mask_weights=(None if document.get("mask_weights") is None
                              else _vector(document["mask_weights"], 3, "mask_weights")),
                references=tuple(str(r) for r in document.get("references", [])),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ConceptError(f"{source}: corrupt concept file ({error}); re-create it with `persam fit`") from None
        try:
            accepted = get_method(concept.method).accepts(concept)
        except ConceptError:
            accepted = False
        if not accepted:
            raise ConceptError(f"{source}: inconsistent method/mask weights; re-create it with `persam fit`")
        _check_values(concept, source)
        return concept

    @property
    def sam_fingerprint(self) -> str | None:
        """The SAM weights the concept depends on."""
        return self.model_fingerprint

    @property
    def weights_note(self) -> str:
        return f"weights {self.model_fingerprint}"

    def require_models(self, sam_fingerprint: str | None, dinov2: tuple[str, str | None] | None,
                       source: str = "concept") -> None:
        """Refuse a concept computed with other SAM weights (None: not known yet); PerSAM
        reads SAM's features only, so DINOv2 is never asked."""
        if sam_fingerprint is not None:
            self.require_fingerprint(sam_fingerprint, source)

    def require_fingerprint(self, fingerprint: str, source: str = "concept") -> None:
        """Refuse a concept computed with other SAM weights."""
        if fingerprint != self.model_fingerprint:
            raise ConceptError(
                f"{source}: concept {self.name!r} was fitted with SAM weights {self.model_fingerprint}, "
                f"but this job loads {fingerprint}; re-run `persam fit` with the same --model-type/--checkpoint"
            )


def _check_values(concept: Concept, source: str) -> None:
    """Refuse vectors that parse but cannot be a fitted concept (zeroed, rescaled, unnormalised)."""
    redo = "re-create it with `persam fit`"
    feature_norm = float(np.linalg.norm(concept.target_feature.astype(np.float64)))
    if abs(feature_norm - 1.0) > UNIT_NORM_TOLERANCE:
        raise ConceptError(f"{source}: target_feature has norm {feature_norm:.6g} (expected 1); {redo}")
    embedding_norm = float(np.linalg.norm(concept.target_embedding.astype(np.float64)))
    low, high = EMBEDDING_NORM_RANGE
    if not low <= embedding_norm <= high:
        raise ConceptError(
            f"{source}: target_embedding has norm {embedding_norm:.6g} (expected {low:g} to {high:g}); {redo}")
    if concept.mask_weights is not None:
        total = float(concept.mask_weights.astype(np.float64).sum())
        if abs(total - 1.0) > WEIGHT_SUM_TOLERANCE:
            raise ConceptError(f"{source}: mask_weights sum to {total:.6g} (expected 1); {redo}")


def _vector(values: Sequence[float], length: int, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.shape != (length,):
        raise ValueError(f"{name}: expected {length} finite float32 numbers")
    with np.errstate(over="ignore"):
        single = array.astype(np.float32)
    if not np.all(np.isfinite(single)):  # checked after the cast: 1e39 is a finite double but inf in float32
        raise ValueError(f"{name}: expected {length} finite float32 numbers")
    return single


def reference_cells(encoded: Sequence[EncodedImage], masks: Sequence[np.ndarray], sources: Sequence[str],
                    model=None) -> Tensor:
    """Pool the features of the kept grid cells of every shot -> T: [n, 256].

    encoded[i].features: [256, 64, 64]; masks[i]: [H, W] bool at that image's size.
    model: the model that encoded them (Sam or SAM2Base): its input transform decides which
    grid cells a mask covers; None means SAM's (resize the longest side and pad).
    """
    grid = reference_mask_grid if model is None else as_backbone(model).mask_grid
    cells = []
    for image, mask, source in zip(encoded, masks, sources):
        if tuple(mask.shape) != tuple(image.original_size):
            raise ConceptError(
                f"{source}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is "
                f"{image.original_size[1]}x{image.original_size[0]}; give a mask of the image's size"
            )
        if not mask.any():
            raise ConceptError(f"{source}: mask is empty; give a mask with the object's pixels non-zero")
        keep = grid(mask, REFERENCE_MASK_VALUE).to(image.features.device)
        if not keep.any():
            raise ConceptError(
                f"{source}: mask is too small to cover any cell of the model's 64x64 feature grid; "
                f"it needs a blob of about {minimum_blob_pixels(mask.shape)} px across"
            )
        cells.append(image.features.permute(1, 2, 0)[keep])
    return torch.cat(cells, dim=0)


def minimum_blob_pixels(shape: tuple[int, int]) -> int:
    """Side of a square blob that surely covers one grid cell (16 px of the 1024 input)."""
    return int(math.ceil(2 * 16 * max(shape) / 1024))


def persam_targets(cells: Tensor) -> tuple[Tensor, Tensor]:
    """T: [n, 256] -> (t, e): PerSAM's unit target feature and target embedding, [256] each."""
    embedding = cells.mean(0).unsqueeze(0)
    feature = embedding / embedding.norm(dim=-1, keepdim=True)
    return feature[0], embedding[0]


def persam_f_target_feature(cells: Tensor) -> Tensor:
    """T: [n, 256] -> PerSAM-F's t = normalise(max(T) / 2 + mean(T) / 2): [256]."""
    pooled = (torch.max(cells, dim=0)[0] / 2 + cells.mean(0) / 2).unsqueeze(0)
    return (pooled / pooled.norm(dim=-1, keepdim=True))[0]


@dataclass(frozen=True)
class ConceptTensors:
    """A concept's vectors on the model's device: target_feature/target_embedding: [256]."""

    concept: Concept
    target_feature: torch.Tensor
    target_embedding: torch.Tensor
    mask_weights: torch.Tensor | None

    @classmethod
    def on(cls, concept: Concept, device: torch.device | str) -> "ConceptTensors":
        weights = None if concept.mask_weights is None else torch.as_tensor(concept.mask_weights, device=device)
        return cls(
            concept,
            torch.as_tensor(concept.target_feature, device=device),
            torch.as_tensor(concept.target_embedding, device=device),
            weights,
        )
