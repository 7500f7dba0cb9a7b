#!/usr/bin/env python
"""Image classification with RLion: ``datasets`` data, a transformers or timm model, ``Trainer``, ``accelerate``.

Without arguments it trains a tiny ResNet from scratch on scikit-learn's handwritten digits
(32x32 RGB, no download, ``hf_rlion.digits``) with ``--optim rlion`` and prints its accuracy::

    accelerate launch recipes/image_classification.py

Any transformers model type or timm architecture, from scratch or pretrained, on any dataset::

    accelerate launch recipes/image_classification.py --model_type timm_wrapper \\
        --config_overrides "architecture=fasternet_t0" --dataset_name timm/imagenet-1k-wds --image_size 224 \\
        --auto_augment rand-m9-mstd0.5 --mixup 0.8 --cutmix 1.0 --reprob 0.25 --label_smoothing_factor 0.1

Built like transformers' ``examples/pytorch/image-classification/run_image_classification.py``
(``HfArgumentParser`` flags or one .json/.yaml file, ``Trainer``, its output files, plus
``training_curves.png``). Defaults that differ from ``TrainingArguments``': :data:`RECIPE_TRAINING_DEFAULTS`
(``--learning_rate 1e-3`` is RLion's own default, docs/results.md; RLion's hyperparameters are the class's).

Transforms are ``torchvision.transforms.v2``; mean, std, interpolation and crop_pct come from the
model's image processor (timm models: timm's data config of the architecture). Each training sample's
augmentation runs under its own seed ``(seed, epoch, sample index)`` and each batch's mixup/cutmix
under a seed derived from its samples', so a run resumed from a checkpoint, even one killed
mid-epoch, ends with the uninterrupted run's exact weights, with any number of data-loader workers.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import hf_rlion  # noqa: F401  (registers --optim rlion, rlion_8bit, paged_rlion_8bit with transformers)
from hf_rlion.complete_checkpoints import MarkCompleteCheckpoints, resolve_checkpoint
from hf_rlion.digits import DIGITS_IMAGE_SIZE, DIGITS_RESNET_CONFIG, digits_dataset
from hf_rlion.distributed_exit import exit_distributed_run
from hf_rlion.training_curves import plot_training_curves

import datasets
import numpy as np
import torch
import torch.nn.functional as F
import transformers
import yaml
from PIL import Image
from torchvision.transforms import v2
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification, HfArgumentParser
from transformers import Trainer, TrainerCallback, TrainingArguments

logger = logging.getLogger("image_classification")

EMBEDDED_DATASET = "sklearn-digits"
EMBEDDED_MODEL_TYPE = "resnet"
EMBEDDED_CONFIG_OVERRIDES = ",".join(f"{k}={v}".replace(" ", "") for k, v in DIGITS_RESNET_CONFIG.items())
RECIPE_TRAINING_DEFAULTS: dict[str, Any] = {
    "output_dir": "outputs/image_classification", "optim": "rlion", "learning_rate": 1e-3, "weight_decay": 0.01,
    "num_train_epochs": 10, "per_device_train_batch_size": 64, "per_device_eval_batch_size": 128,
    "eval_strategy": "epoch", "save_strategy": "epoch", "save_total_limit": 2, "logging_steps": 20,
    "report_to": "none", "remove_unused_columns": False,
    "dataloader_num_workers": -1,  # auto: 0 for the in-memory digits, else the CPUs per rank minus one (<= 8)
}  # fmt: skip
IMAGE_COLUMN_CANDIDATES = ("image", "img", "jpg", "jpeg", "png", "webp", "pixel_values")
LABEL_COLUMN_CANDIDATES = ("label", "labels", "cls", "fine_label", "class")


def option(default: Any, help: str, **metadata) -> Any:
    """A dataclass field that ``HfArgumentParser`` turns into ``--name`` with this help text."""
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class ModelArguments:
    """Which model to train: a pretrained one (``--model_name_or_path``) or one from a config (``--model_type``)."""

    model_name_or_path: Optional[str] = option(None, "Hub id (e.g. timm/...) or local directory; unset: from scratch.")
    model_type: Optional[str] = option(
        None, f"Model type to train from scratch (vit, convnext, timm_wrapper, ...; default {EMBEDDED_MODEL_TYPE!r})."
    )
    config_overrides: Optional[str] = option(
        None, 'key=value settings of the --model_type config: "architecture=fasternet_t0", "depths=[1,1,1]".'
    )
    image_processor_name: Optional[str] = option(None, "Image processor (Hub id or directory) if not the model's.")
    image_size: Optional[int] = option(None, "Input side in pixels (default: config, processor or timm data config).")
    model_revision: str = option("main", "Model revision (branch, tag or commit).")
    token: Optional[str] = option(None, "Hub token (default: HF_TOKEN / the stored login).")
    ignore_mismatched_sizes: bool = option(True, "Replace a pretrained head that has another number of labels.")
    license: Optional[str] = option(None, "License id for the pushed model card (default: the base model's).")


@dataclass
class DataTrainingArguments:
    """Which data to train and evaluate on, and how to augment it."""

    dataset_name: Optional[str] = option(None, f"datasets name or local path (default: {EMBEDDED_DATASET!r}, embedded).")
    dataset_config_name: Optional[str] = option(None, "Dataset configuration name.")
    streaming: bool = option(False, "Stream the dataset (needs --max_steps).")
    train_dir: Optional[str] = option(None, "Image folder for training: <dir>/<label>/<image>.")
    validation_dir: Optional[str] = option(None, "Image folder for evaluation.")
    train_split_name: str = option("train", "Name of the training split.")
    eval_split_name: Optional[str] = option(None, "Evaluation split (default: validation, valid, val or test).")
    train_val_split: float = option(0.15, "Fraction of train held out when there is no evaluation split.")
    image_column_name: Optional[str] = option(None, f"Image column (default: first of {IMAGE_COLUMN_CANDIDATES}).")
    label_column_name: Optional[str] = option(None, f"Label column (default: first of {LABEL_COLUMN_CANDIDATES}).")
    num_labels: Optional[int] = option(None, "Number of classes (streamed data with plain integer labels).")
    max_train_samples: Optional[int] = option(None, "Use at most this many training images.")
    max_eval_samples: Optional[int] = option(None, "Use at most this many evaluation images.")
    corrupt_images: str = option(
        "error", "Unreadable images: 'error' (stop, naming the file) or 'skip' (drop, count).", choices=["error", "skip"]
    )
    train_crop_scale: Optional[str] = option(None, 'Random-resized-crop area "min,max" (default "0.08,1.0"; digits "0.6,1.0").')
    horizontal_flip: Optional[bool] = option(None, "Random horizontal flips (default: on; off for the digits).")
    eval_crop_pct: Optional[float] = option(None, "Eval: resize to image_size/crop_pct, center crop (default: the model's).")
    auto_augment: Optional[str] = option(None, 'As timm train.py: "rand-m9-n2" (RandAugment), "trivial" or "none".')
    mixup: float = option(0.0, "Mixup alpha (0: off). With --cutmix too, each batch gets one of the two.")
    cutmix: float = option(0.0, "CutMix alpha (0: off).")
    reprob: float = option(0.0, "Random-erasing probability per image (timm's --reprob).")

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



def check_image_dir(path: str, flag: str) -> None:
    """``ValueError`` if ``path`` is not a directory holding at least one file."""
    if not os.path.isdir(path):
        raise ValueError(f"{flag} {path!r}: no such directory")
    if not any(not f.startswith(".") for _root, _dirs, files in os.walk(path) for f in files):
        raise ValueError(f"{flag} {path!r} holds no image files (expected {flag.lstrip('-')}/<label>/<image files>)")


def load_raw_datasets(data_args: DataTrainingArguments, token: Optional[str]):
    """The raw splits as a ``DatasetDict`` (or ``IterableDatasetDict`` with ``--streaming``)."""
    if data_args.embedded:
        return digits_dataset()
    if data_args.dataset_name is not None:
        try:
            return datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name, streaming=data_args.streaming, token=token)
        except Exception as err:
            raise explain_load_error(data_args.dataset_name, err) from err
    if data_args.train_dir is None:
        raise ValueError("--validation_dir needs --train_dir as well (the recipe trains)")
    data_files = {}
    for split, folder in (("train", data_args.train_dir), ("validation", data_args.validation_dir)):
        if folder is not None:
            check_image_dir(folder, "--train_dir" if split == "train" else "--validation_dir")
            data_files[split] = os.path.join(folder, "**")
    return datasets.load_dataset("imagefolder", data_files=data_files, streaming=data_args.streaming)


def explain_load_error(name: str, err: Exception) -> Exception:
    """A clearer error for the usual reasons ``load_dataset`` fails: gated, missing, offline."""
    text = f"{type(err).__name__}: {err}"
    lowered = text.lower()
    if any(word in lowered for word in ("gated", "401", "403", "authenticated")):
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
    what = flag.removeprefix("--").removesuffix("_name").replace("_", " ")
    raise ValueError(f"no {what} found among the dataset's columns ({', '.join(columns)}); pass {flag}")


def split_train_eval(raw, data_args: DataTrainingArguments, seed: int):
    """``(train split, eval split)``: the named splits, or a seeded hold-out of train."""
    if data_args.train_split_name not in raw:
        raise ValueError(f"--train_split_name {data_args.train_split_name!r} is not a split of the dataset; splits: {', '.join(raw)}")
    train = raw[data_args.train_split_name]
    for name in [data_args.eval_split_name] if data_args.eval_split_name else ["validation", "valid", "val", "test"]:
        if name in raw:
            return train, raw[name]
    if data_args.eval_split_name:
        raise ValueError(f"--eval_split_name {data_args.eval_split_name!r} is not a split; splits: {', '.join(raw)}")
    if data_args.streaming:
        raise ValueError("streamed data without an evaluation split: pass --eval_split_name or use a local copy")
    parts = train.train_test_split(test_size=data_args.train_val_split, seed=seed)
    return parts["train"], parts["test"]


def label_names(train, label_column: str, data_args: DataTrainingArguments) -> list[str]:
    """Class names: the ``ClassLabel`` names, else ``0..num_labels-1``, else ``0..max(label)``."""
    feature = (train.features or {}).get(label_column)
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    if data_args.num_labels is not None:
        return [str(i) for i in range(data_args.num_labels)]
    if isinstance(train, datasets.IterableDataset):
        raise ValueError(f"label column {label_column!r} is not a ClassLabel: pass --num_labels for streamed data")
    values = sorted(set(train[label_column]))
    if not all(isinstance(v, (int, np.integer)) for v in values):
        raise ValueError(f"label column {label_column!r} holds non-integer values {values[:5]}...; cast it to ClassLabel")
    return [str(i) for i in range(int(max(values)) + 1)]


def decode_image(value: Any, policy: str = "error") -> Optional[Image.Image]:
    """An RGB PIL image from a dataset cell (PIL image, ``{"path", "bytes"}`` dict or path); unreadable:
    ``ValueError`` naming the file (``policy="error"``) or ``None`` (``"skip"``)."""
    import io

    if isinstance(value, Image.Image):
        return value.convert("RGB")
    path = value.get("path") if isinstance(value, dict) else value
    try:
        data = value.get("bytes") if isinstance(value, dict) else None
        image = Image.open(io.BytesIO(data) if data is not None else path)
        image.load()
        return image.convert("RGB")
    except Exception as err:  # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError, ...)
        if policy == "skip":
            return None
        raise ValueError(
            f"corrupt image file {path!r}: {type(err).__name__}: {err}. Remove it, or pass --corrupt_images skip "
            "to drop unreadable images before training."
        ) from None


def drop_corrupt_images(dataset, image_column: str, split: str):
    """Decode every image once; drop those that fail; log the count and the first names."""
    raw = dataset.cast_column(image_column, datasets.Image(decode=False))
    readable = raw.map(lambda b: {"_ok": [decode_image(v, "skip") is not None for v in b[image_column]]}, batched=True)["_ok"]
    bad = [i for i, ok in enumerate(readable) if not ok]
    if bad:
        names = [raw[i][image_column].get("path") or f"row {i}" for i in bad[:10]]
        logger.warning("%s: skipped %d unreadable image(s): %s%s", split, len(bad), names, " ..." if len(bad) > 10 else "")
        dataset = dataset.select([i for i, ok in enumerate(readable) if ok])
    return dataset, len(bad)


def first(dataset, n: Optional[int]):
    """The first ``n`` rows (streamed or not); all of them for ``None``."""
    if n is None:
        return dataset
    return dataset.take(n) if isinstance(dataset, datasets.IterableDataset) else dataset.select(range(min(n, len(dataset))))



def config_from_overrides(model_type: str, text: Optional[str]):
    """A fresh config of ``model_type`` with the ``--config_overrides`` ``key=value,...`` applied.

    The text is read as a YAML flow mapping (lists as ``[1,2]``); numbers, booleans and lists go to the
    config class's constructor (so it derives what depends on them, e.g. a ResNet's ``stage_names``
    from ``depths``), strings through ``PretrainedConfig.update_from_string`` (typed by the default).
    """
    config_class = transformers.CONFIG_MAPPING[model_type]
    try:
        values = yaml.safe_load("{" + (text or "").replace("=", ": ") + "}") or {}
    except yaml.YAMLError:
        values = None
    if not isinstance(values, dict) or any(v is None for v in values.values()):
        raise ValueError(f"--config_overrides: expected key=value,..., got {text!r}")
    unknown = [key for key in values if not hasattr(config_class(), key)]
    if unknown:
        raise ValueError(f"--config_overrides: {config_class.__name__} has no attribute {unknown[0]!r}")
    config = config_class(**{k: v for k, v in values.items() if not isinstance(v, str)})
    strings = ",".join(f"{k}={v}" for k, v in values.items() if isinstance(v, str))
    if strings:
        config.update_from_string(strings)
    return config


def default_image_processor(model_type: str):
    """The model type's own image processor with its defaults, or ViT's if it has none."""
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    names = IMAGE_PROCESSOR_MAPPING_NAMES.get(model_type) or {}
    class_name = names.get("pil") or names.get("torchvision") if isinstance(names, dict) else next((n for n in names if n), None)
    return getattr(transformers, class_name or "ViTImageProcessor", transformers.ViTImageProcessor)()


def build_model_and_processor(model_args: ModelArguments, labels: list[str]):
    """``(model, image_processor)``: pretrained, or from ``--model_type`` + ``--config_overrides``.

    A timm architecture trained from scratch (``--model_type timm_wrapper``) gets a
    ``TimmWrapperImageProcessor`` built offline from the architecture's own ``pretrained_cfg``.
    """
    label_kwargs = {"num_labels": len(labels), "id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in enumerate(labels)}}
    common = {"revision": model_args.model_revision, "token": model_args.token}
    if model_args.model_name_or_path is not None:
        if model_args.config_overrides:
            raise ValueError("--config_overrides only applies when training from scratch (--model_type)")
        name = model_args.model_name_or_path
        config = AutoConfig.from_pretrained(name, finetuning_task="image-classification", **label_kwargs, **common)
        model = AutoModelForImageClassification.from_pretrained(
            name, config=config, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes, **common
        )
        return model, AutoImageProcessor.from_pretrained(model_args.image_processor_name or name, **common)
    model_type = model_args.model_type or EMBEDDED_MODEL_TYPE
    if model_type not in transformers.CONFIG_MAPPING:
        raise ValueError(f"--model_type {model_type!r} is not a transformers model type")
    embedded = model_args.model_type is None and model_args.config_overrides is None
    config = config_from_overrides(model_type, EMBEDDED_CONFIG_OVERRIDES if embedded else model_args.config_overrides)
    for key, value in label_kwargs.items():
        setattr(config, key, value)
    try:
        model = AutoModelForImageClassification.from_config(config)
    except ValueError as err:
        raise ValueError(f"--model_type {model_type!r} has no image-classification model: {err}") from None
    if model_args.image_processor_name:
        return model, AutoImageProcessor.from_pretrained(model_args.image_processor_name, **common)
    if model_type == "timm_wrapper":
        pretrained_cfg = model.timm_model.pretrained_cfg
        model.config.pretrained_cfg = pretrained_cfg  # saved in config.json: AutoImageProcessor reloads it
        return model, transformers.TimmWrapperImageProcessor(pretrained_cfg=pretrained_cfg, architecture=config.architecture)
    return model, default_image_processor(model_type)


@dataclass
class Preprocessing:
    """What the transforms need from the model: input side, normalisation, resampling, eval crop."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    crop_pct: float = 1.0


