#!/usr/bin/env python
"""ViT single-box detection on Caltech101 with RLion (or any registered optimizer), on Accelerate.

The paper's "object detection with Vision Transformers on Caltech101" experiment is the
well-known single-box regression set-up: the 800 ``airplanes`` images with their boxes from
``Annotations/Airplanes_Side_2``, sorted, first 80 % train / last 20 % test, 224x224 input,
a small ViT (patch 32, width 64, 4 layers, 4 heads) whose flattened tokens feed an MLP that
regresses the normalised box (x1, y1, x2, y2), MSE loss, metric mean IoU. The public
baseline trains AdamW (lr 1e-3, weight decay 1e-4, batch 32, <= 100 epochs, last 10 % of
the training images held out for validation) and reports mean IoU on 10 test images; this
recipe reports it on the whole test split, next to the IoU of always predicting the mean
training box.

Run (one process, or ``accelerate launch`` for several)::

    python recipes/vit_detection_caltech101.py --data_dir /data/caltech-101 \\
        --optim rlion --output_dir runs/vit-caltech101-rlion

Data (``--data_dir``): Caltech101's official layout, ``101_ObjectCategories/<category>/
image_NNNN.jpg`` + ``Annotations/<annotation folder>/annotation_NNNN.mat``. ``--data_dir``
may be that folder, or the folder the official ``caltech-101.zip`` extracts to (it holds
``caltech-101/101_ObjectCategories.tar.gz`` and ``caltech-101/Annotations.tar``, which are
extracted once into the cache). Each ``.mat`` holds ``box_coord = [y1, y2, x1, x2]``,
1-based inclusive pixel coordinates, turned here into the continuous box
``((x1 - 1) / W, (y1 - 1) / H, x2 / W, y2 / H)``. Four annotation folders are named
differently from their image folders (``ANNOTATION_FOLDERS``).

Annotation problems (policy): a missing, unreadable or invalid annotation (box outside the
image by more than ``BOX_TOLERANCE_PX`` pixels, or of zero/negative area), an unreadable
image, or an annotation without an image is SKIPPED; the count and the files are printed,
and written to ``<output_dir>/skipped_annotations.json``. ``--strict_annotations`` fails
instead, naming the first bad file. Boxes over the border by at most ``BOX_TOLERANCE_PX``
pixels are clipped to the image.

Cache: the parsed dataset (a ``datasets.Dataset`` with the JPEG bytes as an ``Image``
feature, the box, the category) is saved with ``save_to_disk`` under
``--dataset_cache_dir`` (default ``$HF_RLION_CACHE/caltech101``, ``HF_RLION_CACHE``
defaulting to ``~/.cache/hf_rlion``), in a folder named by a fingerprint of the file list
(names, sizes, modification times), the categories and the loader version; a second run
loads it in about a second instead of re-reading every file.

Outputs in ``--output_dir``: ``eval_results.json`` (test ``mean_iou``, ``iou_at_0.5`` the
fraction of test images with IoU >= 0.5, ``mean_box_baseline_mean_iou``, ``num_images``),
``all_results.json`` (those plus training figures), ``log_history.json``, the model
(``save_pretrained``, safetensors), ``predictions.png`` (predicted vs true boxes on test
images), ``training_curves.png``, ``checkpoint-<epoch>/`` (``Accelerator.save_state``: the
latest and the best are kept) and, with ``--push_to_hub``, the model on the Hub with a card.

Model selection: with ``--validation_fraction > 0`` (default 0.1, the baseline's
``validation_split``) the epoch with the best validation mean IoU is kept and evaluated on
the test split; with 0, the last epoch is. The test split is never used to choose.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import shlex
import shutil
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image as PILImage

import hf_rlion
from hf_rlion.distributed_exit import exit_distributed_run
from hf_rlion.registry import OPTIMIZERS, parse_optim_args

# ----------------------------------------------------------------------------------------
# Caltech101 layout
# ----------------------------------------------------------------------------------------

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
# ViTImageProcessor's defaults: pixels scaled to [0, 1], then (x - 0.5) / 0.5.
PIXEL_MEAN = 0.5
PIXEL_STD = 0.5


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


def to_pixel_values(image: PILImage.Image, image_size: int) -> torch.Tensor:
    """RGB, resized (bilinear) to ``image_size`` x ``image_size`` without keeping the aspect
    ratio (as the baseline; normalised boxes are unchanged), scaled to [0, 1], then
    ``(x - 0.5) / 0.5`` (ViTImageProcessor's defaults). Returns (3, size, size) float32."""
    image = image.convert("RGB").resize((image_size, image_size), PILImage.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return (torch.from_numpy(array).permute(2, 0, 1) - PIXEL_MEAN) / PIXEL_STD


class BoxTransform:
    """A ``datasets`` batch transform giving ``pixel_values``, ``boxes``, ``labels``.

    With ``hflip_probability`` > 0 images are mirrored at random, boxes with them
    (x1, x2 -> 1 - x2, 1 - x1). The flips are drawn from a generator reseeded by
    ``set_epoch`` with (seed, epoch), so a resumed run flips as the uninterrupted one.
    """

    def __init__(self, image_size: int, hflip_probability: float = 0.0, seed: int = 0):
        self.image_size = image_size
        self.hflip_probability = hflip_probability
        self.seed = seed
        self.generator = torch.Generator()
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed * 1_000_003 + epoch)

    def __call__(self, batch: dict[str, list]) -> dict[str, Any]:
        pixels, boxes = [], []
        for image, box in zip(batch["image"], batch["box"]):
            x = to_pixel_values(image, self.image_size)
            box = list(box)
            if self.hflip_probability > 0 and torch.rand((), generator=self.generator).item() < self.hflip_probability:
                x = x.flip(-1)
                box = [1.0 - box[2], box[1], 1.0 - box[0], box[3]]
            pixels.append(x)
            boxes.append(torch.tensor(box, dtype=torch.float32))
        return {"pixel_values": pixels, "boxes": boxes, "labels": list(batch["label"])}


def collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "boxes": torch.stack([e["boxes"] for e in examples]),
        "labels": torch.tensor([e["labels"] for e in examples], dtype=torch.long),
    }


