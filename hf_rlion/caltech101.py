"""Caltech101 images with their single bounding box, read from the official layout.

Layout: ``101_ObjectCategories/<category>/image_NNNN.jpg`` + ``Annotations/<annotation
folder>/annotation_NNNN.mat``, found in ``data_dir`` or ``data_dir/caltech-101`` (the folder
the official ``caltech-101.zip`` extracts to); where that folder holds only the archives
``101_ObjectCategories.tar.gz`` and ``Annotations.tar`` they are extracted once into the
cache. Four annotation folders are named differently from their image folders
(:data:`ANNOTATION_FOLDERS`). Each ``.mat`` holds ``box_coord = [y1, y2, x1, x2]``, 1-based
inclusive pixel coordinates, turned into the continuous normalised box
``((x1 - 1) / W, (y1 - 1) / H, x2 / W, y2 / H)``.

Annotation problems: a missing, unreadable or invalid annotation (box outside the image by
more than :data:`BOX_TOLERANCE_PX` pixels, or of zero/negative area), an unreadable image, or
an annotation without an image is skipped and reported (``strict=True``: an
:class:`AnnotationError` naming the first bad file). Boxes over the border by at most
:data:`BOX_TOLERANCE_PX` pixels are clipped to the image.

Cache: :func:`load_caltech101` saves the parsed ``datasets.Dataset`` (JPEG bytes as an
``Image`` feature, box, category) with ``save_to_disk`` under ``cache_dir`` (default
``$HF_RLION_CACHE/caltech101``, ``HF_RLION_CACHE`` defaulting to ``~/.cache/hf_rlion``), in a
folder named by a fingerprint of the file list (names, sizes, modification times), the
categories and :data:`LOADER_VERSION`.

Split (:func:`split_train_test`, :func:`split_off_validation`): the public baseline's sorted
first 80 % train / last 20 % test per category, the last part of the training images held out
for validation (Keras' ``validation_split``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image as PILImage

IMAGE_ROOT = "101_ObjectCategories"
ANNOTATION_ROOT = "Annotations"
ZIP_FOLDER = "caltech-101"  # what the official caltech-101.zip extracts to
IMAGE_ARCHIVE = "101_ObjectCategories.tar.gz"
ANNOTATION_ARCHIVE = "Annotations.tar"
# Image folder -> annotation folder, where Caltech101 names them differently.
ANNOTATION_FOLDERS = {
    "Faces": "Faces_2",
    "Faces_easy": "Faces_3",
    "Motorbikes": "Motorbikes_16",
    "airplanes": "Airplanes_Side_2",
}
UNANNOTATED_CATEGORIES = ("BACKGROUND_Google",)  # ships without annotations
BOX_TOLERANCE_PX = 2.0  # boxes over the border by up to this many pixels are clipped, not rejected
LOADER_VERSION = 1  # part of the cache fingerprint: bump when parsing changes


class AnnotationError(ValueError):
    """A Caltech101 annotation or image that cannot be used; the message names the file."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("HF_RLION_CACHE", Path.home() / ".cache" / "hf_rlion")) / "caltech101"


def locate_caltech_root(data_dir: str | os.PathLike, extract_dir: Path) -> Path:
    """The folder holding ``101_ObjectCategories/`` and ``Annotations/``.

    Looks in ``data_dir`` and ``data_dir/caltech-101``; where only the official archives are
    there, extracts them once into ``extract_dir`` (a ``.complete`` marker records success).
    """
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise ValueError(f"--data_dir {str(data_dir)!r} is not a directory")
    for candidate in (data_dir, data_dir / ZIP_FOLDER):
        if (candidate / IMAGE_ROOT).is_dir() and (candidate / ANNOTATION_ROOT).is_dir():
            return candidate.resolve()
    for candidate in (data_dir, data_dir / ZIP_FOLDER):
        images, annotations = candidate / IMAGE_ARCHIVE, candidate / ANNOTATION_ARCHIVE
        if images.is_file() and annotations.is_file():
            key = hashlib.sha256(str(candidate.resolve()).encode()).hexdigest()[:16]
            target = extract_dir / f"extracted-{key}"
            if not (target / ".complete").exists():
                tmp = extract_dir / f".tmp-extracted-{key}-{os.getpid()}"
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                for archive in (images, annotations):
                    print(f"extracting {archive} into {target}", flush=True)
                    with tarfile.open(archive) as tar:
                        # The "data" filter refuses absolute paths and links out of the folder
                        # (Python >= 3.10.12 / 3.11.4; older ones extract as before).
                        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                        tar.extractall(tmp, **safe)
                (tmp / ".complete").touch()
                shutil.rmtree(target, ignore_errors=True)
                tmp.rename(target)
            return target
    raise ValueError(
        f"--data_dir {str(data_dir)!r} is not a Caltech101 folder: expected {IMAGE_ROOT}/ and "
        f"{ANNOTATION_ROOT}/ in it or in {ZIP_FOLDER}/ below it (or the official archives "
        f"{IMAGE_ARCHIVE} and {ANNOTATION_ARCHIVE})"
    )