def model_preprocessing(model_args: ModelArguments, data_args: DataTrainingArguments, config, processor) -> Preprocessing:
    """Read :class:`Preprocessing` off the image processor (timm: its data config), then apply the flags.

    Image size: ``--image_size``, else 32 for the embedded ResNet or a model from scratch on the digits, else
    the config's ``image_size``, else the processor's crop or size.
    """
    timm = getattr(processor, "data_config", None)
    if timm is not None:
        found = Preprocessing(timm["input_size"][-1], timm["mean"], timm["std"], timm["interpolation"], timm["crop_pct"])
    else:
        sizes = [getattr(config, "image_size", None)] + [
            (s or {}).get(k) for s in (getattr(processor, "crop_size", None), processor.size) for k in ("height", "shortest_edge")
        ]
        size = next((s[0] if isinstance(s, (list, tuple)) else s for s in sizes if s), 224)
        mean, std = processor.image_mean or (0.5,) * 3, processor.image_std or (0.5,) * 3
        found = Preprocessing(int(size), mean, std, crop_pct=getattr(processor, "crop_pct", None) or 1.0)
    if model_args.model_name_or_path is None and (model_args.model_type is None or data_args.embedded):
        found.image_size = DIGITS_IMAGE_SIZE  # the embedded tiny ResNet, or a model from scratch on the 32x32 digits
    if data_args.embedded:
        found.crop_pct = 1.0
    found.image_size = model_args.image_size or found.image_size
    found.crop_pct = data_args.eval_crop_pct or found.crop_pct
    return found