# ----------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------

MIXED_PRECISION = ("no", "fp16", "bf16")
SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "inverse_sqrt",
)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="ViT single-box detection on Caltech101 (the RLion paper's set-up), on Accelerate.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = p.add_argument_group("data")
    d.add_argument("--data_dir", required=True, help="Caltech101 folder (101_ObjectCategories/ + Annotations/) or the folder caltech-101.zip extracts to")
    d.add_argument("--categories", nargs="+", default=["airplanes"], help="category names (space or comma separated) or 'all'")
    d.add_argument("--test_fraction", type=float, default=0.2, help="last fraction of each category's sorted images used as test split")
    d.add_argument("--split_seed", type=int, default=None, help="shuffle each category with this seed before splitting (default: sorted order, as the baseline)")
    d.add_argument("--validation_fraction", type=float, default=0.1, help="last fraction of the training images held out to pick the best epoch (0: keep the last epoch)")
    d.add_argument("--dataset_cache_dir", default=None, help="where the parsed dataset is cached (default $HF_RLION_CACHE/caltech101, i.e. ~/.cache/hf_rlion/caltech101)")
    d.add_argument("--strict_annotations", action="store_true", help="fail on the first missing/corrupt/invalid annotation instead of skipping and reporting it")
    d.add_argument("--hflip_probability", type=float, default=0.0, help="random horizontal flip of training images (0: none, as the baseline)")
    d.add_argument("--dataloader_num_workers", type=int, default=0)

    m = p.add_argument_group("model (defaults: the public baseline's)")
    m.add_argument("--model_name_or_path", default=None, help="a saved ViTBoxRegressionModel to start from")
    m.add_argument("--backbone_name_or_path", default=None, help="a ViT checkpoint for the encoder (head freshly initialised)")
    m.add_argument("--image_size", type=_positive_int, default=224)
    m.add_argument("--patch_size", type=_positive_int, default=32)
    m.add_argument("--hidden_size", type=_positive_int, default=64)
    m.add_argument("--num_hidden_layers", type=_positive_int, default=4)
    m.add_argument("--num_attention_heads", type=_positive_int, default=4)
    m.add_argument("--intermediate_size", type=_positive_int, default=128)
    m.add_argument("--head_hidden_sizes", type=_int_list, default=[2048, 1024, 512, 64, 32])
    m.add_argument("--head_dropout", type=float, default=0.3)
    m.add_argument("--hidden_dropout_prob", type=float, default=0.1)
    m.add_argument("--loss", choices=("mse", "giou"), default="mse")
    m.add_argument("--class_head", action="store_true", help="also predict the category (useful with several categories)")
    m.add_argument("--class_loss_weight", type=float, default=0.1, help="weight of the class head's cross-entropy added to the box loss (0.1: at 1 the cross-entropy dominated and box IoU suffered on the test fixture)")

    t = p.add_argument_group("training")
    t.add_argument("--optim", choices=tuple(OPTIMIZERS), default="rlion")
    t.add_argument("--optim_args", default=None, help="optimizer options, e.g. 'alpha=3,alpha_scaling=rms,beta2=0.99'")
    t.add_argument("--learning_rate", type=float, default=None, help="default: the optimizer's registered default (hf_rlion.registry)")
    t.add_argument("--weight_decay", type=float, default=1e-4)
    t.add_argument("--num_train_epochs", type=_positive_int, default=100)
    t.add_argument("--per_device_train_batch_size", type=_positive_int, default=32)
    t.add_argument("--per_device_eval_batch_size", type=_positive_int, default=64)
    t.add_argument("--gradient_accumulation_steps", type=_positive_int, default=1)
    t.add_argument("--max_grad_norm", type=float, default=0.0, help="clip the gradient norm (0: no clipping, as the baseline)")
    t.add_argument("--lr_scheduler_type", choices=SCHEDULERS, default="constant")
    t.add_argument("--warmup_steps", type=int, default=0, help="warm-up optimizer steps (schedulers with warm-up)")
    t.add_argument("--mixed_precision", choices=MIXED_PRECISION, default=None, help="default: accelerate's config")
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint-<epoch> folder, or 'latest' (the last complete one in --output_dir)")

    o = p.add_argument_group("output")
    o.add_argument("--output_dir", required=True)
    o.add_argument("--num_plot_images", type=int, default=8)
    o.add_argument("--push_to_hub", action="store_true")
    o.add_argument("--hub_model_id", default=None, help="default: the output folder's name")
    o.add_argument("--hub_private_repo", action="store_true", default=None)
    o.add_argument("--license", default=None, help="license id for the pushed model's card (default: the backbone's)")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, low, high in (("test_fraction", 0.0, 1.0), ("validation_fraction", -1e-12, 1.0), ("hflip_probability", -1e-12, 1.0 + 1e-12)):
        value = getattr(args, name)
        if not low < value < high:
            parser.error(f"--{name} out of range: {value}")
    if args.warmup_steps < 0:
        parser.error(f"--warmup_steps must be >= 0, got {args.warmup_steps}")
    if args.model_name_or_path and args.backbone_name_or_path:
        parser.error("--model_name_or_path and --backbone_name_or_path exclude each other")
    try:
        args.optim_kwargs = parse_optim_args(args.optim_args)
        hf_rlion.registry.optimizer_kwargs(args.optim, args.optim_kwargs)
    except ValueError as err:
        parser.error(f"--optim_args: {err}")
    return args


