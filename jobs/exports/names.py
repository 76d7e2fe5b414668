"""File names derived from data (image URIs, concept names) for export folders."""

from __future__ import annotations

import hashlib
import re


def safe_file_name(*parts: str) -> str:
    """A name that cannot leave its directory, unique per input (short hash suffix)."""
    text = "_".join(parts)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", text.rsplit("/", 1)[-1])[:80].lstrip(".") or "item"
    return f"{stem}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