def record_preprocessing(model, processor, prep: Preprocessing):
    """Make the saved processor (or timm ``pretrained_cfg``) reproduce the eval transform; returns the processor."""
    if isinstance(processor, transformers.TimmWrapperImageProcessor):
        cfg = {**processor.data_config, "input_size": (3, prep.image_size, prep.image_size), "crop_pct": prep.crop_pct}
        model.config.pretrained_cfg = {**(getattr(model.config, "pretrained_cfg", None) or {}), **cfg}
        return transformers.TimmWrapperImageProcessor(pretrained_cfg=cfg, architecture=getattr(model.config, "architecture", None))
    shortest_edge = getattr(processor.size, "shortest_edge", None) and not getattr(processor, "crop_size", None)
    processor.size = {"shortest_edge": prep.image_size} if shortest_edge else {"height": prep.image_size, "width": prep.image_size}
    if getattr(processor, "crop_size", None) is not None:
        processor.crop_size = {"height": prep.image_size, "width": prep.image_size}
    if hasattr(processor, "crop_pct"):
        processor.crop_pct = prep.crop_pct
    return processor


def auto_augment(text: Optional[str]) -> list:
    """``--auto_augment`` as torchvision v2 transforms: ``rand-m<M>[-n<N>]``, ``trivial``, ``none``.

    timm's RandAugment options that torchvision has no equivalent of (``mstd``, ``inc``, ...) are ignored with a warning.
    """
    if text is None or text.lower() == "none":
        return []
    if text.lower() in ("trivial", "trivialaugment", "ta_wide"):
        return [v2.TrivialAugmentWide()]
    parts = text.lower().split("-")
    if parts[0] != "rand":
        raise ValueError(f'--auto_augment {text!r}: expected "rand-m<M>[-n<N>]", "trivial" or "none"')
    options = dict(re.fullmatch(r"([a-z]*)(.*)", p).groups() for p in parts[1:] if p)
    if set(options) - {"m", "n"}:
        logger.warning("--auto_augment %s: ignoring %s (no torchvision equivalent)", text, sorted(set(options) - {"m", "n"}))
    return [v2.RandAugment(num_ops=int(options.get("n", 2)), magnitude=int(float(options.get("m", 9))))]