# ----------------------------------------------------------------------------------------
# Model, metrics, checkpoints
# ----------------------------------------------------------------------------------------


def build_model(args: argparse.Namespace, categories: list[str]):
    from hf_rlion.models import ViTBoxRegressionConfig, ViTBoxRegressionModel

    labels = {"id2label": dict(enumerate(categories)), "label2id": {c: i for i, c in enumerate(categories)}}
    head = dict(
        head_hidden_sizes=args.head_hidden_sizes,
        head_dropout=args.head_dropout,
        loss=args.loss,
        class_head=args.class_head,
        class_loss_weight=args.class_loss_weight,
        **labels,
    )
    if args.model_name_or_path:
        return ViTBoxRegressionModel.from_pretrained(args.model_name_or_path)
    if args.backbone_name_or_path:
        return ViTBoxRegressionModel.from_pretrained_backbone(args.backbone_name_or_path, **head)
    config = ViTBoxRegressionConfig(
        image_size=args.image_size,
        patch_size=args.patch_size,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads,
        intermediate_size=args.intermediate_size,
        hidden_dropout_prob=args.hidden_dropout_prob,
        **head,
    )
    return ViTBoxRegressionModel(config)


def box_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """``mean_iou`` and ``iou_at_0.5`` (fraction of images with IoU >= 0.5) over all rows."""
    from hf_rlion.models import box_iou

    iou = box_iou(pred.float(), target.float())
    return {"mean_iou": iou.mean().item(), "iou_at_0.5": (iou >= 0.5).float().mean().item(), "num_images": len(iou)}


