"""`persam eval --benchmark fss1000|coco20i` on generated samples (tiny SAM and DINOv2, random
weights, --runner local): metrics files, episode counts, determinism, bad data; and the
episode protocol and scoring frame of persam_core.evaluation.fewshot against hand-worked values."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from persam_core.evaluation.fewshot import (ClassMeter, coco_episodes, coco_fold_classes, frame_counts, fss_episodes,
                                 nearest_indices)
from tests.cli_tools import LOCAL, MODEL, assert_one_error_line, run_cli

DINO = ["--dinov2", "tiny", "--dinov2-checkpoint", "random:0"]
SIZES = [(36, 48), (48, 32), (40, 40)]


def _scene(size: tuple[int, int], seed: int, colour: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A noisy background with one coloured rectangle, an eighth of each side -> (image [H, W, 3]
    uint8, its mask [H, W] bool). A small object keeps GF-SAM's location map peaked: a pair
    decodes a score of points rather than 128, and decoding them is what these tests wait for."""
    rng = np.random.default_rng(seed)
    image = (rng.random((*size, 3)) * 60 + 50).astype(np.uint8)
    top, left = int(rng.integers(2, size[0] // 3)), int(rng.integers(2, size[1] // 3))
    mask = np.zeros(size, bool)
    mask[top : top + size[0] // 8, left : left + size[1] // 8] = True
    image[mask] = colour
    return image, mask


def make_fss(root: Path) -> Path:
    """2 classes x 3 images: <class>/<n>.jpg + <n>.png (0/255)."""
    for c, (name, colour) in enumerate([("apple", (200, 40, 40)), ("boat", (40, 40, 200))]):
        (root / name).mkdir(parents=True)
        for n, size in enumerate(SIZES, start=1):
            image, mask = _scene(size, 10 * c + n, colour)
            Image.fromarray(image).save(root / name / f"{n}.jpg", quality=95)
            Image.fromarray(mask.astype(np.uint8) * 255).save(root / name / f"{n}.png")
    return root


def make_coco(root: Path) -> Path:
    """instances_val2014.json: categories 1 (fold 0) and 2 (fold 1), 3 images each, polygons,
    RLE and one crowd region; images under val2014/."""
    (root / "annotations").mkdir(parents=True)
    (root / "val2014").mkdir()
    images, annotations = [], []
    for index in range(6):
        size = SIZES[index % 3]
        category = 1 + index // 3
        image, mask = _scene(size, 100 + index, (200, 40, 40) if category == 1 else (40, 200, 40))
        name = f"COCO_val2014_{index:012d}.jpg"
        Image.fromarray(image).save(root / "val2014" / name, quality=95)
        images.append({"id": index + 1, "file_name": name, "height": size[0], "width": size[1]})
        ys, xs = np.nonzero(mask)
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        if index % 2:
            rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
            segmentation = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
        else:
            segmentation = [[float(v) for v in (x0, y0, x1, y0, x1, y1, x0, y1)]]
        annotations.append({"id": 10 + index, "image_id": index + 1, "category_id": category, "iscrowd": index % 2,
                            "segmentation": segmentation, "area": float(mask.sum()),
                            "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]})
    document = {"images": images, "annotations": annotations,
                "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "bicycle"}]}
    (root / "annotations" / "instances_val2014.json").write_text(json.dumps(document))
    return root


def _eval(data: Path, output: Path, *extra: str, method: str = "gf-sam") -> dict:
    result = run_cli(["eval", *MODEL, *DINO, *LOCAL, "--data", str(data), "--output", str(output),
                      "--method", method, *extra])
    assert result.rc == 0, result.err
    assert (output / "metrics.md").is_file()
    return json.loads((output / "metrics.json").read_text())


def _check_ranges(metrics: dict) -> None:
    for value in [metrics, *metrics["folds"].values()]:
        assert 0.0 <= 100 * value["miou"] <= 100.0 and 0.0 <= 100 * value["fb_iou"] <= 100.0


def test_fss_eval_scores_every_image_once(tmp_path: Path) -> None:
    data = make_fss(tmp_path / "fss")
    first = _eval(data, tmp_path / "a", "--benchmark", "fss1000", method="persam")
    assert first["benchmark"] == "fss1000" and first["method"] == "persam" and first["shots"] == 1
    assert first["episodes"] == 6 and list(first["folds"]) == ["0"]
    fold = first["folds"]["0"]
    assert fold["classes"] == 2 and {c["episodes"] for c in fold["per_class"].values()} == {3}
    assert fold["error_episodes"] == 0 and first["targets_run"] == 6
    _check_ranges(first)
    assert first["miou"] == fold["miou"]
    assert "| mean |" in (tmp_path / "a" / "metrics.md").read_text()


def test_coco_eval_per_fold_and_mean_deterministically(tmp_path: Path) -> None:
    data = make_coco(tmp_path / "coco")
    argv = ["--benchmark", "coco20i", "--fold", "0", "--fold", "1", "--episodes", "3", "--shots", "2"]
    first = _eval(data, tmp_path / "a", *argv, method="persam")
    assert list(first["folds"]) == ["0", "1"] and first["episodes"] == 6 and first["shots"] == 2
    assert [f["episodes"] for f in first["folds"].values()] == [3, 3]
    assert first["folds"]["0"]["per_class"]["1"]["name"] == "person"
    assert first["folds"]["1"]["per_class"]["2"]["name"] == "bicycle"
    _check_ranges(first)
    assert first["miou"] == pytest.approx(np.mean([f["miou"] for f in first["folds"].values()]))
    second = _eval(data, tmp_path / "b", *argv, method="persam")
    assert second["folds"] == first["folds"]


def test_each_episode_computes_only_its_own_pair(tmp_path: Path, monkeypatch) -> None:
    """A group's job decodes each episode's (query, concept) pair and no other, and every
    episode's counts equal those of the job that decoded every pair of its group."""
    from jobs.commands import eval_fewshot
    from persam_core.methods.persam import PerSAMEngine

    decoded, episode_counts = [], []
    segment, counts_of = PerSAMEngine.segment, eval_fewshot.frame_counts

    def counted_segment(self, sam, images, concepts, *args):
        decoded.append(len(images) * len(concepts))
        return segment(self, sam, images, concepts, *args)

    def recorded(prediction, truth):
        episode_counts.append(counts_of(prediction, truth).tolist())
        return episode_counts[-1]

    monkeypatch.setattr(PerSAMEngine, "segment", counted_segment)
    monkeypatch.setattr(eval_fewshot, "frame_counts", lambda p, t: np.asarray(recorded(p, t)))
    fss, coco = make_fss(tmp_path / "fss"), make_coco(tmp_path / "coco")
    runs = {}
    for name, every_pair in (("own", False), ("every", True)):
        if every_pair:  # the job as it was: every concept of the group in every query of the group
            monkeypatch.setattr(eval_fewshot, "episode_pairs", lambda data, episodes: None)
        decoded.clear(), episode_counts.clear()
        _eval(fss, tmp_path / f"fss-{name}", "--benchmark", "fss1000", method="persam")
        fss_pairs, fss_counts = sum(decoded), list(episode_counts)
        decoded.clear(), episode_counts.clear()
        _eval(coco, tmp_path / f"coco-{name}", "--benchmark", "coco20i", "--fold", "0", "--episodes", "4",
              method="persam")
        runs[name] = (fss_pairs, fss_counts, sum(decoded), list(episode_counts))
    own, every = runs["own"], runs["every"]
    assert own[0] == 6 and every[0] == 6 * 6  # FSS: 6 episodes, 6 queries
    assert own[2] == 4 and every[2] > 4  # COCO: 4 episodes over 3 images (a query drawn twice has both concepts)
    assert own[1] == every[1] and own[3] == every[3]  # every episode's intersections and unions
    assert len(own[1]) == 6 and len(own[3]) == 4


@pytest.mark.slow  # GF-SAM's up to 128 prompts per (image, concept) pair: ~10 s of CPU a pair
def test_gfsam_eval_on_both_layouts(tmp_path: Path) -> None:
    fss = _eval(make_fss(tmp_path / "fss"), tmp_path / "a", "--benchmark", "fss1000", "--episodes", "2")
    assert fss["method"] == "gf-sam" and fss["episodes"] == 2 and fss["folds"]["0"]["error_episodes"] == 0
    _check_ranges(fss)
    coco = _eval(make_coco(tmp_path / "coco"), tmp_path / "b", "--benchmark", "coco20i", "--fold", "0", "--fold", "1",
                 "--episodes", "1")
    assert coco["episodes"] == 2 and [f["classes"] for f in coco["folds"].values()] == [1, 1]
    _check_ranges(coco)
    assert (tmp_path / "b" / "fold1" / "job0000" / "concepts" / "e0000.json").is_file()


def test_bad_data_is_one_line_naming_the_file(tmp_path: Path) -> None:
    coco = make_coco(tmp_path / "coco")
    base = ["eval", *MODEL, *DINO, *LOCAL, "--output", str(tmp_path / "out"), "--method", "gf-sam"]
    result = run_cli([*base, "--data", str(coco), "--benchmark", "coco20i", "--fold", "2"])
    assert result.rc == 3
    assert_one_error_line(result, "instances_val2014.json", "fold 2")
    result = run_cli([*base, "--data", str(tmp_path / "nowhere"), "--benchmark", "coco20i"])
    assert result.rc == 3
    assert_one_error_line(result, "instances_val2014.json", "not found")
    fss = make_fss(tmp_path / "fss")
    (fss / "boat" / "2.png").unlink()
    result = run_cli([*base, "--data", str(fss), "--benchmark", "fss1000"])
    assert result.rc == 3
    assert_one_error_line(result, "boat/2.jpg", "2.png")
    for name in ("1", "3"):
        (fss / "boat" / f"{name}.jpg").unlink()
        (fss / "boat" / f"{name}.png").unlink()
    (fss / "boat" / "2.jpg").unlink()
    result = run_cli([*base, "--data", str(fss), "--benchmark", "fss1000"])
    assert result.rc == 3
    assert_one_error_line(result, "boat", "0 image")
    (tmp_path / "test.txt").write_text("apple\r\ncastle\r\n")
    result = run_cli([*base, "--data", str(fss), "--benchmark", "fss1000", "--split", str(tmp_path / "test.txt")])
    assert result.rc == 3
    assert_one_error_line(result, "castle", "test.txt")
    assert not (tmp_path / "out").exists()


# ---- the protocol, without models ---------------------------------------------------------


def test_coco_folds_interleave_the_80_classes() -> None:
    assert coco_fold_classes(0)[:3] == [1, 5, 9] and coco_fold_classes(3)[-1] == 80
    assert sorted(c for f in range(4) for c in coco_fold_classes(f)) == list(range(1, 81))


def test_episodes_follow_the_legacy_numpy_stream() -> None:
    """The same draws as upstream's np.random.seed(0) + choice(..., 1, replace=False) calls."""
    np.random.seed(0)
    classes, images = [1, 5, 9], {1: ["a", "b", "c"], 5: ["d", "e"], 9: ["f", "g", "h", "i"]}
    expected = []
    for _ in range(5):
        label = np.random.choice(classes, 1, replace=False)[0]
        query = np.random.choice(images[label], 1, replace=False)[0]
        supports = []
        while True:
            support = np.random.choice(images[label], 1, replace=False)[0]
            if support != query:
                supports.append(support)
            if len(supports) == 2:
                break
        expected.append((str(label), query, tuple(supports)))
    drawn = coco_episodes(images, classes, shots=2, episodes=5, seed=0)
    assert [(e.label, e.query, e.supports) for e in drawn] == expected
    fss = fss_episodes([("x", ["x/1.jpg", "x/2.jpg", "x/10.jpg"])], shots=1)
    assert [e.query for e in fss] == ["x/1.jpg", "x/10.jpg", "x/2.jpg"]  # upstream's sorted glob
    assert all(e.query not in e.supports for e in fss)


def test_scoring_frame_and_class_means() -> None:
    assert nearest_indices(3, 6).tolist() == [0, 0, 1, 1, 2, 2]
    truth = np.zeros((2, 4), bool)
    truth[:, :2] = True
    prediction = np.zeros((2, 4), bool)
    prediction[:, 1:3] = True
    counts = frame_counts(prediction, truth)  # each source pixel is 512 x 256 frame pixels
    assert counts.tolist() == [[2 * 131072, 2 * 131072], [6 * 131072, 6 * 131072]]
    meter = ClassMeter()
    meter.add("1", counts)
    meter.add("2", frame_counts(truth, truth))
    assert meter.per_class() == {"1": pytest.approx(1 / 3), "2": 1.0}
    assert meter.miou() == pytest.approx((1 / 3 + 1.0) / 2)
    # FB-IoU pools the classes: background (2 + 4) / (6 + 4), foreground (2 + 4) / (6 + 4)
    assert meter.fb_iou() == pytest.approx(0.6)


def test_coco_split_files_are_plain_data(tmp_path: Path) -> None:
    """--split: upstream's fold<N>.pkl (0-based class -> image names) chooses the images; a
    pickle that names any class or function is refused without running it."""
    import collections
    import pickle

    coco = make_coco(tmp_path / "coco")
    splits = tmp_path / "splits"
    splits.mkdir()
    names = [f"val2014/COCO_val2014_{i:012d}.jpg" for i in range(2)]
    (splits / "fold0.pkl").write_bytes(pickle.dumps({0: names, 4: []}))
    base = ["eval", *MODEL, *LOCAL, "--data", str(coco), "--benchmark", "coco20i", "--fold", "0",
            "--output", str(tmp_path / "out"), "--dry-run", "--split", str(splits)]
    result = run_cli(base)
    assert result.rc == 0, result.err
    (splits / "fold0.pkl").write_bytes(pickle.dumps(collections.OrderedDict({0: names})))
    result = run_cli(base)
    assert result.rc == 3
    assert_one_error_line(result, "fold0.pkl", "not a split file")
    (splits / "fold0.pkl").write_bytes(pickle.dumps({0: [*names, "val2014/missing.jpg"]}))
    assert_one_error_line(run_cli(base), "instances_val2014.json", "val2014/missing.jpg")