def build_transforms(prep: Preprocessing, data_args: DataTrainingArguments) -> tuple[v2.Compose, v2.Compose]:
    """``(train, eval)`` torchvision v2 pipelines from PIL image to a normalised float32 CHW tensor.

    train: random resized crop (area ``--train_crop_scale``, aspect 3/4..4/3), horizontal flip,
    ``--auto_augment``, normalise, random erasing (``--reprob``). eval: resize the shorter side to
    ``floor(image_size / crop_pct)``, center crop ``image_size``, normalise.
    """
    interpolation = v2.InterpolationMode(prep.interpolation if prep.interpolation in ("bilinear", "bicubic", "nearest") else "bicubic")
    scale = tuple(float(x) for x in (data_args.train_crop_scale or ("0.6,1.0" if data_args.embedded else "0.08,1.0")).split(","))
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"--train_crop_scale needs min,max with 0 < min <= max <= 1, got {data_args.train_crop_scale!r}")
    flip = (not data_args.embedded) if data_args.horizontal_flip is None else data_args.horizontal_flip
    to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(prep.mean), list(prep.std))]
    train = v2.Compose(
        [v2.RandomResizedCrop(prep.image_size, scale=scale, interpolation=interpolation, antialias=True)]
        + ([v2.RandomHorizontalFlip()] if flip else [])
        + auto_augment(data_args.auto_augment)
        + to_tensor
        + ([v2.RandomErasing(p=data_args.reprob)] if data_args.reprob > 0 else [])
    )
    resize = int(math.floor(prep.image_size / prep.crop_pct))
    evaluation = v2.Compose([v2.Resize(resize, interpolation=interpolation, antialias=True), v2.CenterCrop(prep.image_size)] + to_tensor)
    return train, evaluation


