#!/usr/bin/env python
"""Image classification with RLion: ``datasets`` data, a transformers model, ``Trainer``, ``accelerate``.

The main command (no arguments) trains a small ResNet from scratch on scikit-learn's handwritten
digits rendered as 32x32 RGB images, with ``--optim rlion``, and prints its accuracy::

    accelerate launch recipes/image_classification.py

The same script trains on ImageNet-1k (or any image-classification dataset) on one CPU, several
CPU ranks, a multi-GPU node or FSDP, e.g.::

    accelerate launch --config_file recipes/configs/multi_gpu.yaml recipes/image_classification.py \\
        --dataset_name timm/imagenet-1k-wds --model_type convnext \\
        --config_overrides "depths=[3,3,9,3],hidden_sizes=[96,192,384,768]" --image_size 224 \\
        --learning_rate 3e-4 --weight_decay 0.05 --num_train_epochs 90 --output_dir runs/in1k

It follows the conventions of transformers' ``examples/pytorch/image-classification``:
``HfArgumentParser`` over :class:`ModelArguments`, :class:`DataTrainingArguments` and
``TrainingArguments``; ``Trainer``; ``all_results.json``, ``train_results.json``,
``eval_results.json`` (``eval_accuracy``, plus ``eval_top5_accuracy`` when there are >= 5
classes), ``trainer_state.json`` and ``checkpoint-*`` folders in ``--output_dir``, plus
``training_curves.png`` (training loss and eval accuracy);
``--resume_from_checkpoint``. ``import hf_rlion`` makes ``--optim rlion``, ``rlion_8bit`` and
``paged_rlion_8bit`` valid next to all of transformers' own names.

Recipe defaults that differ from ``TrainingArguments``' (every one can be overridden on the
command line): ``--optim rlion``, ``--learning_rate 1e-3``, ``--weight_decay 0.01``,
``--num_train_epochs 10``, ``--per_device_train_batch_size 64``, ``--eval_strategy epoch``,
``--save_strategy epoch``, ``--save_total_limit 2``, ``--logging_steps 20``,
``--output_dir outputs/image_classification``, ``--report_to none``,
``--remove_unused_columns false``. ``--learning_rate 1e-3``: RLion's own default, chosen by the
optimizer study (docs/results.md); Trainer would otherwise pass its 5e-5. RLion's own
hyperparameters (alpha, alpha_scaling, betas, ...) are never set here: they are the ``RLion``
class defaults unless ``--optim_args`` says otherwise.

Data: ``--dataset_name`` (a Hub or local dataset that ``datasets.load_dataset`` reads: parquet,
webdataset, imagefolder copies; ``--streaming`` for data that does not fit on disk) or
``--train_dir`` / ``--validation_dir`` image folders (``<dir>/<label>/<image>``). Labels and
``id2label`` come from the dataset's ``ClassLabel`` feature (for plain integer labels: ``0 .. max``).

Corrupt image files: ``--corrupt_images error`` (default) stops with an error naming the file
the first time one is read; ``--corrupt_images skip`` checks every image once before training
(non-streaming data), drops the unreadable ones, and reports how many were dropped and which.

Transforms are written with PIL/numpy/torch (no torchvision): train = random resized crop +
horizontal flip, eval = resize the shorter side to ``image_size / crop_pct`` + center crop;
normalisation mean/std from the model's image processor.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

import hf_rlion  # noqa: F401  (registers --optim rlion, rlion_8bit, paged_rlion_8bit with transformers)
from hf_rlion.distributed_exit import exit_distributed_run

import datasets
import evaluate
import numpy as np
import torch
import transformers
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

logger = logging.getLogger("image_classification")

EMBEDDED_DATASET = "sklearn-digits"
"""Name of the embedded default dataset: scikit-learn's 1797 handwritten digits (8x8, 10 classes)."""

# The embedded default model: a ResNet small enough to train on a laptop CPU in a few minutes
# (about 80k parameters; a same-sized ViT is ~10x slower per image on CPU).
EMBEDDED_MODEL_TYPE = "resnet"
EMBEDDED_CONFIG_OVERRIDES = "embedding_size=16,hidden_sizes=[16,32,64],depths=[1,1,1],layer_type=basic"
EMBEDDED_IMAGE_SIZE = 32

RECIPE_TRAINING_DEFAULTS: dict[str, Any] = {
    "output_dir": "outputs/image_classification",
    "optim": "rlion",
    "learning_rate": 1e-3,
    "weight_decay": 0.01,
    "num_train_epochs": 10,
    "per_device_train_batch_size": 64,
    "per_device_eval_batch_size": 128,
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "save_total_limit": 2,
    "logging_steps": 20,
    "report_to": "none",
    "remove_unused_columns": False,
    "dataloader_num_workers": -1,  # "auto": resolved by choose_num_workers()
}

IMAGE_COLUMN_CANDIDATES = ("image", "img", "jpg", "jpeg", "png", "webp", "pixel_values")
LABEL_COLUMN_CANDIDATES = ("label", "labels", "cls", "fine_label", "class")


