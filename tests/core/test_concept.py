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


def _with(field: str, values: list[float]) -> str:
    document = json.loads(_concept().to_json())
    document[field] = values
    return json.dumps(document)


def _unit() -> list[float]:
    return [float(v) for v in _concept().target_feature]


# name -> (damaged file text, field named in the message, phrase of the message)
IMPLAUSIBLE = {
    "zero_feature": (lambda: _with("target_feature", [0.0] * 256), "target_feature", "norm 0 (expected 1)"),
    "scaled_feature": (lambda: _with("target_feature", [v * 1e30 for v in _unit()]), "target_feature", "expected 1"),
    "half_feature": (lambda: _with("target_feature", [v / 2 for v in _unit()]), "target_feature", "norm 0.5"),
    "zero_embedding": (lambda: _with("target_embedding", [0.0] * 256), "target_embedding", "norm 0 "),
    "huge_embedding": (lambda: _with("target_embedding", [1e30] * 256), "target_embedding", "expected 1e-06 to 10000"),
    "float32_overflow": (lambda: _with("target_embedding", [1e39] * 256), "target_embedding", "finite"),
    "weights_sum_two": (lambda: _with("mask_weights", [0.5, 0.5, 1.0]), "mask_weights", "sum to 2"),
    "weights_nan": (lambda: _with("mask_weights", [float("nan"), 0.5, 0.5]), "mask_weights", "finite"),
}


@pytest.mark.parametrize("case", sorted(IMPLAUSIBLE))
def test_implausible_values_are_refused_naming_file_and_field(case):
    make, field, phrase = IMPLAUSIBLE[case]
    text = make()
    assert text != _concept().to_json()  # the damage really happened
    with pytest.raises(ConceptError) as error:
        Concept.from_json(text, source="concepts/x.json")
    message = str(error.value)
    assert message.startswith("concepts/x.json: ") and field in message, message
    assert phrase in message and "persam fit" in message and "\n" not in message, message


def test_values_within_the_tolerances_are_accepted():
    # float32 rounding of t and of the weights' sum stays far inside the tolerances.
    nudged = [v * (1 + 1e-5) for v in _unit()]
    assert Concept.from_json(_with("target_feature", nudged)).method == "persam-f"
    assert Concept.from_json(_with("mask_weights", [0.2, 0.3, 0.50001])).mask_weights is not None
    assert Concept.from_json(_concept("persam").to_json()).mask_weights is None