@contextlib.contextmanager
def seeded(seed: int):
    """Run the block with torch's, Python's and numpy's global RNGs seeded by ``seed``; restore them after."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one training sample in one epoch: a pure function of (seed, epoch, index).

    Augmentations then depend neither on data-loader workers nor on prefetching, so a resume
    mid-epoch replays the uninterrupted run's augmentations exactly (Trainer restores the global
    RNG only after it has fetched the first batch after the resume point).
    """
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + index) % 2**63


class AugmentationEpoch(TrainerCallback):
    """Tell the train transform which epoch it is (before Trainer builds the epoch's data iterator)."""

    epoch = 0

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.epoch = int(math.floor((state.epoch or 0.0) + 1e-6))


class ImagesPerSecond(TrainerCallback):
    """Add ``train_images_per_second`` (all ranks together, since the previous log) to each training log."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.since = (time.perf_counter(), state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        now, (then, step) = time.perf_counter(), self.since
        images = (state.global_step - step) * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        logs["train_images_per_second"] = round(images / max(now - then, 1e-9), 1)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1]["train_images_per_second"] = logs["train_images_per_second"]
        self.since = (now, state.global_step)


@dataclass
class Collator:
    """Stack a batch; training batches get mixup/cutmix (torchvision v2) under a seed derived from their samples'."""

    num_labels: int
    mixup: float = 0.0
    cutmix: float = 0.0

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = {
            "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "labels": torch.tensor([int(e["labels"]) for e in examples], dtype=torch.long),
        }
        mixers = [m(alpha=a, num_classes=self.num_labels) for m, a in ((v2.MixUp, self.mixup), (v2.CutMix, self.cutmix)) if a > 0]
        if not mixers or "augment_seed" not in examples[0]:
            return batch
        seeds = tuple(e["augment_seed"] for e in examples)
        with seeded(hash(seeds) % 2**63) if None not in seeds else contextlib.nullcontext():
            batch["pixel_values"], batch["labels"] = v2.RandomChoice(mixers)(batch["pixel_values"], batch["labels"])
        return batch


