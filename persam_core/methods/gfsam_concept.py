"""The GF-SAM concept file: per shot the DINOv2 tokens and the two weight maps, as JSON.

GF-SAM never runs SAM on a reference, so a concept depends on DINOv2's weights only (their
fingerprint is checked against the job's before any work) and not on SAM's. Arrays travel as
base64 of their little-endian float32 bytes with the shape and dtype declared beside them:
the round trip is exact, and nothing is unpickled. For ViT-L a shot is 5.35 MiB of tokens
(about 7.1 MiB of base64).

    {"format": "persam-gfsam-concept/1", "name", "method", "dinov2": kind, "dinov2_fingerprint",
     "tokens": {"dtype": "<f4", "shape": [S, 1369, C], "base64": ...},
     "wpos": {... [S, 1369]}, "wneg": {... [S, 1369]}, "references": [image names]}

Validated on load, each refusal naming the field: shapes (C must be the DINOv2 kind's width),
dtype, finite values, weights in [0, 1], tokens normalised along the token axis (each channel's
L2 norm over the 1369 tokens of a shot is 1, or 0 for a channel that is zero everywhere), and
the reference not empty. An *empty reference* is one whose positive weights are zero for
every shot: GF-SAM would find no point on any image (upstream crashes there), so `persam fit`
refuses such masks and a file holding one is refused. A single shot with zero weights among
others is legal (the GF-SAM contract §3: it contributes nothing to the positive priors).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from ..modeling.dinov2 import DINOV2_TYPES, dinov2_width
from .gfsam_reference import TOKENS, GFSAMReference
from .registry import ConceptError, get_method, parse_concept_file

FORMAT = "persam-gfsam-concept/1"
DTYPE = "<f4"
# Tokens are written as normalised float32 columns: a channel's norm is 1 within ~1e-6 (or
# exactly 0); 1e-3 leaves room for rounding yet catches a rescaled or per-token-normalised file.
CHANNEL_NORM_TOLERANCE = 1e-3
REDO = "re-create it with `persam fit --method gf-sam`"


def encode_array(array: np.ndarray) -> dict[str, Any]:
    """float32 array -> {"dtype", "shape", "base64"} (little-endian bytes, exact)."""
    data = np.ascontiguousarray(array, dtype=DTYPE)
    return {"dtype": DTYPE, "shape": list(data.shape), "base64": base64.b64encode(data.tobytes()).decode("ascii")}


def decode_array(entry: Any, name: str, source: str) -> np.ndarray:
    """The inverse of encode_array; a ConceptError naming `name` for anything else."""
    if not isinstance(entry, Mapping) or entry.get("dtype") != DTYPE or not isinstance(entry.get("base64"), str):
        raise ConceptError(f"{source}: {name} is not a {DTYPE} array entry (dtype, shape, base64); {REDO}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in shape):
        raise ConceptError(f"{source}: {name} has no valid shape; {REDO}")
    try:
        raw = base64.b64decode(entry["base64"], validate=True)
    except (binascii.Error, ValueError):
        raise ConceptError(f"{source}: {name} is not valid base64; {REDO}") from None
    count = int(np.prod(shape, dtype=np.int64))
    if len(raw) != count * 4:
        raise ConceptError(f"{source}: {name} holds {len(raw)} bytes, its shape {shape} needs {count * 4}; {REDO}")
    return np.frombuffer(raw, DTYPE).reshape(shape).astype(np.float32)


@dataclass(frozen=True)
class GFSAMConcept:
    """A GF-SAM concept: the reference (tokens [S, 1369, C], wpos / wneg [S, 1369] float32)
    and the DINOv2 it was computed with (kind and weights fingerprint)."""

    name: str
    method: str
    dinov2: str
    dinov2_fingerprint: str
    reference: GFSAMReference
    references: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> str:
        return json.dumps({
            "format": FORMAT, "name": self.name, "method": self.method, "dinov2": self.dinov2,
            "dinov2_fingerprint": self.dinov2_fingerprint, "tokens": encode_array(self.reference.tokens),
            "wpos": encode_array(self.reference.wpos), "wneg": encode_array(self.reference.wneg),
            "references": list(self.references),
        })

    @classmethod
    def from_json(cls, text: str, source: str = "concept") -> "GFSAMConcept":
        return cls.from_document(parse_concept_file(text, source), source)

    @classmethod
    def from_document(cls, document: Any, source: str = "concept") -> "GFSAMConcept":
        if not isinstance(document, Mapping) or document.get("format") != FORMAT:
            raise ConceptError(f"{source}: not a {FORMAT} file; {REDO}")
        strings = {}
        for key in ("name", "method", "dinov2", "dinov2_fingerprint"):
            if not isinstance(document.get(key), str) or not document[key]:
                raise ConceptError(f"{source}: {key} missing or not a string; {REDO}")
            strings[key] = document[key]
        references = document.get("references", [])
        if not isinstance(references, list):
            raise ConceptError(f"{source}: references is not a list; {REDO}")
        reference = GFSAMReference(*(decode_array(document.get(key), key, source) for key in ("tokens", "wpos", "wneg")))
        concept = cls(reference=reference, references=tuple(str(r) for r in references), **strings)
        try:
            accepted = get_method(concept.method).accepts(concept)
        except ConceptError:
            accepted = False
        if not accepted:
            raise ConceptError(f"{source}: method {concept.method!r} does not read GF-SAM concepts; {REDO}")
        check_reference(reference, concept.dinov2, source)
        return concept

    @property
    def sam_fingerprint(self) -> str | None:
        """None: a GF-SAM concept does not depend on SAM's weights."""
        return None

    @property
    def weights_note(self) -> str:
        return f"DINOv2 {self.dinov2} weights {self.dinov2_fingerprint}"

    def require_models(self, sam_fingerprint: str | None, dinov2: tuple[str, str | None] | None,
                       source: str = "concept") -> None:
        """Refuse a concept of another DINOv2 (kind, then weights when known). SAM's weights
        are not checked: GF-SAM never runs SAM on a reference."""
        if dinov2 is None:
            return
        kind, fingerprint = dinov2
        if kind != self.dinov2:
            raise ConceptError(f"{source}: concept {self.name!r} was fitted with --dinov2 {self.dinov2}, but this job "
                               f"runs --dinov2 {kind}; pass --dinov2 {self.dinov2} (and its --dinov2-checkpoint)")
        if fingerprint is not None and fingerprint != self.dinov2_fingerprint:
            raise ConceptError(
                f"{source}: concept {self.name!r} was fitted with DINOv2 weights {self.dinov2_fingerprint}, but this "
                f"job loads {fingerprint}; re-run `persam fit --method gf-sam` with the same --dinov2/--dinov2-checkpoint")


