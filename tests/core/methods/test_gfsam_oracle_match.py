"""The product's GF-SAM (persam_core.methods) against the plain oracle (gfsam_oracle.py), pair by
pair: identical points, groups and labels, masks at IoU >= 0.98 at 1024 and at the original
size, same path, presence and prob score.

Scenes are small generated images (a reference colour on a background of another), chosen so
that the location map keeps tens of cells: with the tiny random SAM and DINOv2 that is few
decoder prompts. The deterministic SAM stand-ins (gfsam_standins.py) give several groups, the
fallback (with non-empty and with empty masks) and the no-points path, which random SAM weights
never reach.
"""

from __future__ import annotations

import numpy as np
import pytest
from segment_anything import SamPredictor

import gfsam_oracle as oracle
from gfsam_product import assert_matches_oracle, product_fit, product_predict
from gfsam_standins import (
    TokenStandIn, disc_around_point, empty_mask, fixed_disc, nearest_centre_disc, standin_decoder,
)

BACKGROUND = (60, 140, 70)
OBJECT = (220, 40, 40)


def scene(height: int, width: int, boxes, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """[H, W, 3] uint8 (a noisy background, OBJECT-coloured boxes) and its [H, W] 0/1 mask."""
    rng = np.random.default_rng(seed)
    image = (np.array(BACKGROUND) + rng.integers(0, 8, size=(height, width, 3))).clip(0, 255).astype(np.uint8)
    mask = np.zeros((height, width), np.uint8)
    for y0, y1, x0, x1 in boxes:
        image[y0:y1, x0:x1] = OBJECT
        mask[y0:y1, x0:x1] = 1
    return image, mask


REFERENCES = [scene(64, 96, [(20, 40, 30, 60)], seed=0), scene(80, 80, [(30, 50, 25, 45)], seed=2)]
TARGETS = {  # wide, tall and square, each with the object somewhere else
    "wide": scene(150, 260, [(30, 50, 20, 50), (100, 125, 200, 230)], seed=1)[0],
    "tall": scene(200, 90, [(40, 60, 20, 40)], seed=3)[0],
    "square": scene(120, 120, [(50, 70, 50, 70)], seed=4)[0],
}


@pytest.fixture(scope="module")
def dinov2():
    from persam_core.modeling.dinov2 import build_random_dinov2

    return build_random_dinov2("tiny", 0)


@pytest.fixture(scope="module")
def predictors(sam):
    """SamPredictor set on each target's frame, once (its features are the product's embeddings)."""
    out = {}
    for name, image in TARGETS.items():
        predictor = SamPredictor(sam)
        predictor.set_image(oracle.stretch_to_frame(image))
        out[name] = predictor
    return out


def both(sam, dinov2, shots: int, target: str, predictors, **predict):
    images = [image for image, _ in REFERENCES[:shots]]
    masks = [mask for _, mask in REFERENCES[:shots]]
    predictor = predictors[target]
    expected = oracle.oracle_predict(sam, dinov2, oracle.oracle_fit(dinov2, images, masks), TARGETS[target],
                                     predictor=predictor, **predict)
    result = product_predict(sam, dinov2, [product_fit(dinov2, images, masks)], [TARGETS[target]],
                             embeddings=predictor.features)
    return result[0], expected


@pytest.mark.parametrize("shots, target", [(1, "wide"), (2, "tall"), (1, "square")])
def test_random_weights_match_the_oracle(sam, dinov2, predictors, shots, target):
    result, expected = both(sam, dinov2, shots, target, predictors)
    assert len(expected["grid_points"]) > 1  # a real case: several prompts decoded
    assert_matches_oracle(result, expected)


@pytest.mark.parametrize("shape, shots, target, path, groups", [
    (disc_around_point(60), 1, "wide", "union", 2),  # a disc per point: a group per object
    (disc_around_point(20), 2, "tall", "union", None),  # each disc covers its own point only
    # discs away from the objects: no label 1, the fallback picks among label-2 scores
    (nearest_centre_disc([(200, 300), (800, 700)], 120), 2, "wide", "fallback", 2),
    # one disc off the object, covering no point: a group per point, nothing grows, non-empty fallback
    (fixed_disc(1000, 20, 15), 1, "tall", "fallback", None),
    (empty_mask(), 1, "wide", "fallback", None),  # every mask empty: a group per point, empty fallback
], ids=["discs", "singletons", "two-centres", "fallback", "fallback-empty"])
def test_standin_masks_match_the_oracle(sam, predictors, shape, shots, target, path, groups):
    dinov2 = TokenStandIn(0)
    with standin_decoder(sam, shape):
        result, expected = both(sam, dinov2, shots, target, predictors)
    assert expected["path"] == path
    if groups is not None:  # the case is what its id says
        assert len(set(expected["groups"].tolist())) == groups
    assert_matches_oracle(result, expected)


def test_no_points_matches_the_oracle(sam, predictors):
    """A thin reference mask between the weights' align_corners samples: all-zero weights, no points."""
    image, _ = REFERENCES[0]
    mask = np.zeros((1024, 1024), np.uint8)  # framed on its own: it need not match the image's size
    mask[10, 100:900] = 1  # between the align_corners samples at rows 0 and 28.4
    dinov2 = TokenStandIn(0)
    expected = oracle.oracle_predict(sam, dinov2, oracle.oracle_fit(dinov2, [image], [mask]), TARGETS["wide"],
                                     predictor=predictors["wide"])
    result = product_predict(sam, dinov2, [product_fit(dinov2, [image], [mask])], [TARGETS["wide"]],
                             embeddings=predictors["wide"].features)[0]
    assert expected["path"] == "no_points"
    assert_matches_oracle(result, expected)
    assert result.mask.shape == TARGETS["wide"].shape[:2] and not result.mask.any()
    assert result.points.shape == (0, 2)