def soft_target_cross_entropy(label_smoothing: float):
    """Trainer ``compute_loss_func`` for class ids or mixed (soft) targets ``t``: mean of ``-sum(t' * log_softmax)``
    with ``t' = (1 - eps) t + eps / C`` (``eps = --label_smoothing_factor``), normalised by the samples of the
    whole accumulated batch when Trainer counts them (it counts ``C`` label entries per soft-target sample)."""

    def loss(outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        classes = logits.shape[-1]
        targets = labels.float() if labels.ndim == 2 else F.one_hot(labels, classes).float()
        targets = targets * (1 - label_smoothing) + label_smoothing / classes
        per_sample = -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1)
        if num_items_in_batch is None:
            return per_sample.mean()
        return per_sample.sum() / (num_items_in_batch / (classes if labels.ndim == 2 else 1))

    return loss



def top5_class_ids(logits, labels=None):
    """``preprocess_logits_for_metrics``: each sample's 5 best class ids (less to gather across ranks)."""
    logits = logits[0] if isinstance(logits, (tuple, list)) else logits
    return logits.topk(min(5, logits.shape[-1]), dim=-1).indices


def compute_metrics(prediction) -> dict[str, float]:
    """``accuracy`` (top-1) and, with at least 5 classes, ``top5_accuracy`` from :func:`top5_class_ids`."""
    ranked, truth = np.asarray(prediction.predictions), np.asarray(prediction.label_ids)[:, None]
    hits = ranked == truth
    metrics = {"accuracy": float(hits[:, 0].mean())}
    if ranked.shape[1] >= 5:
        metrics["top5_accuracy"] = float(hits.any(axis=1).mean())
    return metrics



def parse_arguments(argv: Optional[list[str]] = None):
    """The three dataclasses from flags, or from one ``.json``/``.yaml`` file (recipe defaults kept for the rest)."""
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    parser.set_defaults(**RECIPE_TRAINING_DEFAULTS)
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) == 1 and args[0].endswith((".json", ".yaml", ".yml")):
        with open(args[0]) as handle:
            values = yaml.safe_load(handle)  # JSON is YAML
        return parser.parse_dict({**RECIPE_TRAINING_DEFAULTS, **values})
    return parser.parse_args_into_dataclasses(args=args)


