"""Load a checkpoint's model weights back into the model that wrote them: all of them, or an error.

Since transformers 5, ``save_pretrained`` writes weights in the Hub layout: it reverts the
model's weight conversion mapping (``revert_weight_conversion``), which renames and, for some
architectures (fused MoE experts, fused qkv), splits or merges the model's tensors. ViT is one
of them: its ``vit.layers.0.attention.q_proj.weight`` is saved as
``vit.encoder.layer.0.attention.attention.query.weight``. ``from_pretrained`` applies the
mapping forward again, but ``Trainer._load_from_checkpoint`` and ``Trainer._load_best_model``
(transformers 5.24) pass the file to ``model.load_state_dict(..., strict=False)`` unconverted:
every renamed weight is "missing", Trainer only logs that, and training goes on from the
fresh initialisation (huggingface/transformers#43701, #48805).

:func:`load_model_weights` reads ``model.safetensors`` / ``pytorch_model.bin`` (or their
sharded index), applies forward exactly the conversions ``save_pretrained`` reverted for this
model, checks the keys, and copies the tensors in with ``load_state_dict`` (parameters keep
their identity, device and dtype). A model key absent from the checkpoint, other than a tied
alias of a loaded tensor or one of ``model._keys_to_ignore_on_save``, or a checkpoint key the
model does not have, raises :class:`CheckpointMismatchError` before anything is copied. On
transformers 4.x no model has a conversion mapping: the load is the plain one, made strict.

:func:`patch_trainer_checkpoint_loading` makes ``Trainer`` resume (and load its best model)
this way; ``import hf_rlion`` applies it (see ``transformers_integration``).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any, Optional

import torch

_PATCH_MARK = "_hf_rlion_original"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "pytorch_model.bin"
WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
_SHOWN_KEYS = 5

# Trainer's own logger, so the resume messages read as before.
trainer_logger = logging.getLogger("transformers.trainer")


class CheckpointMismatchError(RuntimeError):
    """The checkpoint's model weights do not cover the model, or hold weights the model does not have."""


def weight_files(checkpoint_dir: str | os.PathLike) -> Optional[list[str]]:
    """The model weight files of a ``save_pretrained`` folder, in Trainer's order of preference, or None.

    ``model.safetensors``, else ``pytorch_model.bin``, else the shards listed by
    ``model.safetensors.index.json``, else by ``pytorch_model.bin.index.json``.
    """
    directory = os.fspath(checkpoint_dir)
    for name in (SAFE_WEIGHTS_NAME, WEIGHTS_NAME):
        if os.path.isfile(os.path.join(directory, name)):
            return [os.path.join(directory, name)]
    for name in (SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME):
        index = os.path.join(directory, name)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(directory, shard) for shard in shards]
    return None


def read_weights(files: list[str]) -> dict[str, torch.Tensor]:
    """All tensors of ``files`` (safetensors, or torch pickles loaded with ``weights_only``) on the CPU."""
    from safetensors.torch import load_file

    state_dict: dict[str, torch.Tensor] = {}
    for path in files:
        if path.endswith(".safetensors"):
            state_dict.update(load_file(path, device="cpu"))
        else:
            state_dict.update(torch.load(path, map_location="cpu", weights_only=True))
    return state_dict


def saved_weight_conversions(model: Any) -> list:
    """The weight transforms ``save_pretrained`` reverts for ``model`` (transformers>=5), else ``[]``.

    The same rule as ``transformers.core_model_loading.revert_weight_conversion``: the
    transforms ``from_pretrained`` used (``model._weight_conversions``), or for a model built
    another way its registered mapping without legacy renames and without ``PrefixChange``.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange
        from transformers.modeling_utils import PreTrainedModel
    except ImportError:  # transformers 4.x: checkpoints hold the model's own keys
        return []
    if not isinstance(model, PreTrainedModel):
        return []
    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:
        conversions = [t for t in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(t, PrefixChange)]
    return copy.deepcopy(list(conversions))


def to_model_layout(model: Any, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` as written by ``model.save_pretrained``, with ``model``'s own keys and tensor layout.

    Applies :func:`saved_weight_conversions` forward, as ``from_pretrained`` does: per key all
    renamings, then at most one converter; a converter's tensors are collected (in natural
    key order, so experts stack in order) and converted together. A key that a rename would
    move off a model key it already names keeps its name (``from_pretrained``'s rule too).
    """
    conversions = saved_weight_conversions(model)
    if not conversions:
        return state_dict
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    renamings = [t for t in conversions if isinstance(t, WeightRenaming)]
    converters = [t for t in conversions if isinstance(t, WeightConverter)]
    converter_of_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    model_keys = set(model.state_dict())
    converted: dict[str, torch.Tensor] = {}
    pending: dict[str, Any] = {}  # first target key -> its converter, collecting its source tensors
    for key, tensor in sorted(state_dict.items(), key=lambda item: dot_natural_key(item[0])):
        new_key, pattern = rename_source_key(key, renamings, converters)
        if new_key not in model_keys and key in model_keys:
            new_key, pattern = key, None
        if pattern is None:
            converted[new_key] = tensor
        else:
            converter = pending.setdefault(new_key, copy.deepcopy(converter_of_pattern[pattern]))
            converter.add_tensor(new_key, key, pattern, tensor)
    for first_key, converter in pending.items():
        for name, value in converter.convert(first_key, model=model, config=model.config).items():
            converted[name] = value[0] if isinstance(value, list) else value
    return converted


