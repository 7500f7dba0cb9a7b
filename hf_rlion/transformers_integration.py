"""Teach transformers' ``TrainingArguments`` / ``Trainer`` the names ``rlion``, ``rlion_8bit``, ``paged_rlion_8bit``.

transformers has no public extension point for optimizer names, so two things are patched
(1., 2.), and two more (3., and 4. from :mod:`hf_rlion.checkpoints`) make Trainer's resume load
every optimizer file and model weight or fail; all idempotently, and checked by the tests
against the oldest and newest supported transformers:

1. ``transformers.training_args.OptimizerNames`` (the enum behind ``--optim``) gains the
   three members, so ``TrainingArguments(optim="rlion")`` validates and
   ``HfArgumentParser(TrainingArguments)`` lists them as choices;
2. ``Trainer.get_optimizer_cls_and_kwargs`` (the static method every Trainer version since
   4.x calls to turn ``args.optim`` into a class) answers for these names and defers to the
   original for all others;
3. ``Trainer._load_optimizer_and_scheduler`` (the resume step that ``torch.load``\ s
   ``optimizer.pt`` and ``scheduler.pt``): a file that cannot be read raises a ``RuntimeError``
   that names the checkpoint and the file (torch's own message for a truncated file names
   neither); a ``ValueError`` (a state the optimizer rejects) names the checkpoint too.
4. ``Trainer._load_from_checkpoint`` / ``_load_best_model`` load the model weights with
   :func:`hf_rlion.checkpoints.load_model_weights`: the checkpoint's keys converted back to the
   model's own (transformers>=5 saves ViT and other models with renamed keys, which Trainer
   5.x loads as "missing" and trains on from the initialisation), and an error instead of a
   log line when keys are missing or unexpected.

``import hf_rlion`` does not import transformers (that takes seconds): it installs an import
hook that applies each patch right after transformers loads the module it concerns, or at
once if that module is already loaded.

Where RLion's hyperparameters come from under Trainer:
  - ``lr`` ← ``--learning_rate``; ``weight_decay`` ← ``--weight_decay`` (Trainer's grouping:
    none on biases and norm weights);
  - ``betas`` ← ``--optim_args beta1=…,beta2=…``, default Lion's ``(0.9, 0.99)``.
    ``--adam_beta1/--adam_beta2`` are Adam's (Trainer defaults β2 to 0.999, which is not
    Lion's) and are ignored for RLion, with a warning when they differ from Trainer's defaults;
  - everything else (``alpha``, ``alpha_scaling``, ``bias_correction``, ``min_8bit_size``, …)
    ← ``--optim_args``; an unknown key is an error listing the valid ones.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from typing import Any

from ._import_hook import PatchAfterImport
from .registry import TRANSFORMERS_OPTIMIZER_NAMES, get_spec, optimizer_kwargs, parse_optim_args

logger = logging.getLogger(__name__)

SUPPORTED_TRANSFORMERS = ">=4.46,<6"
_PATCH_MARK = "_hf_rlion_original"
_TRAINER_DEFAULT_ADAM_BETAS = (0.9, 0.999)


def _member_name(value: str) -> str:
    return value.upper()


def extend_optimizer_names(optimizer_names_enum: type) -> None:
    """Add the hf_rlion names to transformers' ``OptimizerNames`` enum (idempotent)."""
    for value in TRANSFORMERS_OPTIMIZER_NAMES:
        if value in optimizer_names_enum._value2member_map_:
            continue
        member = str.__new__(optimizer_names_enum, value)
        member._name_ = _member_name(value)
        member._value_ = value
        member.__objclass__ = optimizer_names_enum
        member.__init__(value)
        optimizer_names_enum._value2member_map_[value] = member
        optimizer_names_enum._member_map_[member._name_] = member
        optimizer_names_enum._member_names_.append(member._name_)
        type.__setattr__(optimizer_names_enum, member._name_, member)


def optimizer_cls_and_kwargs(args: Any, model: Any = None) -> tuple[type, dict[str, Any]]:
    """``(optimizer class, kwargs)`` for ``args.optim`` in ``TRANSFORMERS_OPTIMIZER_NAMES``."""
    name = getattr(args.optim, "value", args.optim)
    options = parse_optim_args(args.optim_args)
    try:
        kwargs = optimizer_kwargs(name, options)
    except ValueError as err:
        raise ValueError(f"--optim {name} --optim_args: {err}") from None
    if (args.adam_beta1, args.adam_beta2) != _TRAINER_DEFAULT_ADAM_BETAS:
        warnings.warn(
            f"--optim {name}: --adam_beta1/--adam_beta2 are Adam's and are ignored; set RLion's betas with "
            f"--optim_args beta1=...,beta2=... (now {kwargs.get('betas', (0.9, 0.99))})",
            stacklevel=2,
        )
    kwargs["lr"] = args.learning_rate
    cls = get_spec(name).load_class()
    if model is not None and name in ("rlion_8bit", "paged_rlion_8bit"):
        from .rlion8bit import keep_embeddings_in_32bit

        keep_embeddings_in_32bit(model)
    return cls, kwargs