def check_run_settings(data_args: DataTrainingArguments, training_args: TrainingArguments) -> None:
    """Settings that would silently train wrongly: refuse them. Also resolve ``--dataloader_num_workers -1``."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and training_args.world_size != launched:
        raise RuntimeError(
            f"{launched} processes were launched but training sees {training_args.world_size}: they would train "
            "separately and overwrite each other's output. On CPU, launch with ACCELERATE_USE_CPU=1 and --multi_gpu "
            "(or recipes/configs/cpu_2ranks.yaml); accelerate's use_cpu: true / --cpu starts unconnected processes."
        )
    if training_args.dataloader_num_workers < 0:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        training_args.dataloader_num_workers = 0 if data_args.embedded else max(0, min(8, cpus // training_args.world_size - 1))
    if training_args.dataloader_persistent_workers and training_args.dataloader_num_workers > 0:
        raise ValueError(
            "--dataloader_persistent_workers: persistent workers would not see the epoch number that seeds each "
            "sample's augmentation (every epoch would repeat the first one's); leave it off"
        )
    if data_args.streaming and training_args.max_steps <= 0:
        raise ValueError("--streaming needs --max_steps (a stream has no length to count epochs with)")
    if not torch.cuda.is_available():
        training_args.dataloader_pin_memory = False


def prepare_datasets(data_args, training_args, token):
    """``(train, eval, image column, label column, class names, skipped counts)``, undecoded and untransformed."""
    with training_args.main_process_first(desc="loading the dataset"):
        train_ds, eval_ds = split_train_eval(load_raw_datasets(data_args, token), data_args, training_args.seed)
    columns = list(train_ds.column_names or (train_ds.features or {}).keys())
    image_column = pick_column(columns, data_args.image_column_name, IMAGE_COLUMN_CANDIDATES, "--image_column_name")
    label_column = pick_column(columns, data_args.label_column_name, LABEL_COLUMN_CANDIDATES, "--label_column_name")
    labels = label_names(train_ds, label_column, data_args)
    train_ds, eval_ds = first(train_ds, data_args.max_train_samples), first(eval_ds, data_args.max_eval_samples)
    skipped = {"train": 0, "eval": 0}
    if data_args.corrupt_images == "skip":
        with training_args.main_process_first(desc="checking images"):
            train_ds, skipped["train"] = drop_corrupt_images(train_ds, image_column, "train")
            eval_ds, skipped["eval"] = drop_corrupt_images(eval_ds, image_column, "eval")
    # Decode images ourselves so that a corrupt file is reported by name (decode_image).
    train_ds = train_ds.cast_column(image_column, datasets.Image(decode=False))
    eval_ds = eval_ds.cast_column(image_column, datasets.Image(decode=False))
    return train_ds, eval_ds, image_column, label_column, labels, skipped


def attach_transforms(train_ds, eval_ds, image_column, label_column, transforms, seed, epoch: AugmentationEpoch, streaming):
    """Apply the transforms on the fly; each training sample under :func:`sample_seed` (non-streamed data)."""

    def apply(transform, train: bool):
        def batch_transform(batch):
            count = len(batch[label_column])
            seeds = [sample_seed(seed, epoch.epoch, i) for i in batch["__index__"]] if "__index__" in batch else [None] * count
            pixels = []
            for value, augment_seed in zip(batch[image_column], seeds):
                with seeded(augment_seed) if augment_seed is not None else contextlib.nullcontext():
                    pixels.append(transform(decode_image(value)))
            return {"pixel_values": pixels, "labels": batch[label_column], **({"augment_seed": seeds} if train else {})}

        return batch_transform

    if streaming:
        removed = list(train_ds.column_names or (train_ds.features or {}).keys())
        train_ds = train_ds.shuffle(seed=seed, buffer_size=10_000).map(apply(transforms[0], True), batched=True, remove_columns=removed)
        return train_ds, eval_ds.map(apply(transforms[1], False), batched=True, remove_columns=removed)
    train_ds = train_ds.add_column("__index__", list(range(len(train_ds))))
    train_ds.set_transform(apply(transforms[0], True))
    eval_ds.set_transform(apply(transforms[1], False))
    return train_ds, eval_ds


def main(argv: Optional[list[str]] = None) -> dict[str, float]:
    model_args, data_args, training_args = parse_arguments(argv)
    level = logging.INFO if training_args.should_log else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level)
    transformers.utils.logging.set_verbosity(level)
    datasets.utils.logging.set_verbosity(logging.WARNING)
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False  # pushed below, with an RLion model card
    check_run_settings(data_args, training_args)
    model_args.token = model_args.token or training_args.hub_token
    transformers.set_seed(training_args.seed)
    checkpoint = resolve_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)

    train_ds, eval_ds, image_column, label_column, labels, skipped = prepare_datasets(data_args, training_args, model_args.token)
    model, processor = build_model_and_processor(model_args, labels)
    prep = model_preprocessing(model_args, data_args, model.config, processor)
    processor = record_preprocessing(model, processor, prep)
    epoch = AugmentationEpoch()
    train_ds, eval_ds = attach_transforms(
        train_ds, eval_ds, image_column, label_column, build_transforms(prep, data_args), training_args.seed, epoch, data_args.streaming
    )
    mixing = data_args.mixup > 0 or data_args.cutmix > 0
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=Collator(len(labels), data_args.mixup, data_args.cutmix),
        compute_metrics=compute_metrics,
        compute_loss_func=soft_target_cross_entropy(training_args.label_smoothing_factor) if mixing else None,
        preprocess_logits_for_metrics=top5_class_ids,
        processing_class=processor,
        callbacks=[MarkCompleteCheckpoints(), epoch, ImagesPerSecond()],
    )
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not getattr(trainer, "is_fsdp_enabled", False):
        logger.warning("FSDP config given, but accelerate applies FSDP only on accelerators: training runs as %s", parallelism(trainer))
    train_metrics = dict(trainer.train(resume_from_checkpoint=checkpoint).metrics)
    trainer.save_model()
    trainer.save_state()
    eval_metrics = trainer.evaluate()
    for split, metrics, dataset in (("train", train_metrics, train_ds), ("eval", eval_metrics, eval_ds)):
        if not data_args.streaming:
            metrics[f"{split}_samples"] = len(dataset)
        if data_args.corrupt_images == "skip":
            metrics[f"{split}_skipped_images"] = skipped[split]
        trainer.log_metrics(split, metrics)
        trainer.save_metrics(split, metrics)
    if trainer.is_world_process_zero():
        report(trainer, data_args, eval_metrics, labels, push_to_hub, model_args, argv)
    training_args.push_to_hub = push_to_hub
    return eval_metrics


def report(trainer, data_args, eval_metrics, labels, push_to_hub, model_args, argv) -> None:
    """Print the accuracy, draw ``training_curves.png``, push to the Hub if asked (main process)."""
    args = trainer.args
    summary = f"eval_accuracy = {eval_metrics['eval_accuracy']:.4f}"
    if "eval_top5_accuracy" in eval_metrics:
        summary += f", eval_top5_accuracy = {eval_metrics['eval_top5_accuracy']:.4f}"
    where = f"{args.world_size} process(es), {parallelism(trainer)}, output in {args.output_dir}"
    print(f"[image_classification] {summary} ({len(labels)} classes, {where})")
    title = f"{dataset_label(data_args)}, --optim {getattr(args.optim, 'value', args.optim)}"
    history = trainer.state.log_history
    plot_training_curves(
        os.path.join(args.output_dir, "training_curves.png"), title,
        [(e["step"], e["loss"]) for e in history if "loss" in e and "step" in e],
        [(e["epoch"], e["eval_accuracy"]) for e in history if "eval_accuracy" in e], "eval accuracy",
    )  # fmt: skip
    if push_to_hub:
        push_model(trainer, model_args, data_args, eval_metrics, argv)


def parallelism(trainer: Trainer) -> str:
    """How the model is spread over processes: ``FSDP``, ``DDP`` or ``single process``."""
    if getattr(trainer, "is_fsdp_enabled", False):
        return "FSDP"
    return "DDP" if trainer.args.world_size > 1 else "single process"


def dataset_label(data_args: DataTrainingArguments) -> str:
    """The dataset's name for the model card."""
    return EMBEDDED_DATASET if data_args.embedded else data_args.dataset_name or "imagefolder"