def check_reference(reference: GFSAMReference, kind: str, source: str) -> None:
    """Refuse a reference of the wrong shape, with non-finite values, weights outside [0, 1],
    tokens not normalised along the token axis, or no positive weight in any shot."""
    if kind not in DINOV2_TYPES:
        raise ConceptError(f"{source}: dinov2 {kind!r} is not one of {', '.join(DINOV2_TYPES)}; {REDO}")
    tokens, wpos, wneg = reference.tokens, reference.wpos, reference.wneg
    width = dinov2_width(kind)
    if tokens.ndim != 3 or tokens.shape[0] < 1 or tokens.shape[1:] != (TOKENS, width):
        raise ConceptError(f"{source}: tokens has shape {list(tokens.shape)}, expected [shots, {TOKENS}, {width}] "
                           f"for DINOv2 {kind}; {REDO}")
    shots = tokens.shape[0]
    for name, weights in (("wpos", wpos), ("wneg", wneg)):
        if weights.shape != (shots, TOKENS):
            raise ConceptError(f"{source}: {name} has shape {list(weights.shape)}, expected [{shots}, {TOKENS}]; {REDO}")
    for name, array in (("tokens", tokens), ("wpos", wpos), ("wneg", wneg)):
        if not np.all(np.isfinite(array)):
            raise ConceptError(f"{source}: {name} holds non-finite values; {REDO}")
    for name, weights in (("wpos", wpos), ("wneg", wneg)):
        if weights.min() < 0 or weights.max() > 1:
            raise ConceptError(f"{source}: {name} has weights outside [0, 1]; {REDO}")
    norms = np.sqrt(np.square(tokens.astype(np.float64)).sum(axis=1))  # [S, C]: each channel over the tokens
    off = np.abs(norms - 1.0) > CHANNEL_NORM_TOLERANCE
    if np.any(off & (norms != 0)):
        raise ConceptError(f"{source}: tokens are not normalised along the token axis (a channel's norm is "
                           f"{float(norms[off & (norms != 0)][0]):.6g}, expected 1); {REDO}")
    if not np.any(wpos > 0):
        raise ConceptError(f"{source}: wpos is zero for every shot (an empty reference: GF-SAM would find no "
                           f"point on any image); {REDO} and masks that cover the object")
