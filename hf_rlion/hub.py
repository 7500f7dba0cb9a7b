"""Model cards and pushing a finished training run to the Hugging Face Hub.

Two functions, used by the recipes after they have saved everything locally:

* :func:`build_model_card` writes a :class:`huggingface_hub.ModelCard` whose YAML front matter
  holds the ``model-index`` (one ``EvalResult`` per metric), the dataset, the license, the tags
  (always ``hf-rlion`` and ``rlion``) and the optimizer with its hyperparameters, and whose text
  gives the model's size and preprocessing, the results per epoch, the training curves, how to
  load the model, how to reproduce the run from the recipe in hf-rlion's source repository, and
  how to cite RLion. No absolute local path appears in it (see :func:`strip_local_paths`).
* :func:`push_folder_to_hub` writes the card as ``README.md`` into the output folder, then creates
  the repository (``exist_ok``) and uploads the folder in one commit. It never prints, logs or
  writes the token. A failed push raises :class:`HubPushError`, which says that the local output
  is intact and gives the command that retries the push::

      python -m hf_rlion.hub push OUTPUT_DIR REPO_ID

Under ``accelerate launch`` with several processes, call :func:`push_folder_to_hub` on the main
process only (``if accelerator.is_main_process:`` / ``if trainer.is_world_process_zero():``).
"""

from __future__ import annotations

import argparse
import enum
import glob
import math
import os
import re
import shlex
import sys
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.utils import filter_repo_objects, get_token
from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS as _HUB_IGNORE_PATTERNS

__all__ = [
    "DEFAULT_IGNORE_PATTERNS",
    "RLION_BIBTEX",
    "HubPushError",
    "base_model_license",
    "build_model_card",
    "files_containing",
    "image_preprocessing",
    "optimizer_hyperparameters",
    "push_folder_to_hub",
    "redact_secrets",
    "strip_local_paths",
    "training_hyperparameters",
]

# The RLion paper (Scientific Reports 15, 2025), cited by every card.
RLION_BIBTEX = """@article{rong2025rlion,
  title   = {A refined lion optimizer for deep learning},
  author  = {Rong, Jian and Ma, Chenhao and Zhang, Qinghui and Cao, Yong and Kou, Weili},
  journal = {Scientific Reports},
  volume  = {15},
  year    = {2025},
  doi     = {10.1038/s41598-025-07112-4},
  url     = {https://doi.org/10.1038/s41598-025-07112-4}
}"""

# Files of a training output folder that do not belong in a model repository: transformers'
# Trainer checkpoints ("checkpoint-500", which Trainer.push_to_hub skips too, with "_*"),
# Accelerate save_state folders as transformers' no_trainer examples name them
# ("epoch_3", "step_100", "checkpoints/"), and Python caches.
DEFAULT_IGNORE_PATTERNS: tuple[str, ...] = (
    "checkpoint-*",
    "checkpoint_*",
    "checkpoints/*",
    "epoch_*",
    "step_*",
    "_*",
    "**/__pycache__/**",
    "*.pyc",
)

# Hub access tokens start with "hf_"; command-line flags and keys that carry a token by name.
_TOKEN_PATTERN = re.compile(r"\bhf_[A-Za-z0-9]{8,}\b")
_TOKEN_FLAG_PATTERN = re.compile(r"(--(?:[\w-]*[_-])?token)(=|\s+)(\S+)", re.IGNORECASE)  # --token, --hub_token ...
_TOKEN_KEY_PATTERN = re.compile(r"(^|[_-])token$", re.IGNORECASE)  # token, hub_token, access_token (not tokenizer_name)
_REDACTED = "<redacted>"

# Sentence-cased titles for the metrics the recipes report; other names are shown as given.
_METRIC_TITLES = {
    "accuracy": "Accuracy",
    "top5_accuracy": "Top-5 accuracy",
    "mean_iou": "Mean IoU",
    "iou_at_0.5": "Fraction with IoU ≥ 0.5",
    "loss": "Loss",
}


class HubPushError(RuntimeError):
    """A push to the Hub failed; the local output folder is untouched (the message says how to retry)."""


def redact_secrets(text: str) -> str:
    """``text`` with Hub tokens (``hf_...``) and the values of ``--*token*`` flags replaced by ``<redacted>``."""
    text = _TOKEN_FLAG_PATTERN.sub(lambda m: f"{m.group(1)}{m.group(2)}{_REDACTED}", text)
    return _TOKEN_PATTERN.sub(_REDACTED, text)


def _public_hyperparameters(name: str, values: Mapping) -> dict:
    """``values`` as plain YAML-safe data, without any entry whose key names a token (``hub_token`` ...)."""
    if not isinstance(values, Mapping):
        raise ValueError(f"{name} must be a dict of hyperparameter name -> value, got {type(values).__name__}")
    public = {}
    for key, value in values.items():
        if _TOKEN_KEY_PATTERN.search(str(key)):
            continue
        public[str(key)] = _yaml_safe(value)
    return public


