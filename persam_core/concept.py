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

from .predictor import EncodedImage
from .preprocess import reference_mask_grid

METHODS = ("persam", "persam-f")
FORMAT = "persam-concept/1"
FEATURE_DIM = 256


class ConceptError(ValueError):
    """A reference or concept file that cannot be used; the message says what to do."""


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
        try:
            document = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ConceptError(f"{source}: not a concept file ({error.__class__.__name__}); re-create it with `persam fit`") from None
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise ConceptError(f"{source}: not a {FORMAT} file; re-create it with `persam fit`")
        try:
            concept = cls(
                name=str(document["name"]),
                method=str(document["method"]),
                target_feature=_vector(document["target_feature"], FEATURE_DIM),
                target_embedding=_vector(document["target_embedding"], FEATURE_DIM),
                model_fingerprint=str(document["model_fingerprint"]),
                mask_weights=None if document.get("mask_weights") is None else _vector(document["mask_weights"], 3),
                references=tuple(str(r) for r in document.get("references", [])),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ConceptError(f"{source}: corrupt concept file ({error}); re-create it with `persam fit`") from None
        if concept.method not in METHODS or (concept.method == "persam-f") != (concept.mask_weights is not None):
            raise ConceptError(f"{source}: inconsistent method/mask weights; re-create it with `persam fit`")
        return concept

    def require_fingerprint(self, fingerprint: str, source: str = "concept") -> None:
        """Refuse a concept computed with other SAM weights."""
        if fingerprint != self.model_fingerprint:
            raise ConceptError(
                f"{source}: concept {self.name!r} was fitted with SAM weights {self.model_fingerprint}, "
                f"but this job loads {fingerprint}; re-run `persam fit` with the same --model-type/--checkpoint"
            )


def _vector(values: Sequence[float], length: int) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.shape != (length,) or not np.all(np.isfinite(array)):
        raise ValueError(f"expected {length} finite numbers")
    return array.astype(np.float32)


def reference_cells(encoded: Sequence[EncodedImage], masks: Sequence[np.ndarray], sources: Sequence[str]) -> Tensor:
    """Pool the features of the kept grid cells of every shot -> T: [n, 256].

    encoded[i].features: [256, 64, 64]; masks[i]: [H, W] bool at that image's size.
    """
    cells = []
    for image, mask, source in zip(encoded, masks, sources):
        if tuple(mask.shape) != tuple(image.original_size):
            raise ConceptError(
                f"{source}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is "
                f"{image.original_size[1]}x{image.original_size[0]}; give a mask of the image's size"
            )
        if not mask.any():
            raise ConceptError(f"{source}: mask is empty; give a mask with the object's pixels non-zero")
        keep = reference_mask_grid(mask).to(image.features.device)
        if not keep.any():
            raise ConceptError(
                f"{source}: mask is too small to cover any cell of SAM's 64x64 feature grid; "
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
