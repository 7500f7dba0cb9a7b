r"""The optimizer study: RLion vs AdamW vs Lion on small offline image tasks.

One reproducible command trains every (task, optimizer, learning rate, seed, warm-up) cell
of a grid and appends one JSON line per finished run to ``<out>/results.jsonl`` (one file per
``--shard``), so a long grid that is stopped half-way still leaves usable results (``--resume``
skips the runs already recorded). ``--report`` turns a study folder into the tables and plots
of ``docs/results.md``.

Tasks (all data is generated or ships inside a package; nothing is downloaded):

``digits``
    scikit-learn's 8×8 handwritten digits (1797 real images, 10 classes) as 1-channel
    images, a small CNN, cross-entropy; metric: test accuracy (stratified 80/20 split).
``boxes``
    single-box regression in the layout of the Caltech101 ``airplanes`` task (one object per
    image, normalised (x1, y1, x2, y2) target, MSE loss, 80/20 split of 800 images): generated
    32×32 images with one textured ellipse on a textured background, a tiny ViT
    (``transformers.ViTModel``: patch 4, width 32, 2 layers, 2 heads) whose flattened tokens
    feed an MLP head; metric: mean IoU over the whole test split.
``textures``
    16×16 patches of three real texture photographs that ship with scikit-image
    (``brick``, ``grass``, ``gravel``), each patch standardised (so brightness does not give
    the class away); train patches from the top 3/4 of each photograph, test patches from the
    bottom 1/4; a small CNN; metric: test accuracy.
``recipe_digits``
    the embedded default of ``recipes/image_classification.py`` (its digits dataset at 32×32
    and its tiny transformers ResNet, from ``hf_rlion.digits`` as the recipe builds them), trained by this
    script's loop without the recipe's augmentation; metric: validation accuracy.
``recipe_caltech``
    the data path of ``recipes/vit_detection_caltech101.py`` on a generated Caltech-layout set
    (300 ``airplanes`` JPEGs with real ``.mat`` annotations, written by the tests' fixture
    writer and read by the recipe's loader; its sorted 80/20 split) and its model
    (``hf_rlion.models.ViTBoxRegressionModel`` from the recipe's ``build_model``), shrunk to
    64 px, patch 16, width 32, 2 layers so a run takes seconds; MSE loss, trained by this
    script's loop; metric: mean IoU over the whole test split.
``fasternet_digits``, ``effnetv2_digits``, ``fasternet_textures``, ``effnetv2_textures``
    the paper's architecture families, built from scratch by timm (no download): FasterNet-T0
    (``fasternet_t0`` as published, 2.6M parameters) and EfficientNetV2-B0
    (``tf_efficientnetv2_b0``, the family's smallest variant) at half width and half depth
    (0.8M parameters: at full size a step costs four times FasterNet-T0's on one CPU thread),
    on the ``recipe_digits`` data (32×32 RGB digits, the recipe's 80/20 split) and on the
    ``textures`` data cut into 32×32 patches (1-channel); 3 epochs; metric: test accuracy.
    Run by ``--paper-archs``.

Every run: ``torch.set_num_threads(1)``, batch 32 (``recipe_digits``: 64, the recipe's), weight decay 0.01 on weights only
(:func:`hf_rlion.create_optimizer`'s Trainer-style grouping), transformers' linear
schedule to 0, without warm-up (the paper's setting) or with 10 % linear warm-up.
The optimizers come from the package registry: ``adamw`` (``torch.optim.AdamW``), ``lion``
(``lion_pytorch.Lion``) and ``rlion`` (:class:`hf_rlion.RLion`, with its own defaults
for whatever a grid cell does not set).

Usage::

    python benchmarks/compare_optimizers.py                 # small default grid, minutes
    python benchmarks/compare_optimizers.py --full          # the whole study (900 runs), ~2 h on 1 core
    python benchmarks/compare_optimizers.py --paper-archs --out study_paper_archs  # FasterNet/EfficientNetV2, 36 runs
    python benchmarks/compare_optimizers.py --full --shard 0/2 --out study &   # two parallel jobs
    python benchmarks/compare_optimizers.py --full --shard 1/2 --out study &
    python benchmarks/compare_optimizers.py --report --out study --figures docs/figures  # tables + plots
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

import hf_rlion

# ----------------------------------------------------------------------------- tasks

WEIGHT_DECAY = 0.01
WARMUP_FRACTION = 0.1


@dataclasses.dataclass
class TaskData:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@dataclasses.dataclass(frozen=True)
class Task:
    """One training problem: data, model, loss and the metric reported (higher is better)."""

    name: str
    metric_name: str
    epochs: int
    make_data: Callable[[], TaskData]
    make_model: Callable[[], nn.Module]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    metric_fn: Callable[[torch.Tensor, torch.Tensor], float]
    batch_size: int = 32


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == labels).float().mean())


def box_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of boxes given as (x1, y1, x2, y2); a predicted box with x2 < x1 has area 0."""
    ix1 = torch.maximum(pred[:, 0], target[:, 0])
    iy1 = torch.maximum(pred[:, 1], target[:, 1])
    ix2 = torch.minimum(pred[:, 2], target[:, 2])
    iy2 = torch.minimum(pred[:, 3], target[:, 3])
    inter = (ix2 - ix1).clamp_min(0) * (iy2 - iy1).clamp_min(0)
    area_p = (pred[:, 2] - pred[:, 0]).clamp_min(0) * (pred[:, 3] - pred[:, 1]).clamp_min(0)
    area_t = (target[:, 2] - target[:, 0]).clamp_min(0) * (target[:, 3] - target[:, 1]).clamp_min(0)
    return inter / (area_p + area_t - inter).clamp_min(1e-12)


