"""Credentials in URLs never reach outputs; huge images and whole-image masks are handled."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from cli_tools import ACCESS_KEY, SECRET_KEY
from jobs.cli import main
from jobs.storage.images import decode_image
from persam_core.modeling.resize import resize_longest_side

TINY = ["--model-type", "tiny", "--checkpoint", "random:0", "--device", "cpu"]


def test_storage_option_credentials_stay_out_of_logs_errors_and_the_concept(s3, perseg_sample, tmp_path, capfd):
    s3.mkdir("refs")
    s3.put(str(perseg_sample / "Images/cat/00.jpg"), "refs/cat.jpg")
    s3.put(str(perseg_sample / "Annotations/cat/00.png"), "refs/cat.png")
    options = json.dumps({"key": ACCESS_KEY, "secret": SECRET_KEY})
    out = tmp_path / "cat.json"
    fit = ["fit", *TINY, "--storage-options", options, "--mask", "s3://refs/cat.png", "--name", "cat"]
    assert main([*fit, "--image", "s3://refs/cat.jpg", "--out", str(out)]) == 0
    assert main([*fit, "--image", "s3://refs/missing.jpg", "--out", str(tmp_path / "x.json")]) != 0
    printed = capfd.readouterr()
    assert "missing.jpg" in printed.err  # the failure names the file ...
    for text in (printed.out, printed.err, out.read_text()):  # ... and nothing shows the credentials
        assert ACCESS_KEY not in text and SECRET_KEY not in text
    assert "s3://refs/cat.jpg" in out.read_text()


def test_a_50_megapixel_photo_is_decoded_and_resized(tmp_path):
    height, width = 6_250, 8_000  # 50 MP
    gradient = np.linspace(0, 255, width, dtype=np.uint8)[None, :, None]
    buffer = io.BytesIO()
    Image.fromarray(np.broadcast_to(gradient, (height, width, 3)).copy()).save(buffer, "JPEG", quality=80)
    pixels = decode_image(buffer.getvalue(), "big.jpg")
    assert pixels.shape == (height, width, 3)
    resized = resize_longest_side(pixels)
    assert resized.input_size == (800, 1024) and resized.original_size == (height, width)


def test_whole_image_mask_is_accepted_with_a_warning(perseg_sample, tmp_path, capsys):
    with Image.open(perseg_sample / "Images/cat/00.jpg") as image:
        size = image.size
    Image.new("L", size, 255).save(tmp_path / "all.png")
    out = tmp_path / "scene.json"
    assert main(["fit", *TINY, "--image", str(perseg_sample / "Images/cat/00.jpg"), "--mask", str(tmp_path / "all.png"),
                 "--name", "scene", "--out", str(out)]) == 0
    assert "whole image" in capsys.readouterr().out and out.exists()
