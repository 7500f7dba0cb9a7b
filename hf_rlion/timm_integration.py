"""Teach timm's optimizer factory the names ``rlion`` and ``rlion8bit``.

After ``import hf_rlion``, ``timm.optim.create_optimizer_v2(model, opt="rlion", lr=..., weight_decay=...)``
builds :class:`hf_rlion.RLion` and ``opt="rlion8bit"`` builds :class:`hf_rlion.RLion8bit`; timm's
``train.py`` gets them through ``python -m hf_rlion.launch train.py --opt rlion ...``. timm's name
prefixes apply as for its own optimizers: ``lookahead_rlion`` is timm's ``Lookahead`` around RLion
(hence ``rlion8bit`` without an underscore: timm reads ``a_b`` as optimizer ``b`` with modifier ``a``).

The names come from ``registry.TIMM_OPTIMIZER_NAMES`` (timm name -> hf_rlion registry name) and
are registered with timm's own API: one ``timm.optim.OptimInfo`` each, added to the registry
``timm.optim.create_optimizer_v2`` and ``timm.optim.list_optimizers`` use (``default_registry``
of ``timm.optim._optim_factory``). The class is given by its import path, so bitsandbytes is
imported only when ``rlion8bit`` is built.

``import hf_rlion`` does not import timm: an import hook registers the names right after timm
loads its optimizer factory, or at once if it is already loaded. This needs timm >= 1.0.12, the
first release with the optimizer registry; older timm has no place to register names, and
``opt="rlion"`` stays unknown there.

Where RLion's hyperparameters come from in timm (``create_optimizer_v2`` / ``train.py``):
  - ``lr`` <- ``lr`` / ``--lr``. Without ``--lr``, train.py scales ``--lr-base`` (0.1, meant
    for SGD) by the batch size, far above RLion's range: pass ``--lr`` (RLion's default is 1e-3;
    the paper trains at learning rates like AdamW's);
  - ``weight_decay`` <- ``weight_decay`` / ``--weight-decay``, in timm's parameter groups:
    none on 1-d parameters (biases, norm weights) and on ``model.no_weight_decay()``;
  - ``betas`` <- ``betas`` / ``--opt-betas B1 B2`` (``has_betas``), default Lion's ``(0.9, 0.99)``;
  - ``foreach`` <- ``foreach`` / ``--opt-foreach``;
  - the rest (``alpha``, ``alpha_scaling``, ``bias_correction``, ``min_8bit_size``, ...) <-
    keyword arguments / ``--opt-kwargs alpha=3 ...``; the class rejects unknown ones;
  - ``eps`` and ``momentum`` do not apply: timm drops them for these names.

``rlion8bit`` through timm gets parameters, not the model, so unlike
:func:`hf_rlion.create_optimizer` it cannot ask for 32-bit state on ``nn.Embedding`` weights;
call :func:`hf_rlion.rlion8bit.keep_embeddings_in_32bit` on the model first if it has embeddings.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

from ._import_hook import PatchAfterImport
from .registry import TIMM_OPTIMIZER_NAMES, get_spec

_FACTORY_MODULE = "timm.optim._optim_factory"


def optim_infos(optim_info_cls: type) -> list[Any]:
    """timm ``OptimInfo`` records for the names in ``TIMM_OPTIMIZER_NAMES``, built from hf_rlion's registry."""
    infos = []
    for timm_name, name in TIMM_OPTIMIZER_NAMES.items():
        spec = get_spec(name)
        module_name, class_name = spec.target.split(":")
        infos.append(
            optim_info_cls(
                name=timm_name,
                opt_class=f"{module_name}.{class_name}",
                description=f"hf-rlion {class_name}: Lion with sign(c) replaced by (2/pi)*arctan(alpha*c)",
                has_eps="eps" in spec.optim_arg_keys,
                has_momentum="momentum" in spec.optim_arg_keys,
                has_betas="beta1" in spec.optim_arg_keys,
                defaults=dict(spec.fixed_kwargs) or None,
            )
        )
    return infos


def register_optimizers(registry: Any, optim_info_cls: type) -> None:
    """Add hf_rlion's ``OptimInfo`` records to a timm ``OptimizerRegistry`` (idempotent)."""
    registered = set(registry.list_optimizers())
    for info in optim_infos(optim_info_cls):
        if info.name in registered and registry.get_optimizer_info(info.name) == info:
            continue
        registry.register(info)


def _patch_module(module_name: str, module: ModuleType) -> None:
    if module_name == _FACTORY_MODULE:
        register_optimizers(module.default_registry, module.OptimInfo)


_hook = PatchAfterImport((_FACTORY_MODULE,), _patch_module)


def register_with_timm() -> None:
    """Make ``opt="rlion"`` and ``opt="rlion8bit"`` work in timm's optimizer factory (idempotent).

    Called by ``import hf_rlion``. Safe to call again, and when timm is not installed.
    """
    _hook.install()


def is_registered() -> bool:
    """Whether the hook is installed and, if timm's optimizer factory is loaded, it knows hf_rlion's names."""
    factory = sys.modules.get(_FACTORY_MODULE)
    if not _hook.installed():
        return False
    return factory is None or set(TIMM_OPTIMIZER_NAMES) <= set(factory.default_registry.list_optimizers())
