"""The GF-SAM oracle itself, on cases whose answers are known by hand (the GF-SAM contract sections).

Priors by design: `FixedTokens(two_kind_tokens(cells))` gives the target tokens e0 on chosen
cells and e1 elsewhere, and the reference below is e0 on its own cells with wpos = 1 there,
so every cosine is 0 or 1: Apos ~ 1 and Mpos = 1 on the chosen cells, 0 elsewhere, and the
location map keeps exactly the chosen cells. Masks by design: `standin_decoder`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything import SamPredictor
from torch.nn import functional as F

import gfsam_oracle as oracle
from gfsam_standins import (
    FixedTokens, TokenStandIn, by_region, cells_mask, disc_around_point, disc_mask, empty_mask, fixed_disc,
    hand_reference, standin_decoder, two_kind_tokens,
)

CLUSTER_A = [(x, y) for x in range(4, 9) for y in range(4, 9)]  # 25 cells, top left
CLUSTER_B = [(x, y) for x in range(26, 31) for y in range(24, 29)]  # 25 cells, bottom right
TARGET_SHAPE = (150, 260)  # H, W: not square, so the original-size mask is a real resize


def corner_pixel(cell: int) -> int:
    return int(cell * 1024 / 37)



@pytest.fixture(scope="module")
def target() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, size=(*TARGET_SHAPE, 3)).astype(np.uint8)


@pytest.fixture(scope="module")
def predictor(sam, target):
    """SAM set on the target's frame once (the stand-in decoder ignores the embedding)."""
    predictor = SamPredictor(sam)
    predictor.set_image(oracle.stretch_to_frame(target))
    return predictor


def run(sam, predictor, target, shape, cells=CLUSTER_A + CLUSTER_B, quirks=oracle.UPSTREAM):
    with standin_decoder(sam, shape):
        return oracle.oracle_predict(sam, FixedTokens(two_kind_tokens(cells)), hand_reference(cells), target,
                                     quirks=quirks, predictor=predictor)


# ---- frames and reference -------------------------------------------------------------


def test_frames_follow_the_data_loader():
    image = np.random.default_rng(0).integers(0, 256, size=(45, 70, 3)).astype(np.uint8)
    expected = np.asarray(Image.fromarray(image).resize((1024, 1024), Image.BILINEAR))
    assert np.array_equal(oracle.stretch_to_frame(image), expected)
    # ToTensor then mul(255).byte() gives every uint8 value back (SAM sees the PIL frame)
    values = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(values.float().div(255).mul(255).byte(), values)
    mask = np.random.default_rng(1).integers(0, 2, size=(37, 53)).astype(np.uint8)
    rows = np.minimum(np.floor(np.arange(1024, dtype=np.float32) * np.float32(37 / 1024)), 36).astype(int)
    cols = np.minimum(np.floor(np.arange(1024, dtype=np.float32) * np.float32(53 / 1024)), 52).astype(int)
    assert np.array_equal(oracle.frame_mask(mask).numpy(), mask[rows][:, cols].astype(np.float32))
    with pytest.raises(ValueError, match="0/1"):
        oracle.frame_mask(mask * 255)


def test_fit_tokens_are_normalised_over_the_token_axis():
    from persam_core.modeling.dinov2 import build_random_dinov2

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(60, 90, 3)).astype(np.uint8) for _ in range(2)]
    masks = [np.pad(np.ones((20, 30), np.uint8), ((20, 20), (30, 30))) for _ in range(2)]
    reference = oracle.oracle_fit(build_random_dinov2("tiny", 0), images, masks)
    tokens = reference["tokens"]
    assert tokens.shape[:2] == (2, 1369) and reference["wpos"].shape == reference["wneg"].shape == (2, 1369)
    # each channel has unit norm over the 1369 tokens of its image; tokens do not
    assert torch.allclose(tokens.norm(dim=1), torch.ones(2, tokens.shape[2]), atol=1e-5)
    assert not torch.allclose(tokens.norm(dim=2), torch.ones(2, 1369), atol=1e-2)
    per_token = oracle.oracle_fit(build_random_dinov2("tiny", 0), images, masks,
                                  oracle.Quirks(token_axis_norm=False))["tokens"]
    assert torch.allclose(per_token.norm(dim=2), torch.ones(2, 1369), atol=1e-5)


