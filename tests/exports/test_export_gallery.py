"""`persam export overlays` (the review gallery) and `subjects`: thumbnails and full-size
overlays, readable sorted captions, escaped names; missing, changed and resized images are
one line each, the rest exported, index.html always written."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from export_data import ellipse, mask_row, ok, run_cli, save_image, small_lake, write_parts
from jobs.exports.drawing import OUTLINE, POINT, TINT, draw_overlay
from jobs.exports.names import safe_file_name


def export(kind, lake, out, *flags):
    return run_cli(["export", kind, "--masks", str(lake.masks), "--output", str(out), *flags])


def captions(index: str) -> list[str]:
    """Each card's caption text, in page order."""
    return [re.sub(r"<[^>]+>", "", c.replace("<br>", " ")) for c in re.findall(r"<figcaption>(.*?)</figcaption>", index)]


def test_gallery_cards_sorted_by_similarity_absent_last_with_readable_captions(tmp_path):
    lake = small_lake(tmp_path)
    out = tmp_path / "review"
    assert ok(export("overlays", lake, out)).splitlines()[-1].startswith("6 overlays + index.html")
    index = (out / "index.html").read_text()
    assert captions(index) == [
        "cat #0 · garden/cat.png score 0.900 · similarity 0.910",
        "dog #0 · garden/dog.png score 0.900 · similarity 0.880",
        "cat #0 · house/both.jpg score 0.900 · similarity 0.730",
        "dog #0 · house/both.jpg score 0.900 · similarity 0.620",
        "cat #0 · garden/dog.png score 0.900 · similarity 0.550",
        "dog #0 · garden/cat.png similarity 0.210 · absent",
    ]
    assert "font-size:15px" in index
    for (name, concept), mask in lake.mask_of.items():
        stem = safe_file_name(str(lake.photos / name), concept, "0")
        assert f'<a href="full/{stem}.jpg"><img src="thumbs/{stem}.jpg"' in index
        with Image.open(out / "full" / f"{stem}.jpg") as full, Image.open(out / "thumbs" / f"{stem}.jpg") as thumb:
            assert full.format == thumb.format == "JPEG"
            assert full.size == Image.open(lake.photos / name).size
            assert max(thumb.size) == min(512, max(full.size))  # both.jpg (640 px) is shrunk, the others are not
            if mask is not None:  # the mask is visibly tinted in the thumbnail too
                small = np.asarray(thumb.convert("RGB")).astype(int)
                shrunk = np.asarray(Image.fromarray(mask).resize(thumb.size)) > 0
                assert small[shrunk][:, 0].mean() > small[~shrunk][:, 0].mean() + 40


def test_draw_overlay_tints_the_mask_outlines_it_and_marks_the_point():
    image = np.full((60, 80, 3), 100, dtype=np.uint8)
    mask = ellipse(80, 60, 40, 30, 15, 10)
    drawn = np.asarray(draw_overlay(image, mask, (40, 30))).astype(int)
    inside = mask.copy()
    inside[25:36, 35:46] = False  # away from the point's dot
    assert np.allclose(drawn[inside], (np.array(TINT) + 100) / 2, atol=1)
    ring = np.zeros_like(mask)
    ring[30, 40 + 15 + 1] = True  # just right of the ellipse
    assert (drawn[ring] == OUTLINE).all()
    assert (drawn[30, 40] == POINT).all()
    assert (drawn[2, 2] == 100).all()  # far from everything: unchanged
    assert np.array_equal(np.asarray(draw_overlay(image, None, None)), image)  # absent: the image alone


def test_hostile_image_and_concept_names_are_escaped(tmp_path):
    photos = tmp_path / "photos"
    path = photos / '<img src=x onerror=alert(1)>".png'
    data = save_image(path, 40, 30, 1)
    concept = '"><script>alert(1)</script>'
    write_parts(tmp_path / "masks", [mask_row(str(path), data, concept, ellipse(40, 30, 20, 15, 8, 6), 0.8)])
    out = tmp_path / "review"
    ok(run_cli(["export", "overlays", "--masks", str(tmp_path / "masks"), "--output", str(out)]))
    index = (out / "index.html").read_text()
    assert "<script>" not in index and "<img src=x" not in index
    assert "&lt;script&gt;" in index and "&lt;img src=x onerror=alert(1)&gt;&quot;.png" in index
    assert all(p.parent.parent == out for p in out.rglob("*.jpg"))  # nothing written outside full/ and thumbs/


@pytest.mark.parametrize("kind", ["overlays", "subjects"])
def test_missing_changed_and_resized_images_are_one_line_each_and_the_rest_is_exported(kind, tmp_path):
    lake = small_lake(tmp_path)
    (lake.photos / "garden" / "cat.png").unlink()  # missing
    save_image(lake.photos / "garden" / "dog.png", 80, 60, seed=99)  # changed, same size
    save_image(lake.photos / "house" / "both.jpg", 320, 200, seed=2)  # changed and resized
    out = tmp_path / kind
    result = export(kind, lake, out)
    lines = ok(result).splitlines()
    problems = [line for line in lines if line.split(":")[0] in ("missing", "changed", "resized", "undecodable", "unreadable")]
    cat, dog, both = (str(lake.photos / n) for n in ("garden/cat.png", "garden/dog.png", "house/both.jpg"))
    assert f"missing: {cat}: image not found; {1 if kind == 'subjects' else 2} masks not exported " \
           "(pass --images if the images moved)" in problems
    resized = "resized: {}: the image is now 320x200, its masks are 640x400" if kind == "overlays" else \
        "changed: {}: the image changed since"  # subjects skip on the hash alone
    assert any(line.startswith(resized.format(both)) for line in problems)
    assert any(line.startswith(f"changed: {dog}: the image changed since its masks were computed") for line in problems)
    assert len(problems) == 3, problems
    if kind == "overlays":  # the changed image is exported and flagged, on the page too
        index = (out / "index.html").read_text()
        assert [c for c in captions(index) if "image changed" in c] == [
            "dog #0 · garden/dog.png score 0.900 · similarity 0.880 image changed",
            "cat #0 · garden/dog.png score 0.900 · similarity 0.550 image changed"]
        assert "<summary>3 problems</summary>" in index
        assert lines[-1].startswith("2 overlays, 1 changed, 1 missing, 1 resized + index.html")
    else:  # a changed image's crops would be wrong training data
        assert not list(out.rglob("*.png")) and lines[-1].startswith("0 subject files, 2 changed, 1 missing")


def test_index_html_is_written_when_no_image_can_be_read(tmp_path):
    lake = small_lake(tmp_path)
    moved = tmp_path / "gone"
    out = tmp_path / "review"
    result = export("overlays", lake, out, "--images", str(moved))
    lines = ok(result).splitlines()
    assert sum(line.startswith("missing: ") for line in lines) == 3
    assert all(str(moved) in line for line in lines if line.startswith("missing: "))
    assert lines[-1].startswith("0 overlays, 3 missing + index.html")
    assert "<summary>3 problems</summary>" in (out / "index.html").read_text()
