#!/usr/bin/env python
"""ViT single-box detection on Caltech101 with RLion (or any registered optimizer), on Accelerate.

The RLion paper's "object detection with Vision Transformers on Caltech101" is the public single-box
regression set-up: Caltech101 ``airplanes`` with their boxes, sorted, first 80 % train / last 20 %
test (the last 10 % of the training images for validation), 224x224 input, a small ViT (patch 32,
width 64, 4 layers) whose flattened tokens feed an MLP regressing the normalised box (x1, y1, x2,
y2), MSE loss, AdamW lr 1e-3, weight decay 1e-4, batch 32, <= 100 epochs. This script reports mean
IoU on the whole test split, next to the IoU of always predicting the mean training box; the epoch
kept is the best on the validation split (the last one with ``--validation_fraction 0``), never
chosen on the test split. Data: :mod:`hf_rlion.caltech101`; model:
:class:`hf_rlion.models.ViTBoxRegressionModel`; checkpoints: :mod:`hf_rlion.complete_checkpoints`
(``checkpoint-<epoch>``, whose completeness marker holds this script's state; the latest and the
best are kept). Outputs, options and figures: docs/vit_detection.md. Run (one process, or
``accelerate launch`` for several; or one ``.json``/``.yaml`` file of the flags as argument)::

    python recipes/vit_detection_caltech101.py --data_dir /data/caltech-101 \\
        --optim rlion --output_dir runs/vit-caltech101-rlion
"""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

import hf_rlion
from hf_rlion.caltech101 import load_caltech101, split_off_validation, split_train_test
from hf_rlion.complete_checkpoints import CHECKPOINT_PREFIX, prune_checkpoints, read_marker, resolve_checkpoint, save_accelerate_checkpoint
from hf_rlion.distributed_exit import exit_distributed_run
from hf_rlion.models import ViTBoxRegressionConfig, ViTBoxRegressionModel, box_iou
from hf_rlion.registry import OPTIMIZERS, optimizer_kwargs, parse_optim_args
from hf_rlion.training_curves import plot_training_curves

# ViTImageProcessor's defaults: pixels scaled to [0, 1], then (x - 0.5) / 0.5.
PIXEL_MEAN = 0.5
PIXEL_STD = 0.5
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial", "inverse_sqrt")


@dataclass
class DataArguments:
    data_dir: str = field(metadata={"help": "Caltech101 folder (101_ObjectCategories/ + Annotations/) or the folder caltech-101.zip extracts to"})
    categories: list[str] = field(default_factory=lambda: ["airplanes"], metadata={"help": "category names (space or comma separated) or 'all'"})
    test_fraction: float = field(default=0.2, metadata={"help": "last fraction of each category's sorted images used as test split"})
    split_seed: Optional[int] = field(default=None, metadata={"help": "shuffle each category with this seed before splitting (default: sorted, as the baseline)"})
    validation_fraction: float = field(default=0.1, metadata={"help": "last fraction of the training images held out to pick the best epoch (0: keep the last)"})
    dataset_cache_dir: Optional[str] = field(default=None, metadata={"help": "parsed dataset cache (default $HF_RLION_CACHE/caltech101, i.e. ~/.cache/hf_rlion/caltech101)"})
    strict_annotations: bool = field(default=False, metadata={"help": "fail on the first missing/corrupt/invalid annotation instead of skipping it"})
    hflip_probability: float = field(default=0.0, metadata={"help": "random horizontal flip of training images and boxes (0: none, as the baseline)"})
    dataloader_num_workers: int = 0

    def __post_init__(self):
        in_range = {
            "test_fraction": 0 < self.test_fraction < 1,
            "validation_fraction": 0 <= self.validation_fraction < 1,
            "hflip_probability": 0 <= self.hflip_probability <= 1,
        }
        for name in (name for name, ok in in_range.items() if not ok):
            raise ValueError(f"--{name} out of range: {getattr(self, name)}")


