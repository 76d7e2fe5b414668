"""Test oracle: a deliberately plain re-implementation of GF-SAM's inference path.

Written from the GF-SAM repository (ANDYZAQ/GF-SAM: matcher/GFSAM.py, main_eval.py,
matcher/data/) and the project's GF-SAM contract (the GF-SAM contract; section numbers below). One
(image, concept) pair at a time: SamPredictor for SAM, scipy for the components, Python loops
for the graph, the growth and the vote. Of persam_core only DINOv2's forward pass is used.
Upstream's quirks are kept; `Quirks` turns each off, so tests can show that it matters.
Ours, not upstream's: equal growth scores in index order, top-k ties to the lower flat index,
an empty mask instead of the crash when there are no points, and the section 4.11 / 5 outputs.

`oracle_predict` returns: "points" [n, 2] int SAM pixels (x, y) before SAM's + 0.5, x-major;
"grid_points" [n, 2] (x, y); "groups" [n]; "labels" [n] in {0, 1, 2}; "cls_scores" [n] (before
the fallback's zeroing); "fg", "consistent" [n] bool; "mask_1024" [1024, 1024] bool; "mask"
[H, W] bool; "selected" (the indices whose masks are united); "path" ("union", "fallback",
"no_points"); "presence", "prob_score" floats; "low_res" [len(selected), 256, 256]; "maps".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image
from scipy.sparse import csgraph
from segment_anything import SamPredictor
from segment_anything.modeling import Sam
from torch import Tensor, nn
from torch.nn import functional as F

FRAME = 1024  # SAM's frame: every image stretched to FRAME x FRAME
DINO_SIZE = 518  # DINOv2 input side
GRID = 37  # DINOv2 patch grid side (518 / 14)
TOKENS = GRID * GRID
MAX_POINTS = 128
PROMPT_BATCH = 64
EMPTY_RESCUE = slice(FRAME // 2 - 7, FRAME // 2 + 7)  # [505:519]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

TokensFn = Callable[[Tensor], Tensor]  # DINOv2 pixels [B, 3, 518, 518] -> patch tokens [B, 1369, C]


@dataclass(frozen=True)
class Quirks:
    """Each upstream behaviour that changes results; False swaps in the 'obvious' variant."""
    token_axis_norm: bool = True  # F.normalize(dim=1) over tokens (else per token)
    no_antialias: bool = True  # 1024 -> 518 without antialias (else antialias=True)
    align_corners_weights: bool = True  # reference weights bilinear align_corners=True
    joint_empty_rule: bool = True  # centre square only when every shot is empty (else per shot)
    strict: bool = True  # Nn > X, P > Nq, p > q, vote < (else >=, <=)
    corner_points: bool = True  # x * 1024 / 37 truncated (else the cell centre, rounded)
    x_major: bool = True  # points ordered by x then y (else y then x)
    nearest_graph: bool = True  # adjacency from nearest 1024 -> 37 (else bilinear > 0)
    weak_components: bool = True  # weak components (else strong)
    last_cls_score: bool = True  # group-wide cls_score of the last visited mask (else own p - q)
    distance_zero_one: bool = True  # distance 0 -> 1 (else 0 -> 1e-6)
    fallback_zeroing: bool = True  # fallback zeroes non-label-2 scores (else argmax of all)
    zero_weight_max: bool = True  # max prior over all tokens, w = 0 giving 0 (else over w > 0)


UPSTREAM = Quirks()


# ---- frames (section 2) ---------------------------------------------------------------


def stretch_to_frame(image: np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8 -> [1024, 1024, 3] uint8: torchvision Resize((1024, 1024)) on a PIL image."""
    return np.array(Image.fromarray(image).resize((FRAME, FRAME), Image.BILINEAR))


def frame_mask(mask: np.ndarray) -> Tensor:
    """[H, W] 0/1 -> [1024, 1024] float32 with torch's legacy nearest (the data loader's)."""
    values = np.unique(np.asarray(mask))
    if not set(values.tolist()) <= {0, 1}:
        raise ValueError(f"reference mask must hold 0/1 values, got {values[:5].tolist()}")
    mask_t = torch.as_tensor(np.asarray(mask, dtype=np.float32))
    return F.interpolate(mask_t[None, None], size=(FRAME, FRAME), mode="nearest")[0, 0]


