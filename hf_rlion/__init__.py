"""hf-rlion: the RLion optimizer for the HuggingFace ecosystem.

``import hf_rlion`` registers ``--optim rlion``, ``rlion_8bit`` and ``paged_rlion_8bit`` with
transformers (see :mod:`hf_rlion.transformers_integration`), makes ``Trainer`` resume with every
model weight or an error (see :mod:`hf_rlion.checkpoints`), and adds ``--opt rlion`` and
``rlion8bit`` to timm's optimizer factory (see :mod:`hf_rlion.timm_integration`).
"""

from .factory import create_optimizer
from .registry import OPTIMIZERS, TRANSFORMERS_OPTIMIZER_NAMES
from .rlion import RLion
from .timm_integration import register_with_timm
from .transformers_integration import register_with_transformers

__version__ = "0.1.0"

__all__ = [
    "RLion",
    "RLion8bit",
    "PagedRLion8bit",
    "create_optimizer",
    "register_with_transformers",
    "register_with_timm",
    "OPTIMIZERS",
    "TRANSFORMERS_OPTIMIZER_NAMES",
]


def __getattr__(name):
    # The 8-bit classes need bitsandbytes, an optional extra: import them on first use.
    if name in ("RLion8bit", "PagedRLion8bit"):
        from . import rlion8bit

        return getattr(rlion8bit, name)
    raise AttributeError(f"module 'hf_rlion' has no attribute {name!r}")


register_with_transformers()
register_with_timm()