def _yaml_safe(value):
    if isinstance(value, enum.Enum):  # transformers' OptimizerNames, SchedulerType ... by value
        value = value.value
    if isinstance(value, str):
        return redact_secrets(str(value))
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return [_yaml_safe(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _yaml_safe(v) for k, v in value.items()}
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return _yaml_safe(value.item())
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(value)


def optimizer_hyperparameters(optimizer) -> dict[str, Any]:
    """The hyperparameters a ``torch.optim.Optimizer`` was built with, for a model card.

    For each key of ``optimizer.defaults`` (lr, betas, weight_decay, alpha, alpha_scaling ...,
    so including what RLion's signature or the registry filled in), the value its parameter
    groups hold: one value when all groups agree, else the distinct values in group order
    (``create_optimizer`` and Trainer put the decayed weights first, so ``weight_decay`` reads
    ``[0.1, 0.0]``). ``lr`` is the initial learning rate (``initial_lr``, which an lr scheduler
    stores), not the decayed one. Keys that only choose an implementation (``foreach``,
    ``fused``, ``capturable``, ``differentiable``) and ``None`` values are left out.
    Accelerate-wrapped optimizers (``.optimizer``) are unwrapped.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    defaults = getattr(inner, "defaults", None)
    groups = getattr(inner, "param_groups", None)
    if not isinstance(defaults, Mapping) or not groups:
        raise ValueError(
            f"optimizer must be a torch.optim.Optimizer (with .defaults and .param_groups), got {type(optimizer).__name__}"
        )
    implementation_only = {"foreach", "fused", "capturable", "differentiable"}
    hyperparameters = {}
    for key in defaults:
        if key in implementation_only:
            continue
        values = []
        for group in groups:
            value = _yaml_safe(group.get(f"initial_{key}", group.get(key, defaults[key])))
            if value not in values:
                values.append(value)
        if values != [None]:
            hyperparameters[key] = values[0] if len(values) == 1 else values
    return hyperparameters


# TrainingArguments fields that describe a run, as transformers' own Trainer model card lists them.
_TRAINING_ARGUMENT_FIELDS = (
    "learning_rate",
    "weight_decay",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "num_train_epochs",
    "max_steps",
    "lr_scheduler_type",
    "warmup_steps",
    "max_grad_norm",
    "seed",
    "bf16",
    "fp16",
    "optim",
    "optim_args",
)


def training_hyperparameters(training_args, *, world_size: int | None = None) -> dict[str, Any]:
    """The card's training hyperparameters from a ``transformers.TrainingArguments`` (or any object
    with those attributes, e.g. an ``argparse.Namespace``): the fields in ``_TRAINING_ARGUMENT_FIELDS``
    that are set, plus ``total_train_batch_size`` = per-device batch × accumulation × processes
    (``world_size``, default ``training_args.world_size`` or 1). Never includes a token."""
    values = {}
    for name in _TRAINING_ARGUMENT_FIELDS:
        value = getattr(training_args, name, None)
        if value is None or (name == "max_steps" and value == -1) or (name in ("bf16", "fp16") and not value):
            continue
        values[name] = _yaml_safe(value)
    per_device = getattr(training_args, "per_device_train_batch_size", None)
    if per_device:
        processes = world_size if world_size is not None else int(getattr(training_args, "world_size", 1) or 1)
        accumulation = int(getattr(training_args, "gradient_accumulation_steps", 1) or 1)
        values["total_train_batch_size"] = int(per_device) * accumulation * processes
    return values


def _markdown_table(header: tuple[str, str], rows: Iterable[tuple[str, object]]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {key} | `{value}` |" if not isinstance(value, str) else f"| {key} | {value} |" for key, value in rows]
    return "\n".join(lines)


def _framework_versions() -> list[tuple[str, str]]:
    import importlib.metadata

    versions = []
    for package in ("hf-rlion", "torch", "transformers", "accelerate", "datasets", "huggingface_hub"):
        try:
            versions.append((package, importlib.metadata.version(package)))
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


# The transformers Auto class that loads a model for each Hub task id (others: AutoModel).
_TASK_AUTO_CLASS = {
    "image-classification": "AutoModelForImageClassification",
    "object-detection": "AutoModelForObjectDetection",
    "image-segmentation": "AutoModelForImageSegmentation",
    "text-classification": "AutoModelForSequenceClassification",
}


def _is_rlion(optimizer: str) -> bool:
    """Whether a registry name (``rlion``, ``rlion_8bit``, ``paged_rlion_8bit``) is one of ours."""
    return "rlion" in optimizer.lower()


def _default_usage_code(task: str, repo_id: str) -> str:
    auto_class = _TASK_AUTO_CLASS.get(task, "AutoModel")
    return f'from transformers import {auto_class}\n\nmodel = {auto_class}.from_pretrained("{repo_id}")'


# An absolute POSIX path (/home/me/runs) or Windows path (C:\runs) standing on its own: not the
# path part of a URL (https://host/a/b), of a Hub id (org/name) or of a relative path (runs/a).
_ABSOLUTE_PATH = re.compile(r"""(?<![\w.~:/\\-])(?:/|[A-Za-z]:[\\/])[^\s'"`<>|()\[\]{},;]+""")


def strip_local_paths(text: str, *, cwd: str | Path | None = None) -> str:
    """``text`` with every absolute local path made relative or replaced, for a public card.

    A path under ``cwd`` (default: the working directory; unless that is ``/`` or the home
    directory) becomes relative to it (``/work/hf-rlion/outputs/run1`` -> ``outputs/run1``, as
    the recipes' command lines run from the repository root); any other becomes
    ``path/to/<its last component>`` (``/data/caltech-101`` -> ``path/to/caltech-101``, the tmp
    and cache folders too). URLs, Hub ids and relative paths are left as they are.
    """
    base = os.path.abspath(cwd if cwd is not None else os.getcwd())
    shared_roots = {os.path.abspath(os.sep), os.path.abspath(os.path.expanduser("~"))}

    def replace(match: re.Match) -> str:
        path = match.group(0)
        stripped = path.rstrip(".:")  # sentence punctuation after a path
        trailing = path[len(stripped) :]
        if base not in shared_roots and "\\" not in stripped:
            normalized = os.path.normpath(stripped)
            if normalized == base or normalized.startswith(base.rstrip(os.sep) + os.sep):
                return os.path.relpath(normalized, base) + trailing
        name = [part for part in re.split(r"[\\/]", stripped) if part][-1:]
        return "/".join(["path", "to", *name]) + trailing

    return _ABSOLUTE_PATH.sub(replace, text)


def _is_local_path(name: str) -> bool:
    """Whether ``name`` names a local file or folder rather than a Hub id (``org/name``)."""
    return bool(_ABSOLUTE_PATH.fullmatch(name)) or name.startswith(("./", "../", "~")) or Path(name).exists()


def _size_field(size, key: str):
    """``size[key]`` of a transformers size (a dict, or a ``SizeDict`` with attributes); ``None`` if absent."""
    if size is None:
        return None
    value = size.get(key) if isinstance(size, Mapping) else getattr(size, key, None)
    return int(value) if value else None


def _interpolation_name(value) -> str | None:
    """``"bicubic"`` for PIL's ``Resampling.BICUBIC`` (or its int 3), torchvision's ``InterpolationMode.BICUBIC``, ``"bicubic"``."""
    if value is None or isinstance(value, str):
        return value.lower() if value else None
    if getattr(value, "name", None):
        return value.name.lower()
    if isinstance(value, int):
        from PIL import Image

        try:
            return Image.Resampling(value).name.lower()
        except ValueError:
            pass
    return str(value)


def image_preprocessing(source) -> dict[str, Any]:
    """The evaluation preprocessing of an image model, for :func:`build_model_card` (``preprocessing=``).

    ``source`` is a transformers image processor or a timm data config
    (``timm.data.resolve_data_config(model=model)``). Returns those of these keys that are known:
    ``image_size`` ``[height, width]`` (the processor's ``crop_size`` when it center-crops, else
    its ``size``; timm's ``input_size``), ``resize_shortest_edge``, ``crop_pct`` (the resized
    image is cropped to ``image_size``, a fraction ``crop_pct`` of its shorter side),
    ``crop_mode``, ``interpolation`` (``"bicubic"`` ...), ``mean`` and ``std``.
    """
    if isinstance(source, Mapping):
        if "input_size" not in source:
            raise ValueError(f"image_preprocessing: a timm data config has 'input_size', got keys {sorted(source)}")
        values = {
            "image_size": [int(v) for v in tuple(source["input_size"])[-2:]],
            "crop_pct": source.get("crop_pct"),
            "crop_mode": source.get("crop_mode"),
            "interpolation": _interpolation_name(source.get("interpolation")),
            "mean": source.get("mean"),
            "std": source.get("std"),
        }
    else:
        size, crop = getattr(source, "size", None), getattr(source, "crop_size", None)
        crops = bool(getattr(source, "do_center_crop", False)) and crop is not None
        shown = crop if crops else size
        height = _size_field(shown, "height") or _size_field(shown, "shortest_edge")
        width = _size_field(shown, "width") or _size_field(shown, "shortest_edge")
        values = {
            "image_size": [height, width] if height and width else None,
            "resize_shortest_edge": _size_field(size, "shortest_edge"),
            "crop_pct": getattr(source, "crop_pct", None),
            "crop_mode": "center" if crops else None,
            "interpolation": _interpolation_name(getattr(source, "resample", None)),
            "mean": getattr(source, "image_mean", None),
            "std": getattr(source, "image_std", None),
        }
    return {key: _yaml_safe(value) for key, value in values.items() if value is not None}


def base_model_license(base_model: str | None, *, token: str | None = None, endpoint: str | None = None) -> str | None:
    """The ``license`` of ``base_model``'s model card, or ``None`` where it is unknown.

    ``base_model`` is a local folder (its ``README.md`` is read) or a Hub id (its ``README.md``
    is downloaded through the Hub cache; nothing is tried with ``HF_HUB_OFFLINE`` set). A card
    without a license, a missing card, or a Hub that cannot be reached gives ``None`` (the last
    with a warning), so the caller can fall back to an explicit ``--license``.
    """
    from huggingface_hub import constants, hf_hub_download

    if not base_model:
        return None
    folder = Path(base_model).expanduser()
    if folder.is_dir():
        readme = folder / "README.md"
        return ModelCard.load(readme, ignore_metadata_errors=True).data.license if readme.is_file() else None
    if _is_local_path(base_model) or constants.HF_HUB_OFFLINE:
        return None
    try:
        readme = hf_hub_download(base_model, "README.md", token=token, endpoint=endpoint)
    except Exception as err:  # no card, no access or no network: the license stays unknown
        warnings.warn(
            f"could not read the license of {base_model!r} from its model card ({type(err).__name__}); "
            "pass the license explicitly",
            stacklevel=2,
        )
        return None
    return ModelCard.load(readme, ignore_metadata_errors=True).data.license


# Logged values that describe the evaluation run, not the model (transformers' Trainer and the recipes).
_NOT_A_RESULT = ("runtime", "per_second", "_time", "samples", "num_")


def _results_per_epoch(log_history: Iterable[Mapping]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-epoch results table: one row per logged evaluation.

    As transformers' Trainer card (``transformers.modelcard.parse_log_history``): epoch, step,
    the training loss (the entry's ``train_loss``, else the last ``loss`` logged before it),
    then each ``eval_*`` value (``eval_loss`` as the validation loss), in order of appearance.
    An evaluation logged again at the same epoch and step (``trainer.evaluate()`` after the
    last epoch's) replaces the earlier row.
    """
    columns: list[str] = []
    rows: dict[tuple, dict[str, Any]] = {}  # by (epoch, step): a later evaluation of the same weights wins
    training_loss = None
    for entry in log_history:
        if not isinstance(entry, Mapping):
            raise ValueError(f"log_history must be a list of dicts (Trainer.state.log_history), got {entry!r}")
        if "loss" in entry:
            training_loss = entry["loss"]
        results = {
            key.removeprefix("eval_"): value
            for key, value in entry.items()
            if key.startswith("eval_")
            and isinstance(value, (int, float))
            and not isinstance(value, bool)
            and not any(part in key for part in _NOT_A_RESULT)
        }
        if not results:
            continue
        columns += [name for name in results if name not in columns]
        epoch, step = entry.get("epoch"), entry.get("step")
        rows[(epoch, step)] = {"epoch": epoch, "step": step, "train_loss": entry.get("train_loss", training_loss), **results}
    titles = {"loss": "Validation loss"}
    header = ["Epoch", "Step", "Training loss"] + [titles.get(name, _METRIC_TITLES.get(name, name)) for name in columns]

    def cell(value, style: str = "value") -> str:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            return "-" if value is None else str(value)
        if style == "epoch":
            return f"{round(value, 2):g}"  # 1.0 -> 1, 0.333 -> 0.33
        if style == "step" or isinstance(value, int):
            return str(int(value))
        return f"{value:.4f}"

    table = [
        [cell(row["epoch"], "epoch"), cell(row["step"], "step"), cell(row["train_loss"])] + [cell(row.get(c)) for c in columns]
        for row in rows.values()
    ]
    return header, table


def _markdown_grid(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _source_repository_url() -> str | None:
    """hf-rlion's source repository, from the installed package's ``Project-URL`` metadata (``Source``/``Repository``)."""
    import importlib.metadata

    try:
        urls = importlib.metadata.metadata("hf-rlion").get_all("Project-URL") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in urls:
        label, _, url = entry.partition(",")
        if label.strip().lower() in ("source", "repository", "source code", "code") and url.strip():
            return url.strip()
    return None


def _reproduce_section(command: str) -> list[str]:
    """How to rerun ``command``: a recipe of hf-rlion's repository (not in the wheel) is run from a clone of it."""
    recipe = re.search(r"(?:^|\s)(recipes/[\w./-]+\.py)\b", command)
    if recipe is None:
        return [
            "## How to reproduce",
            "The command line of this run (secrets removed, local paths replaced):",
            f"```bash\n{command}\n```",
        ]
    url = _source_repository_url()
    clone = f"git clone {url} hf-rlion && cd hf-rlion\n" if url else "# in a clone of the hf-rlion source repository:\n"
    where = f"[hf-rlion's source repository]({url})" if url else "hf-rlion's source repository"
    return [
        "## How to reproduce",
        f"The training script is `{recipe.group(1)}` in {where}; the recipes are not part of the "
        "`hf-rlion` package, so clone the repository (the hf-rlion version under *Framework versions*) "
        "and run the script from its root with the arguments of this run (secrets removed, local "
        "paths replaced by relative ones or `path/to/...`):",
        f"```bash\n{clone}pip install -e \".[recipes]\"\n{command}\n```",
    ]


def build_model_card(
    *,
    model_name: str,
    task: str,
    dataset_name: str,
    metrics: dict[str, float],
    optimizer: str,
    optimizer_hyperparameters: dict,
    training_hyperparameters: dict,
    reproduce_command: str,
    dataset_config: str | None = None,
    dataset_split: str | None = None,
    base_model: str | None = None,
    tags: list[str] | None = None,
    license: str | None = None,
    repo_id: str | None = None,
    usage_code: str | None = None,
    extra_sections: dict[str, str] | None = None,
    num_parameters: int | None = None,
    preprocessing: dict | None = None,
    log_history: list[dict] | None = None,
    training_curves: str | None = None,
) -> ModelCard:
    """A model card for a model trained with hf-rlion, ready to ``save`` or :func:`push_folder_to_hub`.

    Args:
        model_name: the repository / model name shown as the card's title and in the model-index.
        task: the Hub task id, e.g. ``"image-classification"`` or ``"object-detection"`` (also the
            card's ``pipeline_tag``).
        dataset_name: the dataset's Hub id or a descriptive name (``"sklearn-digits"``, a local path
            is reduced to its last component).
        metrics: evaluation results, name -> finite number; an ``eval_`` prefix is dropped
            (``eval_accuracy`` is reported as metric type ``accuracy``). Each becomes one
            ``EvalResult`` of the model-index.
        optimizer: the optimizer's registry name (``rlion``, ``rlion_8bit``, ``adamw`` ...).
        optimizer_hyperparameters: what the optimizer was built with (lr, betas, alpha ...).
        training_hyperparameters: epochs, batch size, scheduler, seed ... (keys naming a token are
            dropped, ``hf_...`` token values are redacted).
        reproduce_command: the command line that reproduces the run (tokens redacted).
        dataset_config / dataset_split: the dataset configuration and evaluated split, if any.
        base_model: the Hub id of the checkpoint this model was fine-tuned from, if any (a local
            folder is named by its last component and not linked).
        tags: more tags; ``hf-rlion``, ``rlion``, the optimizer name and ``task`` are always added.
        license: the Hub's license id (``apache-2.0``, ``mit``, ``other`` ...), if known; e.g.
            ``--license`` or :func:`base_model_license`.
        repo_id: the Hub repository id, used in the "How to use" snippet (default: ``model_name``).
        usage_code: Python code for "How to use" (default: ``from_pretrained`` with the transformers
            Auto class for ``task``, e.g. ``AutoModelForImageClassification``).
        extra_sections: more Markdown sections, title -> body, appended in order.
        num_parameters: the model's parameter count (``model.num_parameters()``).
        preprocessing: the evaluation preprocessing, from :func:`image_preprocessing` (image
            size, crop, interpolation, normalisation), or a dict with its keys and ``resize``
            (a description).
        log_history: ``Trainer.state.log_history`` (or records with ``epoch``, ``step``,
            ``train_loss`` and ``eval_*`` values): one row per evaluation in "Training results".
        training_curves: the path, relative to the pushed folder, of a training-curves picture
            (``"training_curves.png"``), shown in the card; :func:`push_folder_to_hub` warns if
            the folder does not hold it.

    Every absolute local path in the card (output and data folders in the command line,
    hyperparameter values ...) is made relative or replaced (:func:`strip_local_paths`).

    Raises:
        ValueError: naming the argument, for an empty name/task/dataset/optimizer, a metric that
            is not a finite number, hyperparameters that are not a dict, or a ``training_curves``
            path that is absolute or leaves the folder.
    """
    # transformers passes some names as str-valued enums (training_args.optim is OptimizerNames):
    # use their values, so the card says "rlion", not "OptimizerNames.RLION".
    model_name, task, dataset_name, optimizer = (
        value.value if isinstance(value, enum.Enum) else value for value in (model_name, task, dataset_name, optimizer)
    )
    for argument, value in (("model_name", model_name), ("task", task), ("dataset_name", dataset_name), ("optimizer", optimizer)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{argument} must be a non-empty string, got {value!r}")
    model_name, task, dataset_name, optimizer = (str(v).strip() for v in (model_name, task, dataset_name, optimizer))
    clean_metrics = _clean_metrics(metrics)
    optimizer_hparams = _public_hyperparameters("optimizer_hyperparameters", optimizer_hyperparameters)
    training_hparams = _public_hyperparameters("training_hyperparameters", training_hyperparameters)
    if training_curves is not None:
        curves = Path(str(training_curves))
        if not str(training_curves).strip() or curves.is_absolute() or ".." in curves.parts:
            raise ValueError(f"training_curves must be a path relative to the pushed folder, got {training_curves!r}")
        training_curves = curves.as_posix()
    if num_parameters is not None and (isinstance(num_parameters, bool) or not isinstance(num_parameters, int) or num_parameters < 0):
        raise ValueError(f"num_parameters must be a count >= 0, got {num_parameters!r}")
    dataset_id = Path(dataset_name).name if _is_local_path(dataset_name) else dataset_name
    local_base_model = Path(base_model).name if base_model and _is_local_path(base_model) else None
    if local_base_model:
        base_model = None  # the card's base_model must be a Hub id

    card_data = ModelCardData(
        model_name=model_name,
        base_model=base_model,
        datasets=[dataset_id],
        tags=list(dict.fromkeys(["hf-rlion", "rlion", optimizer, task, *(tags or [])])),
        library_name="transformers",
        pipeline_tag=task,
        license=license,
        eval_results=[
            EvalResult(
                task_type=task, dataset_type=dataset_id, dataset_name=dataset_id, dataset_config=dataset_config,
                dataset_split=dataset_split, metric_type=name, metric_name=_METRIC_TITLES.get(name, name),
                metric_value=value,
            )  # fmt: skip
            for name, value in clean_metrics.items()
        ]
        or None,
        optimizer={"name": optimizer, "hyperparameters": optimizer_hparams},
        training_hyperparameters=training_hparams,
    )
    dataset_text = f"`{dataset_id}`" + (f" (config `{dataset_config}`)" if dataset_config else "")
    if base_model:
        origin = f"fine-tuned from [`{base_model}`](https://huggingface.co/{base_model})"
    else:
        origin = f"fine-tuned from a local checkpoint (`{local_base_model}`)" if local_base_model else "trained"
    sections = [
        f"# {model_name}",
        f"This model was {origin} for **{task}** on {dataset_text} with the **{optimizer}** optimizer"
        + (
            " from hf-rlion: RLion, "
            if _is_rlion(optimizer)
            else ", as a baseline run of hf-rlion's recipes, which train with RLion, "
        )
        + "the refined Lion optimizer of Rong et al., *A refined Lion optimizer for deep learning*, "
        "Scientific Reports 15 (2025), doi:10.1038/s41598-025-07112-4.",
    ]
    if clean_metrics:
        split = f" ({dataset_split} split)" if dataset_split else ""
        sections += [
            "## Evaluation results",
            f"On {dataset_text}{split}:",
            _markdown_table(("Metric", "Value"), ((_METRIC_TITLES.get(k, k), f"{v:.4f}") for k, v in clean_metrics.items())),
        ]
    sections += _training_sections(num_parameters, preprocessing, optimizer, optimizer_hparams, training_hparams,
                                   log_history, training_curves)  # fmt: skip
    sections += [
        "## How to use",
        f"```python\n{usage_code.strip() if usage_code else _default_usage_code(task, repo_id or model_name)}\n```",
        *_reproduce_section(redact_secrets(reproduce_command.strip())),
    ]
    for title, body in (extra_sections or {}).items():
        sections += [f"## {title}", body.strip()]
    sections += _closing_sections(license)
    content = f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"
    return ModelCard(strip_local_paths(content))


def _clean_metrics(metrics: Mapping) -> dict[str, float]:
    """``metrics`` with the ``eval_`` prefix dropped; ``ValueError`` for a value that is not a finite number."""
    if not isinstance(metrics, Mapping):
        raise ValueError(f"metrics must be a dict of metric name -> number, got {type(metrics).__name__}")
    clean: dict[str, float] = {}
    for key, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"metrics[{key!r}] must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ValueError(f"metrics[{key!r}] must be finite, got {number}")
        clean[str(key).removeprefix("eval_")] = number
    return clean


def _training_sections(num_parameters, preprocessing, optimizer, optimizer_hparams, training_hparams,
                       log_history, training_curves) -> list[str]:  # fmt: skip
    """The card's "Model details", "Optimizer", "Training hyperparameters" and "Training results"."""
    sections, details = [], []
    if num_parameters is not None:
        details.append(f"- **Parameters:** {num_parameters / 1e6:.2f} M ({num_parameters:,})")
    details += _preprocessing_lines(preprocessing or {})
    if details:
        sections += ["## Model details", "\n".join(details)]
    sections += [
        "## Optimizer",
        f"`{optimizer}` with:" if optimizer_hparams else f"`{optimizer}` with its defaults.",
    ]
    if optimizer_hparams:
        sections.append(_markdown_table(("Hyperparameter", "Value"), optimizer_hparams.items()))
    if training_hparams:
        sections += ["## Training hyperparameters", _markdown_table(("Hyperparameter", "Value"), training_hparams.items())]
    header, rows = _results_per_epoch(log_history or [])
    if rows or training_curves:
        sections.append("## Training results")
    if rows:
        sections.append(_markdown_grid(header, rows))
    if training_curves:
        sections.append(f"![Training curves]({training_curves})")
    return sections


def _closing_sections(license: str | None) -> list[str]:
    """The card's "License", "Framework versions" and "Citation" (the RLion paper's BibTeX)."""
    sections = [
        "## License",
        f"This model is released under the `{license}` license." if license else "No license was given for this model.",
    ]
    versions = _framework_versions()
    if versions:
        sections += ["## Framework versions", "\n".join(f"- {name} {version}" for name, version in versions)]
    return sections + [
        "## Citation",
        "RLion, the optimizer this model was trained with or compared against:",
        f"```bibtex\n{RLION_BIBTEX}\n```",
    ]


def _preprocessing_lines(preprocessing: Mapping) -> list[str]:
    """Markdown bullets for :func:`image_preprocessing`'s keys (others as ``key: value``)."""
    values = dict(_public_hyperparameters("preprocessing", preprocessing))
    lines = []
    size = values.pop("image_size", None)
    if size:
        lines.append(f"- **Image size:** {' x '.join(str(v) for v in size) if isinstance(size, list) else size}")
    if "resize_shortest_edge" in values:
        lines.append(f"- **Resize:** shorter side to {values.pop('resize_shortest_edge')}")
    if "resize" in values:
        lines.append(f"- **Resize:** {values.pop('resize')}")
    if "crop_mode" in values or "crop_pct" in values:
        crop = values.pop("crop_mode", "center")
        lines.append(f"- **Crop:** {crop}" + (f", crop_pct {values.pop('crop_pct')}" if "crop_pct" in values else ""))
    if "interpolation" in values:
        lines.append(f"- **Interpolation:** {values.pop('interpolation')}")
    if "mean" in values or "std" in values:
        lines.append(f"- **Normalisation:** mean {values.pop('mean', None)}, std {values.pop('std', None)}")
    lines += [f"- **{key}:** {value}" for key, value in values.items()]
    return lines


def files_containing(folder: str | Path, secret: str, relative_paths: Iterable[str]) -> list[str]:
    """Those of ``relative_paths`` (under ``folder``) whose bytes contain ``secret``, read in 1 MiB chunks."""
    needle = secret.encode()
    if not needle:
        return []
    chunk_size, overlap = 1 << 20, len(needle) - 1
    found = []
    for relative in relative_paths:
        with open(Path(folder) / relative, "rb") as file:
            tail = b""
            while chunk := file.read(chunk_size):
                if needle in tail + chunk:
                    found.append(relative)
                    break
                tail = chunk[-overlap:] if overlap else b""
    return found


def _files_to_upload(folder: Path, ignore_patterns: list[str]) -> list[str]:
    """The relative paths upload_folder would send (same filter, same default ignores)."""
    relative = [p.relative_to(folder).as_posix() for p in sorted(folder.glob("**/*")) if p.is_file()]
    return list(filter_repo_objects(relative, ignore_patterns=ignore_patterns + list(_HUB_IGNORE_PATTERNS)))


_MARKDOWN_PICTURE = re.compile(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)")


def _card_pictures(text: str) -> list[str]:
    """The local pictures a card shows (``![...](training_curves.png)``), as paths relative to its folder."""
    paths = []
    for target in _MARKDOWN_PICTURE.findall(text):
        if "://" in target or target.startswith(("data:", "#", "/")):
            continue
        paths.append(Path(target).as_posix())
    return list(dict.fromkeys(paths))


def _retry_hint(folder: Path, repo_id: str) -> str:
    return (
        f"The local output is intact in {folder}. Retry the push with:\n"
        f"    python -m hf_rlion.hub push {shlex.quote(str(folder))} {shlex.quote(repo_id)}\n"
        "(the token comes from HF_TOKEN or `hf auth login`)."
    )


def push_folder_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    card: ModelCard | None = None,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload model trained with RLion (hf-rlion)",
    ignore_patterns: Iterable[str] = DEFAULT_IGNORE_PATTERNS,
    endpoint: str | None = None,
) -> str:
    """Push a saved model folder to the Hub repository ``repo_id`` in one commit; return the repo URL.

    Order (so that a failure never loses anything): the card is first written to
    ``folder/README.md``; then the token is checked (``whoami``), the repository created if
    missing (``exist_ok=True``), and the folder uploaded with ``ignore_patterns`` left out.

    Files that contain the token are never uploaded: they are left out with a warning naming
    them. (transformers' ``training_args.bin`` is a pickle of ``TrainingArguments`` and holds
    ``--hub_token`` in clear text; pass the token through ``HF_TOKEN`` instead.)

    Args:
        folder: the local output folder (``save_pretrained`` output, results, card ...).
        repo_id: ``"namespace/name"``, or ``"name"`` for the token owner's namespace.
        card: a card from :func:`build_model_card`; ``None`` pushes the folder's README.md as is.
        token: a Hub token with write access; ``None`` uses ``HF_TOKEN`` or the saved login.
        private: visibility of a newly created repository (``None``: the Hub's default).
        ignore_patterns: glob patterns of files not to upload (default: checkpoints, caches).
        endpoint: the Hub URL; ``None`` uses ``HF_ENDPOINT`` (read when huggingface_hub is
            imported) or https://huggingface.co.

    Raises:
        ValueError: ``repo_id`` is not ``name`` or ``namespace/name``.
        FileNotFoundError: ``folder`` is not a directory.
        HubPushError: no token, a rejected token, or any Hub/network error; the message says
            what failed and how to retry, and never contains the token.
    """
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"folder {str(folder)!r} to push does not exist or is not a directory")
    if not isinstance(repo_id, str) or not re.fullmatch(r"([\w.-]+/)?[\w.-]+", repo_id) or ".." in repo_id:
        raise ValueError(f"repo_id must be 'name' or 'namespace/name' (letters, digits, '-', '_', '.'), got {repo_id!r}")
    if card is not None:
        card.save(folder / "README.md")
    elif not (folder / "README.md").is_file():
        warnings.warn(f"{folder} has no README.md: the repository will have no model card", stacklevel=2)
    ignore_patterns = [ignore_patterns] if isinstance(ignore_patterns, str) else list(ignore_patterns)
    uploads = _files_to_upload(folder, ignore_patterns)
    if (folder / "README.md").is_file():
        missing = [p for p in _card_pictures((folder / "README.md").read_text(encoding="utf-8")) if p not in uploads]
        if missing:
            warnings.warn(
                f"the model card shows {', '.join(missing)}, which {folder} does not hold (or ignore_patterns "
                "leave out): the picture will be missing on the Hub",
                stacklevel=2,
            )

    token = token if token is not None else get_token()
    if not token:
        raise HubPushError(
            f"Cannot push {folder} to {repo_id!r}: no Hugging Face token. Set HF_TOKEN, run "
            "`hf auth login`, or pass token=... (a token with write access). " + _retry_hint(folder, repo_id)
        )
    leaking = files_containing(folder, token, uploads)
    if leaking:
        warnings.warn(
            f"Not pushing {', '.join(leaking)} from {folder}: the file contains your Hub token "
            "(transformers' training_args.bin stores --hub_token; pass the token via HF_TOKEN instead).",
            stacklevel=2,
        )
        ignore_patterns += [glob.escape(path) for path in leaking]
    api = HfApi(endpoint=endpoint, token=token)
    try:
        try:
            user = api.whoami()
        except HfHubHTTPError as err:
            status = getattr(err.response, "status_code", None)
            if status == 401:
                raise HubPushError(
                    f"Cannot push {folder} to {repo_id!r}: the token was rejected by {api.endpoint} "
                    "(401 Unauthorized: invalid or expired). Create a token with write access at "
                    "https://huggingface.co/settings/tokens. " + _retry_hint(folder, repo_id)
                ) from None
            raise
        if "/" not in repo_id:
            repo_id = f"{user['name']}/{repo_id}"
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            repo_id=repo_url.repo_id,
            folder_path=folder,
            commit_message=commit_message,
            ignore_patterns=ignore_patterns,
            repo_type="model",
        )
    except HubPushError:
        raise
    except OfflineModeIsEnabled:
        raise HubPushError(
            f"Cannot push {folder} to {repo_id!r}: HF_HUB_OFFLINE is set. Unset it. " + _retry_hint(folder, repo_id)
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as err:
        reason = redact_secrets(str(err)).replace(token, _REDACTED)
        raise HubPushError(
            f"Cannot push {folder} to {repo_id!r} at {api.endpoint}: {type(err).__name__}: {reason}\n"
            + _retry_hint(folder, repo_id)
        ) from None
    except Exception as err:  # httpx transport errors and the like: same message, same retry hint
        if not type(err).__module__.startswith(("httpx", "httpcore", "requests", "urllib3")):
            raise
        reason = redact_secrets(str(err)).replace(token, _REDACTED)
        raise HubPushError(
            f"Cannot push {folder} to {repo_id!r} at {api.endpoint}: {type(err).__name__}: {reason}\n"
            + _retry_hint(folder, repo_id)
        ) from None
    return str(repo_url)


def main(argv: list[str] | None = None) -> int:
    """``python -m hf_rlion.hub push FOLDER REPO_ID``: (re)push a saved output folder and its README.md."""
    parser = argparse.ArgumentParser(prog="python -m hf_rlion.hub", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    push = commands.add_parser("push", help="push FOLDER (with its README.md model card) to REPO_ID")
    push.add_argument("folder")
    push.add_argument("repo_id")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--commit_message", default="Upload model trained with RLion (hf-rlion)")
    args = parser.parse_args(argv)
    try:
        url = push_folder_to_hub(args.folder, args.repo_id, private=args.private or None, commit_message=args.commit_message)
    except (HubPushError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"Pushed {args.folder} to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