def test_empty_reference_rule_is_joint_over_shots():
    empty, filled = torch.zeros(1024, 1024), cells_mask(10, 10, 14, 14).float()
    centre = torch.zeros(1369)
    centre[18 * 37 + 18] = 1.0  # the 14 px square holds only the align_corners sample at 511.5
    wpos, wneg = oracle.reference_weights(torch.stack([empty, empty]))
    assert torch.equal(wpos, torch.stack([centre, centre])) and torch.equal(wneg, 1 - wpos)
    wpos, _ = oracle.reference_weights(torch.stack([filled, empty]))
    assert wpos[0].sum() > 0 and wpos[1].sum() == 0  # one empty shot among others stays empty
    wpos, _ = oracle.reference_weights(torch.stack([filled, empty]), oracle.Quirks(joint_empty_rule=False))
    assert torch.equal(wpos[1], centre)


def test_thin_reference_mask_misses_every_sample_and_gives_no_points(sam, target):
    mask = np.zeros((1024, 1024), np.uint8)
    mask[10, 100:900] = 1  # between the align_corners samples at rows 0 and 28.4
    reference = oracle.oracle_fit(TokenStandIn(0), [target], [mask])
    assert reference["wpos"].sum() == 0 and reference["wneg"].min() == 1
    result = oracle.oracle_predict(sam, TokenStandIn(0), reference, target)
    assert result["path"] == "no_points" and result["selected"] == [] and len(result["points"]) == 0
    assert result["mask"].shape == TARGET_SHAPE and not result["mask"].any() and not result["mask_1024"].any()
    assert result["presence"] == 0.0 and result["prob_score"] == 0.0


# ---- priors and points ----------------------------------------------------------------


def test_priors_by_design_keep_exactly_the_chosen_cells():
    cells = CLUSTER_A + CLUSTER_B
    query = oracle._normalise(two_kind_tokens(cells)[None], oracle.UPSTREAM)[0]
    maps = oracle.priors(hand_reference(cells), query)
    chosen = torch.zeros(37, 37, dtype=torch.bool)
    for x, y in cells:
        chosen[y, x] = True
    assert torch.equal(maps["Mpos"] > 0.999, chosen) and (maps["Mpos"][~chosen] == 0).all()
    assert torch.allclose(maps["Apos"][chosen], torch.ones(50), atol=1e-5) and (maps["Apos"][~chosen] == 0).all()
    assert torch.allclose(maps["Aneg"][~chosen], torch.ones(1319), atol=1e-5) and (maps["Aneg"][chosen] == 0).all()
    fm = oracle.location_map(maps)
    assert torch.equal(fm > 0, chosen) and (fm < 1).all()
    # every kept value is just under 1, so the sum is just under 50: k = 49, and the tie on the
    # 50th goes to the lower flat index, leaving out B's last cell (30, 28)
    grid, pixels = oracle.select_points(fm)
    assert len(grid) == 49 and (30, 28) not in [tuple(cell) for cell in grid]
    assert oracle.presence_score(maps) == pytest.approx(1.0, abs=1e-5)


def test_max_prior_counts_zero_weight_tokens_as_zero():
    cos = torch.tensor([[-0.5, 0.2], [-0.3, -0.1], [0.9, 0.9]])  # [support 3, query 2]
    weights = torch.tensor([1.0, 0.5, 0.0])
    max_map, mean_map = oracle.shot_priors(cos, weights)
    assert max_map.tolist() == pytest.approx([0.0, 0.2])  # the w = 0 token's 0 beats -0.15
    assert mean_map.tolist() == pytest.approx([(-0.5 - 0.15) / 3 / (0.5 + 1e-7), (0.2 - 0.05) / 3 / (0.5 + 1e-7)])
    masked, _ = oracle.shot_priors(cos, weights, oracle.Quirks(zero_weight_max=False))
    assert masked.tolist() == pytest.approx([-0.15, 0.2])


