"""PerSAM-F as a registry method: PerSAM's engine and concept, plus the three fitted mask weights."""

from __future__ import annotations

from .persam import PerSAMMethod

METHOD = PerSAMMethod("persam-f", mask_weights=True)
