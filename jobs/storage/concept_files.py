"""`--concept` URLs -> concepts: concept files (JSON written by `persam fit`) or folders of them."""

from __future__ import annotations

from typing import Sequence

from fsspec.core import url_to_fs

from persam_core.methods.registry import ConceptError, load_concept

from jobs.storage.files import NotAFileError, as_given, read_file_bytes
from jobs.storage.redaction import redact

# A PerSAM concept is a few KB; a GF-SAM concept holds every DINOv2 token of each shot
# (about 7 MiB of base64 per ViT-L shot), so 256 MiB is dozens of shots: more is not one of ours.
MAX_CONCEPT_BYTES = 256 << 20


def concept_files(paths: Sequence[str], storage_options: dict) -> list[str]:
    """Files as given; a folder -> its *.json files, sorted."""
    files: list[str] = []
    for path in paths:
        fs, root = url_to_fs(path, **storage_options)
        if fs.isdir(root):
            files.extend(map(as_given(fs, path), sorted(fs.glob(f"{root.rstrip('/')}/*.json"))))
        else:
            files.append(path)
    return files


def read_concepts(paths: Sequence[str], storage_options: dict) -> list:
    """Concept files (or folders of *.json) -> concepts, names unique."""
    concepts = []
    for path in concept_files(paths, storage_options):
        try:  # a regular file only (a FIFO would block, /dev/zero never end)
            data = read_file_bytes(path, storage_options, MAX_CONCEPT_BYTES, shown=redact(path))
            text = data.decode("utf-8", errors="replace")
        except NotAFileError as error:
            raise ConceptError(f"{error}; pass a concept file written by `persam fit`") from None
        except (OSError, ValueError) as error:
            raise ConceptError(f"{redact(path)}: cannot read concept file ({type(error).__name__}); "
                               "pass a file written by `persam fit`") from None
        concepts.append(load_concept(text, source=redact(path)))
    names = [c.name for c in concepts]
    if not concepts:
        raise ConceptError("no concept given: pass --concept FILE (written by `persam fit`)")
    if len(set(names)) != len(names):
        raise ConceptError(f"concept names must be unique, got {names}")
    return concepts
