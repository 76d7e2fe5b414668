"""The SAM 2 family: SAM 2.1 (Hiera t, s, b+, l) and `tiny_sam2`, built by the sam2 package.

sam2 (and hydra) are imported only when a SAM 2 model is built or asked about.
"""

from __future__ import annotations

import sys
from typing import Any, Mapping

import torch

from persam_core.modeling.sam2_models import build_sam2_model


def build(model_type: str) -> torch.nn.Module:
    return build_sam2_model(model_type)


def skeleton(model_type: str) -> torch.nn.Module:
    """Built on the CPU: sam2 computes tensors at construction that a meta build cannot hold
    (its RoPE tables, moved to CUDA when there is one)."""
    return build_sam2_model(model_type)


def load(model_type: str, state_dict: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    model = skeleton(model_type)
    model.load_state_dict(state_dict, strict=True)
    return model.float().eval()


def owns(model: Any) -> bool:
    # A model built by sam2 means sam2 is imported: asking about any other model must not
    # import it (hydra's start-up) just to say no.
    module = sys.modules.get("sam2.modeling.sam2_base")
    return module is not None and isinstance(model, module.SAM2Base)


def adapter(model: torch.nn.Module):
    from persam_core.modeling.sam2_backbone import Sam2Backbone

    return Sam2Backbone(model)