def _storage_key(tensor: torch.Tensor) -> tuple:
    return (tensor.device, tensor.untyped_storage().data_ptr())


def key_mismatch(model: Any, state_dict: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """``(missing, unexpected)`` keys of ``state_dict`` against ``model.state_dict()``.

    Not missing: a tied alias (a model tensor sharing storage with one the state dict
    provides: ``save_pretrained`` drops those) and ``model._keys_to_ignore_on_save``.
    """
    model_state = model.state_dict()
    provided = [k for k in state_dict if k in model_state]
    loaded_storages = {_storage_key(model_state[k]) for k in provided}
    not_saved = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    missing = [
        k
        for k, tensor in model_state.items()
        if k not in state_dict and k not in not_saved and _storage_key(tensor) not in loaded_storages
    ]
    unexpected = [k for k in state_dict if k not in model_state]
    return missing, unexpected


def _examples(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > _SHOWN_KEYS else "")


def load_model_weights(model: Any, checkpoint_dir: str | os.PathLike) -> None:
    """Load ``checkpoint_dir``'s model weights into ``model`` in place; raise if they do not match it.

    Raises ``FileNotFoundError`` without weight files and :class:`CheckpointMismatchError`
    (naming the checkpoint and a few keys) when keys are missing or unexpected after the
    conversion; a shape mismatch raises ``load_state_dict``'s ``RuntimeError``.
    """
    files = weight_files(checkpoint_dir)
    if files is None:
        raise FileNotFoundError(f"no model weights ({SAFE_WEIGHTS_NAME}, {WEIGHTS_NAME} or an index) in {checkpoint_dir}")
    state_dict = to_model_layout(model, read_weights(files))
    missing, unexpected = key_mismatch(model, state_dict)
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"{len(missing)} model weights are not in it ({_examples(missing)})")
        if unexpected:
            problems.append(f"it holds {len(unexpected)} weights the model does not have ({_examples(unexpected)})")
        raise CheckpointMismatchError(
            f"checkpoint {os.fspath(checkpoint_dir)} does not match the {type(model).__name__} being trained: "
            + "; ".join(problems)
            + ". Refusing to go on from partly loaded weights; resume with the model and transformers "
            "version that wrote the checkpoint."
        )
    model.load_state_dict(state_dict, strict=False)


def _handles(trainer: Any, model: Any, checkpoint_dir: Optional[str]) -> bool:
    """Whether the checkpoint is a plain ``save_pretrained`` folder for a plain model (else Trainer's own code loads it)."""
    from transformers.utils import is_sagemaker_mp_enabled

    return (
        checkpoint_dir is not None
        and weight_files(checkpoint_dir) is not None
        and not hasattr(model, "peft_config")
        and not is_sagemaker_mp_enabled()
        and not getattr(trainer, "is_fsdp_enabled", False)
        and not getattr(trainer, "is_deepspeed_enabled", False)
    )


def patch_trainer_checkpoint_loading(trainer_cls: type) -> None:
    """Make ``trainer_cls`` load resume and best-model checkpoints with :func:`load_model_weights` (idempotent).

    Wraps ``_load_from_checkpoint`` and ``_load_best_model``; FSDP, DeepSpeed, SageMaker MP and
    PEFT adapter checkpoints still go to Trainer's own code.
    """
    load_from_checkpoint = trainer_cls.__dict__.get("_load_from_checkpoint")
    if load_from_checkpoint is not None and not hasattr(load_from_checkpoint, _PATCH_MARK):

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            target = self.model if model is None else model
            if not _handles(self, target, resume_from_checkpoint):
                return load_from_checkpoint(self, resume_from_checkpoint, model)
            trainer_logger.info(f"Loading model from {resume_from_checkpoint}.")
            load_model_weights(target, resume_from_checkpoint)

        setattr(_load_from_checkpoint, _PATCH_MARK, load_from_checkpoint)
        _load_from_checkpoint.__doc__ = load_from_checkpoint.__doc__
        trainer_cls._load_from_checkpoint = _load_from_checkpoint

    load_best_model = trainer_cls.__dict__.get("_load_best_model")
    if load_best_model is not None and not hasattr(load_best_model, _PATCH_MARK):

        def _load_best_model(self):
            best = self.state.best_model_checkpoint
            if not _handles(self, self.model, best):
                return load_best_model(self)
            trainer_logger.info(f"Loading best model from {best} (score: {self.state.best_metric}).")
            load_model_weights(self.model, best)

        setattr(_load_best_model, _PATCH_MARK, load_best_model)
        _load_best_model.__doc__ = load_best_model.__doc__
        trainer_cls._load_best_model = _load_best_model


def is_patched(trainer_cls: type) -> bool:
    """Whether ``trainer_cls`` loads checkpoints through :func:`load_model_weights`."""
    return all(
        hasattr(getattr(trainer_cls, name, None), _PATCH_MARK) for name in ("_load_from_checkpoint", "_load_best_model")
    )
