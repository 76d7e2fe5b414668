"""The reference code's behaviours that change results (the GF-SAM contract §6), as switches.

The product always runs with every switch on (`FAITHFUL`). Tests replace `FAITHFUL` with a
copy that turns one quirk off, to show that each one changes the result; nothing else sets
them. Each field names the quirk's number in the GF-SAM contract §6 and what "off" does instead.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Quirks:
    pil_stretch: bool = True  # 3: PIL (antialiased) original -> 1024; off: bilinear without antialias
    align_corners_weights: bool = True  # 4: reference weights with align_corners=True; off: False
    zero_in_max: bool = True  # 5: tokens outside the mask give 0 to the max prior; off: they are skipped
    mean_over_weight: bool = True  # 5: the mean prior divides by mean(w) + 1e-7; off: plain mean
    joint_empty_rule: bool = True  # 6: centre square only when every shot is empty; off: per shot
    strict: bool = True  # 7: strict comparisons (and a tied vote keeps a group); off: >= (and ties drop)
    topk_from_sum: bool = True  # 8: k = min(int(sum), 128); off: every non-zero cell up to 128
    corner_points: bool = True  # 9: prompts at truncated cell corners; off: at cell centres
    nearest_adjacency: bool = True  # 10: graph edges from nearest 1024 -> 37; off: bilinear footprint > 0
    weak_components: bool = True  # 11: weakly connected groups; off: strongly connected
    last_cls_score: bool = True  # 12: a group shares its last visited mask's p - q; off: each mask its own
    distance_zero_is_one: bool = True  # 13: distance 0 -> 1; off: 1e-6
    fallback_zeroes: bool = True  # 14: fallback zeroes the scores of non-label-2 points; off: raw argmax


FAITHFUL = Quirks()
