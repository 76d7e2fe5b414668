"""Concept files: exact round trip, and every corrupt, truncated or foreign file refused clearly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from persam_core.concept import Concept, ConceptError


def _concept(method: str = "persam-f") -> Concept:
    generator = np.random.default_rng(0)
    feature = generator.standard_normal(256).astype(np.float32)
    weights = np.array([0.2, 0.3, 0.5], dtype=np.float32) if method == "persam-f" else None
    return Concept("mug", method, feature / np.linalg.norm(feature), feature, "vit_b:0123456789abcdef", weights, ("s3://b/a.jpg",))


def test_round_trip_is_bit_identical():
    concept = _concept()
    again = Concept.from_json(concept.to_json())
    assert again.target_feature.tobytes() == concept.target_feature.tobytes()
    assert again.mask_weights.tobytes() == concept.mask_weights.tobytes()
    assert (again.name, again.method, again.model_fingerprint, again.references) == (
        concept.name, concept.method, concept.model_fingerprint, concept.references)


@pytest.mark.parametrize("damage", [
    lambda text: text[: len(text) // 2],                       # truncated
    lambda text: "",                                           # empty
    lambda text: "\x89PNG\r\n\x1a\n garbage",                  # a foreign binary file
    lambda text: json.dumps({"format": "something-else/1"}),   # foreign JSON
    lambda text: text.replace('"target_feature": [', '"target_feature": [1e999, '),  # wrong length / not finite
    lambda text: text.replace('"persam-f"', '"persam"'),       # method and weights disagree
])
def test_damaged_concept_files_are_refused_with_the_file_named(damage):
    with pytest.raises(ConceptError) as error:
        Concept.from_json(damage(_concept().to_json()), source="concepts/mug.json")
    message = str(error.value)
    assert message.startswith("concepts/mug.json:") and "persam fit" in message and "\n" not in message


def test_other_weights_are_refused_before_any_work():
    with pytest.raises(ConceptError, match="re-run `persam fit`"):
        _concept().require_fingerprint("vit_b:ffffffffffffffff", "concepts/mug.json")