def _mean_iou(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float(box_iou(pred, target).mean())


def _small_cnn(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    flat = 32 * (image_size // 4) ** 2
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )


def _digits_data() -> TaskData:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0  # pixel values 0..16
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, digits.target, test_size=0.2, random_state=0, stratify=digits.target
    )
    as_x = lambda a: torch.from_numpy((a - 0.5) / 0.5).unsqueeze(1)  # noqa: E731
    return TaskData(as_x(x_tr), torch.from_numpy(y_tr), as_x(x_te), torch.from_numpy(y_te))


class BoxViT(nn.Module):
    """A tiny ViT whose flattened output tokens feed an MLP regressing (x1, y1, x2, y2)."""

    def __init__(self, image_size: int = 32, patch_size: int = 4, width: int = 32, layers: int = 2, heads: int = 2):
        super().__init__()
        from transformers import ViTConfig, ViTModel

        config = ViTConfig(
            image_size=image_size,
            patch_size=patch_size,
            num_channels=1,
            hidden_size=width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=2 * width,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        self.vit = ViTModel(config, add_pooling_layer=False)
        tokens = (image_size // patch_size) ** 2 + 1
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(tokens * width, 64), nn.GELU(), nn.Linear(64, 4))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.vit(pixel_values=pixel_values).last_hidden_state)


def make_box_images(n: int, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (n, 1, size, size) with one textured ellipse each, and its box in [0, 1].

    Background: a smooth random field plus pixel noise. Object: an ellipse filling its box,
    brighter or darker than the background, with a random stripe texture. Box sides are
    25-75 % of the image, anywhere inside it.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    images = np.empty((n, 1, size, size), np.float32)
    boxes = np.empty((n, 4), np.float32)
    for i in range(n):
        w, h = rng.uniform(0.25, 0.75, 2) * size
        x1, y1 = rng.uniform(0, size - w), rng.uniform(0, size - h)
        coarse = rng.normal(0, 0.3, (5, 5)).astype(np.float32)
        background = np.kron(coarse, np.ones((size // 4 + 1, size // 4 + 1), np.float32))[:size, :size]
        image = background + rng.normal(0, 0.15, (size, size)).astype(np.float32)
        inside = ((xx - x1 - w / 2) / (w / 2)) ** 2 + ((yy - y1 - h / 2) / (h / 2)) ** 2 <= 1.0
        angle, freq = rng.uniform(0, np.pi), rng.uniform(0.3, 1.2)
        stripes = 0.3 * np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy))
        contrast = rng.choice([-1.0, 1.0]) * rng.uniform(0.8, 1.5)
        image[inside] += contrast + stripes[inside]
        images[i, 0] = image
        boxes[i] = (x1 / size, y1 / size, (x1 + w) / size, (y1 + h) / size)
    return torch.from_numpy(images), torch.from_numpy(boxes)


def _boxes_data() -> TaskData:
    images, boxes = make_box_images(800, seed=0)
    cut = 640  # first 80 % train, last 20 % test, as in the Caltech101 airplanes recipe
    return TaskData(images[:cut], boxes[:cut], images[cut:], boxes[cut:])


TEXTURE_IMAGES = ("brick", "grass", "gravel")


def _texture_patches(image: np.ndarray, n: int, patch: int, rng: np.random.Generator) -> np.ndarray:
    ys = rng.integers(0, image.shape[0] - patch + 1, n)
    xs = rng.integers(0, image.shape[1] - patch + 1, n)
    out = np.stack([image[y : y + patch, x : x + patch] for y, x in zip(ys, xs)]).astype(np.float32)
    out -= out.mean(axis=(1, 2), keepdims=True)
    out /= out.std(axis=(1, 2), keepdims=True) + 1e-6
    return out


def _textures_data(patch: int = 16, train_per_class: int = 500, test_per_class: int = 200) -> TaskData:
    from skimage import data as skdata

    rng = np.random.default_rng(0)
    parts = {"train": ([], []), "test": ([], [])}
    for label, name in enumerate(TEXTURE_IMAGES):
        image = getattr(skdata, name)().astype(np.float32) / 255.0
        cut = image.shape[0] * 3 // 4
        for split, region, n in (("train", image[:cut], train_per_class), ("test", image[cut:], test_per_class)):
            parts[split][0].append(_texture_patches(region, n, patch, rng))
            parts[split][1].append(np.full(n, label))
    x = {k: torch.from_numpy(np.concatenate(v[0])).unsqueeze(1) for k, v in parts.items()}
    y = {k: torch.from_numpy(np.concatenate(v[1])).long() for k, v in parts.items()}
    return TaskData(x["train"], y["train"], x["test"], y["test"])


def _load_recipe(path: Path, name: str):
    """A recipe script as a module (the recipes folder is not a package), loaded once."""
    import importlib.util

    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


def _recipe_digits_data() -> TaskData:
    """The classification recipe's embedded dataset (``hf_rlion.digits``: digits at 32x32 RGB, its 80/20
    split), normalised as the recipe does for its ResNet ((x - 0.5) / 0.5, the image processor's defaults);
    no augmentation."""
    from hf_rlion.digits import digits_dataset

    raw = digits_dataset()

    def tensors(split):
        x = torch.stack([torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32)).permute(2, 0, 1) for img in split["image"]])
        return (x / 255.0 - 0.5) / 0.5, torch.tensor(split["label"])

    return TaskData(*tensors(raw["train"]), *tensors(raw["validation"]))


class _OutputField(nn.Module):
    """A transformers model as a plain tensor-to-tensor module: one field of its output."""

    def __init__(self, model: nn.Module, field: str):
        super().__init__()
        self.model = model
        self.field = field

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(pixel_values=pixel_values), self.field)