def available_categories(root: Path) -> list[str]:
    """Image categories that have an annotation folder, sorted."""
    return sorted(
        p.name
        for p in (root / IMAGE_ROOT).iterdir()
        if p.is_dir() and p.name not in UNANNOTATED_CATEGORIES and (root / ANNOTATION_ROOT / annotation_folder(p.name)).is_dir()
    )


def annotation_folder(category: str) -> str:
    return ANNOTATION_FOLDERS.get(category, category)


def resolve_categories(requested: Sequence[str], root: Path) -> list[str]:
    """``["all"]`` -> every annotated category; otherwise the requested ones, checked, in the given order."""
    names = [n for item in requested for n in item.split(",") if n]
    available = available_categories(root)
    if names == ["all"]:
        return available
    unknown = [n for n in names if n not in available]
    if not names or unknown:
        raise ValueError(
            f"--categories: unknown {unknown or names!r}; allowed: 'all' or names from {available}"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"--categories: duplicates in {names}")
    return names


def read_box(mat_path: Path, width: int, height: int) -> list[float]:
    """Normalised (x1, y1, x2, y2) from a Caltech ``.mat``; ``AnnotationError`` naming the file if unusable.

    ``box_coord = [y1, y2, x1, x2]`` in 1-based inclusive pixels, so the box covers the
    continuous range ``[x1 - 1, x2] x [y1 - 1, y2]`` of a ``width x height`` image.
    """
    import scipy.io

    try:
        mat = scipy.io.loadmat(mat_path)
    except Exception as err:  # scipy raises ValueError, TypeError, MatReadError... on corrupt files
        raise AnnotationError(f"{mat_path}: unreadable .mat file ({type(err).__name__}: {err})") from None
    if "box_coord" not in mat:
        raise AnnotationError(f"{mat_path}: no 'box_coord' variable")
    coords = np.asarray(mat["box_coord"], dtype=np.float64).ravel()
    if coords.size != 4 or not np.all(np.isfinite(coords)):
        raise AnnotationError(f"{mat_path}: box_coord must be 4 finite numbers, got {coords.tolist()}")
    y1, y2, x1, x2 = coords
    left, top, right, bottom = x1 - 1.0, y1 - 1.0, x2, y2
    tol = BOX_TOLERANCE_PX
    if left < -tol or top < -tol or right > width + tol or bottom > height + tol:
        raise AnnotationError(
            f"{mat_path}: box (x1={x1:g}, y1={y1:g}, x2={x2:g}, y2={y2:g}) lies outside the "
            f"{width}x{height} image"
        )
    left, right = max(left, 0.0), min(right, float(width))
    top, bottom = max(top, 0.0), min(bottom, float(height))
    if right <= left or bottom <= top:
        raise AnnotationError(f"{mat_path}: box (x1={x1:g}, y1={y1:g}, x2={x2:g}, y2={y2:g}) has no positive area")
    return [left / width, top / height, right / width, bottom / height]


@dataclass
class ScanResult:
    records: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"file": ..., "reason": ...}


def scan_category(root: Path, category: str, label: int, strict: bool) -> ScanResult:
    """Pair ``image_NNNN.jpg`` with ``annotation_NNNN.mat`` and read the boxes, sorted by file name."""
    result = ScanResult()
    image_dir = root / IMAGE_ROOT / category
    annotation_dir = root / ANNOTATION_ROOT / annotation_folder(category)
    images = sorted(image_dir.glob("image_*.jpg"))
    annotated_ids = {p.stem.removeprefix("annotation_") for p in annotation_dir.glob("annotation_*.mat")}

    def problem(path: Path, reason: str) -> None:
        if strict:
            raise AnnotationError(f"{path}: {reason}" if str(path) not in reason else reason)
        result.skipped.append({"file": str(path.relative_to(root)), "reason": reason})

    for image_path in images:
        number = image_path.stem.removeprefix("image_")
        mat_path = annotation_dir / f"annotation_{number}.mat"
        if number not in annotated_ids:
            problem(mat_path, "missing annotation")
            continue
        try:
            data = image_path.read_bytes()
            with PILImage.open(io.BytesIO(data)) as img:
                img.verify()
            with PILImage.open(io.BytesIO(data)) as img:
                width, height = img.size
        except Exception as err:
            problem(image_path, f"unreadable image ({type(err).__name__}: {err})")
            continue
        try:
            box = read_box(mat_path, width, height)
        except AnnotationError as err:
            problem(mat_path, str(err))
            continue
        result.records.append(
            {
                "image": {"bytes": data, "path": image_path.name},
                "box": box,
                "label": label,
                "category": category,
                "image_file": str(image_path.relative_to(root)),
                "width": width,
                "height": height,
            }
        )
    image_ids = {p.stem.removeprefix("image_") for p in images}
    for number in sorted(annotated_ids - image_ids):
        problem(annotation_dir / f"annotation_{number}.mat", "annotation without image")
    return result


