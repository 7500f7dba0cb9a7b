"""Fused CPU kernel for the RLion step (placeholder until the speed work lands)."""

from __future__ import annotations

from torch import Tensor


def is_supported(params: list[Tensor]) -> bool:
    """Whether :func:`fused_rlion` can run on these parameters."""
    return False


def check_supported(params: list[Tensor]) -> None:
    raise RuntimeError("fused=True: the fused CPU RLion kernel is not available in this build")


def fused_rlion(params, grads, exp_avgs, steps, **hyperparameters) -> None:
    check_supported(params)