@dataclass
class ModelArguments:
    """Defaults: the public baseline's model."""

    model_name_or_path: Optional[str] = field(default=None, metadata={"help": "a saved ViTBoxRegressionModel to start from"})
    backbone_name_or_path: Optional[str] = field(default=None, metadata={"help": "a ViT checkpoint for the encoder (head freshly initialised)"})
    image_size: int = 224
    patch_size: int = 32
    hidden_size: int = 64
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 128
    head_hidden_sizes: str = field(default="2048,1024,512,64,32", metadata={"help": "comma-separated widths of the box head's MLP"})
    head_dropout: float = 0.3
    hidden_dropout_prob: float = 0.1
    loss: str = field(default="mse", metadata={"choices": ("mse", "giou")})
    class_head: bool = field(default=False, metadata={"help": "also predict the category (useful with several categories)"})
    class_loss_weight: float = field(default=0.1, metadata={"help": "weight of the class head's cross-entropy added to the box loss"})

    def __post_init__(self):
        for name in ("image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be a positive integer, got {getattr(self, name)}")
        try:
            sizes = [int(v) for v in self.head_hidden_sizes.split(",") if v]
        except ValueError:
            raise ValueError(f"--head_hidden_sizes: expected comma-separated integers, got {self.head_hidden_sizes!r}") from None
        if not sizes or any(v <= 0 for v in sizes):
            raise ValueError(f"--head_hidden_sizes: expected positive integers, got {self.head_hidden_sizes!r}")
        if self.model_name_or_path and self.backbone_name_or_path:
            raise ValueError("--model_name_or_path and --backbone_name_or_path exclude each other")

    @property
    def head_sizes(self) -> list[int]:
        return [int(v) for v in self.head_hidden_sizes.split(",") if v]


@dataclass
class TrainingArguments:
    output_dir: str
    optim: str = field(default="rlion", metadata={"choices": tuple(OPTIMIZERS)})
    optim_args: Optional[str] = field(default=None, metadata={"help": "optimizer options, e.g. 'alpha=3,alpha_scaling=rms,beta2=0.99'"})
    learning_rate: Optional[float] = field(default=None, metadata={"help": "default: the optimizer's registered default (hf_rlion.registry)"})
    weight_decay: float = 1e-4
    num_train_epochs: int = 100
    per_device_train_batch_size: int = 32
    per_device_eval_batch_size: int = 64
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = field(default=0.0, metadata={"help": "clip the gradient norm (0: no clipping, as the baseline)"})
    lr_scheduler_type: str = field(default="constant", metadata={"choices": SCHEDULERS})
    warmup_steps: int = field(default=0, metadata={"help": "warm-up optimizer steps (schedulers with warm-up)"})
    mixed_precision: Optional[str] = field(default=None, metadata={"choices": ("no", "fp16", "bf16"), "help": "default: accelerate's config"})
    seed: int = 42
    resume_from_checkpoint: Optional[str] = field(default=None, metadata={"help": "a checkpoint-<epoch> folder, or 'latest'/'last' (the last complete one in --output_dir)"})
    num_plot_images: int = 8
    push_to_hub: bool = False
    hub_model_id: Optional[str] = field(default=None, metadata={"help": "default: the output folder's name"})
    hub_private_repo: bool = False
    license: Optional[str] = field(default=None, metadata={"help": "license id for the pushed model's card (default: the backbone's)"})
    optim_kwargs: dict = field(default_factory=dict, init=False)

    def __post_init__(self):
        for name in ("num_train_epochs", "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be a positive integer, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"--warmup_steps must be >= 0, got {self.warmup_steps}")
        try:
            self.optim_kwargs = parse_optim_args(self.optim_args)
            optimizer_kwargs(self.optim, self.optim_kwargs)
        except ValueError as err:
            raise ValueError(f"--optim_args: {err}") from None


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[DataArguments, ModelArguments, TrainingArguments]:
    """Flags, or one ``.json`` / ``.yaml`` file holding them; a bad value exits with the parser's usage error."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(
        (DataArguments, ModelArguments, TrainingArguments),
        description="ViT single-box detection on Caltech101 (the RLion paper's set-up), on Accelerate.",
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if len(argv) == 1 and argv[0].endswith(".json"):
            return parser.parse_json_file(argv[0])
        if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
            return parser.parse_yaml_file(argv[0])
        return parser.parse_args_into_dataclasses(argv)
    except ValueError as err:
        parser.error(str(err))


def image_to_tensor() -> v2.Compose:
    """RGB image to float32 (3, H, W): scaled to [0, 1], then ``(x - 0.5) / 0.5`` (ViTImageProcessor's defaults)."""
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize([PIXEL_MEAN] * 3, [PIXEL_STD] * 3)])


