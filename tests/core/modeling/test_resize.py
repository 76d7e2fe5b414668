"""resize.py: the CPU side's resizes, bit for bit those of segment_anything and SAM 2's transform."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything.utils.transforms import ResizeLongestSide

from fresh_python import fresh_python
from persam_core.modeling.resize import ENCODER_SIZE, longest_side_shape, resize_longest_side, resize_square

# shrunk and enlarged, both orientations, odd sides, a side of one pixel, a square, exactly 1024
SIZES = [(480, 640), (641, 479), (1080, 1440), (1024, 768), (1024, 1024), (37, 53), (1, 300), (300, 1), (5, 5),
         (2000, 999)]


@pytest.mark.parametrize("size", SIZES)
def test_longest_side_resize_is_segment_anythings(size):
    image = np.random.default_rng(sum(size)).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    ours = resize_longest_side(image)
    theirs = ResizeLongestSide(ENCODER_SIZE).apply_image(image)
    assert ours.pixels.dtype == np.uint8 and ours.pixels.flags.c_contiguous
    assert np.array_equal(ours.pixels, theirs) and ours.original_size == size
    assert ours.input_size == longest_side_shape(*size) == ResizeLongestSide.get_preprocess_shape(*size, ENCODER_SIZE)


def test_a_read_only_view_resizes_like_its_copy():
    image = np.random.default_rng(0).integers(0, 256, size=(60, 90, 3), dtype=np.uint8)
    view = image[:, ::-1]  # not contiguous
    view.flags.writeable = False
    assert np.array_equal(resize_longest_side(view).pixels, resize_longest_side(view.copy()).pixels)
    assert np.array_equal(resize_square(view).pixels, resize_square(view.copy()).pixels)


def test_square_resize_is_to_tensor_then_an_antialiased_resize():
    from torchvision.transforms import functional as TF

    image = np.random.default_rng(1).integers(0, 256, size=(300, 500, 3), dtype=np.uint8)
    expected = TF.resize(TF.to_tensor(image), [ENCODER_SIZE, ENCODER_SIZE], antialias=True).permute(1, 2, 0)
    assert torch.equal(torch.from_numpy(resize_square(image).pixels), expected)


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 3), np.float32)])
def test_anything_but_rgb_uint8_is_refused(bad):
    with pytest.raises(ValueError, match="expected an \\[H, W, 3\\] uint8 RGB image"):
        resize_longest_side(bad)


def test_the_longest_side_resize_imports_no_torch():
    code = ("import sys, numpy as np; from persam_core.modeling.resize import resize_longest_side; "
            "resize_longest_side(np.zeros((20, 30, 3), np.uint8)); "
            "print(sorted(m for m in ('torch', 'torchvision', 'segment_anything') if m in sys.modules))")
    assert fresh_python(code).strip() == "[]"