def _recipe_digits_model() -> nn.Module:
    """The classification recipe's embedded default model (``hf_rlion.digits.digits_resnet``)."""
    from hf_rlion.digits import digits_resnet

    return _OutputField(digits_resnet(num_labels=10), "logits")


DETECTION_RECIPE_PATH = Path(__file__).resolve().parents[1] / "recipes" / "vit_detection_caltech101.py"
#: the detection task's model: the recipe's ViT box regressor, shrunk so a run takes seconds on CPU
#: (the paper's 224 px / patch 32 / width 64 / 4 layers model takes minutes per run here)
CALTECH_MODEL_ARGS = (
    "--image_size 64 --patch_size 16 --hidden_size 32 --num_hidden_layers 2 --num_attention_heads 2 "
    "--intermediate_size 64 --head_hidden_sizes 64 --head_dropout 0 --hidden_dropout_prob 0"
).split()


def _load_detection_recipe():
    return _load_recipe(DETECTION_RECIPE_PATH, "vit_detection_caltech101_recipe")


def _recipe_caltech_data() -> TaskData:
    """The detection recipe's data path on a generated Caltech-layout set: 300 ``airplanes`` JPEGs
    with real ``.mat`` annotations (the tests' fixture writer), read by the recipe's loader, split
    by its rule (sorted, first 80 % train), resized and normalised by its ``to_pixel_values``."""
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from _caltech_fixture import write_caltech_fixture

    from hf_rlion.caltech101 import load_caltech101, split_train_test

    recipe = _load_detection_recipe()
    image_size = int(CALTECH_MODEL_ARGS[CALTECH_MODEL_ARGS.index("--image_size") + 1])
    with tempfile.TemporaryDirectory() as tmp:
        write_caltech_fixture(Path(tmp) / "caltech101", {"airplanes": 300}, seed=0)
        dataset, _, _, _ = load_caltech101(
            Path(tmp) / "caltech101", ["airplanes"], cache_dir=Path(tmp) / "cache", show_progress=False
        )
        train, test = split_train_test(dataset)

        def tensors(indices):
            rows = dataset.select(indices)
            x = torch.stack([recipe.to_pixel_values(image, image_size) for image in rows["image"]])
            return x, torch.tensor(rows["box"], dtype=torch.float32)

        return TaskData(*tensors(train), *tensors(test))


def _recipe_caltech_model() -> nn.Module:
    """The detection recipe's model (``hf_rlion.models.ViTBoxRegressionModel``), built by its ``build_model``."""
    recipe = _load_detection_recipe()
    _, model_args, _ = recipe.parse_args(["--data_dir", ".", "--output_dir", ".", *CALTECH_MODEL_ARGS])
    return _OutputField(recipe.build_model(model_args, ["airplanes"]), "pred_boxes")


#: EfficientNetV2-B0's width and depth multipliers in the ``effnetv2_digits`` task
EFFNETV2_MULTIPLIERS = dict(channel_multiplier=0.5, depth_multiplier=0.5)


def timm_model(name: str, num_classes: int, in_chans: int = 3, **kwargs) -> nn.Module:
    """A timm image classifier built from scratch (random init, nothing downloaded)."""
    import timm

    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            "digits", "accuracy", 10, _digits_data, lambda: _small_cnn(1, 8, 10), nn.functional.cross_entropy,
            _accuracy,
        ),
        Task("boxes", "mean IoU", 15, _boxes_data, BoxViT, nn.functional.mse_loss, _mean_iou),
        Task(
            "textures", "accuracy", 6, _textures_data, lambda: _small_cnn(1, 16, 3),
            nn.functional.cross_entropy, _accuracy,
        ),
        Task(
            "recipe_digits", "accuracy", 5, _recipe_digits_data, _recipe_digits_model,
            nn.functional.cross_entropy, _accuracy, batch_size=64,
        ),
        Task(
            "recipe_caltech", "mean IoU", 15, _recipe_caltech_data, _recipe_caltech_model,
            nn.functional.mse_loss, _mean_iou,
        ),
        Task(
            "fasternet_digits", "accuracy", 3, _recipe_digits_data, lambda: timm_model("fasternet_t0", 10),
            nn.functional.cross_entropy, _accuracy,
        ),
        Task(
            "effnetv2_digits", "accuracy", 3, _recipe_digits_data,
            lambda: timm_model("tf_efficientnetv2_b0", 10, **EFFNETV2_MULTIPLIERS),
            nn.functional.cross_entropy, _accuracy,
        ),
        Task(
            "fasternet_textures", "accuracy", 3, lambda: _textures_data(patch=32),
            lambda: timm_model("fasternet_t0", 3, in_chans=1), nn.functional.cross_entropy, _accuracy,
        ),
        Task(
            "effnetv2_textures", "accuracy", 3, lambda: _textures_data(patch=32),
            lambda: timm_model("tf_efficientnetv2_b0", 3, in_chans=1, **EFFNETV2_MULTIPLIERS),
            nn.functional.cross_entropy, _accuracy,
        ),
    )
}

# ----------------------------------------------------------------------------- optimizers


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """A registry name plus options; ``label`` names it in tables and plots."""

    label: str
    name: str
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.options)


