"""What every export kind is handed: one signature for all of them (the table in __init__.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from jobs.exports.rows import MaskDataset


@dataclass(frozen=True)
class ExportRequest:
    """dataset: the masks, shard by shard; output: the file or folder URL; images: where the
    images are now (--images); image_root: what file names are relative to (--image-root)."""

    dataset: MaskDataset
    output: str
    images: str | None
    image_root: str | None
    storage_options: dict | None
    log: Callable[[str], None]

    def fields(self) -> tuple:
        return self.dataset, self.output, self.images, self.image_root, self.storage_options, self.log