def test_point_selection_count_order_and_coordinates():
    fm = torch.zeros(37, 37)
    fm[2, 5], fm[7, 3], fm[1, 3], fm[30, 36] = 0.9, 0.9, 0.5, 0.05  # [y, x]
    grid, pixels = oracle.select_points(fm)  # sum 2.35: k = 2, the two 0.9 cells
    assert grid.tolist() == [[3, 7], [5, 2]]  # x-major: by x, then y
    assert pixels.tolist() == [[83, 193], [138, 55]]  # x * 1024 / 37 truncated (cell corners)
    assert pixels.tolist() == [[corner_pixel(x), corner_pixel(y)] for x, y in grid]
    assert oracle.select_points(fm, oracle.Quirks(x_major=False))[0].tolist() == [[5, 2], [3, 7]]
    assert oracle.select_points(fm, oracle.Quirks(corner_points=False))[1].tolist() == [[96, 207], [152, 69]]
    single = torch.zeros(37, 37)
    single[36, 36] = 0.4  # a sum in (0, 1) still gives one point
    grid, pixels = oracle.select_points(single)
    assert grid.tolist() == [[36, 36]] and pixels.tolist() == [[996, 996]]
    ties = torch.zeros(37, 37)
    ties[0, 9], ties[0, 4], ties[5, 1], ties[2, 2] = 0.6, 0.6, 0.6, 0.6  # k = 2 of four equal
    assert oracle.select_points(ties)[0].tolist() == [[4, 0], [9, 0]]  # lower flat indices
    capped = oracle.select_points(torch.full((37, 37), 0.5))[0]  # sum 684.5: capped at 128
    assert len(capped) == 128 and all(y * 37 + x < 128 for x, y in capped)
    assert oracle.select_points(torch.zeros(37, 37))[0].shape == (0, 2)


# ---- graph, growth, vote, output ------------------------------------------------------


def test_cells_mask_is_exact_for_both_samplings():
    mask = cells_mask(3, 5, 6, 9)[None]
    expected = torch.zeros(37, 37)
    expected[5:10, 3:7] = 1
    feet = oracle.footprints(mask)[0]  # bilinear weights sum to 1 up to rounding at a few cells
    assert torch.allclose(feet, expected, atol=1e-6) and (feet[expected == 0] == 0).all()
    assert torch.equal(F.interpolate(mask[None].float(), size=(37, 37), mode="nearest")[0, 0], expected)


def test_groups_are_weak_components_labelled_by_smallest_member():
    grid = np.array([[2, 2], [3, 2], [10, 10], [30, 30]])
    masks = torch.stack([
        cells_mask(30, 30, 30, 30),  # point 0 covers point 3 only
        cells_mask(3, 2, 3, 2),  # point 1 covers itself only
        cells_mask(10, 10, 10, 10),  # point 2 alone
        cells_mask(2, 2, 3, 2),  # point 3 covers points 0 and 1 (edges one way)
    ])
    assert oracle.mask_groups(masks, grid).tolist() == [0, 0, 1, 0]
    strong = oracle.mask_groups(masks, grid, oracle.Quirks(weak_components=False))
    assert strong[0] == strong[3] != strong[1] and len(set(strong.tolist())) == 3


