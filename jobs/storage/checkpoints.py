"""Checkpoint specs -> a loaded SAM and its fingerprint.

A spec is `random:SEED` (the architecture with torch.manual_seed(SEED) weights),
`official` (the published file for the model type, SHA-256 checked where published), a local path, or
any fsspec URL (s3://, gs://, https://...). Remote files are downloaded once per node
into the cache (`PERSAM_CACHE`, default ~/.cache/persam) under a lock, written to a
temporary name and renamed, so parallel actors never see half a file.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import fsspec
from persam_core.modeling.backbone import Model

from persam_core.modeling.families import families, family_of
from persam_core.modeling.models import ModelError, build_from_state_dict, build_random, fingerprint, load_state_dict_file, model_fingerprint

from jobs.storage.redaction import redact

_RANDOM = re.compile(r"^random:(\d+)$")


def cache_dir() -> Path:
    return Path(os.environ.get("PERSAM_CACHE") or Path.home() / ".cache" / "persam")


def random_seed(spec: str) -> int | None:
    match = _RANDOM.match(spec)
    return int(match.group(1)) if match else None


def official_url(model_type: str) -> str:
    published = family_of(model_type).official_checkpoints
    if model_type not in published:
        raise ModelError(f"no official checkpoint for --model-type {model_type}; pass --checkpoint PATH or random:SEED")
    return published[model_type][0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _expected_sha256(name: str) -> str | None:
    published = (entry for family in families() for entry in family.official_checkpoints.values())
    return next((sha for url, sha in published if url.rsplit("/", 1)[-1] == name), None)


def fetch(url: str, storage_options: dict | None = None) -> Path:
    """A local path for `url`: itself when local, else a verified copy in the cache."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    if protocol in ("file", "local"):
        path = Path(url.split("://", 1)[-1]).expanduser()
        if not path.is_file():
            raise ModelError(f"{url}: checkpoint file not found; pass an existing path or URL")
        return path
    name = redact(url).rstrip("/").rsplit("/", 1)[-1] or "checkpoint.pth"
    key = hashlib.sha256(redact(url).encode()).hexdigest()[:16]
    target = cache_dir() / "checkpoints" / key / name
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one download per node, however many actors start
        # Downloads only happen under this lock, and a dead process holds no lock: every
        # partial file found now is the leftover of a killed download.
        for leftover in target.parent.glob(f"{name}.part*"):
            leftover.unlink(missing_ok=True)
        if not target.exists():
            partial = target.with_suffix(target.suffix + f".part{os.getpid()}")
            try:
                with fsspec.open(url, "rb", **(storage_options or {})) as source, open(partial, "wb") as sink:
                    for block in iter(lambda: source.read(1 << 22), b""):
                        sink.write(block)
            except Exception as error:
                partial.unlink(missing_ok=True)
                raise ModelError(f"{redact(url)}: cannot download ({type(error).__name__}); check the URL, the network and credentials") from None
            expected = _expected_sha256(name)
            if expected is not None and _sha256(partial) != expected:
                partial.unlink(missing_ok=True)
                raise ModelError(f"{redact(url)}: SHA-256 does not match the published {name}; the download is corrupt")
            os.replace(partial, target)
    return target


@dataclass(frozen=True)
class LoadedModel:
    sam: Model
    fingerprint: str
    source: str


def load_model(model_type: str, spec: str, storage_options: dict | None = None) -> LoadedModel:
    """Build SAM for `model_type` from a checkpoint spec (see module docstring)."""
    seed = random_seed(spec)
    if seed is not None:
        sam = build_random(model_type, seed)
        return LoadedModel(sam, model_fingerprint(sam, model_type), spec)
    url = official_url(model_type) if spec == "official" else spec
    path = fetch(url, storage_options)
    state = load_state_dict_file(str(path))
    sam = build_from_state_dict(model_type, state, source=redact(url))
    return LoadedModel(sam, fingerprint(state, model_type), redact(url))


def random_weights_note(spec: str) -> str | None:
    """The warning every output carries when the weights are random."""
    if random_seed(spec) is None:
        return None
    return "weights are random (--checkpoint random:SEED): masks are NOT meaningful; pass real SAM weights"