def push_model(trainer: Trainer, model_args, data_args, eval_metrics, argv) -> str:
    """Upload ``--output_dir`` (no checkpoints) with an RLion model card (``hf_rlion.hub``, which also redacts
    tokens from the command); returns the repo URL. The card's optimizer hyperparameters are those the
    optimizer was built with, class defaults included."""
    from hf_rlion import hub

    args = trainer.args
    repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
    optim_name = getattr(args.optim, "value", args.optim)
    metrics = {k: float(v) for k, v in eval_metrics.items() if k.endswith("accuracy")}
    command = "accelerate launch recipes/image_classification.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    processor = trainer.processing_class
    curves = "training_curves.png" if os.path.isfile(os.path.join(args.output_dir, "training_curves.png")) else None
    card = hub.build_model_card(
        model_name=repo_id.split("/")[-1], task="image-classification", dataset_name=dataset_label(data_args),
        dataset_config=data_args.dataset_config_name, metrics=metrics, optimizer=optim_name,
        optimizer_hyperparameters=hub.optimizer_hyperparameters(trainer.optimizer),
        training_hyperparameters=hub.training_hyperparameters(args), reproduce_command=command,
        base_model=model_args.model_name_or_path, repo_id=repo_id, tags=["image-classification"],
        license=model_args.license or hub.base_model_license(model_args.model_name_or_path, token=model_args.token),
        num_parameters=trainer.model.num_parameters(), log_history=trainer.state.log_history, training_curves=curves,
        preprocessing=hub.image_preprocessing(getattr(processor, "data_config", None) or processor),
    )  # fmt: skip
    accuracy = metrics.get("eval_accuracy", float("nan"))
    url = hub.push_folder_to_hub(
        args.output_dir, repo_id, card=card, token=model_args.token, private=args.hub_private_repo,
        commit_message=f"Image classification with {optim_name}: eval accuracy {accuracy:.4f}",
    )  # fmt: skip
    print(f"[image_classification] pushed to {url}")
    return url


if __name__ == "__main__":
    main()
    # In a multi-process run: barrier, then os._exit, so that no rank aborts at interpreter exit
    # after everything is saved (a PyTorch race, see hf_rlion.distributed_exit).
    exit_distributed_run()
