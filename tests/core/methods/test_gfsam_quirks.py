"""Each of GF-SAM's quirks (the GF-SAM contract §6) changes the product's result when turned off
(gfsam_quirks.FAITHFUL), and where the oracle has the same switch, the product follows it
there too. Quirks 1-2 (token-axis normalisation, x_prenorm) and the no-antialias half of 3
belong to DINOv2's forward (persam_core/modeling/dinov2.py) and are tested with it.

Priors by design: target tokens e0 on two clusters of cells and e1 elsewhere, a reference of
e0 on the same cells (every cosine 0 or 1), so the location map keeps exactly those cells;
masks by design: the deterministic SAM stand-ins.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

import gfsam_oracle as oracle
from gfsam_product import iou
from gfsam_standins import (
    FixedTokens, by_region, disc_around_point, hand_reference, standin_decoder, two_kind_tokens,
)
from persam_core.methods import gfsam_quirks
from persam_core.methods.gfsam_batch import segment_gfsam
from persam_core.methods.gfsam_frames import frame_mask, stretch_frame
from persam_core.methods.gfsam_reference import GFSAMReference, fit_reference, reference_weights
from persam_core.modeling.dinov2 import normalise_tokens

CLUSTER_A = [(x, y) for x in range(4, 9) for y in range(4, 9)]
CLUSTER_B = [(x, y) for x in range(26, 31) for y in range(24, 29)]
CELLS = CLUSTER_A + CLUSTER_B
SIZE = (150, 260)



@pytest.fixture(scope="module")
def predictor(sam):
    predictor = SamPredictor(sam)
    predictor.set_image(np.zeros((1024, 1024, 3), np.uint8))  # the stand-in decoder ignores the features
    return predictor


def product(sam, shape, cells=CELLS, reference=None, **off):
    """The product on the designed case, with the quirks named in `off` turned off."""
    reference = reference or hand_reference(cells)
    concept = GFSAMReference(*(reference[key].numpy() for key in ("tokens", "wpos", "wneg")))
    tokens = normalise_tokens(two_kind_tokens(cells)[None])
    quirks = dataclasses.replace(gfsam_quirks.Quirks(), **off)
    saved, gfsam_quirks.FAITHFUL = gfsam_quirks.FAITHFUL, quirks
    try:
        with standin_decoder(sam, shape):
            return segment_gfsam(sam, torch.zeros(1, 256, 64, 64), tokens, [concept], [SIZE])[0]
    finally:
        gfsam_quirks.FAITHFUL = saved


def expected(sam, predictor, shape, cells=CELLS, **off):
    """The oracle on the same case, with its own switches turned off."""
    with standin_decoder(sam, shape):
        return oracle.oracle_predict(sam, FixedTokens(two_kind_tokens(cells)), hand_reference(cells),
                                     np.zeros((*SIZE, 3), np.uint8), quirks=oracle.Quirks(**off), predictor=predictor)


def same_points(result, reference: dict) -> bool:
    return (np.array_equal(result.points.numpy(), reference["grid_points"])
            and np.array_equal(result.groups.numpy(), reference["groups"])
            and np.array_equal(result.labels.numpy(), reference["labels"]))


def differs(a, b) -> bool:
    return (a.path != b.path or not torch.equal(a.points, b.points) or not torch.equal(a.groups, b.groups)
            or not torch.equal(a.labels, b.labels) or iou(a.mask_1024, b.mask_1024) < 0.999
            or not torch.allclose(a.cls_scores, b.cls_scores))


def test_the_faithful_case_matches_the_oracle(sam, predictor):
    shape = disc_around_point(60)
    assert same_points(product(sam, shape), expected(sam, predictor, shape))


def test_pil_stretch():  # 3: PIL's bilinear antialiases when it shrinks
    image = np.random.default_rng(0).integers(0, 256, size=(1500, 1300, 3)).astype(np.uint8)
    faithful = stretch_frame(image)
    gfsam_quirks.FAITHFUL, saved = gfsam_quirks.Quirks(pil_stretch=False), gfsam_quirks.FAITHFUL
    try:
        plain = stretch_frame(image)
    finally:
        gfsam_quirks.FAITHFUL = saved
    assert np.abs(faithful.astype(int) - plain.astype(int)).mean() > 5


def test_align_corners_weights(monkeypatch):  # 4: a thin mask between the samples weighs nothing
    mask = torch.zeros(1, 1024, 1024)
    mask[0, 13, 100:900] = 1  # align_corners=True samples rows 0 and 28.4; False reads rows 13-14
    assert reference_weights(mask)[0].sum() == 0
    monkeypatch.setattr(gfsam_quirks, "FAITHFUL", gfsam_quirks.Quirks(align_corners_weights=False))
    assert reference_weights(mask)[0].sum() > 0


def test_masked_tokens_give_zeros_to_the_max_prior(monkeypatch):  # 5, first half
    """Target cells opposite to the reference (-e0) have cosine -1 with every masked token: the
    max prior is 0 there only because the unmasked tokens count (with zero weight)."""
    from persam_core.methods.gfsam_points import find_points, location_map
    from persam_core.methods.gfsam_priors import pair_priors
    from persam_core.methods.gfsam_reference import as_stack

    reference = hand_reference(CLUSTER_A)
    stack = as_stack([GFSAMReference(*(reference[key].numpy() for key in ("tokens", "wpos", "wneg")))],
                     torch.device("cpu"))
    target = two_kind_tokens(CLUSTER_A)
    for x, y in CLUSTER_B:
        target[y * 37 + x] = 0.0
        target[y * 37 + x, 0] = -1.0
    tokens = normalise_tokens(target[None])

    def points():
        return find_points(location_map(pair_priors(stack, tokens, [(0, 0)])))

    faithful = points()
    monkeypatch.setattr(gfsam_quirks, "FAITHFUL", gfsam_quirks.Quirks(zero_in_max=False))
    off = points()
    cells = lambda p: {tuple(c) for c in p.cells[0, : int(p.count[0])].tolist()}  # noqa: E731
    assert cells(faithful) <= set(CLUSTER_A) and cells(off) & set(CLUSTER_B)


def test_mean_prior_over_the_mean_weight(monkeypatch):  # 5, second half: it sets the growth's region
    from gfsam_product import product_fit, tokens_of
    from gfsam_standins import TokenStandIn
    from persam_core.methods.gfsam_priors import pair_priors
    from persam_core.methods.gfsam_reference import as_stack
    from test_gfsam_oracle_match import REFERENCES, TARGETS

    dinov2 = TokenStandIn(0)
    stack = as_stack([product_fit(dinov2, [REFERENCES[0][0]], [REFERENCES[0][1]])], torch.device("cpu"))
    tokens = tokens_of(dinov2, [stretch_frame(TARGETS["wide"])])

    def positive_region():
        priors = pair_priors(stack, tokens, [(0, 0)])
        half = (priors.apos.amax() + priors.apos.amin()) / 2
        return priors.apos, priors.apos**2 > priors.aneg * half  # the GF-SAM contract 4.7's pos

    apos, faithful = positive_region()
    monkeypatch.setattr(gfsam_quirks, "FAITHFUL", gfsam_quirks.Quirks(mean_over_weight=False))
    plain, off = positive_region()
    ratio = apos / plain  # one factor: 1 / (mean(w) + 1e-7)
    assert torch.allclose(ratio, ratio[0, 0].expand_as(ratio), rtol=1e-4) and float(ratio[0, 0]) > 2
    assert not torch.equal(faithful, off)


def test_joint_empty_rule(sam, monkeypatch):  # 6: the centre square only when every shot is empty
    filled, empty = torch.zeros(1024, 1024), torch.zeros(1024, 1024)
    filled[300:600, 300:600] = 1
    tokens = torch.randn(2, 1369, 4)
    joint = fit_reference(tokens, torch.stack([filled, empty]))
    monkeypatch.setattr(gfsam_quirks, "FAITHFUL", gfsam_quirks.Quirks(joint_empty_rule=False))
    per_shot = fit_reference(tokens, torch.stack([filled, empty]))
    assert joint.wpos[1].sum() == 0 and per_shot.wpos[1].sum() == 1  # the rescue's one align_corners sample
    assert np.array_equal(joint.wpos[0], per_shot.wpos[0])


# Designed cases where each graph quirk decides (the stand-in's disc radius sets the edges:
# 20 px covers only the point's own corner, 60 px its neighbours' too).
SMALL, LARGE = disc_around_point(20), disc_around_point(60)
ONE_WAY = by_region([((0, 0, 180, 1024), disc_around_point(80))], disc_around_point(10))


@pytest.mark.parametrize("quirk, shape, oracle_name", [
    ("strict", SMALL, "strict"),  # 7
    ("topk_from_sum", SMALL, None),  # 8: 50 cells kept, the sum is just under 50
    ("corner_points", LARGE, "corner_points"),  # 9
    # 10: bilinear footprints reach the neighbours (the oracle's switch for it fails on its own:
    # its bilinear branch keeps a channel axis)
    ("nearest_adjacency", SMALL, None),
    ("weak_components", ONE_WAY, "weak_components"),  # 11: large discs cover small ones one way
    ("last_cls_score", LARGE, None),  # 12
    ("distance_zero_is_one", SMALL, "distance_zero_one"),  # 13
])
def test_graph_quirks_change_the_result(sam, predictor, quirk, shape, oracle_name):
    faithful, off = product(sam, shape), product(sam, shape, **{quirk: False})
    assert differs(faithful, off)
    if quirk == "topk_from_sum":
        assert (len(faithful.points), len(off.points)) == (49, 50)
    if oracle_name is not None and quirk != "weak_components":  # scipy numbers strong components otherwise
        assert same_points(off, expected(sam, predictor, shape, **{oracle_name: False}))


def test_dinov2_quirks_change_the_points():
    """Quirks 1-3 on DINOv2's side (persam_core.modeling.dinov2): the token-axis normalisation,
    x_prenorm rather than the final norm's output, and no antialias on 1024 -> 518; each moves
    the points of a designed scene (the tiny random DINOv2)."""
    import torch.nn.functional as F

    from gfsam_product import frame_pixels
    from persam_core.methods.gfsam_points import find_points, location_map
    from persam_core.methods.gfsam_priors import pair_priors
    from persam_core.methods.gfsam_reference import as_stack
    from persam_core.modeling.dinov2 import build_random_dinov2, dinov2_input, prenorm_tokens
    from test_gfsam_oracle_match import REFERENCES, TARGETS

    model = build_random_dinov2("tiny", 0)
    (image, mask), target = REFERENCES[0], TARGETS["wide"]
    pixels = frame_pixels([stretch_frame(image), stretch_frame(target)])
    masks = frame_mask(mask)[None]

    def dino_pixels(antialias: bool) -> torch.Tensor:
        small = F.interpolate(pixels, size=(518, 518), mode="bilinear", align_corners=False, antialias=antialias)
        mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
        return (small - mean) / torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)

    def points(axis=1, final_norm=False, antialias=False):
        tokens = prenorm_tokens(model, dino_pixels(antialias))
        if final_norm:
            tokens = model.norm(tokens)
        tokens = F.normalize(tokens, dim=axis)
        stack = as_stack([fit_reference(tokens[:1], masks)], torch.device("cpu"))
        found = find_points(location_map(pair_priors(stack, tokens[1:], [(0, 0)])))
        return found.cells[0, : int(found.count[0])]

    assert torch.equal(dinov2_input(pixels), dino_pixels(False))  # the product's input is the faithful one
    faithful = points()
    for variant in ({"axis": 2}, {"final_norm": True}, {"antialias": True}):
        off = points(**variant)
        assert off.shape != faithful.shape or not torch.equal(off, faithful), variant
