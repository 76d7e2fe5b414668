"""`persam fit`: the concept file it writes, and the one-line refusals of bad input."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from jobs.cli import main
from persam_core.concept import Concept
from persam_core.modeling.models import build_random, model_types

FEATURE_DIM = 256
VENV_PERSAM = Path(sys.executable).with_name("persam")


def fit_argv(image, mask, out, *, method="persam", name="thing", model_type="tiny", checkpoint="random:0", extra=()):
    return [
        "fit", "--model-type", model_type, "--checkpoint", str(checkpoint),
        "--image", str(image), "--mask", str(mask),
        "--method", method, "--name", name, "--out", str(out), *extra,
    ]


def read_concept(path: Path) -> Concept:
    return Concept.from_json(path.read_text(), source=str(path))


def save_png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


# ---------------------------------------------------------------------------- happy paths


def test_fit_persam_writes_a_concept(perseg_sample, tmp_path, capsys, tiny_fingerprint):
    out = tmp_path / "cat.json"
    image = perseg_sample / "Images" / "cat" / "00.jpg"
    rc = main(fit_argv(image, perseg_sample / "Annotations" / "cat" / "00.png", out, name="cat"))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "not meaningful" in captured.out.lower()  # random weights are announced

    concept = read_concept(out)
    assert concept.name == "cat"
    assert concept.method == "persam"
    assert concept.mask_weights is None
    assert concept.model_fingerprint == tiny_fingerprint
    assert concept.target_feature.shape == (FEATURE_DIM,)
    assert concept.target_embedding.shape == (FEATURE_DIM,)
    assert concept.target_feature.dtype == np.float32
    assert np.all(np.isfinite(concept.target_feature)) and np.all(np.isfinite(concept.target_embedding))
    # PerSAM: t = e / ||e||
    assert np.linalg.norm(concept.target_feature) == pytest.approx(1.0, abs=1e-5)
    expected = concept.target_embedding / np.linalg.norm(concept.target_embedding)
    np.testing.assert_allclose(concept.target_feature, expected, atol=1e-6)
    assert any(reference.endswith("cat/00.jpg") for reference in concept.references)
    # The file is JSON (never pickle) and round-trips exactly.
    again = Concept.from_json(concept.to_json())
    np.testing.assert_array_equal(again.target_feature, concept.target_feature)
    assert not list(tmp_path.glob("*.probe"))  # the writability probe is cleaned up


def test_fit_persam_f_writes_weights(perseg_sample, tmp_path, capsys, tiny_fingerprint):
    out = tmp_path / "duck.json"
    rc = main(fit_argv(
        perseg_sample / "Images" / "duck_toy" / "00.jpg", perseg_sample / "Annotations" / "duck_toy" / "00.png",
        out, method="persam-f", name="duck_toy", extra=("--epochs", "5"),
    ))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "5 epochs" in captured.out

    concept = read_concept(out)
    assert concept.method == "persam-f"
    assert concept.model_fingerprint == tiny_fingerprint
    assert concept.target_feature.shape == (FEATURE_DIM,)
    assert concept.target_embedding.shape == (FEATURE_DIM,)
    assert np.linalg.norm(concept.target_feature) == pytest.approx(1.0, abs=1e-5)
    assert concept.mask_weights is not None and concept.mask_weights.shape == (3,)
    assert float(concept.mask_weights.sum()) == pytest.approx(1.0, abs=1e-5)
    assert np.all(np.isfinite(concept.mask_weights))
    # PerSAM-F pools max/2 + mean/2, so t is no longer e's direction.
    plain = concept.target_embedding / np.linalg.norm(concept.target_embedding)
    assert not np.allclose(concept.target_feature, plain, atol=1e-4)


def test_saved_state_dict_has_the_random_seed_fingerprint(tmp_path, capsys, tiny_fingerprint):
    """A torch.save'd copy of random:0 loads (weights_only) and fingerprints like random:0."""
    checkpoint = tmp_path / "tiny.pth"
    torch.save(build_random("tiny", 0).state_dict(), checkpoint)
    image = save_png(tmp_path / "img.png", np.full((120, 160, 3), 90, np.uint8))
    mask = np.zeros((120, 160), np.uint8)
    mask[20:100, 30:130] = 255
    out = tmp_path / "c.json"
    rc = main(fit_argv(image, save_png(tmp_path / "mask.png", mask), out, checkpoint=checkpoint))
    assert rc == 0, capsys.readouterr().err
    assert read_concept(out).model_fingerprint == tiny_fingerprint