def test_growth_is_strict_ordered_by_score_then_index_and_shares_the_last_score():
    apos = torch.zeros(37, 37)
    apos[10:15, 10:12] = 1.0  # pos cells: Apos^2 = 1 > Aneg * half = 0.5
    maps = {"Apos": apos, "Aneg": torch.ones(37, 37), "Mpos": apos}
    # group 0: one mask over 2 pos and 2 non-pos cells (p == q); group 1: two equal masks
    masks = torch.stack([cells_mask(11, 10, 12, 11), cells_mask(10, 12, 11, 14), cells_mask(10, 12, 11, 14)])
    groups = np.array([0, 1, 1])
    assert (oracle.footprints(masks).sum(dim=(1, 2)) == torch.tensor([4.0, 6.0, 6.0])).all()  # exact sums
    fg, cls = oracle.grow(masks, groups, maps)
    assert fg.tolist() == [False, True, False]  # p == q is not foreground; the tie: lower index first
    assert cls.tolist() == [0.0, 0.0, 0.0]  # group 1's last visit found nothing new: p - q = 0
    fg, cls = oracle.grow(masks, groups, maps, oracle.Quirks(strict=False))
    assert fg.tolist() == [True, True, True]
    _, cls = oracle.grow(masks, groups, maps, oracle.Quirks(last_cls_score=False))
    assert cls.tolist() == [0.0, 6.0, 0.0]  # each mask's own p - q (6 pos cells, then none left)


def test_consistency_vote_keeps_a_tied_group():
    left = [(x, y) for x in range(17) for y in range(37)]
    query = two_kind_tokens(left)  # e0 for x <= 16, e1 for x >= 17
    grid = np.array([[5, 5], [17, 5], [18, 5]])
    masks = torch.stack([cells_mask(2, 2, 10, 10), cells_mask(2, 2, 10, 10), cells_mask(20, 2, 30, 10)])
    groups = np.array([0, 0, 1])
    # point 1 looks like group 1's region and sits one cell from it: it votes for group 1
    assert oracle.consistency(masks, groups, grid, query).tolist() == [True, False, True]
    assert oracle.consistency(masks, groups, grid, query, oracle.Quirks(strict=False)).tolist() == [False, False, True]


def test_output_selection_union_and_fallback():
    masks = torch.stack([cells_mask(0, 0, 1, 1), cells_mask(5, 5, 6, 6), torch.zeros(1024, 1024, dtype=torch.bool)])
    cls = np.array([3.0, 1.0, 2.0], dtype=np.float32)
    assert oracle.output_selection(masks, np.array([1, 2, 1]), cls) == ([0, 2], "union")
    # union empty: non-label-2 scores are zeroed, then the first argmax (here a label-0 point)
    assert oracle.output_selection(masks, np.array([0, 2, 1]), cls) == ([1], "fallback")
    assert oracle.output_selection(masks, np.array([2, 0, 2]), -cls) == ([1], "fallback")
    assert oracle.output_selection(masks, np.array([0, 0, 1]), cls) == ([0], "fallback")  # label-1 mask empty
    off = oracle.Quirks(fallback_zeroing=False)
    assert oracle.output_selection(masks, np.array([0, 2, 0]), cls, off) == ([0], "fallback")


# ---- end to end with the stand-ins ----------------------------------------------------


def expected_grid(cells, dropped=(30, 28)):
    return sorted(cell for cell in cells if cell != dropped)  # x-major


