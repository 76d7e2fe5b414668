"""The few-shot benchmarks' layouts, checked before any work: FSS-1000 and COCO-20i.

    FSS-1000   <data>/<class>/<n>.jpg + <n>.png (masks: grey level >= 128 is the object);
               classes from --split (upstream's splits/test.txt) or every class folder
    COCO-20i   <data>/annotations/instances_val2014.json (pycocotools) + <data>/val2014/*.jpg;
               a class's mask in an image = the union of its instances' masks (crowd regions
               included); its images from --split (upstream's splits/val/fold<N>.pkl, read
               without executing code) or every image with an instance of it

Episodes themselves are drawn by persam_core.evaluation.fewshot.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
from dataclasses import dataclass, field

import numpy as np
from fsspec.core import url_to_fs
from PIL import Image

from jobs.commands.eval_report import EvalError
from jobs.storage.files import as_given, folder_entries, read_bytes
from jobs.storage.images import decode_image
from jobs.storage.redaction import redact
from jobs.storage.schema import AREA, HEIGHT, WIDTH  # the same words in COCO's own format

FSS_IMAGE_EXTENSIONS = (".jpg", ".jpeg")
COCO_SPLIT = "val2014"  # upstream evaluates COCO-20i on COCO 2014 val
COCO_ANNOTATIONS = f"annotations/instances_{COCO_SPLIT}.json"
MASK_THRESHOLD = 128  # upstream's FSS read_mask: grey level >= 128 is the object


@dataclass
class FewShotData:
    """classes: label -> image names in support-draw order; url(name) -> the image URL;
    truth(name, label) -> [H, W] bool; names: label -> display name."""

    benchmark: str
    source: str  # what a bad-data message names
    classes: dict[str, list[str]]
    names: dict[str, str] = field(default_factory=dict)
    _url: object = None
    _truth: object = None

    def url(self, image: str) -> str:
        return self._url(image)

    def truth(self, image: str, label: str) -> np.ndarray:
        return self._truth(image, label)

    def image(self, image: str, storage_options: dict | None) -> np.ndarray:
        url = self.url(image)
        return decode_image(read_bytes(url, storage_options), redact(url))


def _split_lines(url: str, storage_options: dict | None) -> list[str]:
    try:
        text = read_bytes(url, storage_options).decode("utf-8")
    except FileNotFoundError:
        raise EvalError(f"{redact(url)}: split file not found; give a class list (one name a line)") from None
    return sorted({line.strip() for line in text.splitlines() if line.strip()})


def _fss_mask(url: str, storage_options: dict | None) -> np.ndarray:
    try:
        grey = Image.open(io.BytesIO(read_bytes(url, storage_options))).convert("L")
    except FileNotFoundError:
        raise EvalError(f"{redact(url)}: mask not found") from None
    except OSError as error:
        raise EvalError(f"{redact(url)}: not a readable mask image ({error})") from None
    return np.asarray(grey) >= MASK_THRESHOLD


def _support_order(names: list[str]) -> list[str]:
    """Numeric stems in numeric order (upstream draws 1..10), else name order."""
    stems = [os.path.splitext(n)[0] for n in names]
    if all(s.isdigit() for s in stems):
        return [n for _, n in sorted(zip((int(s) for s in stems), names))]
    return sorted(names)


def scan_fss(data: str, split: str | None, storage_options: dict | None = None) -> FewShotData:
    """Check the FSS-1000 layout (every listed class: >= 2 images, each with its .png)."""
    fs, root = url_to_fs(data, **(storage_options or {}))
    root = root.rstrip("/")
    url = as_given(fs, data)
    if not fs.isdir(root):
        raise EvalError(f"{redact(data)}: not a folder; expected FSS-1000's <class>/<n>.jpg + <n>.png")
    present = folder_entries(fs, root)[0]
    wanted = _split_lines(split, storage_options) if split else sorted(present)
    missing = [name for name in wanted if name not in present]
    if missing:
        raise EvalError(f"{redact(data)}: class folder {missing[0]!r} of {redact(split or data)} is missing "
                        f"({len(missing)} missing in all)")
    classes: dict[str, list[str]] = {}
    for name in wanted:
        files = folder_entries(fs, f"{root}/{name}")[1]
        images = [f for f in files if f.lower().endswith(FSS_IMAGE_EXTENSIONS) and not f.startswith(".")]
        for image in images:
            if f"{os.path.splitext(image)[0]}.png" not in files:
                raise EvalError(f"{redact(url(f'{root}/{name}/{image}'))} has no mask "
                                f"{os.path.splitext(image)[0]}.png beside it")
        if len(images) < 2:
            raise EvalError(f"{redact(url(f'{root}/{name}'))}: class has {len(images)} image(s); an episode "
                            "needs a query and a support (at least 2 images with masks)")
        classes[name] = _support_order(images)
    if not classes:
        raise EvalError(f"{redact(data)}: no class folders; expected FSS-1000's <class>/<n>.jpg + <n>.png")

    def image_url(image: str) -> str:
        return url(f"{root}/{image}")

    def truth(image: str, label: str) -> np.ndarray:
        return _fss_mask(image_url(f"{os.path.splitext(image)[0]}.png"), storage_options)

    names = {label: label for label in classes}
    # episode images are named <class>/<file>: one namespace for the whole benchmark
    return FewShotData("fss1000", redact(data), {k: [f"{k}/{v}" for v in vs] for k, vs in classes.items()},
                       names, image_url, truth)


class _PlainUnpickler(pickle.Unpickler):
    """Upstream's split files are pickled dicts of lists of str: plain data, no classes."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing {module}.{name}: a split file holds only lists of image names")