def rlion_config(alpha: float, alpha_scaling: str, bias_correction: bool = False) -> OptimizerConfig:
    label = f"rlion {alpha_scaling} a={alpha:g}" + (" bc" if bias_correction else "")
    options = (("alpha", float(alpha)), ("alpha_scaling", alpha_scaling), ("bias_correction", bias_correction))
    return OptimizerConfig(label, "rlion", options)


ADAMW = OptimizerConfig("adamw", "adamw")
LION = OptimizerConfig("lion", "lion")  # lion_pytorch.Lion, the reference sign-based Lion

FULL_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
FULL_ALPHAS = {"fixed": (1.0, 10.0, 100.0, 1000.0), "rms": (0.3, 1.0, 3.0, 10.0, 30.0)}


def full_grid(seeds=(0, 1, 2)) -> list[dict]:
    """The whole study, in priority order, so that a partial run is already useful.

    * main: every optimizer × lr × task (digits, boxes, textures), no warm-up, bias correction
      off (the paper's setting);
    * recipe: the classification recipe's embedded default (~10 s a run on one core) with
      AdamW, Lion and three RLion settings at lr 1e-4, 1e-3, 1e-2;
    * warm-up: AdamW, Lion and three RLion settings with 10 % linear warm-up;
    * bias correction: the fixed-α rule with ``bias_correction=True`` (for ``"rms"`` it cannot
      change anything: the RMS rescales it away).

    Blocks run seed 0 and 1 of the main grid first, then one seed of everything else, then the
    remaining seeds (870 runs, about 1 h with two single-thread jobs on a shared 2-core machine).
    """
    main_opts = [ADAMW, LION] + [rlion_config(a, s) for s in ("rms", "fixed") for a in FULL_ALPHAS[s]]
    side_opts = [ADAMW, LION, rlion_config(1.0, "rms"), rlion_config(3.0, "rms"), rlion_config(1000.0, "fixed")]
    bias_corrected = [rlion_config(a, "fixed", bias_correction=True) for a in (10.0, 100.0, 1000.0)]
    main_tasks = ("digits", "boxes", "textures", "recipe_caltech")

    def block(opts, lrs, tasks, seed, warmup=False):
        return [
            dict(task=t, optimizer=o, lr=lr, seed=seed, warmup=warmup)
            for o, lr, t in itertools.product(opts, lrs, tasks)
        ]

    first, rest = seeds[:2], seeds[2:]
    runs = [r for seed in first for r in block(main_opts, FULL_LRS, main_tasks, seed)]
    runs += block(side_opts, (1e-4, 1e-3, 1e-2), ("recipe_digits",), seeds[0])
    runs += block(side_opts, FULL_LRS, main_tasks, seeds[0], warmup=True)
    runs += block(bias_corrected, FULL_LRS, main_tasks, seeds[0])
    for seed in rest:
        runs += block(main_opts, FULL_LRS, main_tasks, seed)
    for seed in seeds[1:]:
        runs += block(side_opts, FULL_LRS, main_tasks, seed, warmup=True)
        runs += block(bias_corrected, FULL_LRS, main_tasks, seed)
    for seed in seeds[1:]:
        runs += block(side_opts, (1e-4, 1e-3, 1e-2), ("recipe_digits",), seed)
    return runs


def default_rlion_config() -> OptimizerConfig:
    """RLion with the package's current defaults, read from the ``RLion`` signature."""
    import inspect

    params = inspect.signature(hf_rlion.RLion).parameters
    return rlion_config(params["alpha"].default, params["alpha_scaling"].default, params["bias_correction"].default)


def small_grid() -> list[dict]:
    """A few minutes on one core: the decisive comparison at three learning rates, one seed:
    AdamW, Lion, RLion with its defaults and the paper's fixed-α rule with α = 1000."""
    optimizers = [ADAMW, LION, default_rlion_config(), rlion_config(1000.0, "fixed")]
    return [
        dict(task=task, optimizer=opt, lr=lr, seed=0, warmup=False)
        for opt, lr, task in itertools.product(
            optimizers, (1e-4, 1e-3, 1e-2), ("digits", "boxes", "textures", "recipe_caltech")
        )
    ]


PAPER_ARCH_TASKS = ("fasternet_digits", "effnetv2_digits", "fasternet_textures", "effnetv2_textures")


def paper_archs_grid(seeds=(0, 1, 2)) -> list[dict]:
    """The paper's setting on its architecture families: AdamW, Lion and RLion with its defaults,
    all at lr 1e-3 without warm-up, on FasterNet-T0 and a small EfficientNetV2 (digits and textures);
    seed-major order (36 runs, about 25 min on one thread of a loaded 2-core machine)."""
    optimizers = [ADAMW, LION, default_rlion_config()]
    return [
        dict(task=task, optimizer=opt, lr=1e-3, seed=seed, warmup=False)
        for seed, task, opt in itertools.product(seeds, PAPER_ARCH_TASKS, optimizers)
    ]


# ----------------------------------------------------------------------------- training

_DATA_CACHE: dict[str, TaskData] = {}
_BASELINE_CACHE: dict[str, float] = {}


def task_data(task: Task) -> TaskData:
    if task.name not in _DATA_CACHE:
        _DATA_CACHE[task.name] = task.make_data()
    return _DATA_CACHE[task.name]


