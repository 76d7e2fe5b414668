"""The model-family registry: a new family is one registry entry, and everything asks it."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from persam_core.modeling.families import ModelError, family_of, family_of_model, input_format, model_types, register_family
from persam_core.modeling.models import build_random, model_fingerprint
from persam_core.modeling.sam_backbone import SamBackbone

from cli_tools import LOCAL, run_cli
from fresh_python import fresh_python
from toy_family import TOY, TOY_TYPE, ToySam, register, unregister

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture()
def toy_family():
    register()
    yield TOY
    unregister()


def test_builtin_families_own_their_model_types():
    assert {"vit_h", "vit_l", "vit_b", "vit_t", "tiny"} == set(family_of("vit_b").model_types)
    assert family_of("sam2.1_b+").tracks_with_memory and not family_of("vit_h").tracks_with_memory
    assert family_of("vit_h").tunable_decoder and not family_of("tiny_sam2").tunable_decoder
    assert model_types()[:5] == ("vit_h", "vit_l", "vit_b", "vit_t", "tiny")
    with pytest.raises(ModelError, match="unknown model type 'sam9'.*vit_h"):
        family_of("sam9")


def test_a_model_type_belongs_to_one_family(toy_family):
    with pytest.raises(ValueError, match="'tiny' already belongs to the 'sam' family"):
        register_family(type(TOY)(name="other", model_types=("tiny",), implementation=TOY.implementation,
                                  input_format=TOY.input_format))


def test_toy_family_builds_loads_and_adapts(toy_family):
    model = build_random(TOY_TYPE, 0)
    assert isinstance(model, ToySam) and family_of_model(model) is TOY
    assert isinstance(toy_family.implementation().adapter(model), SamBackbone)
    assert input_format(TOY_TYPE).family == "sam"
    # same weights as the tiny SAM of the same seed, but its own fingerprint (the type is named in it)
    assert model_fingerprint(model, TOY_TYPE) != model_fingerprint(build_random("tiny", 0), "tiny")


def _scene(path: Path, shift: int) -> None:
    image = np.full((96, 128, 3), 40, np.uint8)
    image[20 + shift:60 + shift, 30:80] = (220, 60, 50)
    Image.fromarray(image).save(path)


@pytest.mark.slow
def test_toy_family_runs_through_fit_segment_and_rank(toy_family, tmp_path):
    """fit -> segment -> rank with --model-type toy_tiny, --runner local: no edit under jobs/."""
    images = tmp_path / "images"
    images.mkdir()
    for n in range(3):
        _scene(images / f"{n}.jpg", 4 * n)
    mask = np.zeros((96, 128), np.uint8)
    mask[20:60, 30:80] = 255
    Image.fromarray(mask).save(tmp_path / "ref.png")
    model = ["--model-type", TOY_TYPE, "--checkpoint", "random:0", "--device", "cpu"]
    concept = tmp_path / "toy.json"
    fitted = run_cli(["fit", *model, "--image", str(images / "0.jpg"), "--mask", str(tmp_path / "ref.png"),
                      "--name", "toy", "--out", str(concept)])
    assert fitted.rc == 0, fitted.err
    segmented = run_cli(["segment", *model, *LOCAL, "--concept", str(concept), "--input", str(images),
                         "--output", str(tmp_path / "masks")])
    assert segmented.rc == 0, segmented.err
    rows = pq.read_table(tmp_path / "masks").to_pylist()
    assert len(rows) == 3 and {r["model_fingerprint"].split(":")[0] for r in rows} == {TOY_TYPE}
    ranked = run_cli(["rank", *model, *LOCAL, "--concept", str(concept), "--input", str(images),
                      "--output", str(tmp_path / "rank"), "--top-k", "1"])
    assert ranked.rc == 0, ranked.err
    assert len(pq.read_table(tmp_path / "rank" / "ranking.parquet").to_pylist()) == 3


FAMILY_MODULES = {"families.py", "sam_family.py", "sam2_family.py", "sam_backbone.py", "sam2_backbone.py",
                  "sam2_models.py", "video_sam2.py", "decoder_speed.py",
                  "dinov2.py", "dinov2_checkpoints.py"}  # DINOv2: its own sizes (vits14 .. tiny), not SAM's types


def _product_files():
    for package in ("persam_core", "jobs"):
        yield from sorted((REPO / package).rglob("*.py"))


def _asks_family(node: ast.AST) -> str | None:
    """What `node` asks about a model's family, if it does: is_sam2(...), isinstance(m, Sam /
    SAM2Base), or a comparison with a model type's or a family's name."""
    if isinstance(node, ast.Name) and node.id in {"is_sam2", "SAM2_MODEL_TYPES"}:
        return node.id
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance":
        names = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)} | {
            n.attr for n in ast.walk(node.args[1]) if isinstance(n, ast.Attribute)}
        if names & {"Sam", "SAM2Base"}:
            return "isinstance(..., " + "/".join(sorted(names & {"Sam", "SAM2Base"})) + ")"
    if isinstance(node, ast.Compare):
        for constant in (n for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)):
            if constant.value in model_types() or constant.value in {"sam", "sam2"} or constant.value.startswith("sam2"):
                return f"compares with {constant.value!r}"
    return None


def test_nothing_outside_the_families_asks_which_family_a_model_is():
    """Outside the family modules nothing asks which family a model is (decoder_speed.py
    wraps SAM's own decoder: its type guard is that module's own contract)."""
    found = []
    for path in _product_files():
        if path.name in FAMILY_MODULES:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            question = _asks_family(node)
            if question:
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {question}")
    assert found == []


def test_adapting_a_sam_model_does_not_import_sam2():
    code = ("import sys; from persam_core.modeling.families import as_backbone; from persam_core.modeling.models import build_random; "
            "as_backbone(build_random('tiny', 0)); print('sam2' in sys.modules)")
    assert fresh_python(code).strip() == "False"