@dataclass
class ModelArguments:
    """Which model to train: a pretrained one (``--model_name_or_path``) or one from a config (``--model_type``)."""

    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Hub model id or local directory to start from. Leave unset to train from scratch."},
    )
    model_type: Optional[str] = field(
        default=None,
        metadata={
            "help": "Train from scratch with this transformers model type (vit, convnext, resnet, ...). "
            f"Default without --model_name_or_path: {EMBEDDED_MODEL_TYPE!r} (a ~80k-parameter ResNet)."
        },
    )
    config_overrides: Optional[str] = field(
        default=None,
        metadata={
            "help": "Comma-separated key=value settings applied to the config of --model_type, "
            'e.g. "hidden_size=96,num_hidden_layers=4". Only for training from scratch.'
        },
    )
    image_processor_name: Optional[str] = field(
        default=None, metadata={"help": "Image processor (Hub id or directory) if not the model's."}
    )
    image_size: Optional[int] = field(
        default=None,
        metadata={"help": "Input side in pixels. Default: the config's image_size, else the image processor's size."},
    )
    model_revision: str = field(default="main", metadata={"help": "Model revision (branch, tag or commit)."})
    token: Optional[str] = field(
        default=None, metadata={"help": "Hub token (default: HF_TOKEN / the stored login). Needed for gated data."}
    )
    ignore_mismatched_sizes: bool = field(
        default=True,
        metadata={"help": "Replace a pretrained classifier head whose number of labels differs from the dataset's."},
    )
    license: Optional[str] = field(
        default=None,
        metadata={"help": "License id for the pushed model's card (apache-2.0, mit, ...). Default: the base model's."},
    )


@dataclass
class DataTrainingArguments:
    """Which data to train and evaluate on, and how to turn images into tensors."""

    dataset_name: Optional[str] = field(
        default=None,
        metadata={
            "help": "Dataset for datasets.load_dataset (Hub id such as ILSVRC/imagenet-1k or timm/imagenet-1k-wds, "
            f"or a local path). Default with no --dataset_name/--train_dir: the embedded {EMBEDDED_DATASET!r}."
        },
    )
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "Dataset configuration name."})
    streaming: bool = field(
        default=False, metadata={"help": "Stream the dataset instead of downloading it (needs --max_steps)."}
    )
    train_dir: Optional[str] = field(default=None, metadata={"help": "Image folder for training: <dir>/<label>/<img>."})
    validation_dir: Optional[str] = field(default=None, metadata={"help": "Image folder for evaluation."})
    train_split_name: str = field(default="train", metadata={"help": "Name of the training split."})
    eval_split_name: Optional[str] = field(
        default=None, metadata={"help": "Name of the evaluation split (default: validation, else test)."}
    )
    train_val_split: float = field(
        default=0.15, metadata={"help": "Fraction of train held out for evaluation when there is no eval split."}
    )
    image_column_name: Optional[str] = field(
        default=None, metadata={"help": f"Image column (default: the first of {', '.join(IMAGE_COLUMN_CANDIDATES)})."}
    )
    label_column_name: Optional[str] = field(
        default=None, metadata={"help": f"Label column (default: the first of {', '.join(LABEL_COLUMN_CANDIDATES)})."}
    )
    num_labels: Optional[int] = field(
        default=None,
        metadata={"help": "Number of classes, needed only for streamed data whose labels are plain integers."},
    )
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Use at most this many train images."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Use at most this many eval images."})
    corrupt_images: str = field(
        default="error",
        metadata={
            "help": "What to do with unreadable image files: 'error' (stop, naming the file) or 'skip' "
            "(check all images before training, drop and count the unreadable ones).",
            "choices": ["error", "skip"],
        },
    )
    train_crop_scale: Optional[str] = field(
        default=None,
        metadata={
            "help": 'Random-resized-crop area range "min,max" as fractions of the image '
            '(default "0.08,1.0", the Inception/ImageNet setting; "0.6,1.0" for the embedded digits).'
        },
    )
    horizontal_flip: Optional[bool] = field(
        default=None,
        metadata={"help": "Random horizontal flips in training (default: on; off for the embedded digits)."},
    )
    eval_crop_pct: Optional[float] = field(
        default=None,
        metadata={"help": "Eval: resize the shorter side to image_size/crop_pct, then center crop "
                  "(default: the image processor's crop_pct, else 1.0)."},
    )

    def __post_init__(self):
        if self.dataset_name is not None and (self.train_dir is not None or self.validation_dir is not None):
            raise ValueError("give either --dataset_name or --train_dir/--validation_dir, not both")
        if self.streaming and self.corrupt_images == "skip":
            raise ValueError("--corrupt_images skip needs a pre-pass over the data and does not work with --streaming")
        if not 0.0 < self.train_val_split < 1.0:
            raise ValueError(f"--train_val_split must be in (0, 1), got {self.train_val_split}")

    @property
    def embedded(self) -> bool:
        return self.dataset_name in (None, EMBEDDED_DATASET) and self.train_dir is None and self.validation_dir is None


# ---------------------------------------------------------------------------------------------
# Metric: top-1 / top-5 accuracy as an `evaluate` module defined here, so nothing is fetched
# from the Hub (evaluate.load("accuracy") downloads its script).
# ---------------------------------------------------------------------------------------------


