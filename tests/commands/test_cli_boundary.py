"""The CLI boundary: any error is one scrubbed line with a documented exit code, never a traceback."""

from __future__ import annotations

import json

import pytest

from jobs import cli
from jobs.storage.redaction import redact, scrub, secrets_in

SECRET_KEY, SECRET_TOKEN, SIGNATURE = "AKIAEXAMPLEKEY", "sEcReT/tOkEn+value", "X-Amz-Signature=deadbeefcafe"


@pytest.mark.parametrize("failure,code,word", [
    (RuntimeError, 1, "failed"),  # a library's error
    (KeyError, 1, "failed"),
    (ValueError, 3, "error"),  # ours: bad input
    (OSError, 3, "error"),
])
def test_any_error_is_one_scrubbed_line(monkeypatch, capsys, failure, code, word):
    url = f"s3://{SECRET_KEY}:{SECRET_TOKEN}@bucket/photos/?{SIGNATURE}"

    def explode(args):
        raise failure(f"while reading {url} with token {SECRET_TOKEN}\nsecond line\nTraceback (most recent call last)")

    monkeypatch.setattr(cli, "_run", explode)
    options = json.dumps({"key": "OPTIONKEY123", "secret": "OPTIONSECRET456", "client_kwargs": {"region_name": "eu"}})
    exit_code = cli.main(["export", "coco", "--masks", url, "--output", "out.json", "--storage-options", options])
    captured = capsys.readouterr()
    assert exit_code == code
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"persam export: {word}:")
    for secret in (SECRET_KEY, SECRET_TOKEN, "deadbeefcafe", "OPTIONKEY123", "OPTIONSECRET456"):
        assert secret not in captured.err and secret not in captured.out
    assert "Traceback" not in captured.err
    assert "s3://bucket/photos/" in lines[0]  # the redacted URL still names the place


def test_scrub_and_redact_rules():
    text = "GET https://user:pw@host.example/a/b.jpg?sig=abc&token=xyz failed; local what?.jpg kept"
    assert scrub(text) == "GET https://host.example/a/b.jpg failed; local what?.jpg kept"
    assert redact("s3://k:s@b/p/x.jpg?versionId=1") == "s3://b/p/x.jpg"
    assert redact("photos/what?.jpg") == "photos/what?.jpg"
    assert secrets_in(["s3://k3y:s3cret@b/p?sig=123", {"a": ["https://h/x?tok=999"]}]) >= {"k3y", "s3cret", "sig=123", "tok=999"}


# ---------------------------------------------------------------------------- exit classes (issue 29 item 15)


@pytest.mark.parametrize("code", [28, 122])  # ENOSPC, EDQUOT: the machine, not the input
def test_a_full_disk_is_a_failure_naming_the_file_not_bad_input(tmp_path, monkeypatch, code):
    import os

    from input_tools import fit_concept, segment, write_scenes
    from jobs.storage import files

    concept = fit_concept(tmp_path / "concept")
    write_scenes(tmp_path / "lake", ["a.jpg", "b.jpg"])

    def full(descriptor):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(files.os, "fsync", full)
    for argv in (("segment",), ("fit",)):
        if argv == ("segment",):
            result = segment(concept, str(tmp_path / "lake"), tmp_path / "out")
            named = str(tmp_path / "out")
        else:
            from cli_tools import MODEL, run_cli

            result = run_cli(["fit", *MODEL, "--image", str(tmp_path / "concept/ref.jpg"), "--mask",
                              str(tmp_path / "concept/ref.png"), "--name", "again", "--out", str(tmp_path / "again.json")])
            named = str(tmp_path / "again.json")
        lines = result.err.strip().splitlines()
        assert result.rc == 1, result.err
        assert len(lines) == 1 and "failed: OSError" in lines[0] and os.strerror(code) in lines[0], lines
        assert named in lines[0], lines


@pytest.mark.parametrize("nesting", ["[" * 100_000, '{"a":' * 50_000, "[" * 3000 + "]" * 3000,
                                     '{"format": "persam-concept", "name": ' + "[" * 100_000])
def test_a_deeply_nested_concept_file_is_bad_input_naming_it(tmp_path, nesting):
    from input_tools import segment

    concept = tmp_path / "deep.json"
    concept.write_text(nesting)
    result = segment(concept, str(tmp_path), tmp_path / "out")
    lines = result.err.strip().splitlines()
    assert result.rc == 3 and len(lines) == 1 and str(concept) in lines[0] and "concept" in lines[0], result.err