def test_two_groups_union_of_label_one_discs(sam, predictor, target):
    result = run(sam, predictor, target, disc_around_point(45))
    grid = result["grid_points"]
    assert [tuple(cell) for cell in grid] == expected_grid(CLUSTER_A + CLUSTER_B)
    assert result["points"].tolist() == [[corner_pixel(x), corner_pixel(y)] for x, y in grid]
    # a disc reaches the 8 neighbours (27.7 and 39.1 px away), never the other cluster
    assert result["groups"].tolist() == [0] * 25 + [1] * 24
    assert result["path"] == "union" and result["consistent"].all()
    assert result["selected"] == np.flatnonzero(result["labels"] == 1).tolist() and result["selected"]
    assert set(result["labels"].tolist()) <= {1, 2} and (result["labels"] == 1).tolist() == result["fg"].tolist()
    union = torch.zeros(1024, 1024, dtype=torch.bool)
    for index in result["selected"]:
        x, y = result["points"][index]
        union |= disc_mask(x + 0.5, y + 0.5, 45)
    assert (union.numpy() != result["mask_1024"]).mean() < 1e-4  # a disc up to float rounding
    with standin_decoder(sam, disc_around_point(45)):  # upstream's union of the label-1 masks, exactly
        masks, _ = oracle.sam_masks(predictor, result["points"][result["selected"]])
    assert np.array_equal(masks.any(dim=0).numpy(), result["mask_1024"])
    # at the original size: the same discs, through SAM's postprocessing to H x W
    resized = F.interpolate(torch.as_tensor(result["mask_1024"])[None, None].float(), size=TARGET_SHAPE)[0, 0]
    assert result["mask"].shape == TARGET_SHAPE and (resized.numpy().astype(bool) != result["mask"]).mean() < 0.01
    assert 0 < result["prob_score"] <= 1 and result["presence"] == pytest.approx(1.0, abs=1e-5)


def test_group_of_large_discs_is_background(sam, predictor, target):
    shape = by_region([((0, 0, 400, 400), disc_around_point(45))], default=disc_around_point(300))
    result = run(sam, predictor, target, shape)
    b = result["groups"] == 1
    assert not result["fg"][b].any() and (result["labels"][b] == 2).all()
    assert result["path"] == "union" and all(index < 25 for index in result["selected"])


def test_fallback_to_a_non_empty_mask(sam, predictor, target):
    result = run(sam, predictor, target, disc_around_point(300))  # every disc mostly background
    assert result["groups"].tolist() == [0] * 25 + [1] * 24
    assert not result["fg"].any() and (result["labels"] == 2).all()
    best = int(np.argmax(result["cls_scores"]))
    assert result["path"] == "fallback" and result["selected"] == [best] and best in (0, 25)
    x, y = result["points"][best]
    assert result["mask_1024"].any() and (disc_mask(x + 0.5, y + 0.5, 300).numpy() != result["mask_1024"]).mean() < 1e-4


def test_fallback_to_an_empty_mask(sam, predictor, target):
    result = run(sam, predictor, target, empty_mask())
    n = len(result["points"])
    assert result["groups"].tolist() == list(range(n))  # no mask covers any point
    assert result["labels"].tolist() == [2] + [0] * (n - 1)  # every score 0: group 0 wins every vote
    assert result["path"] == "fallback" and result["selected"] == [0]
    assert not result["mask_1024"].any() and not result["mask"].any() and result["prob_score"] == 0.0


def test_fixed_disc_distance_rule_and_fallback_to_a_label_zero_point(sam, predictor, target):
    # one disc for every prompt, covering no point's cell but the left-out cell (30, 28) (e0)
    # and six background cells: every point is its own group, none is foreground
    shape = fixed_disc(870, 810, 40)
    result = run(sam, predictor, target, shape)
    n = len(result["points"])
    assert result["groups"].tolist() == list(range(n)) and not result["fg"].any()
    # every group's map is the same and positive on the points, so a point ties its own group
    # (distance 0 -> 1) with a neighbour one cell away, and the first (lower) group wins: only
    # the clusters' first points (4, 4) and (26, 24) keep their own
    assert np.flatnonzero(result["consistent"]).tolist() == [0, 25]
    assert np.flatnonzero(result["labels"] == 2).tolist() == [0, 25]
    # fallback: label-2 scores are negative, the others zeroed, so the first label-0 point wins
    assert (result["cls_scores"] < 0).all()
    assert result["path"] == "fallback" and result["selected"] == [1] and result["labels"][1] == 0
    assert (disc_mask(870, 810, 40).numpy() != result["mask_1024"]).mean() < 1e-4 and result["mask_1024"].any()
    other = run(sam, predictor, target, shape, quirks=oracle.Quirks(distance_zero_one=False))
    assert other["consistent"].all()


