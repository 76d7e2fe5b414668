"""Few-shot segmentation benchmarks (FSS-1000, COCO-20i): episodes, scoring frame, mIoU / FB-IoU.

The protocol of the HSNet / Matcher / GF-SAM evaluation code (`matcher/data/fss.py`,
`coco.py`, `common/evaluation.py`, `common/logger.py`):

* Episodes come from numpy's legacy generator seeded once (`np.random.seed(seed)`, seed 0
  upstream), drawn in episode order with `choice(x, 1, replace=False)` (a permutation of the
  whole population per draw: the stream depends on each population's size, so the draws
  below use exactly those calls).
  - FSS-1000: every image of every class is a query once (classes sorted by name, images
    in file-name order); each support is drawn from the class's images, redrawn while it is
    the query (several shots may repeat one image).
  - COCO-20i: `episodes` draws (1000 upstream) of a class of the fold, then a query among
    that class's images, then supports as above.
* Scoring happens in the 1024 x 1024 stretch frame: the annotation and the prediction are
  resized there with torch's legacy nearest rule, so every episode weighs the same whatever
  its image's size.
* Per class: IoU = Σ foreground intersection / max(Σ foreground union, 1) over its
  episodes; mIoU = mean over the classes. FB-IoU = mean over {background, foreground} of
  Σ intersection / Σ union over all classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from persam_core.methods.registry import FRAME_SIDE  # the scoring frame: the stretch frame of GF-SAM's loaders
DEFAULT_SEED = 0  # upstream's utils.fix_randseed(0)
COCO_EPISODES = 1000  # episodes per fold upstream
COCO_CLASSES = 80
COCO_FOLDS = 4


@dataclass(frozen=True)
class Episode:
    """One episode: the class, the query and its supports (names as the dataset lists them)."""

    index: int
    label: str
    query: str
    supports: tuple[str, ...]


def _draw(rng: np.random.RandomState, population: Sequence) -> object:
    """One element, as upstream's `np.random.choice(population, 1, replace=False)[0]`."""
    return population[int(rng.choice(len(population), 1, replace=False)[0])]


def _supports(rng: np.random.RandomState, images: Sequence[str], query: str, shots: int) -> tuple[str, ...]:
    """Supports drawn one at a time, redrawn while equal to the query (repeats allowed)."""
    if len(images) < 2:
        raise ValueError(f"a class needs at least 2 images to form an episode, got {len(images)}")
    chosen: list[str] = []
    while len(chosen) < shots:
        candidate = _draw(rng, images)
        if candidate != query:
            chosen.append(candidate)
    return tuple(chosen)


def fss_episodes(classes: Sequence[tuple[str, Sequence[str]]], shots: int, seed: int = DEFAULT_SEED,
                 limit: int | None = None) -> list[Episode]:
    """classes: (name, its images in support order) sorted by name -> one episode per image.

    Queries run through each class's images in file-name order (upstream's sorted glob);
    supports are drawn from the list as given (upstream draws the numbers 1..10, so the list
    is the numeric order for FSS-1000's 1.jpg .. 10.jpg). limit: the first episodes only."""
    rng = np.random.RandomState(seed)
    episodes: list[Episode] = []
    for label, images in classes:
        for query in sorted(images, key=lambda name: name):
            if limit is not None and len(episodes) >= limit:
                return episodes
            episodes.append(Episode(len(episodes), label, query, _supports(rng, list(images), query, shots)))
    return episodes


def coco_fold_classes(fold: int) -> list[int]:
    """COCO-20i fold -> its classes, 1-based contiguous COCO indices: fold, fold + 4, ... (+1)."""
    if not 0 <= fold < COCO_FOLDS:
        raise ValueError(f"fold {fold}: COCO-20i has folds 0 to {COCO_FOLDS - 1}")
    return [fold + COCO_FOLDS * v + 1 for v in range(COCO_CLASSES // COCO_FOLDS)]


def coco_episodes(class_images: dict[int, Sequence[str]], classes: Sequence[int], shots: int,
                  episodes: int = COCO_EPISODES, seed: int = DEFAULT_SEED) -> list[Episode]:
    """class_images: class -> its images in the split's order; classes: those drawn from
    (ascending) -> `episodes` episodes, labels the class number as text."""
    rng = np.random.RandomState(seed)
    drawn: list[Episode] = []
    for index in range(episodes):
        label = int(_draw(rng, list(classes)))
        images = list(class_images[label])
        query = str(_draw(rng, images))
        drawn.append(Episode(index, str(label), query, _supports(rng, images, query, shots)))
    return drawn


def nearest_indices(source: int, target: int) -> np.ndarray:
    """torch's legacy `nearest` sampling of one axis: min(floor(i * float32(source/target)), source-1)."""
    scale = np.float32(source) / np.float32(target)
    index = np.floor(np.arange(target, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(index, source - 1)


def to_frame(mask: np.ndarray, side: int = FRAME_SIDE) -> np.ndarray:
    """[H, W] bool -> [side, side] bool, nearest-resized as upstream resizes its annotations."""
    return mask[np.ix_(nearest_indices(mask.shape[0], side), nearest_indices(mask.shape[1], side))]


def frame_counts(prediction: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """[H, W] bool x2 (same size) -> [2, 2] int64: rows (intersection, union), columns
    (background, foreground), counted in the scoring frame."""
    if prediction.shape != truth.shape or prediction.ndim != 2:
        raise ValueError(f"masks differ in shape: prediction {prediction.shape}, annotation {truth.shape}")
    p, t = to_frame(prediction.astype(bool)), to_frame(truth.astype(bool))
    return np.array([[np.count_nonzero(~p & ~t), np.count_nonzero(p & t)],
                     [np.count_nonzero(~p | ~t), np.count_nonzero(p | t)]], dtype=np.int64)


@dataclass
class ClassMeter:
    """Σ counts per class (upstream's AverageMeter buffers) -> per-class IoU, mIoU, FB-IoU."""

    counts: dict[str, np.ndarray] = field(default_factory=dict)
    episodes: dict[str, int] = field(default_factory=dict)

    def add(self, label: str, counts: np.ndarray) -> None:
        self.counts[label] = self.counts.get(label, np.zeros((2, 2), np.int64)) + counts
        self.episodes[label] = self.episodes.get(label, 0) + 1

    def per_class(self) -> dict[str, float]:
        """Foreground IoU per class: Σ intersection / max(Σ union, 1)."""
        return {label: float(c[0, 1]) / float(max(c[1, 1], 1)) for label, c in self.counts.items()}

    def miou(self) -> float | None:
        values = list(self.per_class().values())
        return float(np.mean(values)) if values else None

    def fb_iou(self) -> float | None:
        if not self.counts:
            return None
        total = sum(self.counts.values())
        return float(np.mean([total[0, k] / max(total[1, k], 1) for k in (0, 1)]))
