"""A third model family registered from the tests folder alone: SAM's `tiny` config under a
new model type, as its own class, with its own builder, loader and adapter. It proves that a
family is one registry entry: nothing under jobs/ names it."""

from __future__ import annotations

from types import SimpleNamespace

from segment_anything.modeling import Sam

from persam_core.modeling import sam_family
from persam_core.modeling.families import ModelFamily, register_family, unregister_family
from persam_core.modeling.inputs import SAM_INPUT
from persam_core.modeling.sam_backbone import SamBackbone

TOY_TYPE = "toy_tiny"


class ToySam(Sam):
    """The tiny SAM's modules, a class of its own (so the family is told apart by its model)."""


def _build(model_type: str) -> ToySam:
    model = sam_family.build("tiny")
    model.__class__ = ToySam
    return model.eval()


def _load(model_type: str, state_dict) -> ToySam:
    model = _build(model_type)
    model.load_state_dict(state_dict, strict=True)
    return model.float().eval()


IMPLEMENTATION = SimpleNamespace(
    build=_build,
    skeleton=_build,
    load=_load,
    owns=lambda model: isinstance(model, ToySam),
    adapter=SamBackbone,
)
TOY = ModelFamily(name="toy", model_types=(TOY_TYPE,), implementation=lambda: IMPLEMENTATION, input_format=SAM_INPUT)


def register() -> None:
    register_family(TOY)


def unregister() -> None:
    unregister_family(TOY.name)