class TopKAccuracy(evaluate.Metric):
    """Top-1 and top-k accuracy from ranked class predictions.

    ``predictions[i]`` are sample i's class ids, best first (at least one); ``references[i]`` its
    true class. ``accuracy`` = mean(predictions[i][0] == references[i]);
    ``top{k}_accuracy`` = mean(references[i] in predictions[i][:k]) for each k in ``top_k`` that
    is <= the number of ranked predictions given.
    """

    def _info(self):
        return evaluate.MetricInfo(
            description="Top-1 and top-k classification accuracy from ranked predictions.",
            citation="",
            inputs_description="predictions: list of ranked class ids per sample; references: class id per sample.",
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("int64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, top_k=(5,)):
        ranked = np.asarray(predictions, dtype=np.int64)
        if ranked.ndim != 2 or ranked.shape[1] == 0:
            raise ValueError(f"predictions must be ranked class ids of shape (n, k>=1), got shape {ranked.shape}")
        truth = np.asarray(references, dtype=np.int64)[:, None]
        hits = ranked == truth
        out = {"accuracy": float(hits[:, 0].mean())}
        for k in top_k:
            if k <= ranked.shape[1]:
                out[f"top{k}_accuracy"] = float(hits[:, :k].any(axis=1).mean())
        return out


def ranked_predictions(logits: torch.Tensor, labels: Any = None, k: int = 5) -> torch.Tensor:
    """``preprocess_logits_for_metrics``: keep only each sample's top-k class ids (less to gather across ranks)."""
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return logits.topk(min(k, logits.shape[-1]), dim=-1).indices


# ---------------------------------------------------------------------------------------------
# Transforms (PIL/numpy/torch; torchvision is not a dependency of this project)
# ---------------------------------------------------------------------------------------------


def random_resized_crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], generator=None
) -> tuple[int, int, int, int]:
    """A random crop box ``(left, top, right, bottom)`` as in Inception training (Szegedy et al. 2015).

    Draw an area fraction uniformly in ``scale`` and a log-uniform aspect ratio in ``ratio``; keep
    the first of 10 draws that fits in the image, otherwise the largest center crop whose aspect
    ratio is clamped to ``ratio``.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u = torch.rand(4, generator=generator).tolist()
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[1])
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(u[2] * (width - w + 1))
            top = int(u[3] * (height - h + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def center_crop_box(width: int, height: int, crop: int) -> tuple[int, int, int, int]:
    """The ``crop`` x ``crop`` box centred in a ``width`` x ``height`` image (rounding as PIL/timm do)."""
    left = int(round((width - crop) / 2.0))
    top = int(round((height - crop) / 2.0))
    return left, top, left + crop, top + crop


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Resize (bicubic) so that the shorter side is ``size``, keeping the aspect ratio."""
    w, h = image.size
    if w <= h:
        new_w, new_h = size, max(1, int(round(h * size / w)))
    else:
        new_w, new_h = max(1, int(round(w * size / h))), size
    return image.resize((new_w, new_h), Image.BICUBIC)


