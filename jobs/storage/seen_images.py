"""A bounded-memory set of the images a run has already planned: 16 bytes per image.

A manifest is planned in waves (listing.waves) so that the driver never holds the whole
lake; an image listed again in a later wave must not be run again. The set keeps a 128-bit
BLAKE2b digest of each image's name (its identity, redaction.image_name) in one sorted
numpy array: 16 bytes per distinct image (1.6 GB for 100 M images), against ~100 bytes for
a Python set of the same digests. At 128 bits two names share a digest with probability
about n^2 / 2^129 (1e-23 for 100 M images): no image is lost to a collision in practice.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

DIGEST_BYTES = 16
_DTYPE = np.dtype(f"S{DIGEST_BYTES}")


def name_digest(name: str) -> bytes:
    """16 bytes identifying `name` (surrogate-escaped file names included)."""
    return hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=DIGEST_BYTES).digest()


class SeenImages:
    """Digests of the names added so far; `first_seen` marks the names not seen before."""

    def __init__(self) -> None:
        self._sorted = np.empty(0, dtype=_DTYPE)

    def __len__(self) -> int:
        return len(self._sorted)

    def first_seen(self, names: Sequence[str]) -> list[bool]:
        """-> for each of `names`: True when seen neither before nor earlier in `names`; all
        of them are seen afterwards. One sorted merge per call: call it once per wave."""
        digests = np.array([name_digest(n) for n in names], dtype=_DTYPE)
        if len(self._sorted):
            position = np.searchsorted(self._sorted, digests).clip(max=len(self._sorted) - 1)
            known = self._sorted[position] == digests
        else:
            known = np.zeros(len(names), dtype=bool)
        _, first = np.unique(digests, return_index=True)  # a repeat inside this call counts once
        fresh = np.zeros(len(names), dtype=bool)
        fresh[first] = True
        fresh &= ~known
        # two sorted runs: the stable sort (timsort) merges them in linear time
        self._sorted = np.sort(np.concatenate([self._sorted, np.sort(digests[fresh])]), kind="stable")
        return fresh.tolist()