def mean_box_baseline(train_boxes: torch.Tensor, test_boxes: torch.Tensor) -> float:
    """Mean IoU of predicting the mean training box for every test image."""
    from hf_rlion.models import box_iou

    constant = train_boxes.float().mean(0, keepdim=True).expand_as(test_boxes)
    return box_iou(constant, test_boxes.float()).mean().item()


@torch.no_grad()
def predict(model, dataloader, accelerator) -> dict[str, torch.Tensor]:
    """Predicted and true boxes (and labels, logits) over the whole split, gathered from all ranks."""
    model.eval()
    out: dict[str, list[torch.Tensor]] = {"pred_boxes": [], "boxes": [], "labels": [], "logits": []}
    for batch in dataloader:
        result = model(pixel_values=batch["pixel_values"])
        parts = {"pred_boxes": result.pred_boxes, "boxes": batch["boxes"], "labels": batch["labels"]}
        if result.logits is not None:
            parts["logits"] = result.logits
        for key, value in accelerator.gather_for_metrics(parts).items():
            out[key].append(value.float().cpu() if value.is_floating_point() else value.cpu())
    return {k: torch.cat(v) for k, v in out.items() if v}


def evaluate(model, dataloader, accelerator) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    predictions = predict(model, dataloader, accelerator)
    metrics = box_metrics(predictions["pred_boxes"], predictions["boxes"])
    if "logits" in predictions:
        metrics["accuracy"] = (predictions["logits"].argmax(-1) == predictions["labels"]).float().mean().item()
    return metrics, predictions


CHECKPOINT_PREFIX = "checkpoint-"
RECIPE_STATE = "recipe_state.json"  # written last, inside the temporary folder, before the rename


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """``checkpoint-<epoch>`` folders with their recipe state, by epoch (temporary ones never match)."""
    found = []
    for path in output_dir.glob(f"{CHECKPOINT_PREFIX}*"):
        suffix = path.name[len(CHECKPOINT_PREFIX):]
        if path.is_dir() and suffix.isdigit() and (path / RECIPE_STATE).is_file():
            found.append((int(suffix), path))
    return [p for _, p in sorted(found)]


def save_checkpoint(accelerator, output_dir: Path, epoch: int, recipe_state: dict[str, Any]) -> Path:
    """``Accelerator.save_state`` into ``.tmp-checkpoint-<epoch>``, then a rename to
    ``checkpoint-<epoch>``: a crash mid-write leaves only the temporary folder, never a
    checkpoint that looks complete."""
    final = output_dir / f"{CHECKPOINT_PREFIX}{epoch}"
    tmp = output_dir / f".tmp-{CHECKPOINT_PREFIX}{epoch}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / RECIPE_STATE).write_text(json.dumps(recipe_state, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(output_dir: Path, keep: set[Path]) -> None:
    for path in complete_checkpoints(output_dir):
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)


def resolve_resume(value: Optional[str], output_dir: Path) -> Optional[Path]:
    if not value:
        return None
    if value == "latest":
        found = complete_checkpoints(output_dir)
        if not found:
            print(f"--resume_from_checkpoint latest: no complete checkpoint in {output_dir}; starting fresh", flush=True)
            return None
        return found[-1]
    path = Path(value)
    if not (path / RECIPE_STATE).is_file():
        raise ValueError(f"--resume_from_checkpoint {value!r} is not a complete checkpoint (no {RECIPE_STATE})")
    return path


# ----------------------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------------------


