"""The methods' tests share one SAM: the session's tiny random one."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def sam(tiny_sam):
    """tests/conftest.py's `tiny_sam`. The GF-SAM stand-ins (gfsam_standins.standin_decoder)
    swap its modules only inside their block and put the originals back when it ends."""
    return tiny_sam