def _coco_split(url: str, storage_options: dict | None) -> dict[int, list[str]]:
    """fold<N>.pkl (upstream: 0-based class -> image names) -> 1-based class -> image names."""
    try:
        data = read_bytes(url, storage_options)
        value = _PlainUnpickler(io.BytesIO(data)).load()
    except FileNotFoundError:
        raise EvalError(f"{redact(url)}: split file not found; give the folder of fold0.pkl .. fold3.pkl") from None
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise EvalError(f"{redact(url)}: not a split file ({error})") from None
    if not isinstance(value, dict) or not all(isinstance(k, int) and isinstance(v, list) for k, v in value.items()):
        raise EvalError(f"{redact(url)}: not a split file (expected a dict of class -> list of image names)")
    return {int(k) + 1: [str(n) for n in v] for k, v in value.items()}


def _load_coco(url: str, storage_options: dict | None):
    from pycocotools.coco import COCO

    try:
        document = json.loads(read_bytes(url, storage_options))
    except FileNotFoundError:
        raise EvalError(f"{redact(url)}: COCO annotation file not found; expected <data>/{COCO_ANNOTATIONS}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise EvalError(f"{redact(url)}: not a COCO annotation file ({error})") from None
    if not isinstance(document, dict) or not all(k in document for k in ("images", "annotations", "categories")):
        raise EvalError(f"{redact(url)}: not a COCO instances file (needs images, annotations and categories)")
    coco = COCO()
    coco.dataset = document
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco.createIndex()
    return coco


def scan_coco(data: str, folds: list[int], split: str | None, storage_options: dict | None = None) -> list[FewShotData]:
    """COCO-20i, one FewShotData per fold (the file parsed once): the fold's classes with >= 2
    images (a fold with none -> an error naming the file)."""
    from persam_core.evaluation.fewshot import coco_fold_classes

    fs, root = url_to_fs(data, **(storage_options or {}))
    root = root.rstrip("/")
    url = as_given(fs, data)
    annotations = url(f"{root}/{COCO_ANNOTATIONS}")
    coco = _load_coco(annotations, storage_options)
    category_ids = sorted(c["id"] for c in coco.dataset["categories"])
    contiguous = {cat: index + 1 for index, cat in enumerate(category_ids)}  # COCO's 80 ids -> 1..80
    category_of = {index: cat for cat, index in contiguous.items()}
    by_name = {f"{COCO_SPLIT}/{image['file_name']}": image for image in coco.dataset["images"]}
    present: dict[int, set[str]] = {}
    for ann in coco.dataset["annotations"]:
        if ann.get(AREA, 1) > 0 and ann["category_id"] in contiguous and ann["image_id"] in coco.imgs:
            present.setdefault(contiguous[ann["category_id"]], set()).add(
                f"{COCO_SPLIT}/{coco.imgs[ann['image_id']]['file_name']}")

    def image_url(image: str) -> str:
        return url(f"{root}/{image}")

    def truth(image: str, label: str) -> np.ndarray:
        info = by_name[image]
        mask = np.zeros((info[HEIGHT], info[WIDTH]), bool)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[info["id"]], catIds=[category_of[int(label)]], iscrowd=None)):
            mask |= coco.annToMask(ann).astype(bool)
        return mask

    result = []
    for fold in folds:
        if split:
            listed = _coco_split(f"{split.rstrip('/')}/fold{fold}.pkl", storage_options)
        else:
            listed = {k: sorted(v) for k, v in present.items()}
        classes = {str(c): listed[c] for c in coco_fold_classes(fold) if len(listed.get(c, ())) >= 2}
        if not classes:
            raise EvalError(f"{redact(annotations)}: no class of COCO-20i fold {fold} has 2 images "
                            "(a query and a support); check the annotation file or --fold")
        for images in classes.values():
            unknown = [n for n in images if n not in by_name]
            if unknown:
                raise EvalError(f"{redact(annotations)}: the split lists {unknown[0]}, which the file does not hold")
        names = {label: coco.cats[category_of[int(label)]]["name"] for label in classes if int(label) in category_of}
        result.append(FewShotData("coco20i", redact(annotations), classes, names, image_url, truth))
    return result