def to_normalized_tensor(image: Image.Image, mean, std) -> torch.Tensor:
    """RGB PIL image -> float32 CHW tensor ``(x/255 - mean) / std``."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = (array - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


@dataclass
class ImageTransforms:
    """Train and eval transforms for one input size and normalisation."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    horizontal_flip: bool = True
    eval_crop_pct: float = 1.0

    def train(self, image: Image.Image, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        box = random_resized_crop_box(*image.size, self.crop_scale, self.crop_ratio, generator=generator)
        image = image.resize((self.image_size, self.image_size), Image.BICUBIC, box=box)
        if self.horizontal_flip and torch.rand((), generator=generator) < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return to_normalized_tensor(image, self.mean, self.std)

    def eval(self, image: Image.Image) -> torch.Tensor:
        resized = resize_shorter_side(image, int(math.floor(self.image_size / self.eval_crop_pct)))
        image = resized.crop(center_crop_box(*resized.size, self.image_size))
        return to_normalized_tensor(image, self.mean, self.std)


SAMPLE_INDEX_COLUMN = "__sample_index__"


def augmentation_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The random stream of one training sample in one epoch: a pure function of (seed, epoch, index).

    Augmentations then do not depend on the global RNG, on data-loader workers or on how many
    batches were prefetched, so ``--resume_from_checkpoint`` mid-epoch replays exactly the crops
    and flips of the uninterrupted run (Trainer restores the global RNG only after it has already
    fetched the first batch after the resume point).
    """
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_000_007 + index) % 2**63)


class AugmentationEpoch(TrainerCallback):
    """Tell the train transform which epoch it is (before Trainer builds the epoch's data iterator)."""

    def __init__(self):
        self.epoch = 0

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.epoch = int(math.floor((state.epoch or 0.0) + 1e-6))
        return control


def decode_image(value: Any, policy: str = "error") -> Optional[Image.Image]:
    """An RGB PIL image from a dataset cell (PIL image, ``{"path", "bytes"}`` dict, or path).

    An unreadable file raises ``ValueError`` naming it when ``policy == "error"`` and gives
    ``None`` when ``policy == "skip"``.
    """
    import io

    if isinstance(value, Image.Image):
        return value.convert("RGB")
    path = value.get("path") if isinstance(value, dict) else value
    try:
        if isinstance(value, dict) and value.get("bytes") is not None:
            image = Image.open(io.BytesIO(value["bytes"]))
        else:
            image = Image.open(path)
        image.load()
        return image.convert("RGB")
    except Exception as err:  # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError, ...)
        if policy == "skip":
            return None
        raise ValueError(
            f"corrupt image file {path!r}: {type(err).__name__}: {err}. Remove it, or pass --corrupt_images skip "
            "to drop unreadable images before training."
        ) from None


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def digits_dataset(image_size: int = 32) -> datasets.DatasetDict:
    """scikit-learn's handwritten digits as RGB images: a fixed stratified 80/20 train/validation split.

    1797 images of 8x8 pixels with 17 grey levels (UCI "Optical Recognition of Handwritten Digits"),
    upscaled bicubically to ``image_size`` and replicated to 3 channels; dark ink on white as in a scan.
    Split: ``train_test_split(test_size=0.2, stratify=labels, random_state=0)`` -> 1437 / 360.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = (255 - np.round(digits.images * (255.0 / 16.0))).astype(np.uint8)
    images = [Image.fromarray(p, mode="L").resize((image_size, image_size), Image.BICUBIC).convert("RGB") for p in pixels]
    labels = digits.target.astype(np.int64)
    train_idx, eval_idx = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=0)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])}
    )

    def subset(idx):
        return datasets.Dataset.from_dict(
            {"image": [images[i] for i in idx], "label": [int(labels[i]) for i in idx]}, features=features
        )

    return datasets.DatasetDict({"train": subset(train_idx), "validation": subset(eval_idx)})


def check_image_dir(path: str, flag: str) -> None:
    """``ValueError`` if ``path`` is not a directory holding at least one file."""
    if not os.path.isdir(path):
        raise ValueError(f"{flag} {path!r}: no such directory")
    for _root, _dirs, files in os.walk(path):
        if any(not f.startswith(".") for f in files):
            return
    raise ValueError(f"{flag} {path!r} holds no image files (expected {flag.lstrip('-')}/<label>/<image files>)")


def load_raw_datasets(data_args: DataTrainingArguments, token: Optional[str], cache_dir: Optional[str] = None):
    """The raw splits as a ``DatasetDict`` (or ``IterableDatasetDict`` with ``--streaming``)."""
    if data_args.embedded:
        return digits_dataset()
    if data_args.dataset_name is not None:
        try:
            return datasets.load_dataset(
                data_args.dataset_name,
                data_args.dataset_config_name,
                streaming=data_args.streaming,
                token=token,
                cache_dir=cache_dir,
            )
        except Exception as err:
            raise explain_load_error(data_args.dataset_name, err) from err
    data_files = {}
    if data_args.train_dir is not None:
        check_image_dir(data_args.train_dir, "--train_dir")
        data_files["train"] = os.path.join(data_args.train_dir, "**")
    if data_args.validation_dir is not None:
        check_image_dir(data_args.validation_dir, "--validation_dir")
        data_files["validation"] = os.path.join(data_args.validation_dir, "**")
    if "train" not in data_files:
        raise ValueError("--validation_dir needs --train_dir as well (the recipe trains)")
    return datasets.load_dataset("imagefolder", data_files=data_files, streaming=data_args.streaming, cache_dir=cache_dir)


def explain_load_error(name: str, err: Exception) -> Exception:
    """A clearer error for the usual reasons ``load_dataset`` fails: gated, missing, offline."""
    text = f"{type(err).__name__}: {err}"
    lowered = text.lower()
    if "gated" in lowered or "401" in lowered or "403" in lowered or "authenticated" in lowered:
        return ValueError(
            f"--dataset_name {name!r} is gated: accept its terms at https://huggingface.co/datasets/{name}, then "
            "log in (`hf auth login`), set HF_TOKEN, or pass --token. Original error: " + text
        )
    if "offline" in lowered or "connection" in lowered:
        return ValueError(
            f"--dataset_name {name!r} could not be reached (offline?). Use a local copy (--dataset_name <dir> or "
            "--train_dir) or run without a dataset argument for the embedded digits. Original error: " + text
        )
    return ValueError(f"--dataset_name {name!r} could not be loaded. Original error: " + text)


def pick_column(columns: list[str], requested: Optional[str], candidates: tuple[str, ...], flag: str) -> str:
    """The column to use: ``requested`` (must exist) or the first candidate present."""
    if requested is not None:
        if requested not in columns:
            raise ValueError(f"{flag} {requested!r} is not a column of the dataset; its columns: {', '.join(columns)}")
        return requested
    for name in candidates:
        if name in columns:
            return name
    raise ValueError(
        f"no {flag.removeprefix('--').removesuffix('_name').replace('_', ' ')} found among the dataset's columns "
        f"({', '.join(columns)}); pass {flag}"
    )


def split_train_eval(raw, data_args: DataTrainingArguments, seed: int):
    """``(train split, eval split)``: the named splits, or a seeded hold-out of train."""
    if data_args.train_split_name not in raw:
        raise ValueError(
            f"--train_split_name {data_args.train_split_name!r} is not a split of the dataset; splits: {', '.join(raw)}"
        )
    train = raw[data_args.train_split_name]
    names = [data_args.eval_split_name] if data_args.eval_split_name else ["validation", "valid", "val", "test"]
    for name in names:
        if name in raw:
            return train, raw[name]
    if data_args.eval_split_name:
        raise ValueError(f"--eval_split_name {data_args.eval_split_name!r} is not a split; splits: {', '.join(raw)}")
    if data_args.streaming:
        raise ValueError("streamed data without an evaluation split: pass --eval_split_name or use a local copy")
    parts = train.train_test_split(test_size=data_args.train_val_split, seed=seed)
    return parts["train"], parts["test"]


def label_names(train, label_column: str, data_args: DataTrainingArguments) -> list[str]:
    """Class names: the ``ClassLabel`` names, else the sorted distinct label values, else ``0..num_labels-1``."""
    feature = (train.features or {}).get(label_column)
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    if data_args.num_labels is not None:
        return [str(i) for i in range(data_args.num_labels)]
    if isinstance(train, datasets.IterableDataset):
        raise ValueError(
            f"label column {label_column!r} is not a ClassLabel, so the classes cannot be listed without reading "
            "the whole stream: pass --num_labels"
        )
    values = sorted(set(train[label_column]))
    if not all(isinstance(v, (int, np.integer)) for v in values):
        raise ValueError(f"label column {label_column!r} holds non-integer values {values[:5]}...; cast it to ClassLabel")
    return [str(i) for i in range(int(max(values)) + 1)]


def drop_corrupt_images(dataset, image_column: str, split: str, num_proc: Optional[int] = None):
    """Decode every image once; drop those that fail. Logs the count and the first names."""
    raw = dataset.cast_column(image_column, datasets.Image(decode=False))
    readable = raw.map(
        lambda batch: {"_readable": [decode_image(v, "skip") is not None for v in batch[image_column]]},
        batched=True,
        num_proc=num_proc,
        desc=f"checking {split} images",
    )
    bad = [i for i, ok in enumerate(readable["_readable"]) if not ok]
    if bad:
        names = [raw[i][image_column].get("path") or f"row {i}" for i in bad[:10]]
        logger.warning("%s: skipped %d unreadable image(s): %s%s", split, len(bad), names, " ..." if len(bad) > 10 else "")
        dataset = dataset.select([i for i in range(len(dataset)) if readable[i]["_readable"]])
    return dataset, len(bad)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def build_model_and_processor(model_args: ModelArguments, labels: list[str]):
    """``(model, image_processor)``: pretrained, or from ``--model_type`` + ``--config_overrides``."""
    label2id = {name: i for i, name in enumerate(labels)}
    id2label = {i: name for i, name in enumerate(labels)}
    common = {"revision": model_args.model_revision, "token": model_args.token}
    if model_args.model_name_or_path is not None:
        if model_args.config_overrides:
            raise ValueError("--config_overrides only applies when training from scratch (--model_type)")
        config = AutoConfig.from_pretrained(
            model_args.model_name_or_path,
            num_labels=len(labels),
            id2label=id2label,
            label2id=label2id,
            finetuning_task="image-classification",
            **common,
        )
        model = AutoModelForImageClassification.from_pretrained(
            model_args.model_name_or_path,
            config=config,
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
            **common,
        )
        processor = AutoImageProcessor.from_pretrained(
            model_args.image_processor_name or model_args.model_name_or_path, **common
        )
        return model, processor
    model_type = model_args.model_type or EMBEDDED_MODEL_TYPE
    if model_type not in transformers.CONFIG_MAPPING:
        raise ValueError(f"--model_type {model_type!r} is not a transformers model type")
    overrides = model_args.config_overrides
    if model_args.model_type is None and overrides is None:
        overrides = EMBEDDED_CONFIG_OVERRIDES
    config = config_from_overrides(model_type, overrides)
    config.num_labels = len(labels)
    config.id2label, config.label2id = id2label, label2id
    try:
        model = AutoModelForImageClassification.from_config(config)
    except ValueError as err:
        raise ValueError(f"--model_type {model_type!r} has no image-classification model: {err}") from None
    if model_args.image_processor_name:
        processor = AutoImageProcessor.from_pretrained(model_args.image_processor_name, **common)
    else:
        processor = default_image_processor(model_type)
    return model, processor


def split_overrides(text: str) -> list[tuple[str, str]]:
    """``"a=1,b=[2,3]"`` -> ``[("a", "1"), ("b", "[2,3]")]``: commas inside brackets do not split."""
    items, depth, current = [], 0, ""
    for char in text + ",":
        if char == "," and depth == 0:
            if current.strip():
                key, sep, value = current.strip().partition("=")
                if not sep or not key:
                    raise ValueError(f"--config_overrides: expected key=value, got {current.strip()!r}")
                items.append((key.strip(), value.strip()))
            current = ""
            continue
        depth += char in "[("
        depth -= char in "])"
        current += char
    return items


def parse_config_overrides(config, text: str) -> dict[str, Any]:
    """``--config_overrides`` as typed values; each value's type follows ``config``'s current value.

    Lists are written ``[1,2,3]`` (JSON). Unknown keys raise ``ValueError`` naming them.
    """
    parsed: dict[str, Any] = {}
    for key, value in split_overrides(text):
        if not hasattr(config, key):
            raise ValueError(f"--config_overrides: {type(config).__name__} has no attribute {key!r}")
        current = getattr(config, key)
        if value.startswith("["):
            parsed[key] = json.loads(value)
        elif isinstance(current, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"--config_overrides: {key} expects true/false, got {value!r}")
            parsed[key] = value.lower() in ("true", "1")
        elif isinstance(current, int):
            parsed[key] = int(value)
        elif isinstance(current, float):
            parsed[key] = float(value)
        elif current is None and (value[:1].isdigit() or value in ("true", "false", "null")):
            parsed[key] = json.loads(value)
        else:
            parsed[key] = value
    return parsed


def config_from_overrides(model_type: str, text: Optional[str]):
    """A fresh config of ``model_type`` built with the ``--config_overrides`` as constructor arguments.

    Passing them to the constructor (rather than setting attributes afterwards) lets the config
    derive what depends on them, e.g. a ResNet's ``stage_names``/``out_features`` from ``depths``.
    """
    config_class = transformers.CONFIG_MAPPING[model_type]
    overrides = parse_config_overrides(config_class(), text) if text else {}
    return config_class(**overrides)


def default_image_processor(model_type: str):
    """The model type's own image processor with its defaults (PIL backend), or ViT's if it has none."""
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    names = IMAGE_PROCESSOR_MAPPING_NAMES.get(model_type) or {}
    if isinstance(names, dict):
        class_name = names.get("pil") or names.get("torchvision")
    else:  # older transformers: (slow, fast) tuple
        class_name = next((n for n in names if n), None)
    cls = getattr(transformers, class_name, None) if class_name else None
    return (cls or transformers.ViTImageProcessor)()


def resolve_image_size(model_args: ModelArguments, config, processor) -> int:
    """``--image_size``, else ``config.image_size``, else the processor's size (height or shortest edge)."""
    if model_args.image_size is not None:
        return int(model_args.image_size)
    if model_args.model_name_or_path is None and model_args.model_type is None:
        return EMBEDDED_IMAGE_SIZE
    size = getattr(config, "image_size", None)
    if isinstance(size, (list, tuple)):
        size = size[0]
    if isinstance(size, int):
        return size
    crop = getattr(processor, "crop_size", None)
    for candidate in (crop, getattr(processor, "size", None)):
        if candidate is None:
            continue
        get = candidate.get if isinstance(candidate, dict) else lambda k, c=candidate: getattr(c, k, None)
        for key in ("height", "shortest_edge"):
            if get(key):
                return int(get(key))
    return 224


def align_processor(processor, image_size: int, crop_pct: float) -> None:
    """Make a saved processor reproduce the eval transform (resize + center crop to ``image_size``)."""
    try:
        processor.size = {"height": image_size, "width": image_size}
        if hasattr(processor, "crop_size"):
            processor.crop_size = {"height": image_size, "width": image_size}
        if hasattr(processor, "crop_pct"):
            processor.crop_pct = crop_pct
    except Exception:  # processors whose size is validated differently keep their own
        logger.warning("could not record image_size=%d in %s", image_size, type(processor).__name__)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def choose_num_workers(requested: int, data_args: DataTrainingArguments, world_size: int) -> int:
    """DataLoader workers; ``-1`` = auto: 0 for the in-memory embedded digits, else the CPUs per rank minus one (<= 8).

    Train augmentations draw from :func:`augmentation_generator` (seed, epoch, sample index), so
    they do not depend on the number of workers and a resumed run replays them exactly (tested,
    also after SIGKILL mid-epoch). Workers are not persistent by default: the epoch number reaches
    them when each epoch's workers start; with ``--dataloader_persistent_workers`` they would keep
    the first epoch's number, so the recipe refuses that combination.
    """
    if requested >= 0:
        return requested
    if data_args.embedded:
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cpus // max(1, world_size) - 1))


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "labels": torch.tensor([int(e["labels"]) for e in examples], dtype=torch.long),
    }


def parse_pair(text: str, flag: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f'{flag} expects "min,max", got {text!r}') from None
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"{flag} needs 0 < min <= max <= 1, got {text!r}")
    return lo, hi


