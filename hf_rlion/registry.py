"""One registry of optimizer names: what each name builds and which keyword arguments it takes.

Used by :func:`hf_rlion.create_optimizer`, by the transformers registration (``--optim``),
by the timm registration (``--opt``) and by the recipes, so a name means the same thing everywhere.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

# The names hf_rlion adds to transformers' ``--optim``.
TRANSFORMERS_OPTIMIZER_NAMES = ("rlion", "rlion_8bit", "paged_rlion_8bit")

# The names hf_rlion adds to timm's optimizer factory (``--opt``), each mapped to its name here.
# timm reads ``a_b`` as optimizer ``b`` with modifier ``a`` (``lookahead_rlion``), so no underscores.
TIMM_OPTIMIZER_NAMES = {"rlion": "rlion", "rlion8bit": "rlion_8bit"}

_RLION_KEYS = ("alpha", "alpha_scaling", "bias_correction", "beta1", "beta2", "maximize", "foreach", "fused")
_RLION_8BIT_KEYS = (
    "alpha",
    "alpha_scaling",
    "bias_correction",
    "beta1",
    "beta2",
    "maximize",
    "min_8bit_size",
    "optim_bits",
    "foreach",
    "fused",
)


@dataclass(frozen=True)
class OptimizerSpec:
    """How to build one named optimizer."""

    name: str
    target: str  # "module:attribute" of the class
    optim_arg_keys: tuple[str, ...]  # keys accepted in --optim_args / **kwargs besides lr, weight_decay
    default_lr: float
    install_hint: str = ""
    fixed_kwargs: dict = field(default_factory=dict)

    def load_class(self) -> Callable[..., Any]:
        module_name, attr = self.target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            hint = f" Install it with: {self.install_hint}" if self.install_hint else ""
            raise ImportError(f"optimizer {self.name!r} needs {module_name.split('.')[0]!r}.{hint}") from err
        return getattr(module, attr)


OPTIMIZERS: dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in (
        OptimizerSpec("rlion", "hf_rlion.rlion:RLion", _RLION_KEYS, default_lr=1e-3),
        OptimizerSpec(
            "rlion_8bit",
            "hf_rlion.rlion8bit:RLion8bit",
            _RLION_8BIT_KEYS,
            default_lr=1e-3,
            install_hint="pip install 'hf-rlion[8bit]'",
        ),
        OptimizerSpec(
            "paged_rlion_8bit",
            "hf_rlion.rlion8bit:PagedRLion8bit",
            _RLION_8BIT_KEYS,
            default_lr=1e-3,
            install_hint="pip install 'hf-rlion[8bit]'",
        ),
        OptimizerSpec("adamw", "torch.optim:AdamW", ("beta1", "beta2", "eps", "foreach", "fused"), default_lr=1e-3),
        OptimizerSpec(
            "lion",
            "lion_pytorch:Lion",
            ("beta1", "beta2"),
            default_lr=1e-4,
            install_hint="pip install 'hf-rlion[recipes]'",
        ),
        OptimizerSpec("sgd", "torch.optim:SGD", ("momentum", "nesterov", "dampening"), default_lr=1e-2),
    )
}


def get_spec(name: str) -> OptimizerSpec:
    """The spec for ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        return OPTIMIZERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZERS)}") from None


def optimizer_kwargs(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Turn user options (``beta1``/``beta2`` and the spec's keys) into constructor kwargs.

    Unknown keys raise ``ValueError`` listing the valid ones; nothing is silently dropped.
    """
    spec = get_spec(name)
    unknown = sorted(set(options) - set(spec.optim_arg_keys))
    if unknown:
        raise ValueError(
            f"unknown argument(s) {unknown} for optimizer {name!r}; valid: {', '.join(spec.optim_arg_keys)}"
        )
    kwargs = dict(options)
    if "beta1" in kwargs or "beta2" in kwargs:
        default_betas = (0.9, 0.999) if name == "adamw" else (0.9, 0.99)
        kwargs["betas"] = (kwargs.pop("beta1", default_betas[0]), kwargs.pop("beta2", default_betas[1]))
    return kwargs


def parse_optim_args(text: str | None) -> dict[str, Any]:
    """Parse ``"alpha=3,bias_correction=true,alpha_scaling=fixed"`` into typed values.

    Whitespace around items, keys and values is ignored (``"alpha = 3, beta1=0.9"``); inside a
    value it is kept (``"a=x y"`` gives ``"x y"``, which the optimizer then rejects by name).
    ``true``/``false`` become bools, numbers become int/float (``1e-3`` included), the rest
    stays a string. A malformed item or a key given twice raises ``ValueError`` quoting it.
    """
    if not text:
        return {}
    out: dict[str, Any] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key or not value:
            raise ValueError(f"optim_args: expected 'key=value' items separated by commas, got {item.strip()!r}")
        if key in out:
            raise ValueError(f"optim_args: {key!r} is given more than once in {text!r}")
        out[key] = _parse_value(value)
    return out


def _parse_value(value: str) -> Any:
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value
