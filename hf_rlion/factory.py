"""``create_optimizer``: build any registered optimizer for a model, grouped as Trainer groups it."""

from __future__ import annotations

import re
from typing import Any, Optional

import torch
from torch import nn

from .registry import get_spec, optimizer_kwargs

# transformers' Trainer.get_decay_parameter_names: no decay for LayerNorm modules and for
# parameters whose name matches these patterns.
_NO_DECAY_NAME_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")
_NO_DECAY_MODULE_TYPES: tuple[type, ...] = (nn.LayerNorm,)


def decay_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters that get weight decay, by Trainer's rule.

    Excluded: parameters owned directly by an ``nn.LayerNorm`` and parameters whose full name
    matches ``bias``, ``layernorm``, ``rmsnorm``, ``norm`` (a whole dotted component) or
    ``*_norm``. Same result as ``Trainer.get_decay_parameter_names``.
    """
    patterns = [re.compile(p) for p in _NO_DECAY_NAME_PATTERNS]
    names = []
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if isinstance(module, _NO_DECAY_MODULE_TYPES):
                continue
            if any(p.search(full.lower()) for p in patterns):
                continue
            names.append(full)
    return names


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups, as Trainer builds them: decayed weights and the rest (decay 0). Frozen params are left out."""
    decay = set(decay_parameter_names(model))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def create_optimizer(
    model: nn.Module,
    name: str = "rlion",
    lr: Optional[float] = None,
    weight_decay: float = 0.0,
    **optimizer_options: Any,
) -> torch.optim.Optimizer:
    """Build the optimizer ``name`` for ``model``.

    Args:
        model: the module to train; parameters with ``requires_grad=False`` are left out.
        name: a registered name (``rlion``, ``rlion_8bit``, ``paged_rlion_8bit``, ``adamw``,
            ``lion``, ``sgd``); ``hf_rlion.registry.OPTIMIZERS`` lists them.
        lr: learning rate; default: the optimizer's registered default.
        weight_decay: applied to weights only: biases and norm weights get 0, as in Trainer.
        **optimizer_options: the optimizer's own options (``alpha``, ``bias_correction``,
            ``beta1``/``beta2``, ...). Unknown ones raise ``ValueError`` listing the valid keys.

    Example::

        opt = hf_rlion.create_optimizer(model, "rlion", lr=1e-4, weight_decay=0.1, alpha=3.0)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"create_optimizer needs an nn.Module, got {type(model).__name__}")
    spec = get_spec(name)
    kwargs = optimizer_kwargs(name, optimizer_options)
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    groups = parameter_groups(model, float(weight_decay))
    if not groups:
        raise ValueError("create_optimizer: the model has no trainable parameters (all requires_grad=False)")
    cls = spec.load_class()
    if name in ("rlion_8bit", "paged_rlion_8bit"):
        from .rlion8bit import keep_embeddings_in_32bit

        keep_embeddings_in_32bit(model)
    return cls(groups, lr=spec.default_lr if lr is None else lr, **spec.fixed_kwargs, **kwargs)