def learned_nothing_metric(task: Task) -> float:
    """The test metric of a model that ignores its input: it always predicts the most frequent
    training class (classification) or the mean training box (boxes). A diverged run scores this."""
    if task.name not in _BASELINE_CACHE:
        data = task_data(task)
        if data.y_train.dtype.is_floating_point:
            constant = data.y_train.mean(dim=0, keepdim=True).expand_as(data.y_test)
        else:
            logits = torch.zeros(len(data.y_test), int(data.y_train.max()) + 1)
            logits[:, torch.bincount(data.y_train).argmax()] = 1.0
            constant = logits
        _BASELINE_CACHE[task.name] = task.metric_fn(constant, data.y_test)
    return _BASELINE_CACHE[task.name]


def train_one(task: Task, optimizer: OptimizerConfig, lr: float, seed: int, warmup: bool, epochs: int | None = None) -> dict:
    """Train one cell of the grid from scratch; return its record (metric, loss curve, time)."""
    from transformers import get_linear_schedule_with_warmup

    data = task_data(task)
    epochs = task.epochs if epochs is None else epochs
    torch.manual_seed(seed)
    model = task.make_model()
    opt = hf_rlion.create_optimizer(model, optimizer.name, lr=lr, weight_decay=WEIGHT_DECAY, **optimizer.kwargs)
    n = len(data.x_train)
    batch = task.batch_size
    steps_per_epoch = math.ceil(n / batch)
    total = steps_per_epoch * epochs
    schedule = get_linear_schedule_with_warmup(opt, int(WARMUP_FRACTION * total) if warmup else 0, total)
    order = torch.Generator().manual_seed(seed)
    curve, diverged, start = [], False, time.perf_counter()
    for _ in range(epochs):
        model.train()
        permutation = torch.randperm(n, generator=order)
        total_loss = 0.0
        for b in range(steps_per_epoch):
            idx = permutation[b * batch : (b + 1) * batch]
            loss = task.loss_fn(model(data.x_train[idx]), data.y_train[idx])
            if not torch.isfinite(loss):
                diverged = True
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            total_loss += loss.item() * len(idx)
        if diverged:
            break
        curve.append(total_loss / n)
    model.eval()
    with torch.no_grad():
        out = model(data.x_test)
        test_loss = float(task.loss_fn(out, data.y_test))
        metric = task.metric_fn(out, data.y_test) if not diverged and math.isfinite(test_loss) else learned_nothing_metric(task)
    return dict(
        task=task.name,
        metric_name=task.metric_name,
        metric=metric,
        test_loss=test_loss if math.isfinite(test_loss) else None,
        train_loss_curve=curve,
        diverged=diverged,
        optimizer=optimizer.label,
        registry_name=optimizer.name,
        options=optimizer.kwargs,
        lr=lr,
        seed=seed,
        warmup=warmup,
        epochs=epochs,
        seconds=round(time.perf_counter() - start, 3),
    )


def run_key(run: dict) -> tuple:
    opt = run["optimizer"]
    label = opt.label if isinstance(opt, OptimizerConfig) else opt
    return (run["task"], label, float(run["lr"]), int(run["seed"]), bool(run["warmup"]))


def results_files(out_dir: Path) -> list[Path]:
    """Every results file of a study folder: ``results.jsonl`` and the shards' ``results.shard*.jsonl``."""
    return sorted(Path(out_dir).glob("results*.jsonl"))


def run_grid(runs: list[dict], out_dir: Path, resume: bool, epochs: int | None = None, shard: tuple[int, int] = (0, 1)) -> list[dict]:
    """Train ``runs`` (this shard of them), appending each record to a results file in ``out_dir``
    as it finishes. With ``resume``, runs recorded in any results file of ``out_dir`` are skipped;
    without it, the folder's results files are removed first."""
    from tqdm.auto import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    index, count = shard
    out_file = out_dir / ("results.jsonl" if count == 1 else f"results.shard{index}of{count}.jsonl")
    done = set()
    for path in results_files(out_dir):
        if resume:
            done |= {run_key(r) for r in read_results(path)}
        else:
            path.unlink()
    todo = [r for i, r in enumerate(runs) if i % count == index and run_key(r) not in done]
    records = []
    with open(out_file, "a") as f:
        for run in tqdm(todo, desc="optimizer study", unit="run", file=sys.stderr):
            record = train_one(TASKS[run["task"]], run["optimizer"], run["lr"], run["seed"], run["warmup"], epochs)
            f.write(json.dumps(record) + "\n")
            f.flush()
            records.append(record)
    return records