def plot_predictions(dataset, indices: list[int], pred: torch.Tensor, path: Path, title: str) -> None:
    """Test images with the true box (green) and the prediction (red, dashed), IoU in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from hf_rlion.models import box_iou

    n = len(indices)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, index, box in zip(axes.flat, indices, pred):
        row = dataset[index]
        image = row["image"].convert("RGB")
        w, h = image.size
        ax.imshow(image)
        true = torch.tensor(row["box"])
        for b, color, style in ((true, "lime", "-"), (box, "red", "--")):
            x1, y1, x2, y2 = (b * torch.tensor([w, h, w, h])).tolist()
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linestyle=style, linewidth=2))
        iou = box_iou(box[None].float(), true[None].float()).item()
        ax.set_title(f"{Path(row['image_file']).name}  IoU {iou:.2f}", fontsize=8)
    fig.suptitle(f"{title}\ntrue box: green, predicted: red dashed", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_training_curves(history: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.3))
    left.plot(epochs, [h["train_loss"] for h in history], marker=".")
    left.set(xlabel="epoch", ylabel="training loss", yscale="log")
    right.plot(epochs, [h["eval_mean_iou"] for h in history], marker=".", label=history[0]["eval_split"])
    right.set(xlabel="epoch", ylabel="mean IoU", ylim=(0, 1))
    right.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        # Shuffling seeded by (seed, epoch): a resumed run sees the same batches.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(args.seed)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    resume_path = resolve_resume(args.resume_from_checkpoint, output_dir)

    # Data: built by the main process first, read from the cache by the others.
    with accelerator.main_process_first():
        dataset, skipped, cache_path, from_cache = load_caltech101(
            args.data_dir, args.categories, args.dataset_cache_dir, args.strict_annotations, accelerator.is_local_main_process
        )
    categories = dataset.features["label"].names
    accelerator.print(f"dataset: {len(dataset)} images of {categories} ({'cache' if from_cache else 'built'}: {cache_path})")
    if skipped:
        accelerator.print(f"skipped {len(skipped)} annotation(s)/image(s); first: {skipped[:5]} (all in skipped_annotations.json)")
    train_all, test_indices = split_train_test(dataset, args.test_fraction, args.split_seed)
    train_indices, validation_indices = split_off_validation(dataset, train_all, args.validation_fraction)
    select_split = "validation" if validation_indices else "test"
    accelerator.print(f"split: {len(train_indices)} train, {len(validation_indices)} validation, {len(test_indices)} test")

    model = build_model(args, categories)
    image_size = model.config.image_size
    train_transform = BoxTransform(image_size, args.hflip_probability, args.seed)
    train_ds = dataset.select(train_indices).with_transform(train_transform)
    eval_transform = BoxTransform(image_size)
    test_ds = dataset.select(test_indices).with_transform(eval_transform)
    eval_ds = dataset.select(validation_indices).with_transform(eval_transform) if validation_indices else test_ds

    loader = dict(collate_fn=collate, num_workers=args.dataloader_num_workers)
    train_dl = DataLoader(train_ds, batch_size=args.per_device_train_batch_size, shuffle=True, **loader)
    eval_dl = DataLoader(eval_ds, batch_size=args.per_device_eval_batch_size, **loader)
    test_dl = DataLoader(test_ds, batch_size=args.per_device_eval_batch_size, **loader)
    train_dl, eval_dl, test_dl = accelerator.prepare(train_dl, eval_dl, test_dl)

    optimizer = hf_rlion.create_optimizer(
        model, args.optim, lr=args.learning_rate, weight_decay=args.weight_decay, **args.optim_kwargs
    )
    steps_per_epoch = math.ceil(len(train_dl) / args.gradient_accumulation_steps)
    total_steps = steps_per_epoch * args.num_train_epochs
    # The prepared scheduler steps once per process per optimizer step, hence the factor.
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=args.warmup_steps * accelerator.num_processes,
        num_training_steps=total_steps * accelerator.num_processes,
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    state: dict[str, Any] = {"epoch": 0, "global_step": 0, "best_epoch": None, "best_metric": None, "history": [], "train_runtime": 0.0}
    if resume_path is not None:
        accelerator.print(f"resuming from {resume_path}")
        accelerator.load_state(str(resume_path))
        state = json.loads((resume_path / RECIPE_STATE).read_text())

    base_lr = optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"])
    accelerator.print(
        f"optimizer {args.optim} lr {base_lr} ({args.lr_scheduler_type} schedule) "
        f"weight decay {args.weight_decay} {args.optim_kwargs or ''}; {steps_per_epoch} steps/epoch x {args.num_train_epochs} epochs"
    )
    progress = tqdm(
        total=total_steps, initial=state["global_step"], desc="training", disable=not accelerator.is_local_main_process
    )
    for epoch in range(state["epoch"], args.num_train_epochs):
        started = time.perf_counter()
        model.train()
        train_dl.set_epoch(epoch)
        train_transform.set_epoch(epoch)
        loss_sum = torch.zeros((), dtype=torch.float64)
        loss_count = 0
        for batch in train_dl:
            with accelerator.accumulate(model):
                output = model(**batch)  # labels are used only by a class head
                accelerator.backward(output.loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            loss_sum += output.loss.detach().double().cpu()
            loss_count += 1
            if accelerator.sync_gradients:
                state["global_step"] += 1
                progress.update(1)
        train_loss = accelerator.reduce(loss_sum / max(loss_count, 1), reduction="mean").item()
        metrics, _ = evaluate(model, eval_dl, accelerator)
        state["train_runtime"] += time.perf_counter() - started
        record = {"epoch": epoch + 1, "step": state["global_step"], "train_loss": train_loss, "eval_split": select_split}
        record.update({f"eval_{k}": v for k, v in metrics.items()})
        record["learning_rate"] = scheduler.get_last_lr()[0]
        state["history"].append(record)
        state["epoch"] = epoch + 1
        progress.set_postfix(loss=f"{train_loss:.4f}", **{f"{select_split[:3]}_iou": f"{metrics['mean_iou']:.3f}"})
        is_best = select_split == "test" or state["best_metric"] is None or metrics["mean_iou"] > state["best_metric"]
        if is_best:  # without a validation split the last epoch is kept: the test split never chooses
            state["best_epoch"], state["best_metric"] = epoch + 1, metrics["mean_iou"]
        checkpoint = save_checkpoint(accelerator, output_dir, epoch + 1, state)
        if accelerator.is_main_process:
            best = output_dir / f"{CHECKPOINT_PREFIX}{state['best_epoch']}"
            prune_checkpoints(output_dir, {checkpoint, best})
        accelerator.wait_for_everyone()
    progress.close()

    # The kept model: the best checkpoint's weights.
    best_checkpoint = output_dir / f"{CHECKPOINT_PREFIX}{state['best_epoch']}"
    if state["best_epoch"] != state["epoch"]:
        accelerator.print(f"loading the best epoch ({state['best_epoch']}, {select_split} mean IoU {state['best_metric']:.4f})")
        accelerator.load_state(str(best_checkpoint))
    test_metrics, test_predictions = evaluate(model, test_dl, accelerator)
    train_boxes = torch.tensor(dataset.select(train_all)["box"])
    test_metrics["mean_box_baseline_mean_iou"] = mean_box_baseline(train_boxes, test_predictions["boxes"])
    test_metrics["epoch"] = state["best_epoch"]
    test_metrics["split"] = "test"

    results: dict[str, Any] = {}
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(output_dir, safe_serialization=True)
        results = {
            **{f"eval_{k}" if k not in ("epoch",) else "best_epoch": v for k, v in test_metrics.items()},
            "train_loss": state["history"][-1]["train_loss"] if state["history"] else None,
            "train_runtime": state["train_runtime"],
            "train_samples": len(train_indices),
            "validation_samples": len(validation_indices),
            "epochs": state["epoch"],
            "global_step": state["global_step"],
            "selection_split": select_split,
            "best_selection_mean_iou": state["best_metric"],
            "skipped_annotations": len(skipped),
            "optimizer": args.optim,
            "learning_rate": optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"]),
            "weight_decay": args.weight_decay,
            "optim_args": args.optim_kwargs,
            "num_processes": accelerator.num_processes,
        }
        (output_dir / "eval_results.json").write_text(json.dumps(test_metrics, indent=1))
        (output_dir / "all_results.json").write_text(json.dumps(results, indent=1))
        (output_dir / "log_history.json").write_text(json.dumps(state["history"], indent=1))
        (output_dir / "skipped_annotations.json").write_text(json.dumps(skipped, indent=1))
        raw_test = dataset.select(test_indices)
        shown = np.linspace(0, len(raw_test) - 1, num=min(args.num_plot_images, len(raw_test))).round().astype(int).tolist()
        label = f"{args.optim}, test mean IoU {test_metrics['mean_iou']:.3f} (mean-box baseline {test_metrics['mean_box_baseline_mean_iou']:.3f})"
        plot_predictions(raw_test, shown, test_predictions["pred_boxes"][shown], output_dir / "predictions.png", label)
        if state["history"]:
            plot_training_curves(state["history"], output_dir / "training_curves.png", f"ViT on Caltech101 {categories[:3]}, {args.optim}")
        accelerator.print(json.dumps(test_metrics, indent=1))
        if args.push_to_hub:
            push(args, output_dir, test_metrics, results, categories, unwrapped)
    accelerator.wait_for_everyone()
    return {"eval": test_metrics, "all": results}


def push(args, output_dir: Path, test_metrics: dict, results: dict, categories: list[str], model) -> str:
    """Push ``output_dir`` (without checkpoints) with a model card, through hf_rlion.hub."""
    from hf_rlion import hub

    repo_id = args.hub_model_id or output_dir.resolve().name
    if "/" not in repo_id:  # the token's own namespace, named in the card's usage snippet
        try:
            from huggingface_hub import HfApi

            repo_id = f"{HfApi().whoami()['name']}/{repo_id}"
        except Exception:  # the push itself reports authentication problems clearly
            pass
    launcher = f"accelerate launch --num_processes {results['num_processes']} " if results["num_processes"] > 1 else "python "
    command = launcher + "recipes/vit_detection_caltech101.py " + shlex.join(a for a in sys.argv[1:] if a != "--push_to_hub")
    card = hub.build_model_card(
        model_name=repo_id.split("/")[-1],
        task="object-detection",
        dataset_name="Caltech101",
        dataset_config=",".join(categories),
        metrics={"mean_iou": test_metrics["mean_iou"], "iou_at_0.5": test_metrics["iou_at_0.5"]},
        optimizer=args.optim,
        optimizer_hyperparameters={"learning_rate": results["learning_rate"], "weight_decay": args.weight_decay, **args.optim_kwargs},
        training_hyperparameters={
            "num_train_epochs": args.num_train_epochs,
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "num_processes": results["num_processes"],
            "lr_scheduler_type": args.lr_scheduler_type,
            "warmup_steps": args.warmup_steps,
            "loss": model.config.loss,
            "seed": args.seed,
        },
        reproduce_command=command,
        dataset_split="test",
        base_model=args.backbone_name_or_path,
        repo_id=repo_id,
        usage_code=(
            "import hf_rlion.models  # registers vit_box_regression with the Auto classes\n"
            "from transformers import AutoModel\n\n"
            f'model = AutoModel.from_pretrained("{repo_id}")\n'
            "boxes = model(pixel_values).pred_boxes  # normalised (x1, y1, x2, y2)"
        ),
        tags=["vision", "object-detection", "vit", "caltech101"],
        license=args.license or hub.base_model_license(args.backbone_name_or_path),
        num_parameters=model.num_parameters(),
        preprocessing={  # to_pixel_values
            "image_size": [model.config.image_size] * 2,
            "resize": "the whole image to the square (aspect ratio not kept), no crop",
            "interpolation": "bilinear",
            "mean": [PIXEL_MEAN] * 3,
            "std": [PIXEL_STD] * 3,
        },
        log_history=json.loads((output_dir / "log_history.json").read_text()),
        training_curves="training_curves.png" if (output_dir / "training_curves.png").is_file() else None,
        extra_sections={
            "Predictions on test images": "![true (green) and predicted (red) boxes](predictions.png)",
            "Baseline for context": (
                f"Whole test split ({test_metrics['num_images']} images): mean IoU "
                f"{test_metrics['mean_iou']:.4f}, fraction with IoU >= 0.5 {test_metrics['iou_at_0.5']:.4f}; "
                f"predicting the mean training box gives mean IoU {test_metrics['mean_box_baseline_mean_iou']:.4f}."
            )
        },
    )
    return hub.push_folder_to_hub(output_dir, repo_id, card=card, private=args.hub_private_repo, commit_message=f"ViT Caltech101 detection, {args.optim}")


if __name__ == "__main__":
    main()
    # In a multi-process run: barrier, then os._exit, so that a rank cannot abort at interpreter
    # exit after everything is saved (a PyTorch race, see hf_rlion.distributed_exit). It replaces
    # accelerator.end_training(), whose destroy_process_group leaves gloo's threads running.
    exit_distributed_run()
