"""The method registry: every `--method` name, and what each method needs, asked in one place.

A method is one module exposing `METHOD`, an object with the `Method` attributes below. The
CLI's choices, the concept-file loader, the driver's checks, the prepare stage (which frames
to make) and the model actor (which encoders to run, which batched passes) ask the registry;
nothing else spells a method's name. Built-in methods are listed here by module and imported
on first use, so that `persam --help` (which lists the names) never loads torch; a method
written elsewhere (a plug-in, a test) calls `register(METHOD)` and runs through every command.

Two methods share an `engine` when their pairs run through one batched pass (PerSAM and
PerSAM-F: one location prior for both, their decoder passes side by side).
"""

from __future__ import annotations

import importlib
import json
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence

if TYPE_CHECKING:  # annotations only: this module imports nothing heavy
    import numpy as np

# The per-image inputs a method's engine reads (made by the prepare stage, encoded by the actor):
FRAME_MODEL = "model"  # the SAM family's own input frame (persam_core.modeling.inputs: SAM resizes the longest side)
FRAME_STRETCH = "stretch"  # the image stretched to FRAME_SIDE x FRAME_SIDE, aspect ratio not kept (GF-SAM)
FRAME_SIDE = 1024  # the stretch frame's side
FRAMES = (FRAME_MODEL, FRAME_STRETCH)

_BUILTIN = {
    "persam": "persam_core.methods.persam",
    "persam-f": "persam_core.methods.persam_f",
    "gf-sam": "persam_core.methods.gfsam",
}
_REGISTERED: dict[str, "Method"] = {}


class ConceptError(ValueError):
    """A reference or concept file that cannot be used; the message says what to do."""


class Engine(Protocol):
    """A batched pass over the (image, concept) pairs of one encoder batch.

    `images` are FrameImage objects of the engine's `frame` (features: [256, 64, 64] on the
    device, sizes, and DINOv2 tokens [1369, C] where `needs_dinov2`); `concepts` is what
    `on_device` made of the engine's concepts (K of them). Results are persam_core.batch
    HostResults whose concept_index counts this engine's concepts."""

    frame: str
    needs_dinov2: bool
    ranks: bool  # has `score` (rank's pass: presence and a point, no decoding)
    # whether `score` reads SAM's features: False when presence needs DINOv2's tokens alone
    # (rank's first pass then neither loads SAM nor runs its encoder; FrameImage.encoded is None)
    score_reads_sam: bool

    def on_device(self, concepts: Sequence[Any], device: Any) -> Any: ...

    def segment(self, sam: Any, images: Sequence[Any], concepts: Any, max_instances: int,
                min_similarity: float | None) -> Any: ...

    def score(self, sam: Any, images: Sequence[Any], concepts: Any) -> tuple["np.ndarray", "np.ndarray"]:
        """-> similarity [B, K] float32, point [B, K, 2] int32 (x, y) in original pixels."""
        ...


class Method(Protocol):
    """name: the `--method` value and the rows' `method` column; engine: its batched pass;
    fit: shots -> its concept (an object with name, method, to_json(), require_models());
    concept_from_document: a parsed concept file -> its concept, validated (ConceptError
    naming `source` and the field otherwise); accepts: whether a concept object is this method's."""

    name: str
    engine: Engine

    def fit(self, shots: "Shots", models: "FitModels", log: Callable[[str], None]) -> Any: ...

    def concept_from_document(self, document: Mapping[str, Any], source: str) -> Any: ...

    def accepts(self, concept: Any) -> bool: ...


class Shots:
    """What `fit` reads: images [H, W, 3] uint8, masks [H, W] bool (same size), their names
    (redacted), the concept's name and the fit's own settings: epochs (None: the method's
    default) and progress(epochs) -> an on_epoch(epoch, loss) callback for iterative fits."""

    def __init__(self, name: str, images: Sequence["np.ndarray"], masks: Sequence["np.ndarray"],
                 image_sources: Sequence[str], mask_sources: Sequence[str], epochs: int | None = None,
                 progress: Callable[[int], Callable[[int, float], None]] | None = None) -> None:
        self.name, self.images, self.masks = name, list(images), list(masks)
        self.image_sources, self.mask_sources = tuple(image_sources), tuple(mask_sources)
        self.epochs, self.progress = epochs, progress