def parse_arguments(argv: Optional[list[str]] = None):
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    parser.set_defaults(**RECIPE_TRAINING_DEFAULTS)
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) == 1 and args[0].endswith((".json", ".yaml", ".yml")):
        # One settings file instead of flags; the recipe's defaults still apply to what it leaves out.
        with open(args[0]) as handle:
            if args[0].endswith(".json"):
                values = json.load(handle)
            else:
                import yaml

                values = yaml.safe_load(handle)
        return parser.parse_dict({**RECIPE_TRAINING_DEFAULTS, **values})
    return parser.parse_args_into_dataclasses(args=args)


def main(argv: Optional[list[str]] = None) -> dict[str, float]:
    model_args, data_args, training_args = parse_arguments(argv)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if training_args.should_log else logging.WARNING,
    )
    transformers.utils.logging.set_verbosity(logging.INFO if training_args.should_log else logging.WARNING)
    datasets.utils.logging.set_verbosity(logging.WARNING)
    push_to_hub = training_args.push_to_hub
    training_args.push_to_hub = False  # the recipe pushes itself, with an RLion model card (hf_rlion.hub)
    training_args.dataloader_num_workers = choose_num_workers(
        training_args.dataloader_num_workers, data_args, training_args.world_size
    )
    if not torch.cuda.is_available():
        training_args.dataloader_pin_memory = False  # pinning only helps host-to-GPU copies
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and training_args.world_size != launched:
        raise RuntimeError(
            f"{launched} processes were launched but training sees {training_args.world_size}: they would train "
            "separately and overwrite each other's output. On CPU, launch with ACCELERATE_USE_CPU=1 and --multi_gpu "
            "(or recipes/configs/cpu_2ranks.yaml); accelerate's use_cpu: true / --cpu starts unconnected processes."
        )
    if training_args.dataloader_persistent_workers and training_args.dataloader_num_workers > 0:
        raise ValueError(
            "--dataloader_persistent_workers: persistent workers would not see the epoch number that seeds each "
            "sample's augmentation (every epoch would repeat the first one's crops); leave it off"
        )
    if data_args.streaming and training_args.max_steps <= 0:
        raise ValueError("--streaming needs --max_steps (a stream has no length to count epochs with)")
    token = model_args.token or training_args.hub_token
    model_args.token = token
    transformers.set_seed(training_args.seed)

    checkpoint = resolve_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)

    # Data: the main process prepares (and caches) first; the other ranks then read the cache.
    with training_args.main_process_first(desc="loading the dataset"):
        raw = load_raw_datasets(data_args, token, cache_dir=None)
        train_ds, eval_ds = split_train_eval(raw, data_args, training_args.seed)
    columns = list(train_ds.column_names or (train_ds.features or {}).keys())
    image_column = pick_column(columns, data_args.image_column_name, IMAGE_COLUMN_CANDIDATES, "--image_column_name")
    label_column = pick_column(columns, data_args.label_column_name, LABEL_COLUMN_CANDIDATES, "--label_column_name")
    labels = label_names(train_ds, label_column, data_args)

    if data_args.max_train_samples is not None:
        train_ds = _first(train_ds, data_args.max_train_samples)
    if data_args.max_eval_samples is not None:
        eval_ds = _first(eval_ds, data_args.max_eval_samples)
    skipped = {"train": 0, "eval": 0}
    if data_args.corrupt_images == "skip":
        with training_args.main_process_first(desc="checking images"):
            train_ds, skipped["train"] = drop_corrupt_images(train_ds, image_column, "train")
            eval_ds, skipped["eval"] = drop_corrupt_images(eval_ds, image_column, "eval")

    model, processor = build_model_and_processor(model_args, labels)
    image_size = resolve_image_size(model_args, model.config, processor)
    default_scale = "0.6,1.0" if data_args.embedded else "0.08,1.0"
    crop_pct = data_args.eval_crop_pct or (None if data_args.embedded else getattr(processor, "crop_pct", None)) or 1.0
    transforms = ImageTransforms(
        image_size=image_size,
        mean=tuple(getattr(processor, "image_mean", None) or (0.5, 0.5, 0.5)),
        std=tuple(getattr(processor, "image_std", None) or (0.5, 0.5, 0.5)),
        crop_scale=parse_pair(data_args.train_crop_scale or default_scale, "--train_crop_scale"),
        horizontal_flip=(not data_args.embedded) if data_args.horizontal_flip is None else data_args.horizontal_flip,
        eval_crop_pct=crop_pct,
    )
    align_processor(processor, image_size, crop_pct)

    def batch_transform(transform):
        def apply(batch):
            return {
                "pixel_values": [transform(decode_image(v)) for v in batch[image_column]],
                "labels": batch[label_column],
            }

        return apply

    augmentation_epoch = AugmentationEpoch()
    # Decode images ourselves so that a corrupt file is reported by name (see decode_image).
    train_ds = train_ds.cast_column(image_column, datasets.Image(decode=False))
    eval_ds = eval_ds.cast_column(image_column, datasets.Image(decode=False))
    if data_args.streaming:
        keep = [c for c in columns if c not in (image_column, label_column)]
        train_ds = train_ds.shuffle(seed=training_args.seed, buffer_size=10_000)
        train_ds = train_ds.map(batch_transform(transforms.train), batched=True, remove_columns=keep + [image_column, label_column])
        eval_ds = eval_ds.map(batch_transform(transforms.eval), batched=True, remove_columns=keep + [image_column, label_column])
    else:
        train_ds = train_ds.add_column(SAMPLE_INDEX_COLUMN, list(range(len(train_ds))))

        def seeded_train_transform(batch):
            return {
                "pixel_values": [
                    transforms.train(
                        decode_image(v), augmentation_generator(training_args.seed, augmentation_epoch.epoch, i)
                    )
                    for v, i in zip(batch[image_column], batch[SAMPLE_INDEX_COLUMN])
                ],
                "labels": batch[label_column],
            }

        train_ds.set_transform(seeded_train_transform)
        eval_ds.set_transform(batch_transform(transforms.eval))

    metric = TopKAccuracy(keep_in_memory=True)

    def compute_metrics(prediction):
        return metric.compute(predictions=prediction.predictions, references=prediction.label_ids, top_k=(5,))

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=collate,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=ranked_predictions,
        processing_class=processor,
        callbacks=[MarkCompleteCheckpoints(), augmentation_epoch],
    )

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not getattr(trainer, "is_fsdp_enabled", False):
        logger.warning(
            "an FSDP config was given but accelerate applies FSDP only on GPUs (and other accelerators); "
            "training runs as %s", parallelism(trainer)
        )
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model()
    train_metrics = dict(train_result.metrics)
    if not data_args.streaming:
        train_metrics["train_samples"] = len(train_ds)
    if data_args.corrupt_images == "skip":
        train_metrics["train_skipped_images"] = skipped["train"]
    trainer.log_metrics("train", train_metrics)
    trainer.save_metrics("train", train_metrics)
    trainer.save_state()

    eval_metrics = trainer.evaluate()
    if not data_args.streaming:
        eval_metrics["eval_samples"] = len(eval_ds)
    if data_args.corrupt_images == "skip":
        eval_metrics["eval_skipped_images"] = skipped["eval"]
    trainer.log_metrics("eval", eval_metrics)
    trainer.save_metrics("eval", eval_metrics)

    if trainer.is_world_process_zero():
        summary = f"eval_accuracy = {eval_metrics['eval_accuracy']:.4f}"
        if "eval_top5_accuracy" in eval_metrics:
            summary += f", eval_top5_accuracy = {eval_metrics['eval_top5_accuracy']:.4f}"
        print(
            f"[image_classification] {summary} ({len(labels)} classes, {training_args.world_size} process(es), "
            f"{parallelism(trainer)}, "
            f"output in {training_args.output_dir})"
        )
        plot_training_curves(
            trainer.state.log_history,
            os.path.join(training_args.output_dir, "training_curves.png"),
            title=f"{dataset_label(data_args)}, --optim {getattr(training_args.optim, 'value', training_args.optim)}",
        )
        if push_to_hub:
            push_model(trainer, model_args, data_args, eval_metrics, token, argv)
    training_args.push_to_hub = push_to_hub
    return eval_metrics


