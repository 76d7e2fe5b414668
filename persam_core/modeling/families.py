"""Model families: which model types exist, how each is built and loaded, and what it can do.

In the spirit of segment_anything's `sam_model_registry`: one table, and nothing outside it
asks which family a model is. A family is the torch-free facts a command line needs (its
model types, the CPU-side input format, official checkpoints, capabilities) plus an
`implementation` loaded on first use, so `persam --help` and a job's read stage never import
torch and a SAM job never imports sam2 (hydra).

A new family is one `register_family(ModelFamily(...))` call, for example from a plug-in
module or a test: the job's commands, stages and checks all ask this registry.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

from persam_core.modeling.inputs import SAM2_INPUT, SAM_INPUT, InputFormat

if TYPE_CHECKING:  # annotations only: this module stays importable without torch
    import torch

    from persam_core.modeling.backbone import Backbone


class ModelError(ValueError):
    """A model type or checkpoint that cannot be used; the message says what to do."""


class FamilyImplementation(Protocol):
    """What a family's implementation module provides (see sam_family.py, sam2_family.py)."""

    def build(self, model_type: str) -> "torch.nn.Module":
        """The architecture with freshly initialised weights, on the CPU, in eval mode."""

    def skeleton(self, model_type: str) -> "torch.nn.Module":
        """The architecture for key and shape checks (the meta device where it can)."""

    def load(self, model_type: str, state_dict: Mapping[str, "torch.Tensor"]) -> "torch.nn.Module":
        """The architecture with `state_dict` loaded strictly (keys already checked), eval mode."""

    def owns(self, model: Any) -> bool:
        """Whether a built model belongs to this family."""

    def adapter(self, model: "torch.nn.Module") -> "Backbone":
        """The model behind the Backbone protocol the methods are written over."""


@dataclass(frozen=True)
class ModelFamily:
    """name: the family; model_types: the `--model-type` names it builds; input_format: the
    CPU-side resize and high-res levels of its encoder's input (inputs.py, torch-free).

    official_checkpoints: model type -> (URL, published SHA-256 or None); types without an
    entry take only a path, a URL or `random:SEED`. tunable_decoder: its decoder runs under
    `--decoder-precision`, decoder graphs and compilation (decoder_speed.py). video_mode: the
    name of its video evaluation mode; tracks_with_memory: `persam track` can follow a concept
    with the family's own video memory; sam_predictor_decodes: its decodes are segment_anything's
    SamPredictor's, which methods specified on SAM alone (GF-SAM) need.
    """

    name: str
    model_types: tuple[str, ...]
    implementation: Callable[[], FamilyImplementation]
    input_format: InputFormat
    official_checkpoints: Mapping[str, tuple[str, str | None]] = field(default_factory=dict)
    tunable_decoder: bool = False
    video_mode: str = "sam-prior"
    tracks_with_memory: bool = False
    sam_predictor_decodes: bool = False


def module_implementation(name: str) -> Callable[[], ModuleType]:
    """A family implementation that is a module, imported on first use."""
    return lambda: importlib.import_module(name)


_FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Add a family; its model types must be new (a name means one architecture)."""
    taken = {t: f.name for f in _FAMILIES.values() for t in f.model_types if f.name != family.name}
    clash = [t for t in family.model_types if t in taken]
    if clash:
        raise ValueError(f"model type {clash[0]!r} already belongs to the {taken[clash[0]]!r} family")
    _FAMILIES[family.name] = family
    return family


def unregister_family(name: str) -> None:
    _FAMILIES.pop(name, None)


def families() -> tuple[ModelFamily, ...]:
    return tuple(_FAMILIES.values())


def model_types() -> tuple[str, ...]:
    """Every model type, family by family, in registration order."""
    return tuple(t for f in _FAMILIES.values() for t in f.model_types)


def family_of(model_type: str) -> ModelFamily:
    for family in _FAMILIES.values():
        if model_type in family.model_types:
            return family
    raise ModelError(f"unknown model type {model_type!r}: choose one of {', '.join(model_types())}")


def implementation_of(model_type: str) -> FamilyImplementation:
    return family_of(model_type).implementation()


def input_format(model_type: str) -> InputFormat:
    """The CPU-side input contract of `model_type`: no model is built, no torch imported."""
    return family_of(model_type).input_format


def family_of_model(model: Any) -> ModelFamily:
    """The family of a built model: the latest registered that owns it, so that a family of
    a subclass (registered after the family of its base class) is told apart."""
    for family in reversed(_FAMILIES.values()):
        if family.implementation().owns(model):
            return family
    raise ModelError(f"{type(model).__name__} is no model of a registered family ({', '.join(_FAMILIES)})")


def as_backbone(model: Any) -> "Backbone":
    """A built model (or an existing backbone) -> its Backbone, a thin view without a copy."""
    if not _is_module(model):
        return model
    return family_of_model(model).implementation().adapter(model)


def _is_module(model: Any) -> bool:
    import torch

    return isinstance(model, torch.nn.Module)


_SAM = "https://dl.fbaipublicfiles.com/segment_anything/"
_SAM2 = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"

register_family(ModelFamily(
    name="sam",
    model_types=("vit_h", "vit_l", "vit_b", "vit_t", "tiny"),
    implementation=module_implementation("persam_core.modeling.sam_family"),
    input_format=SAM_INPUT,
    official_checkpoints={
        "vit_h": (_SAM + "sam_vit_h_4b8939.pth", "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e"),
        "vit_l": (_SAM + "sam_vit_l_0b3195.pth", "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622"),
        "vit_b": (_SAM + "sam_vit_b_01ec64.pth", "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"),
        "vit_t": ("https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
                  "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f"),
    },
    tunable_decoder=True,
    video_mode="sam-prior",
    sam_predictor_decodes=True,
))
register_family(ModelFamily(
    name="sam2",
    model_types=("sam2.1_t", "sam2.1_s", "sam2.1_b+", "sam2.1_l", "tiny_sam2"),
    implementation=module_implementation("persam_core.modeling.sam2_family"),
    input_format=SAM2_INPUT,
    # Files are {"model": state_dict}; Meta publishes no SHA-256 for them, so none is checked.
    official_checkpoints={
        "sam2.1_t": (_SAM2 + "sam2.1_hiera_tiny.pt", None),
        "sam2.1_s": (_SAM2 + "sam2.1_hiera_small.pt", None),
        "sam2.1_b+": (_SAM2 + "sam2.1_hiera_base_plus.pt", None),
        "sam2.1_l": (_SAM2 + "sam2.1_hiera_large.pt", None),
    },
    video_mode="sam2-memory",
    tracks_with_memory=True,
))