def _fingerprint(root: Path, categories: list[str]) -> str:
    digest = hashlib.sha256(f"v{LOADER_VERSION}|{root}|{','.join(categories)}|{BOX_TOLERANCE_PX}".encode())
    for category in categories:
        for folder in (root / IMAGE_ROOT / category, root / ANNOTATION_ROOT / annotation_folder(category)):
            for path in sorted(folder.iterdir()):
                stat = path.stat()
                digest.update(f"{path.name}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def load_caltech101(
    data_dir: str | os.PathLike,
    categories: Sequence[str] = ("airplanes",),
    cache_dir: Optional[str | os.PathLike] = None,
    strict: bool = False,
    show_progress: bool = True,
):
    """Caltech101 images with boxes as a ``datasets.Dataset``, and the skipped files.

    Returns ``(dataset, skipped, cache_path, from_cache)``. Columns: ``image`` (``Image``,
    the original JPEG bytes), ``box`` (4 float32, normalised x1, y1, x2, y2), ``label``
    (``ClassLabel`` over the categories), ``category``, ``image_file`` (path relative to the
    root), ``width``, ``height``. Rows are sorted by category order, then file name.
    """
    import datasets
    from tqdm.auto import tqdm

    cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    root = locate_caltech_root(data_dir, cache_dir)
    categories = resolve_categories(categories, root)
    cache_path = cache_dir / f"dataset-{_fingerprint(root, categories)}"
    report_path = cache_path / "skipped_annotations.json"
    if (cache_path / "dataset_info.json").exists() and report_path.exists():
        skipped = json.loads(report_path.read_text())
        if strict and skipped:
            raise AnnotationError(f"{root / skipped[0]['file']}: {skipped[0]['reason']}")
        return datasets.load_from_disk(str(cache_path)), skipped, cache_path, True

    records, skipped = [], []
    for label, category in enumerate(tqdm(categories, desc="reading Caltech101", disable=not show_progress)):
        scanned = scan_category(root, category, label, strict)
        records += scanned.records
        skipped += scanned.skipped
    if not records:
        raise ValueError(f"--categories {categories}: no usable annotated image under {root}")
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "box": datasets.Sequence(datasets.Value("float32"), length=4),
            "label": datasets.ClassLabel(names=categories),
            "category": datasets.Value("string"),
            "image_file": datasets.Value("string"),
            "width": datasets.Value("int32"),
            "height": datasets.Value("int32"),
        }
    )
    columns = {name: [r[name] for r in records] for name in features}
    dataset = datasets.Dataset.from_dict(columns, features=features)
    # Written to a temporary folder and renamed, so an interrupted run never leaves a cache
    # that looks complete.
    tmp = cache_dir / f".tmp-{cache_path.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    dataset.save_to_disk(str(tmp))
    (tmp / "skipped_annotations.json").write_text(json.dumps(skipped, indent=1))
    shutil.rmtree(cache_path, ignore_errors=True)
    tmp.rename(cache_path)
    return datasets.load_from_disk(str(cache_path)), skipped, cache_path, False


def split_train_test(dataset, test_fraction: float = 0.2, split_seed: Optional[int] = None):
    """Per category: the first ``1 - test_fraction`` of the (sorted) images train, the rest test.

    ``int(n * (1 - test_fraction))`` training images, as the baseline's ``int(len * 0.8)``.
    With ``split_seed`` the images of each category are shuffled by that seed first.
    Returns ``(train_indices, test_indices)``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"--test_fraction must be in (0, 1), got {test_fraction}")
    labels = np.asarray(dataset["label"])
    train, test = [], []
    rng = np.random.default_rng(split_seed) if split_seed is not None else None
    for label in sorted(set(labels.tolist())):
        indices = np.flatnonzero(labels == label)
        if rng is not None:
            indices = rng.permutation(indices)
        n_train = int(len(indices) * (1.0 - test_fraction))
        train += indices[:n_train].tolist()
        test += indices[n_train:].tolist()
    return train, test


def split_off_validation(dataset, train_indices: list[int], validation_fraction: float):
    """The last ``validation_fraction`` of each category's training images (Keras'
    ``validation_split`` takes the last part, unshuffled). Returns ``(train, validation)``."""
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"--validation_fraction must be in [0, 1), got {validation_fraction}")
    if validation_fraction == 0:
        return list(train_indices), []
    labels = np.asarray(dataset["label"])[train_indices]
    train, validation = [], []
    for label in sorted(set(labels.tolist())):
        members = [i for i, lab in zip(train_indices, labels) if lab == label]
        n_train = int(len(members) * (1.0 - validation_fraction))
        train += members[:n_train]
        validation += members[n_train:]
    return train, validation