def test_standin_holds_through_the_products_batched_decoder(sam, predictor):
    """The stand-in is a function of the point through SAM's own submodules, so persam_core's
    prompt encoder and batched decoder (another code path) see the same discs."""
    from persam_core.decoder import decode_masks
    from persam_core.prompts import encode_prompts

    points = np.array([[100, 200], [700, 650], [0, 1023], [512, 40]])
    shape = by_region([((0, 0, 512, 512), disc_around_point(80))], default=fixed_disc(300, 700, 120))
    with standin_decoder(sam, shape):
        masks, lows = oracle.sam_masks(predictor, points)
        coords = torch.as_tensor(points, dtype=torch.int)[:, None, :]
        sparse, dense = encode_prompts(sam.prompt_encoder, coords, torch.ones(4, 1, dtype=torch.int), None, None)
        product, _ = decode_masks(sam.mask_decoder, predictor.features, sam.prompt_encoder.get_dense_pe(),
                                  sparse, dense, multimask_output=False)
    assert torch.allclose(product[:, 0], lows, atol=1e-5)
    for mask, (cx, cy, r) in zip(masks, [(100.5, 200.5, 80), (300, 700, 120), (300, 700, 120), (300, 700, 120)]):
        assert (mask != disc_mask(cx, cy, r)).float().mean() < 1e-4
    assert masks[0].any() and not masks[0][600:, :].any()
    # and the module is SAM's own again afterwards
    assert type(sam.mask_decoder.transformer.final_attn_token_to_image).__name__ == "Attention"


@pytest.mark.slow
def test_random_vit_b_end_to_end_invariants(vit_b_sam):
    """SAM vit_b and the tiny DINOv2 (random weights), two shots, a non-square target."""
    from persam_core.modeling.dinov2 import build_random_dinov2

    sam, dinov2 = vit_b_sam, build_random_dinov2("tiny", 0)
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, size=shape).astype(np.uint8) for shape in [(120, 160, 3), (200, 130, 3)]]
    masks = [np.zeros(image.shape[:2], np.uint8) for image in images]
    masks[0][30:80, 40:100], masks[1][100:160, 20:90] = 1, 1
    noise = rng.integers(0, 256, size=(90, 200, 3)).astype(np.uint8)
    # the noise in a box of a flat field: 15 points in 3 groups, labels 1 and 2, the union path
    # (noise everywhere gives 89 points, each one more decode, all in one group)
    target = np.full_like(noise, 90)
    target[20:60, 60:130] = noise[20:60, 60:130]
    predictor = SamPredictor(sam)
    predictor.set_image(oracle.stretch_to_frame(target))
    result = oracle.oracle_predict(sam, dinov2, oracle.oracle_fit(dinov2, images, masks), target, predictor=predictor)

    grid, n = result["grid_points"], len(result["points"])
    assert 0 < n <= 128 and [tuple(cell) for cell in grid] == sorted(tuple(cell) for cell in grid)
    assert result["points"].tolist() == [[corner_pixel(x), corner_pixel(y)] for x, y in grid]
    first_seen = [int(np.flatnonzero(result["groups"] == group)[0]) for group in range(result["groups"].max() + 1)]
    assert first_seen == sorted(first_seen)  # groups numbered by their smallest member
    fg, consistent = result["fg"], result["consistent"]
    assert result["labels"].tolist() == [1 if f and c else 2 if f or c else 0 for f, c in zip(fg, consistent)]
    masks_1024, lows = oracle.sam_masks(predictor, result["points"][result["selected"]])
    assert np.array_equal(masks_1024.any(dim=0).numpy(), result["mask_1024"])
    original = sam.postprocess_masks(lows[:, None], (1024, 1024), (90, 200))[:, 0] > 0
    assert np.array_equal(original.any(dim=0).numpy(), result["mask"])