def to_pixel_values(image, image_size: int) -> torch.Tensor:
    """An image as the model sees it: RGB, resized (bilinear) to ``image_size`` squared without keeping
    the aspect ratio (as the baseline; normalised boxes are unchanged by it), then :func:`image_to_tensor`."""
    resized = v2.functional.resize(image.convert("RGB"), [image_size, image_size], interpolation=v2.InterpolationMode.BILINEAR)
    return image_to_tensor()(resized).as_subclass(torch.Tensor)


class CaltechBoxes(torch.utils.data.Dataset):
    """Rows of a Caltech101 split as ``pixel_values``, ``boxes`` (normalised x1, y1, x2, y2), ``labels``.

    The box travels with the image through ``torchvision.transforms.v2`` as ``BoundingBoxes``
    (resize to ``image_size``, random horizontal flip with ``hflip_probability``). Each sample's flip
    is drawn from a seed of (seed, epoch, index), set by ``set_epoch``: the same in every process,
    worker and resumed run.
    """

    def __init__(self, rows, image_size: int, hflip_probability: float = 0.0, seed: int = 0):
        self.rows, self.image_size, self.seed, self.epoch = rows, image_size, seed, 0
        resize = v2.Resize((image_size, image_size), interpolation=v2.InterpolationMode.BILINEAR)
        self.transform = v2.Compose([resize, v2.RandomHorizontalFlip(hflip_probability), image_to_tensor()])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        image = row["image"].convert("RGB")
        width, height = image.size
        pixels = torch.tensor([row["box"]]) * torch.tensor([width, height, width, height])
        box = tv_tensors.BoundingBoxes(pixels, format="XYXY", canvas_size=(height, width))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_003 + index) % 2**63)
            pixel_values, box = self.transform(image, box)
        box = box.as_subclass(torch.Tensor)[0] / self.image_size
        return {"pixel_values": pixel_values.as_subclass(torch.Tensor), "boxes": box, "labels": row["label"]}


def build_model(model_args: ModelArguments, categories: list[str]) -> ViTBoxRegressionModel:
    if model_args.model_name_or_path:
        return ViTBoxRegressionModel.from_pretrained(model_args.model_name_or_path)
    head = dict(
        head_hidden_sizes=model_args.head_sizes,
        head_dropout=model_args.head_dropout,
        loss=model_args.loss,
        class_head=model_args.class_head,
        class_loss_weight=model_args.class_loss_weight,
        id2label=dict(enumerate(categories)),
        label2id={c: i for i, c in enumerate(categories)},
    )
    if model_args.backbone_name_or_path:
        return ViTBoxRegressionModel.from_pretrained_backbone(model_args.backbone_name_or_path, **head)
    encoder = ("image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_dropout_prob")
    return ViTBoxRegressionModel(ViTBoxRegressionConfig(**{k: getattr(model_args, k) for k in encoder}, **head))


def box_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """``mean_iou`` and ``iou_at_0.5`` (fraction of images with IoU >= 0.5) over all rows."""
    iou = box_iou(pred.float(), target.float())
    return {"mean_iou": iou.mean().item(), "iou_at_0.5": (iou >= 0.5).float().mean().item(), "num_images": len(iou)}


def mean_box_baseline(train_boxes: torch.Tensor, test_boxes: torch.Tensor) -> float:
    """Mean IoU of predicting the mean training box for every test image."""
    constant = train_boxes.float().mean(0, keepdim=True).expand_as(test_boxes)
    return box_iou(constant, test_boxes.float()).mean().item()


