"""GF-SAM's tensor forms of the graph steps against their plain definitions: components against
scipy, group unions against resizing the real union, frames and the reference weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.sparse import csgraph

from gfsam_standins import cells_mask, disc_mask
from persam_core.methods import gfsam_quirks
from persam_core.methods.gfsam_frames import frame_mask, stretch_frame
from persam_core.methods.gfsam_graph import choose_masks, components, grow
from persam_core.methods.gfsam_masks import mask_facts, union_footprints
from persam_core.methods.gfsam_reference import fit_reference, reference_weights


@pytest.mark.parametrize("weak", [True, False])
def test_components_are_scipys_numbered_by_smallest_member(monkeypatch, weak):
    monkeypatch.setattr(gfsam_quirks, "FAITHFUL", gfsam_quirks.Quirks(weak_components=weak))
    rng = np.random.default_rng(0)
    counts = [1, 5, 17, 40]
    edges = torch.zeros(len(counts), 40, 40, dtype=torch.bool)
    valid = torch.zeros(len(counts), 40, dtype=torch.bool)
    for p, n in enumerate(counts):
        edges[p, :n, :n] = torch.from_numpy(rng.random((n, n)) < 1.5 / n)
        valid[p, :n] = True
    graph = components(edges, valid)
    for p, n in enumerate(counts):
        expected_count, expected = csgraph.connected_components(
            edges[p, :n, :n].numpy(), directed=True, connection="weak" if weak else "strong")
        ours = graph.groups[p, :n].tolist()
        if weak:  # upstream's: scipy numbers weak components by their smallest member
            assert ours == expected.tolist()
        else:  # scipy numbers strong ones in another order: the same partition
            assert {tuple(np.flatnonzero(np.array(ours) == g)) for g in set(ours)} == {
                tuple(np.flatnonzero(expected == g)) for g in set(expected.tolist())}
        assert int(graph.count[p]) == expected_count
        assert graph.member[p].sum(0)[:n].eq(1).all() and not graph.member[p, :, n:].any()


def test_group_unions_equal_resizing_the_union():
    centres = [(100, 120, 60), (140, 130, 50), (700, 300, 200), (512, 900, 5), (0, 0, 0)]
    masks = torch.stack([disc_mask(*c) for c in centres])  # [5, 1024, 1024]
    logits = torch.where(masks, 1.0, -1.0)[:, None]
    low = F.interpolate(logits, size=(256, 256), mode="bilinear", align_corners=False)
    facts = mask_facts(low, 0.0)
    upsampled = F.interpolate(low, size=(1024, 1024), mode="bilinear", align_corners=False)[:, 0] > 0
    direct = F.interpolate(upsampled[:, None].float(), size=(37, 37), mode="bilinear", align_corners=False)
    assert torch.equal(facts.foot, direct.flatten(1))
    nearest = F.interpolate(upsampled[:, None].float(), size=(37, 37), mode="nearest").flatten(1) > 0
    assert torch.equal(facts.near, nearest) and facts.nonempty.tolist() == [True, True, True, True, False]
    member = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]], dtype=torch.bool)[None]
    unions = union_footprints(facts.probe[None], member)[0]
    for group in range(3):
        union = upsampled[member[0, group]].any(0)
        resized = F.interpolate(union[None, None].float(), size=(37, 37), mode="bilinear", align_corners=False)
        assert torch.allclose(unions[group], resized.flatten(), atol=1e-6)


def test_growth_is_strict_in_score_order_and_shares_the_last_score(monkeypatch):
    """Quirks 7 and 12 at the growth step: p == q is not foreground; a group's score is its last visit's."""
    apos = torch.zeros(37, 37)
    apos[10:15, 10:12] = 1.0  # positive cells: Apos^2 = 1 > Aneg * half = 0.5
    masks = torch.stack([cells_mask(11, 10, 12, 11), cells_mask(10, 12, 11, 14), cells_mask(10, 12, 11, 14)])
    foot = F.interpolate(masks[:, None].float(), size=(37, 37), mode="bilinear", align_corners=False).flatten(1)
    groups = torch.tensor([[0, 1, 1]])
    member = torch.tensor([[[1, 0, 0], [0, 1, 1], [0, 0, 0]]], dtype=torch.bool)
    graph = components(torch.zeros(1, 3, 3, dtype=torch.bool), torch.ones(1, 3, dtype=torch.bool))._replace(
        groups=groups, member=member)
    args = (foot[None], apos.flatten()[None], torch.ones(1, 1369), graph, torch.ones(1, 3, dtype=torch.bool))
    fg, cls = grow(*args)
    assert fg.tolist() == [[False, True, False]] and torch.allclose(cls, torch.zeros(1, 3), atol=1e-5)
    monkeypatch.setattr(gfsam_quirks, "FAITHFUL", gfsam_quirks.Quirks(strict=False))
    assert grow(*args)[0].tolist() == [[True, True, True]]
    monkeypatch.setattr(gfsam_quirks, "FAITHFUL", gfsam_quirks.Quirks(last_cls_score=False))
    assert torch.allclose(grow(*args)[1], torch.tensor([[0.0, 6.0, 0.0]]), atol=1e-5)


def test_fallback_zeroes_the_scores_of_points_not_labelled_2(monkeypatch):
    """Quirk 14: no label-1 pixels; the best label-2 point wins over a higher label-0 score."""
    labels = torch.tensor([[0, 2, 2, 0], [1, 2, 0, 0]])
    cls = torch.tensor([[5.0, -1.0, 0.5, 7.0], [3.0, 1.0, 2.0, 0.0]])
    nonempty = torch.tensor([[True] * 4, [False, True, True, True]])  # pair 1's label-1 mask is empty
    valid = torch.ones(2, 4, dtype=torch.bool)
    chosen, fallback = choose_masks(labels, cls, nonempty, valid)
    assert fallback.tolist() == [True, True]
    assert chosen.nonzero().tolist() == [[0, 2], [1, 1]]
    monkeypatch.setattr(gfsam_quirks, "FAITHFUL", gfsam_quirks.Quirks(fallback_zeroes=False))
    assert choose_masks(labels, cls, nonempty, valid)[0].nonzero().tolist() == [[0, 3], [1, 0]]
    union = choose_masks(torch.tensor([[1, 2]]), torch.tensor([[0.0, 9.0]]), torch.ones(1, 2, dtype=torch.bool),
                         torch.ones(1, 2, dtype=torch.bool))
    assert union[0].tolist() == [[True, False]] and union[1].tolist() == [False]


def test_frames_and_reference_weights():
    image = np.random.default_rng(0).integers(0, 256, size=(45, 70, 3)).astype(np.uint8)
    assert np.array_equal(stretch_frame(image), np.asarray(Image.fromarray(image).resize((1024, 1024), Image.BILINEAR)))
    mask = np.random.default_rng(1).integers(0, 2, size=(37, 53)).astype(bool)
    rows = np.minimum(np.floor(np.arange(1024, dtype=np.float32) * np.float32(37 / 1024)), 36).astype(int)
    cols = np.minimum(np.floor(np.arange(1024, dtype=np.float32) * np.float32(53 / 1024)), 52).astype(int)
    assert np.array_equal(frame_mask(mask).numpy(), mask[rows][:, cols].astype(np.float32))
    with pytest.raises(ValueError, match="uint8 RGB"):
        stretch_frame(image[..., 0])

    empty, filled = torch.zeros(1024, 1024), cells_mask(10, 10, 14, 14).float()
    centre = torch.zeros(1369)
    centre[18 * 37 + 18] = 1.0  # the 14 px centre square holds one align_corners sample
    wpos, wneg = reference_weights(torch.stack([empty, empty]))
    assert torch.equal(wpos, torch.stack([centre, centre])) and torch.equal(wneg, 1 - wpos)
    wpos, _ = reference_weights(torch.stack([filled, empty]))
    assert wpos[0].sum() > 0 and wpos[1].sum() == 0  # one empty shot among others stays empty (quirk 6)
    reference = fit_reference(torch.randn(2, 1369, 8), torch.stack([filled, empty]))
    assert reference.tokens.shape == (2, 1369, 8) and reference.wpos.shape == reference.wneg.shape == (2, 1369)
    assert reference.tokens.dtype == reference.wpos.dtype == np.float32
    with pytest.raises(ValueError, match="2 reference images but 1 masks"):
        fit_reference(torch.randn(2, 1369, 8), filled[None])