def read_results(path: Path) -> list[dict]:
    """Records of a results file; a half-written last line (a run killed mid-write) is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


# ----------------------------------------------------------------------------- report


def summarize(records: list[dict], warmup: bool = False) -> dict[tuple[str, str, float], dict]:
    """(task, optimizer, lr) -> mean / sample std / min / max of the metric over seeds, for one warm-up setting."""
    cells: dict[tuple, list[float]] = {}
    for r in records:
        if r["warmup"] == warmup:
            metric = learned_nothing_metric(TASKS[r["task"]]) if r["diverged"] else r["metric"]
            cells.setdefault((r["task"], r["optimizer"], r["lr"]), []).append(metric)
    return {
        k: dict(mean=float(np.mean(v)), std=float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                min=float(np.min(v)), max=float(np.max(v)), n=len(v))
        for k, v in cells.items()
    }


def _sorted_optimizers(labels) -> list[str]:
    def key(label: str):
        if label == "adamw":
            return (0, "", 0.0)
        if label == "lion":
            return (1, "", 0.0)
        parts = label.split()
        return (2 if parts[1] == "rms" else 3, " ".join(parts[3:]), float(parts[2][2:]))

    return sorted(set(labels), key=key)


def markdown_table(summary: dict, task: str, lrs: list[float]) -> str:
    """Rows: optimizers; columns: learning rates; cells: mean metric over seeds (min-max)."""
    labels = _sorted_optimizers(k[1] for k in summary if k[0] == task)
    lines = ["| optimizer | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---" * (len(lrs) + 1) + "|"]
    for label in labels:
        cells = []
        for lr in lrs:
            s = summary.get((task, label, lr))
            cells.append("" if s is None else f"{s['mean']:.3f}" + (f" ({s['min']:.2f}-{s['max']:.2f})" if s["n"] > 1 else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_table(summary: dict, tasks: list[str], lr: float, with_std: bool = False) -> str:
    """Rows: optimizers; columns: tasks at one lr; each cell: mean metric (± sample std over seeds
    with ``with_std``) and the difference of the means to AdamW's."""
    labels = _sorted_optimizers(k[1] for k in summary if k[0] in tasks and k[2] == lr)
    lines = ["| optimizer | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for label in labels:
        cells = []
        for task in tasks:
            s, ref = summary.get((task, label, lr)), summary.get((task, "adamw", lr))
            if s is None:
                cells.append("")
                continue
            cell = f"{s['mean']:.3f}" + (f" ± {s['std']:.3f}" if with_std else "")
            if ref is not None and label != "adamw":
                cell += f" ({s['mean'] - ref['mean']:+.3f})"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best_lr_table(summary: dict, tasks: list[str]) -> str:
    """Rows: optimizers; each cell: the best mean metric over the lr grid and the lr that gave it."""
    labels = _sorted_optimizers(k[1] for k in summary if k[0] in tasks)
    lines = ["| optimizer | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for label in labels:
        cells = []
        for task in tasks:
            options = [(s["mean"], lr) for (t, l, lr), s in summary.items() if t == task and l == label]
            cells.append(f"{max(options)[0]:.3f} @ {max(options)[1]:g}" if options else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def variant_table(records: list[dict], tasks: list[str], pairs: list[tuple[str, bool, str, bool]], lr: float) -> str:
    """Each row compares two settings (label, warm-up) on every task at ``lr``: ``A -> B``, means over
    the seeds both settings have (so a seed that only one of them ran does not bias the comparison)."""
    lines = ["| setting: A -> B | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]

    def metrics(task, label, warmup):
        return {r["seed"]: r["metric"] for r in records
                if r["task"] == task and r["optimizer"] == label and r["warmup"] == warmup and r["lr"] == lr}

    for label_a, warm_a, label_b, warm_b in pairs:
        cells = []
        for task in tasks:
            a, b = metrics(task, label_a, warm_a), metrics(task, label_b, warm_b)
            seeds = sorted(set(a) & set(b))
            if seeds:
                mean_a, mean_b = np.mean([a[s] for s in seeds]), np.mean([b[s] for s in seeds])
                cells.append(f"{mean_a:.3f} -> {mean_b:.3f} ({mean_b - mean_a:+.3f}, n={len(seeds)})")
            else:
                cells.append("")
        name_a = label_a + (" +warm-up" if warm_a else "")
        name_b = label_b + (" +warm-up" if warm_b else "")
        lines.append(f"| {name_a} -> {name_b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_mean_std(records: list[dict], tasks: list[str], lr: float, path: Path, title: str) -> None:
    """One bar per optimizer and task: the mean metric over seeds at ``lr``, ± sample std as an
    error bar, every seed as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(records, False)
    labels = _sorted_optimizers(k[1] for k in summary if k[0] in tasks and k[2] == lr)
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(2.0 + 2.4 * len(tasks), 3.8))
    for i, label in enumerate(labels):
        color = _style(label)["color"]
        for j, task in enumerate(tasks):
            s = summary.get((task, label, lr))
            if s is None:
                continue
            x = j + (i - (len(labels) - 1) / 2) * width
            ax.bar(x, s["mean"], width * 0.9, yerr=s["std"], color=color, alpha=0.8, capsize=3,
                   label=label if j == 0 else None)
            ax.text(x, s["mean"] + s["std"] + 0.005, f"{s['mean']:.3f}", ha="center", va="bottom", fontsize=7)
            seeds = [r["metric"] for r in records
                     if r["task"] == task and r["optimizer"] == label and r["lr"] == lr and not r["warmup"]]
            ax.scatter([x] * len(seeds), seeds, s=10, color="white", edgecolors="black", linewidths=0.6, zorder=3)
    shown = [r["metric"] for r in records if r["task"] in tasks and r["lr"] == lr]
    tops = [s["mean"] + s["std"] for (t, _, r), s in summary.items() if t in tasks and r == lr]
    ax.set_ylim(max(0.0, min(shown) - 0.05), max(tops + shown) + 0.03)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel(_metric_name(tasks[0]) if len({_metric_name(t) for t in tasks}) == 1 else "metric")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _style(label: str) -> dict:
    """Line style per optimizer: AdamW black, Lion red, RLion rms blue / fixed green, darker for larger α."""
    import matplotlib

    if label == "adamw":
        return dict(color="black", lw=2.5, marker="o")
    if label == "lion":
        return dict(color="tab:red", lw=2.5, marker="s")
    scaling, alpha = label.split()[1], float(label.split()[2][2:])
    cmap = matplotlib.colormaps["Blues" if scaling == "rms" else "Greens"]
    shade = 0.35 + 0.6 * (math.log10(alpha) + 1) / 4.5
    return dict(color=cmap(min(shade, 1.0)), lw=1.5, marker="^" if scaling == "rms" else "v",
                ls="-" if scaling == "rms" else "--")


def _grid_axes(plt, count: int):
    """A figure with ``count`` panels, at most two per row."""
    cols = min(count, 2)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.6 * cols, 4.0 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat[:count]


def _shared_legend(fig, axes) -> None:
    """One legend for the whole figure, with every line any panel drew (each label once)."""
    seen = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    fig.legend(list(seen.values()), list(seen), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)


def plot_lr_sweep(summary: dict, tasks: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = _grid_axes(plt, len(tasks))
    for ax, task in zip(axes, tasks):
        for label in _sorted_optimizers(k[1] for k in summary if k[0] == task and not k[1].endswith(" bc")):
            lrs = sorted(lr for (t, l, lr) in summary if t == task and l == label)
            mean = [summary[(task, label, lr)]["mean"] for lr in lrs]
            lo = [summary[(task, label, lr)]["min"] for lr in lrs]
            hi = [summary[(task, label, lr)]["max"] for lr in lrs]
            style = _style(label)
            ax.plot(lrs, mean, label=label, **style)
            ax.fill_between(lrs, lo, hi, color=style["color"], alpha=0.10)
        ax.axhline(learned_nothing_metric(TASKS[task]), color="gray", ls=":", lw=1, label="learned nothing")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel(_metric_name(task))
        ax.set_title(task)
        ax.grid(alpha=0.3)
    _shared_legend(fig, axes)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def default_rlion_label() -> str:
    """The grid label of RLion with the package's current defaults."""
    return default_rlion_config().label


def plot_headline(summary: dict, tasks: list[str], path: Path) -> None:
    """The one-figure summary: AdamW, Lion, RLion with its defaults and the paper's rule with a
    small fixed α (what public copies default to), final metric vs lr on every task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    default = default_rlion_label()
    labels = {"adamw": "AdamW", "lion": "Lion (lion-pytorch)", default: f"RLion defaults ({default[6:]})",
              "rlion fixed a=10": "RLion, paper rule, fixed a=10"}
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for label, shown in labels.items():
            lrs = sorted(lr for (t, l, lr) in summary if t == task and l == label)
            if lrs:
                ax.plot(lrs, [summary[(task, label, lr)]["mean"] for lr in lrs], label=shown, **_style(label))
        ax.axhline(learned_nothing_metric(TASKS[task]), color="gray", ls=":", lw=1, label="learned nothing")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel(_metric_name(task))
        ax.set_title(task, fontsize=10)
        ax.grid(alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_alpha(summary: dict, tasks: list[str], lrs: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = _grid_axes(plt, len(tasks))
    for ax, task in zip(axes, tasks):
        for scaling, ls in (("rms", "-"), ("fixed", "--")):
            for lr, color in zip(lrs, ("tab:blue", "tab:orange", "tab:green")):
                points = sorted(
                    (float(l.split()[2][2:]), s["mean"])
                    for (t, l, r), s in summary.items()
                    if t == task and r == lr and l.startswith(f"rlion {scaling} ") and not l.endswith("bc")
                )
                if points:
                    ax.plot(*zip(*points), ls=ls, marker="o", color=color, label=f"{scaling}, lr {lr:g}")
        for lr, color in zip(lrs, ("tab:blue", "tab:orange", "tab:green")):
            s = summary.get((task, "adamw", lr))
            if s:
                ax.axhline(s["mean"], color=color, lw=0.8, ls=":")
        ax.axhline(learned_nothing_metric(TASKS[task]), color="gray", lw=1.5, ls="-.")
        ax.set_xscale("log")
        ax.set_xlabel("alpha")
        ax.set_ylabel(_metric_name(task))
        ax.set_title(f"{task}\n(dotted: AdamW at that lr; gray: learned nothing)", fontsize=9)
        ax.grid(alpha=0.3)
    _shared_legend(fig, axes)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_loss_curves(records: list[dict], tasks: list[str], optimizers: list[str], lr: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = _grid_axes(plt, len(tasks))
    for ax, task in zip(axes, tasks):
        for label in optimizers:
            curves = [r["train_loss_curve"] for r in records
                      if r["task"] == task and r["optimizer"] == label and r["lr"] == lr and not r["warmup"]]
            curves = [c for c in curves if c]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            mean = np.mean([c[:length] for c in curves], axis=0)
            ax.plot(range(1, length + 1), mean, label=label, **{k: v for k, v in _style(label).items() if k != "marker"})
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("training loss (mean over seeds)")
        ax.set_title(f"{task}, lr {lr:g}")
        ax.grid(alpha=0.3)
    _shared_legend(fig, axes)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _metric_name(task: str) -> str:
    return TASKS[task].metric_name if task in TASKS else "metric"


def report(records: list[dict], figures_dir: Path, prefix: str = "results_") -> str:
    """Write the plots into ``figures_dir`` and return the Markdown tables (one per task and warm-up)."""
    figures_dir.mkdir(parents=True, exist_ok=True)
    tasks = [t for t in TASKS if any(r["task"] == t for r in records)]
    lrs = sorted({r["lr"] for r in records})
    text = []
    summary = summarize(records, False)
    for lr in (1e-3, 1e-4):
        if any(k[2] == lr for k in summary):
            text.append(f"### All tasks at lr {lr:g}, no warm-up (difference to AdamW at the same lr)\n")
            text.append(comparison_table(summary, tasks, lr) + "\n")
    text.append("### Best over the lr grid (mean over seeds @ lr), no warm-up\n")
    text.append(best_lr_table(summary, tasks) + "\n")
    labels = sorted({r["optimizer"] for r in records})
    warm_pairs = [(l, False, l, True) for l in _sorted_optimizers(labels) if any(r["optimizer"] == l and r["warmup"] for r in records)]
    bc_pairs = [(l[:-3], False, l, False) for l in _sorted_optimizers(labels) if l.endswith(" bc")]
    main_tasks = [t for t in tasks if t != "recipe_digits"]  # recipe_caltech has warm-up/bias-correction runs too
    for lr in (1e-4, 1e-3, 1e-2):
        if warm_pairs and any(r["lr"] == lr and r["warmup"] for r in records):
            text.append(f"### Warm-up (10 % linear) on/off at lr {lr:g}: without -> with\n")
            text.append(variant_table(records, main_tasks, warm_pairs, lr) + "\n")
    for lr in (1e-4, 1e-3, 1e-2):
        if bc_pairs and any(r["lr"] == lr and r["optimizer"].endswith(" bc") for r in records):
            text.append(f"### Bias correction off -> on (fixed α), lr {lr:g}\n")
            text.append(variant_table(records, main_tasks, bc_pairs, lr) + "\n")
    for warmup in (False, True):
        summary = summarize(records, warmup)
        if not summary:
            continue
        seeds = sorted({r["seed"] for r in records if r["warmup"] == warmup})
        tag = "warmup" if warmup else "no_warmup"
        plot_lr_sweep(summary, tasks, figures_dir / f"{prefix}lr_sweep_{tag}.png",
                      f"final metric vs lr ({'10 % warm-up' if warmup else 'no warm-up'}; mean over seeds {seeds}, band min-max)")
        for task in tasks:
            text.append(f"### {task} ({_metric_name(task)}), {'10 % warm-up' if warmup else 'no warm-up'}\n")
            text.append(markdown_table(summary, task, lrs) + "\n")
    summary = summarize(records, False)
    plot_headline(summary, tasks, figures_dir / f"{prefix}headline.png")
    plot_alpha(summary, tasks, [lr for lr in (1e-4, 1e-3, 1e-2) if lr in lrs], figures_dir / f"{prefix}alpha.png")
    labels = [l for l in ("adamw", "lion", default_rlion_label(), "rlion fixed a=1000", "rlion fixed a=10")
              if any(r["optimizer"] == l for r in records)]
    for lr in (1e-3,):
        plot_loss_curves(records, tasks, labels, lr, figures_dir / f"{prefix}loss_curves.png")
    return "\n".join(text)


def paper_archs_report(records: list[dict], figures_dir: Path, prefix: str = "results_paper_archs") -> str:
    """The ``--paper-archs`` grid: its mean ± std table at lr 1e-3, a bar plot and the loss curves."""
    figures_dir.mkdir(parents=True, exist_ok=True)
    tasks = [t for t in PAPER_ARCH_TASKS if any(r["task"] == t for r in records)]
    seeds = sorted({r["seed"] for r in records})
    plot_mean_std(records, tasks, 1e-3, figures_dir / f"{prefix}.png",
                  f"lr 1e-3, no warm-up; mean ± std over seeds {seeds} (dots: single seeds)")
    labels = _sorted_optimizers(r["optimizer"] for r in records)
    plot_loss_curves(records, tasks, labels, 1e-3, figures_dir / f"{prefix}_loss_curves.png")
    return (
        "### FasterNet-T0 and EfficientNetV2-B0 (half width and depth) at lr 1e-3, no warm-up "
        "(mean ± std over seeds; difference to AdamW)\n\n" + comparison_table(summarize(records, False), tasks, 1e-3, with_std=True) + "\n"
    )


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    grid = parser.add_mutually_exclusive_group()
    grid.add_argument("--full", action="store_true", help="the whole grid (hours on one core) instead of the small default")
    grid.add_argument("--paper-archs", action="store_true",
                      help="AdamW/Lion/RLion defaults at lr 1e-3 on FasterNet-T0 and EfficientNetV2 (36 runs)")
    parser.add_argument("--out", type=Path, default=Path("benchmark_results"), help="folder for results*.jsonl, tables and plots")
    parser.add_argument("--resume", action="store_true", help="keep the folder's results and skip the runs they already hold")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {list(TASKS)}")
    parser.add_argument("--epochs", type=int, default=None, help="override every task's epoch count (smoke runs)")
    parser.add_argument("--shard", default="0/1", help="i/n: run every n-th grid cell starting at i (parallel jobs)")
    parser.add_argument("--report", action="store_true", help="only write tables and plots from the results in --out")
    parser.add_argument("--figures", type=Path, default=None, help="folder for the plots (default: --out), e.g. docs/figures")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"--tasks: unknown task(s) {unknown}; valid: {', '.join(TASKS)}")
    if not args.report:
        grid = full_grid() if args.full else paper_archs_grid() if args.paper_archs else small_grid()
        runs = [r for r in grid if r["task"] in tasks]
        try:
            index, count = (int(v) for v in args.shard.split("/"))
            assert 0 <= index < count
        except (ValueError, AssertionError):
            raise ValueError(f"--shard must be i/n with 0 <= i < n, got {args.shard!r}") from None
        run_grid(runs, args.out, resume=args.resume, epochs=args.epochs, shard=(index, count))
    records = [r for path in results_files(args.out) for r in read_results(path) if r["task"] in tasks]
    figures = args.figures or args.out
    tables = paper_archs_report(records, figures) if args.paper_archs else report(records, figures)
    (args.out / "tables.md").write_text(tables)
    print(tables)
    print(f"{len(records)} runs; tables.md and plots in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