def _float_frame(frame: np.ndarray) -> Tensor:
    """ToTensor: [1024, 1024, 3] uint8 -> [3, 1024, 1024] float32 in [0, 1]."""
    return torch.from_numpy(frame.copy()).permute(2, 0, 1).float().div(255)


def _dino_pixels(float_frames: Tensor, quirks: Quirks) -> Tensor:
    """[B, 3, 1024, 1024] in [0, 1] -> [B, 3, 518, 518]: bilinear, then ImageNet statistics."""
    small = F.interpolate(float_frames, size=(DINO_SIZE, DINO_SIZE), mode="bilinear", align_corners=False,
                          antialias=not quirks.no_antialias)
    return (small - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _patch_tokens(dinov2: nn.Module | TokensFn, pixels: Tensor) -> Tensor:
    """x_prenorm's patch tokens [B, 1369, C]: a DINOv2 module through the product's forward
    (the one piece shared with it), or a plain callable (test stand-ins)."""
    if isinstance(dinov2, nn.Module) and not getattr(dinov2, "is_token_standin", False):
        from persam_core.modeling.dinov2 import prenorm_tokens

        tokens = prenorm_tokens(dinov2, pixels.to(next(dinov2.parameters()).device))
    else:
        tokens = dinov2(pixels)
    if tokens.shape[1] == TOKENS + 1:  # with the cls token
        tokens = tokens[:, 1:]
    assert tokens.shape[1] == TOKENS, tokens.shape
    return tokens.float().cpu()


def _normalise(tokens: Tensor, quirks: Quirks) -> Tensor:
    """[B, N, C]: each channel over the N tokens of its image (upstream's dim=1)."""
    axis = 1 if quirks.token_axis_norm else 2
    return tokens / tokens.norm(p=2, dim=axis, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def encode_tokens(dinov2: nn.Module | TokensFn, frames: list[np.ndarray], quirks: Quirks = UPSTREAM) -> Tensor:
    """Stretched frames (uint8) -> normalised tokens [B, 1369, C], encoded as one batch."""
    pixels = _dino_pixels(torch.stack([_float_frame(frame) for frame in frames]), quirks)
    return _normalise(_patch_tokens(dinov2, pixels), quirks)


# ---- reference side (section 3) -------------------------------------------------------


def reference_weights(masks_1024: Tensor, quirks: Quirks = UPSTREAM) -> tuple[Tensor, Tensor]:
    """[S, 1024, 1024] float 0/1 -> (wpos, wneg) [S, 1369], the empty rule applied first."""
    masks_1024 = masks_1024.clone()
    for shots in [slice(None)] if quirks.joint_empty_rule else range(len(masks_1024)):
        if masks_1024[shots].sum() == 0:  # joint: every shot empty
            masks_1024[shots, EMPTY_RESCUE, EMPTY_RESCUE] = 1
    wpos, wneg = [], []
    for mask in masks_1024:
        for weights, source in ((wpos, mask), (wneg, 1 - mask)):
            small = F.interpolate(source[None, None], size=(GRID, GRID), mode="bilinear",
                                  align_corners=quirks.align_corners_weights)
            weights.append(small.flatten())
    return torch.stack(wpos), torch.stack(wneg)


def oracle_fit(dinov2: nn.Module | TokensFn, images: list[np.ndarray], masks: list[np.ndarray],
               quirks: Quirks = UPSTREAM) -> dict:
    """Shots ([H, W, 3] uint8, [H, W] 0/1) -> {"tokens": [S, 1369, C], "wpos"/"wneg": [S, 1369]}."""
    frames = [stretch_to_frame(image) for image in images]
    tokens = encode_tokens(dinov2, frames, quirks)
    wpos, wneg = reference_weights(torch.stack([frame_mask(mask) for mask in masks]), quirks)
    return {"tokens": tokens, "wpos": wpos, "wneg": wneg}


# ---- priors (section 4.2) -------------------------------------------------------------


def cosine(support: Tensor, query: Tensor) -> Tensor:
    """support [N_s, C], query [N_q, C] -> [N_s, N_q]: <s, q> / (|s| |q| + 1e-7)."""
    dots = support @ query.T
    norms = support.norm(dim=1, keepdim=True) @ query.norm(dim=1, keepdim=True).T
    return dots / (norms + 1e-7)


def shot_priors(cos: Tensor, weights: Tensor, quirks: Quirks = UPSTREAM) -> tuple[Tensor, Tensor]:
    """cos [N_s, N_q], weights [N_s] -> (max map, mean map) [N_q]: zero-weight tokens give 0."""
    weighted = cos * weights[:, None]
    kept = weighted if quirks.zero_weight_max or not (weights > 0).any() else weighted[weights > 0]
    max_map = kept.max(dim=0).values
    mean_map = weighted.mean(dim=0) / (weights.sum() / weights.numel() + 1e-7)
    return max_map, mean_map


def priors(reference: dict, query: Tensor, quirks: Quirks = UPSTREAM) -> dict[str, Tensor]:
    """query [1369, C] -> {"Mpos", "Apos", "Aneg"} [37, 37], each averaged over shots."""
    maps: dict[str, list[Tensor]] = {"Mpos": [], "Apos": [], "Aneg": []}
    for tokens, wpos, wneg in zip(reference["tokens"], reference["wpos"], reference["wneg"]):
        cos = cosine(tokens, query)
        max_pos, mean_pos = shot_priors(cos, wpos, quirks)
        for name, value in (("Mpos", max_pos), ("Apos", mean_pos), ("Aneg", shot_priors(cos, wneg)[1])):
            maps[name].append(value)
    return {name: torch.stack(values).mean(dim=0).view(GRID, GRID) for name, values in maps.items()}


def location_map(maps: dict[str, Tensor], quirks: Quirks = UPSTREAM) -> Tensor:
    """Fm [37, 37] (section 4.3): minmax(Apos * Mpos), zero where minmax(Aneg) beats it."""
    minmax = lambda x: (x - x.min()) / (x.max() - x.min() + 1e-6)  # noqa: E731
    cross, neg = minmax(maps["Apos"] * maps["Mpos"]), minmax(maps["Aneg"])
    negative = neg > cross if quirks.strict else neg >= cross
    return cross * ~negative


# ---- points (section 4.4) -------------------------------------------------------------


def select_points(fm: Tensor, quirks: Quirks = UPSTREAM) -> tuple[np.ndarray, np.ndarray]:
    """Fm [37, 37] -> (grid (x, y) [n, 2], SAM pixel (x, y) [n, 2] int), x-major."""
    total = float(fm.sum())
    k = 1 if 0 < total < 1 else min(int(total), MAX_POINTS)
    values = fm.flatten().numpy()
    order = np.argsort(-values, kind="stable")  # equal values: lower flat index first
    chosen = sorted(order[:k].tolist())
    cells = [(index % GRID, index // GRID) for index in chosen]  # (x, y)
    cells.sort(key=(lambda c: (c[0], c[1])) if quirks.x_major else (lambda c: (c[1], c[0])))
    grid = np.array(cells, dtype=np.int64).reshape(-1, 2)
    if quirks.corner_points:  # ResizeLongestSide.apply_coords on a 37x37 "image", then int()
        pixels = (grid.astype(np.float64) * (FRAME / GRID)).astype(np.int64)
    else:
        pixels = np.floor((grid.astype(np.float64) + 0.5) * (FRAME / GRID)).astype(np.int64)
    return grid, pixels


# ---- masks and graph (sections 4.5, 4.6) ----------------------------------------------


@torch.no_grad()
def sam_masks(predictor: SamPredictor, pixels: np.ndarray) -> tuple[Tensor, Tensor]:
    """One positive point per prompt, single-mask output, PROMPT_BATCH prompts a call:
    pixels [n, 2] int (x, y) -> (masks [n, 1024, 1024] bool, low-res logits [n, 256, 256])."""
    masks, lows = [], []
    for start in range(0, len(pixels), PROMPT_BATCH):
        chunk = torch.as_tensor(pixels[start : start + PROMPT_BATCH], dtype=torch.int, device=predictor.device)
        labels = torch.ones(len(chunk), dtype=torch.int, device=predictor.device)
        mask, _, low = predictor.predict_torch(
            point_coords=chunk[:, None, :], point_labels=labels[:, None], multimask_output=False
        )
        masks.append((mask[:, 0] > predictor.model.mask_threshold).cpu())
        lows.append(low[:, 0].cpu())
    return torch.cat(masks), torch.cat(lows)


def mask_groups(masks: Tensor, grid: np.ndarray, quirks: Quirks = UPSTREAM) -> np.ndarray:
    """A[i, j] = mask i (sampled 1024 -> 37) covers point j; groups = components -> [n] int."""
    if quirks.nearest_graph:
        small = F.interpolate(masks[:, None].float(), size=(GRID, GRID), mode="nearest")[:, 0]
    else:
        small = (F.interpolate(masks[:, None].float(), size=(GRID, GRID), mode="bilinear") > 0).float()
    small, adjacency = small.numpy(), np.zeros((len(grid), len(grid)), dtype=np.float32)
    for i in range(len(grid)):
        for j, (x, y) in enumerate(grid):
            adjacency[i, j] = small[i, y, x]
    connection = "weak" if quirks.weak_components else "strong"
    _, labels = csgraph.connected_components(adjacency, directed=True, connection=connection)
    return labels.astype(np.int64)


def footprints(masks: Tensor) -> Tensor:
    """[m, 1024, 1024] bool -> [m, 37, 37]: bilinear (align_corners False)."""
    return F.interpolate(masks[:, None].float(), size=(GRID, GRID), mode="bilinear", align_corners=False)[:, 0]


# ---- foreground by mask growth (section 4.7) ------------------------------------------


def grow(masks: Tensor, groups: np.ndarray, maps: dict[str, Tensor], quirks: Quirks = UPSTREAM):
    """-> (fg [n] bool, cls_scores [n] float32) with P = Apos^2 and Nq = Aneg * half."""
    apos = maps["Apos"]
    half = (apos.max() + apos.min()) / 2
    p_map, n_map = apos * apos, maps["Aneg"] * half
    pos = (p_map > n_map).float() if quirks.strict else (p_map >= n_map).float()
    fg, cls_scores = np.zeros(len(groups), dtype=bool), np.zeros(len(groups), dtype=np.float32)
    for group in range(int(groups.max()) + 1):
        members = np.flatnonzero(groups == group)
        feet = footprints(masks[members])  # [m, 37, 37]
        scores = (feet * (p_map - n_map)[None]).sum(dim=(-1, -2)) / (feet.sum(dim=(-1, -2)) + 1e-6)
        order = torch.argsort(scores, descending=True, stable=True).tolist()
        grown = torch.zeros(GRID, GRID)
        last = 0.0
        for index in order:
            current = feet[index] * (1 - grown)
            p, q = (pos * current).sum(), ((1 - pos) * current).sum()
            if (p > q) if quirks.strict else (p >= q):
                grown += current
                fg[members[index]] = True
            last = float(p - q)
            if not quirks.last_cls_score:
                cls_scores[members[index]] = last
        if quirks.last_cls_score:
            cls_scores[members] = last
    return fg, cls_scores


# ---- consistency (section 4.8) --------------------------------------------------------


def consistency(masks: Tensor, groups: np.ndarray, grid: np.ndarray, query: Tensor,
                quirks: Quirks = UPSTREAM) -> np.ndarray:
    """-> consistent [n] bool after each group's majority vote."""
    n, n_groups = len(groups), int(groups.max()) + 1
    self_cos = cosine(query, query)
    group_maps = []
    for group in range(n_groups):
        union = masks[np.flatnonzero(groups == group)].any(dim=0)
        weights = footprints(union[None])[0].flatten()
        group_maps.append(shot_priors(self_cos, weights)[1].view(GRID, GRID))
    consistent = np.zeros(n, dtype=bool)
    for j in range(n):
        xj, yj = grid[j]
        best, best_group = None, -1
        for group in range(n_groups):
            # float32 square roots of integer squared distances, as torch.cdist gives them
            nearest = min(np.sqrt(np.float32((grid[m][0] - xj) ** 2 + (grid[m][1] - yj) ** 2))
                          for m in np.flatnonzero(groups == group))
            if nearest == 0:
                nearest = np.float32(1.0 if quirks.distance_zero_one else 1e-6)
            score = np.float32(group_maps[group][yj, xj]) / nearest
            if best is None or score > best:  # first maximum wins ties
                best, best_group = score, group
        consistent[j] = best_group == groups[j]
    for group in range(n_groups):
        members = np.flatnonzero(groups == group)
        kept = int(consistent[members].sum())
        dropped = kept < len(members) - kept if quirks.strict else kept <= len(members) - kept
        if dropped:
            consistent[members] = False
    return consistent


# ---- predict (sections 4, 5) ----------------------------------------------------------


def output_selection(masks: Tensor, labels: np.ndarray, cls_scores: np.ndarray,
                     quirks: Quirks = UPSTREAM) -> tuple[list[int], str]:
    """Section 4.10 -> (indices of the masks to unite, "union" or "fallback")."""
    selected = np.flatnonzero(labels == 1).tolist()
    if selected and bool(masks[selected].any()):
        return selected, "union"
    scores = cls_scores.copy()
    if quirks.fallback_zeroing:
        scores[labels != 2] = 0
    chosen = 0
    for index in range(len(scores)):  # the first maximum, even when every score is <= 0
        if scores[index] > scores[chosen]:
            chosen = index
    return [chosen], "fallback"


def presence_score(maps: dict[str, Tensor]) -> float:
    """Section 5: the raw cross map's maximum, max(Apos * Mpos), in [-1, 1]."""
    return float((maps["Apos"] * maps["Mpos"]).max())


def prob_score(masks: Tensor, apos: Tensor) -> float:
    """Section 5: max over the output masks of Apos (bilinear to 1024) averaged inside each
    mask; empty masks skipped; 0.0 when none is left."""
    upsampled = F.interpolate(apos[None, None], size=(FRAME, FRAME), mode="bilinear", align_corners=False)[0, 0]
    best = None
    for mask in masks:
        if mask.any():
            mean = float((upsampled * mask).sum() / mask.sum())
            best = mean if best is None else max(best, mean)
    return 0.0 if best is None else best


def _no_points(maps: dict[str, Tensor], height: int, width: int) -> dict:
    none = {key: np.zeros(0, dtype=np.int64) for key in ("groups", "labels")}
    none.update({key: np.zeros(0, dtype=bool) for key in ("fg", "consistent")})
    return none | {
        "points": np.zeros((0, 2), dtype=np.int64), "grid_points": np.zeros((0, 2), dtype=np.int64),
        "cls_scores": np.zeros(0, dtype=np.float32), "mask_1024": np.zeros((FRAME, FRAME), dtype=bool),
        "mask": np.zeros((height, width), dtype=bool), "selected": [], "path": "no_points",
        "presence": presence_score(maps), "prob_score": 0.0, "low_res": torch.zeros(0, 256, 256), "maps": maps,
    }


@torch.no_grad()
def oracle_predict(sam: Sam, dinov2: nn.Module | TokensFn, reference: dict, image: np.ndarray,
                   quirks: Quirks = UPSTREAM, predictor: SamPredictor | None = None) -> dict:
    """One target [H, W, 3] uint8 against one concept (oracle_fit's dict); keys: module docstring.
    `predictor`: a SamPredictor already set on this image's frame (a test's cache)."""
    height, width = image.shape[:2]
    frame = stretch_to_frame(image)
    query = encode_tokens(dinov2, [frame], quirks)[0]
    maps = priors(reference, query, quirks)
    grid, pixels = select_points(location_map(maps, quirks), quirks)
    if len(grid) == 0:  # upstream crashes here (selected_points unbound); ours: empty
        return _no_points(maps, height, width)

    if predictor is None:
        predictor = SamPredictor(sam)
        # upstream: the float frame's mul(255).byte(), which gives the PIL uint8 frame back
        predictor.set_image(_float_frame(frame).mul(255).byte().permute(1, 2, 0).numpy())
    masks, lows = sam_masks(predictor, pixels)
    groups = mask_groups(masks, grid, quirks)
    fg, cls_scores = grow(masks, groups, maps, quirks)
    consistent = consistency(masks, groups, grid, query, quirks)
    labels = np.where(consistent & fg, 1, np.where(consistent | fg, 2, 0)).astype(np.int64)

    selected, path = output_selection(masks, labels, cls_scores, quirks)
    mask_1024 = masks[selected].any(dim=0)

    # Section 4.11: SAM's own way back to the image size, per selected mask, then united.
    original = torch.zeros(height, width, dtype=torch.bool)
    for index in selected:
        logits = sam.postprocess_masks(lows[index][None, None], (FRAME, FRAME), (height, width))[0, 0]
        original |= logits > sam.mask_threshold
    return {
        "points": pixels, "grid_points": grid, "groups": groups, "labels": labels,
        "cls_scores": cls_scores, "fg": fg, "consistent": consistent,
        "mask_1024": mask_1024.numpy().copy(), "mask": original.numpy(), "selected": selected,
        "path": path, "presence": presence_score(maps), "prob_score": prob_score(masks[selected], maps["Apos"]),
        "low_res": lows[selected], "maps": maps,
    }
