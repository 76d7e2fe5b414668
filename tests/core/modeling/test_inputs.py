"""persam_core.modeling.inputs: each model family's CPU-side input contract, chosen by model type alone.

The job's CPU stages resize with `input_format(model_type).resize` and size the embedding
cache by `high_res_shapes`, without building the model; both must be exactly what the model's
own backbone does, and choosing them must not import sam2 (whose import starts hydra).
"""

from __future__ import annotations

import numpy as np
import pytest

from persam_core.modeling.families import as_backbone
from persam_core.modeling.families import input_format
from persam_core.modeling.inputs import SAM2_HIGH_RES_SHAPES
from persam_core.modeling.models import ModelError
from persam_core.modeling.predictor import encode_images

from fresh_python import fresh_python

IMAGE = np.random.default_rng(3).integers(0, 256, (230, 410, 3), dtype=np.uint8)


@pytest.mark.parametrize("fixture, model_type, dtype, shape", [
    ("tiny_sam", "tiny", np.uint8, (574, 1024, 3)),
    ("tiny_sam2", "tiny_sam2", np.float32, (1024, 1024, 3)),
])
def test_resize_by_type_is_the_backbones_resize(request, fixture, model_type, dtype, shape):
    ours, theirs = input_format(model_type).resize(IMAGE), as_backbone(request.getfixturevalue(fixture)).resize(IMAGE)
    assert ours.pixels.dtype == dtype and ours.pixels.shape == shape
    assert np.array_equal(ours.pixels, theirs.pixels) and ours.original_size == theirs.original_size == (230, 410)


def test_a_read_only_image_resizes_the_same(tiny_sam2):
    frozen = IMAGE.copy()
    frozen.flags.writeable = False  # what a decoded PIL image is
    assert np.array_equal(input_format("tiny_sam2").resize(frozen).pixels, input_format("tiny_sam2").resize(IMAGE).pixels)


def test_high_res_shapes_are_what_the_sam2_encoder_hands_the_decoder(tiny_sam2):
    encoded = encode_images(tiny_sam2, [input_format("tiny_sam2").resize(IMAGE)])[0]
    assert tuple(tuple(level.shape) for level in encoded.high_res) == SAM2_HIGH_RES_SHAPES
    assert all(input_format(t).high_res_shapes == SAM2_HIGH_RES_SHAPES for t in ("sam2.1_t", "sam2.1_b+", "sam2.1_l"))
    assert input_format("vit_h").high_res_shapes == () and input_format("vit_h").family == "sam"


def test_unknown_type_is_one_clear_error():
    with pytest.raises(ModelError, match="unknown model type 'sam3'"):
        input_format("sam3")


def test_choosing_sam2s_input_format_does_not_import_sam2():
    code = ("import sys, numpy as np; from persam_core.modeling.families import input_format; "
            "r = input_format('sam2.1_b+').resize(np.zeros((20, 30, 3), np.uint8)); "
            "assert r.pixels.shape == (1024, 1024, 3); print('sam2' in sys.modules)")
    assert fresh_python(code).strip() == "False"