def test_console_script_fit_smoke(perseg_sample, tmp_path, tiny_fingerprint):
    """The installed `persam` entry point runs end to end in a fresh process."""
    executable = [str(VENV_PERSAM)] if VENV_PERSAM.exists() else [sys.executable, "-m", "jobs.cli"]
    out = tmp_path / "sneaker.json"
    result = subprocess.run(
        executable + fit_argv(
            perseg_sample / "Images" / "colorful_sneaker" / "00.jpg",
            perseg_sample / "Annotations" / "colorful_sneaker" / "00.png",
            out, name="colorful_sneaker",
        ),
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "colorful_sneaker" in result.stdout.strip().splitlines()[-1]
    assert read_concept(out).model_fingerprint == tiny_fingerprint


@pytest.mark.parametrize("command", ["fit", "segment"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--model-type" in text and "--checkpoint" in text
    flags = ("--image", "--mask", "--method", "--name", "--out", "--epochs") if command == "fit" else (
        "--concept", "--input", "--output", "--batch-size", "--num-actors")
    for flag in flags:
        assert flag in text


# ---------------------------------------------------------------------------- bad input


class _MarkerPayload:
    """Unpickling this creates `path` (via open() or a shell): proof that a pickle ran code."""

    def __init__(self, path: str, shell: bool = False) -> None:
        self.path, self.shell = path, shell

    def __reduce__(self):
        if self.shell:
            return (os.system, (f"touch '{self.path}'",))
        return (open, (self.path, "w"))


@pytest.fixture
def files(tmp_path):
    """A small valid image/mask pair plus every kind of broken input."""
    height, width = 100, 120
    save_png(tmp_path / "img.png", np.full((height, width, 3), 128, np.uint8))
    good = np.zeros((height, width), np.uint8)
    good[10:90, 10:100] = 255
    save_png(tmp_path / "good_mask.png", good)
    save_png(tmp_path / "empty_mask.png", np.zeros((height, width), np.uint8))
    small = np.zeros((50, 60), np.uint8)
    small[10:40, 10:40] = 255
    save_png(tmp_path / "other_size_mask.png", small)
    save_png(tmp_path / "big.png", np.full((1000, 1000, 3), 60, np.uint8))
    blob = np.zeros((1000, 1000), np.uint8)
    blob[500:502, 500:502] = 255  # 2x2 px: covers no cell of the 64x64 grid
    save_png(tmp_path / "blob_mask.png", blob)
    (tmp_path / "text.jpg").write_text("this is not a JPEG\n")
    torch.save(build_random("tiny", 0).state_dict(), tmp_path / "tiny.pth")
    (tmp_path / "corrupt.pth").write_bytes(np.random.default_rng(0).bytes(4096))
    torch.save({"model": _MarkerPayload(str(tmp_path / "PWNED"))}, tmp_path / "evil.pth")
    torch.save(_MarkerPayload(str(tmp_path / "PWNED_SHELL"), shell=True), tmp_path / "evil_shell.pth")
    (tmp_path / "a_file").write_text("a file, not a directory")
    return tmp_path


# name -> (argument overrides relative to `files`, file named in the message, phrases of the message)
BAD_INPUTS = {
    "empty_mask": ({"mask": "empty_mask.png"}, "empty_mask.png", ["empty"]),
    "mask_too_small": ({"image": "big.png", "mask": "blob_mask.png"}, "blob_mask.png", ["too small", "px"]),
    "mask_size_differs": ({"mask": "other_size_mask.png"}, "other_size_mask.png", ["60x50", "120x100"]),
    "unreadable_image": ({"image": "text.jpg"}, "text.jpg", ["not a decodable image"]),
    "missing_image": ({"image": "missing.jpg"}, "missing.jpg", ["check the path"]),
    "missing_mask": ({"mask": "missing.png"}, "missing.png", ["check the path"]),
    "unknown_model_type": ({"model_type": "vit_x"}, "vit_x", list(model_types())),
    "other_architecture": ({"model_type": "vit_b", "checkpoint": "tiny.pth"}, "tiny.pth", ["vit_b", "--model-type"]),
    "corrupt_checkpoint": ({"checkpoint": "corrupt.pth"}, "corrupt.pth", ["SAM"]),
    "code_running_pickle": ({"checkpoint": "evil.pth"}, "evil.pth", ["SAM"]),
    "shell_running_pickle": ({"checkpoint": "evil_shell.pth"}, "evil_shell.pth", ["SAM"]),
    "missing_checkpoint": ({"checkpoint": "nowhere.pth"}, "nowhere.pth", ["not found"]),
    "unwritable_out": ({"out": "a_file/sub/concept.json"}, "a_file/sub/concept.json", ["not writable"]),
}
LOCAL_FILES = ("image", "mask", "checkpoint", "out")


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_naming_the_file(case, files, capsys):
    overrides, named, phrases = BAD_INPUTS[case]
    arguments = {"image": "img.png", "mask": "good_mask.png", "out": "concept.json",
                 "model_type": "tiny", "checkpoint": "random:0"}
    arguments.update(overrides)
    for key in LOCAL_FILES:
        if key != "checkpoint" or not arguments[key].startswith("random:"):
            arguments[key] = str(files / arguments[key])

    rc = main(fit_argv(arguments["image"], arguments["mask"], arguments["out"],
                       model_type=arguments["model_type"], checkpoint=arguments["checkpoint"]))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc != 0
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("persam fit: error:"), line
    assert named in line, line
    for phrase in phrases:
        assert phrase in line, line
    assert "Traceback" not in err
    assert not (files / "concept.json").exists()  # nothing half-written


@pytest.mark.parametrize("checkpoint, marker, shell", [("evil.pth", "PWNED", False), ("evil_shell.pth", "PWNED_SHELL", True)])
def test_pickle_payload_is_never_executed(checkpoint, marker, shell, files, capsys):
    # Control: the payload really runs code when unpickled the unsafe way.
    control = files / f"control_{marker}"
    result = pickle.loads(pickle.dumps(_MarkerPayload(str(control), shell=shell)))
    if hasattr(result, "close"):
        result.close()
    assert control.exists()

    rc = main(fit_argv(files / "img.png", files / "good_mask.png", files / "concept.json", checkpoint=files / checkpoint))
    capsys.readouterr()
    assert rc != 0
    assert not (files / marker).exists()


@pytest.mark.parametrize("checkpoint", ["evil.pth", "evil_shell.pth"])
def test_refused_pickle_message_is_plain_and_safe(checkpoint, files, capsys):
    main(fit_argv(files / "img.png", files / "good_mask.png", files / "concept.json", checkpoint=files / checkpoint))
    err = capsys.readouterr().err
    assert "\x1b" not in err, repr(err)
    assert "weights_only" not in err, err


def test_zero_epochs_refused(files, capsys):
    rc = main(fit_argv(files / "img.png", files / "good_mask.png", files / "c.json", method="persam-f",
                       extra=("--epochs", "0")))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "--epochs" in err[0]


def test_shots_must_pair(files, capsys):
    argv = fit_argv(files / "img.png", files / "good_mask.png", files / "c.json") + ["--image", str(files / "img.png")]
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "--mask" in err[0]


@pytest.mark.parametrize("name", ["../escape", "a/b", ".."])
def test_bad_concept_name_refused(name, files, capsys):
    rc = main(fit_argv(files / "img.png", files / "good_mask.png", files / "c.json", name=name))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "--name" in err[0]


# Names that pass a `^...$` check or cannot name a folder on every store (issue 29 item 9)
UNFOLDERABLE = ["cat\n", "cat\r\n", "cat\r", "ca\tt", "c\x00at", "cat\x1b[31m", "cat\u2028", "", ".cat", "..",
                "...", "a" * 101, "cat/", "/cat", "c/../at", "..\\cat", "cat dog", "café", "1cat", "_cat", "cat\n\n"]


@pytest.mark.parametrize("name", UNFOLDERABLE)
def test_a_name_that_cannot_name_a_folder_is_one_line_before_work(name, files, capsys):
    out = files / "c.json"
    rc = main(fit_argv(files / "img.png", files / "good_mask.png", out, name=name))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 3 and len(err) == 1 and "--name" in err[0], err
    assert not out.exists() and not any(p.name.startswith("c.json") for p in files.iterdir())


@pytest.mark.parametrize("name", ["cat\n", "cat/x", ".cat", "a" * 101])
def test_segment_refuses_a_concept_file_whose_name_cannot_name_a_partition(name, files, tmp_path, capsys):
    """A concept file edited by hand: the same rule (fullmatch), one line, before any work."""
    import json

    out = files / "c.json"
    assert main(fit_argv(files / "img.png", files / "good_mask.png", out, name="cat")) == 0
    document = json.loads(out.read_text())
    document["name"] = name
    out.write_text(json.dumps(document))
    capsys.readouterr()
    rc = main(["segment", "--model-type", "tiny", "--checkpoint", "random:0", "--runner", "local", "--concept", str(out),
               "--input", str(files / "img.png"), "--output", str(tmp_path / "masks")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 3 and len(err) == 1 and repr(name) in err[0], err
    assert not (tmp_path / "masks").exists() or not any((tmp_path / "masks").rglob("concept=*"))


@pytest.mark.parametrize("name", ["cat", "Cat_2", "duck.toy-v1", "a" * 100])
def test_plain_names_are_accepted(name, files):
    assert main(fit_argv(files / "img.png", files / "good_mask.png", files / f"{name}.json", name=name)) == 0


def test_spec_model_types_are_all_known():
    assert {"vit_h", "vit_l", "vit_b", "vit_t", "tiny"} <= set(model_types())


def test_segment_help_lists_every_spec_flag(capsys):
    with pytest.raises(SystemExit):
        main(["segment", "--help"])
    text = capsys.readouterr().out
    for flag in ("--device", "--batch-size", "--num-actors", "--max-instances", "--min-similarity", "--cache"):
        assert flag in text, flag
