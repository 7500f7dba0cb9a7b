"""bitsandbytes, imported in one place, with the error that says how to install it.

:class:`hf_rlion.RLion8bit` keeps its state in bitsandbytes' layout and uses its blockwise
quantisation (:mod:`hf_rlion.reference8bit`, :mod:`hf_rlion.sharded8bit`) and its
``GlobalOptimManager`` overrides; bitsandbytes is the optional ``[8bit]`` extra.
"""

try:
    import bitsandbytes.functional as bnb_functional
    from bitsandbytes.optim import GlobalOptimManager
except ImportError as _err:  # pragma: no cover - exercised in an environment without bitsandbytes
    raise ImportError(
        "RLion8bit / PagedRLion8bit store their state with bitsandbytes, which is not installed. "
        "Install it with: pip install 'hf-rlion[8bit]'"
    ) from _err

__all__ = ["bnb_functional", "GlobalOptimManager"]