def plot_training_curves(log_history: list[dict], path: str, title: str = "") -> None:
    """Training loss per step and eval accuracy per epoch (``trainer.state.log_history``) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["epoch"], e["eval_accuracy"]) for e in log_history if "eval_accuracy" in e]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 3.8))
    if train:
        loss_axis.plot(*zip(*train), marker=".")
    loss_axis.set(xlabel="step", ylabel="training loss", yscale="log", title="training loss")
    if evals:
        accuracy_axis.plot(*zip(*evals), marker="o")
        accuracy_axis.annotate(f"{evals[-1][1]:.4f}", evals[-1], textcoords="offset points", xytext=(-30, -15))
    accuracy_axis.set(xlabel="epoch", ylabel="eval accuracy", ylim=(0, 1.02), title="eval accuracy")
    accuracy_axis.grid(alpha=0.3)
    loss_axis.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def parallelism(trainer: Trainer) -> str:
    """How the model is spread over processes: ``FSDP``, ``DDP`` or ``single process``."""
    if getattr(trainer, "is_fsdp_enabled", False):
        return "FSDP"
    return "DDP" if trainer.args.world_size > 1 else "single process"


def _first(dataset, n: int):
    """The first ``n`` rows (streamed or not)."""
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.take(n)
    return dataset.select(range(min(n, len(dataset))))


CHECKPOINT_COMPLETE = "checkpoint_complete.json"  # written last, once every rank has saved


class MarkCompleteCheckpoints(TrainerCallback):
    """Mark a ``checkpoint-*`` folder complete once Trainer has written all of it, on every rank.

    Trainer writes a checkpoint in place (model, optimizer, scheduler, per-rank RNG, then
    ``trainer_state.json``), so a process killed mid-save leaves a folder that looks like a
    checkpoint but is not. ``on_save`` runs after ``_save_checkpoint``; after a barrier (every
    rank's RNG file is on disk) the main process writes :data:`CHECKPOINT_COMPLETE` atomically
    (temp file, fsync, rename). ``--resume_from_checkpoint last`` only considers marked folders.
    """

    def on_save(self, args, state, control, **kwargs):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        if args.should_save:
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            if os.path.isdir(folder):
                tmp = os.path.join(folder, f".{CHECKPOINT_COMPLETE}.tmp")
                with open(tmp, "w") as f:
                    json.dump({"global_step": state.global_step, "epoch": state.epoch}, f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, os.path.join(folder, CHECKPOINT_COMPLETE))
        return control


def complete_checkpoints(output_dir: str) -> list[str]:
    """``checkpoint-*`` folders in ``output_dir`` that carry the completeness marker, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", name)
        path = os.path.join(output_dir, name)
        if match and os.path.isfile(os.path.join(path, CHECKPOINT_COMPLETE)):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def resolve_checkpoint(value: Optional[str], output_dir: str) -> Optional[str]:
    """``--resume_from_checkpoint``: a checkpoint directory, or ``true``/``last`` for the newest COMPLETE one.

    A folder without the completeness marker (a save interrupted by a crash) is never picked
    by ``last``; naming it explicitly is an error that says so.
    """
    if value is None or value.lower() in ("", "false", "none"):
        return None
    if value.lower() in ("true", "last"):
        complete = complete_checkpoints(output_dir)
        newest = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if not complete:
            where = f" ({newest} is incomplete: its save was interrupted)" if newest else ""
            raise ValueError(
                f"--resume_from_checkpoint {value}: no complete checkpoint-* folder in --output_dir {output_dir!r}{where}"
            )
        if newest is not None and os.path.abspath(newest) != os.path.abspath(complete[-1]):
            logger.warning("skipping %s: its save was interrupted (no %s); resuming from %s", newest, CHECKPOINT_COMPLETE, complete[-1])
        return complete[-1]
    if not os.path.isdir(value):
        raise ValueError(f"--resume_from_checkpoint {value!r}: no such directory")
    if not os.path.isfile(os.path.join(value, CHECKPOINT_COMPLETE)):
        logger.warning(
            "%s has no %s: it was written by another tool, or its save was interrupted", value, CHECKPOINT_COMPLETE
        )
    return value


def dataset_label(data_args: DataTrainingArguments) -> str:
    """The dataset's name for the model card."""
    if data_args.embedded:
        return EMBEDDED_DATASET
    if data_args.dataset_name:
        return data_args.dataset_name
    return "imagefolder"


def without_secrets(args: list[str]) -> list[str]:
    """The command line minus ``--hub_token``/``--token`` and their values."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg in ("--hub_token", "--token"):
            skip = True
            continue
        if arg.startswith(("--hub_token=", "--token=")):
            continue
        out.append(arg)
    return out


def push_model(trainer: Trainer, model_args, data_args, eval_metrics, token, argv) -> str:
    """Upload ``--output_dir`` (no checkpoints) with an RLion model card; returns the repo URL.

    The optimizer hyperparameters on the card are those the optimizer was really built with
    (``hf_rlion.hub.optimizer_hyperparameters(trainer.optimizer)``: class defaults included).
    """
    from hf_rlion import hub

    args = trainer.args
    repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
    optim_name = getattr(args.optim, "value", args.optim)
    metrics = {k: float(v) for k, v in eval_metrics.items() if k.endswith("accuracy")}
    command_args = without_secrets(list(sys.argv[1:] if argv is None else argv))
    card = hub.build_model_card(
        model_name=repo_id.split("/")[-1],
        task="image-classification",
        dataset_name=dataset_label(data_args),
        dataset_config=data_args.dataset_config_name,
        metrics=metrics,
        optimizer=optim_name,
        optimizer_hyperparameters=hub.optimizer_hyperparameters(trainer.optimizer),
        training_hyperparameters=hub.training_hyperparameters(args),
        reproduce_command="accelerate launch recipes/image_classification.py " + shlex.join(command_args),
        base_model=model_args.model_name_or_path,
        repo_id=repo_id,
        tags=["image-classification"],
        license=model_args.license or hub.base_model_license(model_args.model_name_or_path, token=token),
        num_parameters=trainer.model.num_parameters(),
        preprocessing=hub.image_preprocessing(trainer.processing_class),
        log_history=trainer.state.log_history,
        training_curves="training_curves.png" if os.path.isfile(os.path.join(args.output_dir, "training_curves.png")) else None,
    )
    url = hub.push_folder_to_hub(
        args.output_dir,
        repo_id,
        card=card,
        token=token,
        private=args.hub_private_repo,
        commit_message=f"Image classification with {optim_name}: eval accuracy {metrics.get('eval_accuracy', float('nan')):.4f}",
    )
    print(f"[image_classification] pushed to {url}")
    return url


if __name__ == "__main__":
    main()
    # In a multi-process run: barrier, then os._exit, so that a rank cannot abort at interpreter
    # exit after everything is saved (a PyTorch race, see hf_rlion.distributed_exit).
    exit_distributed_run()