def patch_trainer(trainer_cls: type) -> None:
    """Wrap ``trainer_cls.get_optimizer_cls_and_kwargs`` so it answers for hf_rlion's names, and
    ``trainer_cls._load_optimizer_and_scheduler`` so a failed resume names its file (idempotent)."""
    _patch_optimizer_choice(trainer_cls)
    _patch_optimizer_loading(trainer_cls)


#: The files ``Trainer._load_optimizer_and_scheduler`` reads with ``torch.load`` (transformers' names).
_RESUME_FILES = ("optimizer.pt", "scheduler.pt")


def _unreadable_resume_file(checkpoint: str) -> str | None:
    """The first of ``_RESUME_FILES`` in ``checkpoint`` that ``torch.load`` cannot read, or ``None``."""
    import torch

    for name in _RESUME_FILES:
        path = os.path.join(checkpoint, name)
        if not os.path.isfile(path):
            continue
        try:  # mmap: reads the archive's index, not the tensors
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:
            return path
    return None


def _patch_optimizer_loading(trainer_cls: type) -> None:
    """On a failed ``_load_optimizer_and_scheduler``: a file that cannot be read becomes a
    ``RuntimeError`` naming it; a ``ValueError`` (the optimizer's ``load_state_dict`` rejecting
    the state) stays a ``ValueError``, with the checkpoint added to its message; anything else
    is raised as it was."""
    original = trainer_cls.__dict__.get("_load_optimizer_and_scheduler")
    if original is None or hasattr(original, _PATCH_MARK):
        return

    @functools.wraps(original)
    def _load_optimizer_and_scheduler(self, checkpoint, *args, **kwargs):
        try:
            return original(self, checkpoint, *args, **kwargs)
        except Exception as err:
            if not isinstance(checkpoint, (str, os.PathLike)):
                raise
            checkpoint = os.fspath(checkpoint)
            path = _unreadable_resume_file(checkpoint)
            if path is not None:
                raise RuntimeError(
                    f"resuming from checkpoint {checkpoint}: {path} cannot be read (truncated or corrupted?); "
                    f"{type(err).__name__}: {err}"
                ) from err
            if type(err) is ValueError:
                raise ValueError(f"resuming from checkpoint {checkpoint}: {err}") from err
            raise

    setattr(_load_optimizer_and_scheduler, _PATCH_MARK, original)
    trainer_cls._load_optimizer_and_scheduler = _load_optimizer_and_scheduler


def _patch_optimizer_choice(trainer_cls: type) -> None:
    current = trainer_cls.__dict__.get("get_optimizer_cls_and_kwargs")
    original = current.__func__ if isinstance(current, staticmethod) else current
    if original is None or hasattr(original, _PATCH_MARK):
        return

    def get_optimizer_cls_and_kwargs(args, model=None):
        if getattr(args.optim, "value", args.optim) in TRANSFORMERS_OPTIMIZER_NAMES:
            return optimizer_cls_and_kwargs(args, model)
        return original(args, model) if model is not None else original(args)

    setattr(get_optimizer_cls_and_kwargs, _PATCH_MARK, original)
    get_optimizer_cls_and_kwargs.__doc__ = original.__doc__
    trainer_cls.get_optimizer_cls_and_kwargs = staticmethod(get_optimizer_cls_and_kwargs)


def _patch_module(module_name: str, module: Any) -> None:
    if module_name == "transformers.training_args":
        extend_optimizer_names(module.OptimizerNames)
    elif module_name == "transformers.trainer":
        from .checkpoints import patch_trainer_checkpoint_loading

        patch_trainer(module.Trainer)
        patch_trainer_checkpoint_loading(module.Trainer)


_TARGETS = ("transformers.training_args", "transformers.trainer")


_hook = PatchAfterImport(_TARGETS, _patch_module)


def register_with_transformers() -> None:
    """Make ``--optim rlion|rlion_8bit|paged_rlion_8bit`` work in transformers (idempotent).

    Called by ``import hf_rlion``. Safe to call again, and when transformers is not installed.
    """
    _hook.install()


def is_registered() -> bool:
    """Whether the loaded transformers modules know hf_rlion's names."""
    training_args = sys.modules.get("transformers.training_args")
    trainer = sys.modules.get("transformers.trainer")
    ok = _hook.installed()
    if training_args is not None:
        ok &= all(n in training_args.OptimizerNames._value2member_map_ for n in TRANSFORMERS_OPTIMIZER_NAMES)
    if trainer is not None:
        from .checkpoints import is_patched

        ok &= hasattr(trainer.Trainer.get_optimizer_cls_and_kwargs, _PATCH_MARK) and is_patched(trainer.Trainer)
        loading = getattr(trainer.Trainer, "_load_optimizer_and_scheduler", None)
        ok &= loading is None or hasattr(loading, _PATCH_MARK)
    return ok