@torch.no_grad()
def evaluate(model, dataloader, accelerator) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Metrics and predictions over the whole split, each sample once (gathered from all ranks)."""
    model.eval()
    out: dict[str, list[torch.Tensor]] = {"pred_boxes": [], "boxes": [], "labels": [], "logits": []}
    for batch in dataloader:
        result = model(pixel_values=batch["pixel_values"])
        parts = {"pred_boxes": result.pred_boxes, "boxes": batch["boxes"], "labels": batch["labels"]}
        if result.logits is not None:
            parts["logits"] = result.logits
        for key, value in accelerator.gather_for_metrics(parts).items():
            out[key].append(value.float().cpu() if value.is_floating_point() else value.cpu())
    predictions = {k: torch.cat(v) for k, v in out.items() if v}
    metrics = box_metrics(predictions["pred_boxes"], predictions["boxes"])
    if "logits" in predictions:
        metrics["accuracy"] = (predictions["logits"].argmax(-1) == predictions["labels"]).float().mean().item()
    return metrics, predictions


def plot_predictions(rows, indices: list[int], pred: torch.Tensor, path: Path, title: str) -> None:
    """Test images with the true box (green) and the prediction (red, dashed), IoU in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    cols = min(4, len(indices))
    rows_n = math.ceil(len(indices) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.2 * cols, 2.8 * rows_n + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, index, box in zip(axes.flat, indices, pred):
        row = rows[index]
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


def load_splits(data_args: DataArguments, accelerator) -> dict[str, Any]:
    """The dataset's splits (built by the main process first, read from the cache by the others)."""
    with accelerator.main_process_first():
        dataset, skipped, cache_path, from_cache = load_caltech101(
            data_args.data_dir, data_args.categories, data_args.dataset_cache_dir, data_args.strict_annotations,
            accelerator.is_local_main_process,
        )  # fmt: skip
    categories = dataset.features["label"].names
    accelerator.print(f"dataset: {len(dataset)} images of {categories} ({'cache' if from_cache else 'built'}: {cache_path})")
    if skipped:
        accelerator.print(f"skipped {len(skipped)} annotation(s)/image(s); first: {skipped[:5]} (all in skipped_annotations.json)")
    train_all, test = split_train_test(dataset, data_args.test_fraction, data_args.split_seed)
    train, validation = split_off_validation(dataset, train_all, data_args.validation_fraction)
    accelerator.print(f"split: {len(train)} train, {len(validation)} validation, {len(test)} test")
    return {
        "categories": categories,
        "skipped": skipped,
        "train_boxes": torch.tensor(dataset.select(train_all)["box"]),
        "train": dataset.select(train),
        "eval": dataset.select(validation) if validation else dataset.select(test),
        "test": dataset.select(test),
        "selection_split": "validation" if validation else "test",
    }


def make_dataloaders(splits, image_size: int, data_args: DataArguments, args: TrainingArguments, accelerator) -> dict[str, Any]:
    """Prepared loaders over :class:`CaltechBoxes`; only the training split is shuffled and flipped."""
    from torch.utils.data import DataLoader

    loaders = {}
    for split in ("train", "eval", "test"):
        is_train = split == "train"
        samples = CaltechBoxes(splits[split], image_size, data_args.hflip_probability if is_train else 0.0, args.seed)
        batch_size = args.per_device_train_batch_size if is_train else args.per_device_eval_batch_size
        loaders[split] = DataLoader(samples, batch_size=batch_size, shuffle=is_train, num_workers=data_args.dataloader_num_workers)
    return dict(zip(loaders, accelerator.prepare(*loaders.values())))


def train_one_epoch(model, optimizer, scheduler, train_dl, accelerator, args: TrainingArguments, progress) -> float:
    """One pass over the training data; returns the mean training loss over all ranks."""
    model.train()
    loss_sum, loss_count = torch.zeros((), dtype=torch.float64), 0
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
            progress.update(1)
    return accelerator.reduce(loss_sum / max(loss_count, 1), reduction="mean").item()


def train(model, optimizer, scheduler, loaders, split: str, accelerator, args: TrainingArguments, state: dict[str, Any]) -> None:
    """Epochs from ``state["epoch"]`` on; after each: evaluate, choose, checkpoint (``state`` in the marker), prune."""
    from tqdm.auto import tqdm

    output_dir = Path(args.output_dir)
    steps_per_epoch = math.ceil(len(loaders["train"]) / args.gradient_accumulation_steps)
    progress = tqdm(total=steps_per_epoch * args.num_train_epochs, initial=state["global_step"], desc="training", disable=not accelerator.is_local_main_process)
    for epoch in range(state["epoch"], args.num_train_epochs):
        started = time.perf_counter()
        loaders["train"].set_epoch(epoch)  # shuffling seeded by (seed, epoch)
        loaders["train"].dataset.set_epoch(epoch)  # flips seeded by (seed, epoch, index)
        train_loss = train_one_epoch(model, optimizer, scheduler, loaders["train"], accelerator, args, progress)
        metrics, _ = evaluate(model, loaders["eval"], accelerator)
        state["train_runtime"] += time.perf_counter() - started
        state["global_step"] += steps_per_epoch
        record = {"epoch": epoch + 1, "step": state["global_step"], "train_loss": train_loss, "eval_split": split}
        record.update({f"eval_{k}": v for k, v in metrics.items()}, learning_rate=scheduler.get_last_lr()[0])
        state["history"].append(record)
        state["epoch"] = epoch + 1
        progress.set_postfix(loss=f"{train_loss:.4f}", **{f"{split[:3]}_iou": f"{metrics['mean_iou']:.3f}"})
        # Without a validation split the last epoch is kept: the test split never chooses.
        if split == "test" or state["best_metric"] is None or metrics["mean_iou"] > state["best_metric"]:
            state["best_epoch"], state["best_metric"] = epoch + 1, metrics["mean_iou"]
        checkpoint = save_accelerate_checkpoint(accelerator, output_dir, epoch + 1, state)
        if accelerator.is_main_process:
            prune_checkpoints(output_dir, {checkpoint, str(output_dir / f"{CHECKPOINT_PREFIX}-{state['best_epoch']}")})
        accelerator.wait_for_everyone()
    progress.close()


def save_results(args, model_args, data, state, test_metrics, test_predictions, accelerator, model) -> dict[str, Any]:
    """Main process: the model, the JSON results, the pictures, and the Hub push."""
    output_dir = Path(args.output_dir)
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(output_dir, safe_serialization=True)
    results = {
        **{("best_epoch" if k == "epoch" else f"eval_{k}"): v for k, v in test_metrics.items()},
        "train_loss": state["history"][-1]["train_loss"] if state["history"] else None,
        "train_runtime": state["train_runtime"],
        "train_samples": len(data["train"]),
        "validation_samples": len(data["eval"]) if data["selection_split"] == "validation" else 0,
        "epochs": state["epoch"],
        "global_step": state["global_step"],
        "selection_split": data["selection_split"],
        "best_selection_mean_iou": state["best_metric"],
        "skipped_annotations": len(data["skipped"]),
        "optimizer": args.optim,
        "learning_rate": state["learning_rate"],
        "weight_decay": args.weight_decay,
        "optim_args": args.optim_kwargs,
        "num_processes": accelerator.num_processes,
    }
    outputs = {"eval_results": test_metrics, "all_results": results, "log_history": state["history"], "skipped_annotations": data["skipped"]}
    for name, content in outputs.items():
        (output_dir / f"{name}.json").write_text(json.dumps(content, indent=1))
    rows = data["test"]
    shown = np.linspace(0, len(rows) - 1, num=min(args.num_plot_images, len(rows))).round().astype(int).tolist()
    label = f"{args.optim}, test mean IoU {test_metrics['mean_iou']:.3f} (mean-box baseline {test_metrics['mean_box_baseline_mean_iou']:.3f})"
    plot_predictions(rows, shown, test_predictions["pred_boxes"][shown], output_dir / "predictions.png", label)
    if state["history"]:
        history = state["history"]
        plot_training_curves(
            output_dir / "training_curves.png", f"ViT on Caltech101 {data['categories'][:3]}, {args.optim}",
            [(h["epoch"], h["train_loss"]) for h in history], [(h["epoch"], h["eval_mean_iou"]) for h in history],
            f"mean IoU ({history[0]['eval_split']})", loss_x="epoch",
        )  # fmt: skip
    accelerator.print(json.dumps(test_metrics, indent=1))
    if args.push_to_hub:
        push(args, model_args, output_dir, test_metrics, results, data["categories"], unwrapped)
    return results


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    data_args, model_args, args = parse_args(argv)
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),  # a resumed run sees the same batches
    )
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    resume = resolve_checkpoint(args.resume_from_checkpoint, output_dir)
    state = read_marker(resume) if resume else {"epoch": 0, "global_step": 0, "best_epoch": None, "best_metric": None, "history": [], "train_runtime": 0.0}

    data = load_splits(data_args, accelerator)
    model = build_model(model_args, data["categories"])
    loaders = make_dataloaders(data, model.config.image_size, data_args, args, accelerator)
    optimizer = hf_rlion.create_optimizer(model, args.optim, lr=args.learning_rate, weight_decay=args.weight_decay, **args.optim_kwargs)
    steps = math.ceil(len(loaders["train"]) / args.gradient_accumulation_steps) * args.num_train_epochs
    # The prepared scheduler steps once per process per optimizer step, hence the factor.
    n = accelerator.num_processes
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.warmup_steps * n, num_training_steps=steps * n)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if resume:
        accelerator.print(f"resuming from {resume}")
        accelerator.load_state(resume)
    state["learning_rate"] = optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"])
    accelerator.print(f"optimizer {args.optim} lr {state['learning_rate']} ({args.lr_scheduler_type}) weight decay {args.weight_decay} {args.optim_kwargs or ''}")

    train(model, optimizer, scheduler, loaders, data["selection_split"], accelerator, args, state)

    if state["best_epoch"] != state["epoch"]:  # the kept model: the best checkpoint's weights
        accelerator.print(f"loading the best epoch ({state['best_epoch']}, {data['selection_split']} mean IoU {state['best_metric']:.4f})")
        accelerator.load_state(str(output_dir / f"{CHECKPOINT_PREFIX}-{state['best_epoch']}"))
    test_metrics, test_predictions = evaluate(model, loaders["test"], accelerator)
    test_metrics["mean_box_baseline_mean_iou"] = mean_box_baseline(data["train_boxes"], test_predictions["boxes"])
    test_metrics.update(epoch=state["best_epoch"], split="test")
    results = save_results(args, model_args, data, state, test_metrics, test_predictions, accelerator, model) if accelerator.is_main_process else {}
    accelerator.wait_for_everyone()
    return {"eval": test_metrics, "all": results}


def push(args, model_args, output_dir: Path, test_metrics: dict, results: dict, categories: list[str], model) -> str:
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
        base_model=model_args.backbone_name_or_path,
        repo_id=repo_id,
        usage_code=(
            "import hf_rlion.models  # registers vit_box_regression with the Auto classes\n"
            "from transformers import AutoModel\n\n"
            f'model = AutoModel.from_pretrained("{repo_id}")\n'
            "boxes = model(pixel_values).pred_boxes  # normalised (x1, y1, x2, y2)"
        ),
        tags=["vision", "object-detection", "vit", "caltech101"],
        license=args.license or hub.base_model_license(model_args.backbone_name_or_path),
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
    return hub.push_folder_to_hub(output_dir, repo_id, card=card, private=args.hub_private_repo or None, commit_message=f"ViT Caltech101 detection, {args.optim}")


if __name__ == "__main__":
    main()
    # In a multi-process run: barrier, then os._exit, so that a rank cannot abort at interpreter
    # exit after everything is saved (a PyTorch race, see hf_rlion.distributed_exit). It replaces
    # accelerator.end_training(), whose destroy_process_group leaves gloo's threads running.
    exit_distributed_run()
