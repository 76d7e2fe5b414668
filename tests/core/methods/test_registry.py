"""The method registry: a third method registered from this file alone runs through `fit` and
`segment` (--runner local) and names itself in the rows; no code outside the registry
compares a method name."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch
from PIL import Image

from persam_core.batch import EncodedBatch
from persam_core.host_results import HostResults, host_results_of
from persam_core.concept import Concept, ConceptTensors
from persam_core.methods import registry
from persam_core.methods.persam import fit_persam
from persam_core.methods.registry import FRAME_MODEL, get_method, method_names
from persam_core.modeling.predictor import predict
from persam_core.prior import positive_points, similarity_maps, upsample_similarities
from tests.cli_tools import LOCAL, MODEL, run_cli

REPO = Path(__file__).resolve().parents[3]


class PeakEngine:
    """The toy: one SAM decode (single mask) at the peak of the location prior, no PerSAM hooks."""

    frame = FRAME_MODEL
    needs_dinov2 = False
    ranks = True

    def on_device(self, concepts, device):
        return [ConceptTensors.on(c, device) for c in concepts]

    def _peaks(self, sam, images, concepts):
        batch = EncodedBatch.of([i.encoded for i in images])
        similarity = similarity_maps(batch.features, torch.stack([c.target_feature for c in concepts]))
        for b, image in enumerate(images):
            up = upsample_similarities(sam, similarity[b], image.encoded.input_size, image.encoded.original_size)
            yield b, image, positive_points(up), up.flatten(1).amax(1)

    def segment(self, sam, images, concepts, max_instances, min_similarity) -> HostResults:
        masks, image_index, concept_index, score, similarity, points = [], [], [], [], [], []
        for b, image, peak, best in self._peaks(sam, images, concepts):
            for k in range(len(concepts)):
                point = peak[k].cpu().numpy()
                decoded = predict(sam, image.encoded, point[None], np.array([1]), multimask_output=False)
                masks.append((decoded.high_res(0) > sam.mask_threshold).cpu().numpy())
                image_index.append(b), concept_index.append(k), points.append(point)
                score.append(float(decoded.scores[0])), similarity.append(float(best[k]))
        return host_results_of(masks, image_index, concept_index, [True] * len(masks), score, similarity, points)

    def score(self, sam, images, concepts):
        peaks = list(self._peaks(sam, images, concepts))
        return (np.stack([best.cpu().numpy() for *_, best in peaks]).astype(np.float32),
                np.stack([peak.cpu().numpy() for _, _, peak, _ in peaks]).astype(np.int32))


class PeakMethod:
    name = "peak-toy"
    engine = PeakEngine()

    def fit(self, shots, models, log):
        sam, fingerprint = models.sam()
        return fit_persam(shots, sam, fingerprint, self.name, False, log)

    def concept_from_document(self, document: Mapping[str, Any], source: str) -> Concept:
        return Concept.from_document(dict(document), source)

    def accepts(self, concept: Any) -> bool:
        return isinstance(concept, Concept) and concept.mask_weights is None


@pytest.fixture
def toy_method():
    registry.register(PeakMethod())
    yield PeakMethod.name
    registry.unregister(PeakMethod.name)


def _scene(path: Path, size: tuple[int, int], seed: int) -> Path:
    rng = np.random.default_rng(seed)
    image = (rng.random((*size, 3)) * 50 + 60).astype(np.uint8)
    image[size[0] // 4: size[0] * 3 // 4, size[1] // 3: size[1] * 2 // 3] = (210, 50, 40)
    Image.fromarray(image).save(path)
    return path


def test_a_method_registered_from_the_tests_runs_through_fit_segment_and_rank(toy_method, tmp_path):
    lake = tmp_path / "lake"
    lake.mkdir()
    image = _scene(tmp_path / "ref.png", (48, 64), 0)
    mask = np.zeros((48, 64), np.uint8)
    mask[12:36, 21:43] = 255
    Image.fromarray(mask).save(tmp_path / "ref_mask.png")
    for index, size in enumerate([(40, 56), (64, 40)]):
        _scene(lake / f"{index}.png", size, index + 1)
    concept = tmp_path / "toy.json"
    fit = run_cli(["fit", *MODEL, "--method", toy_method, "--image", str(image), "--mask", str(tmp_path / "ref_mask.png"),
                   "--name", "toy", "--out", str(concept)])
    assert fit.rc == 0, fit.err
    assert get_method(toy_method).accepts(registry.load_concept(concept.read_text()))

    out = tmp_path / "out"
    segment = run_cli(["segment", *MODEL, *LOCAL, "--concept", str(concept), "--input", str(lake), "--output", str(out)])
    assert segment.rc == 0, segment.err
    rows = ds.dataset(str(out), format="parquet", partitioning="hive").to_table().to_pylist()
    assert len(rows) == 2 and {r["method"] for r in rows} == {toy_method}
    assert all(r["error"] is None and r["present"] for r in rows)
    assert {(r["width"], r["height"]) for r in rows} == {(56, 40), (40, 64)}

    ranked = run_cli(["rank", *MODEL, *LOCAL, "--concept", str(concept), "--input", str(lake),
                      "--output", str(tmp_path / "rank"), "--top-k", "1"])
    assert ranked.rc == 0, ranked.err
    ranking = ds.dataset(str(tmp_path / "rank" / "ranking.parquet"), format="parquet").to_table().to_pylist()
    assert len(ranking) == 2 and [r["rank"] for r in ranking] == [1, 2]
    assert [r["mask_rle"] is not None for r in ranking] == [True, False]  # masks for the top k only


def test_an_unregistered_method_is_refused_with_the_names():
    with pytest.raises(registry.ConceptError, match="persam, persam-f, gf-sam"):
        get_method("no-such-method")
    assert method_names()[:3] == ("persam", "persam-f", "gf-sam")


def _method_literals(node: ast.AST, names: set[str]) -> list[str]:
    """Method names spelled as string constants in the operands of a comparison."""
    found = []
    for operand in [node.left, *node.comparators]:
        for leaf in ast.walk(operand):
            if isinstance(leaf, ast.Constant) and isinstance(leaf.value, str) and leaf.value in names:
                found.append(leaf.value)
    return found


def test_no_code_outside_the_registry_compares_a_method_name():
    names = set(method_names())
    offenders = []
    for package in ("persam_core", "jobs"):
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Compare) and _method_literals(node, names):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, f"method names compared outside the registry: {offenders}"