class FitModels:
    """The models a fit may use, loaded on first ask (a GF-SAM fit never loads SAM).
    sam() -> (model on the device, fingerprint); dinov2() -> (kind, model on the device, fingerprint)."""

    def __init__(self, sam: Callable[[], tuple[Any, str]], dinov2: Callable[[], tuple[str, Any, str]]) -> None:
        self._loaders = {"sam": sam, "dinov2": dinov2}
        self._loaded: dict[str, Any] = {}

    def _get(self, which: str):
        if which not in self._loaded:
            self._loaded[which] = self._loaders[which]()
        return self._loaded[which]

    def sam(self) -> tuple[Any, str]:
        return self._get("sam")

    def dinov2(self) -> tuple[str, Any, str]:
        return self._get("dinov2")


def register(method: Method) -> None:
    """Add (or replace) a method: its name becomes a `--method` choice and a valid concept."""
    _REGISTERED[method.name] = method


def unregister(name: str) -> None:
    """Remove a method added by `register` (built-ins come back on their next use)."""
    _REGISTERED.pop(name, None)


def method_names() -> tuple[str, ...]:
    """Every method's name, built-ins first (no method module imported)."""
    return tuple(dict.fromkeys([*_BUILTIN, *_REGISTERED]))


def get_method(name: str) -> Method:
    """The method called `name`; a ConceptError listing the names for an unknown one."""
    if name not in _REGISTERED:
        if name not in _BUILTIN:
            raise ConceptError(f"unknown method {name!r}: choose one of {', '.join(method_names())}")
        _REGISTERED[name] = importlib.import_module(_BUILTIN[name]).METHOD
    return _REGISTERED[name]


def method_of(concept: Any) -> Method:
    """The method of a loaded concept."""
    return get_method(concept.method)


def parse_concept_file(text: str, source: str = "concept") -> Any:
    """A concept file's text -> its parsed JSON document; one-line ConceptError naming `source`
    for text that is no JSON (RecursionError: nested too deep)."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise ConceptError(f"{source}: not a concept file ({error.__class__.__name__}); "
                           "re-create it with `persam fit`") from None


def load_concept(text: str, source: str = "concept") -> Any:
    """A concept file's text -> its method's concept, validated; one-line ConceptError naming
    `source` otherwise."""
    redo = "re-create it with `persam fit`"
    document = parse_concept_file(text, source)
    if not isinstance(document, dict) or not isinstance(document.get("method"), str):
        raise ConceptError(f"{source}: not a concept file (no method); {redo}")
    if document["method"] not in method_names():
        raise ConceptError(f"{source}: unknown method {document['method']!r}; {redo}")
    return get_method(document["method"]).concept_from_document(document, source)


def concept_label(text: str) -> tuple[str, str]:
    """(name, method) of a concept file's text, without validating its payload (cheap)."""
    document = json.loads(text)
    return str(document["name"]), str(document["method"])


def engines_of(concepts: Sequence[Any]) -> list[tuple[Engine, list[int]]]:
    """The engines a list of concepts runs, in first-use order, each with its concepts'
    positions in the list (one batched pass per engine)."""
    groups: list[tuple[Engine, list[int]]] = []
    for position, concept in enumerate(concepts):
        engine = method_of(concept).engine
        for known, positions in groups:
            if known is engine:
                positions.append(position)
                break
        else:
            groups.append((engine, [position]))
    return groups


def frames_of(methods: Sequence[str]) -> tuple[str, ...]:
    """The frames the named methods read, in FRAMES order."""
    wanted = {get_method(name).engine.frame for name in methods}
    return tuple(frame for frame in FRAMES if frame in wanted)


def needs_dinov2(methods: Sequence[str]) -> bool:
    return any(get_method(name).engine.needs_dinov2 for name in methods)


def presence_reads_sam(methods: Sequence[str]) -> bool:
    """Whether the presence pass (rank's first) of the named methods reads SAM's features; an
    engine that does not say (a plug-in written before `score_reads_sam`) is taken to read them."""
    return any(getattr(get_method(name).engine, "score_reads_sam", True) for name in methods)
