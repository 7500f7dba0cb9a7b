"""The reference step of RLion8bit: bitsandbytes' public blockwise API around RLion's reference update.

Every fast path (the C and Triton kernels, the sharded FSDP2 step) is tested against
:func:`rlion8bit_reference_update_`. The state layout is bitsandbytes' (``state1`` codes, ``absmax1``
per block of 256, ``qmap1``: see :mod:`hf_rlion.rlion8bit`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._bitsandbytes import bnb_functional
from ._optimizer_base import BLOCKSIZE
from .kernels.cpu_rlion8bit import check_8bit_state
from .rlion import rlion_update_

__all__ = ["rlion8bit_reference_update_", "quantize_blockwise"]


def rlion8bit_reference_update_(
    param: Tensor, grad: Tensor, codes: Tensor, absmax: Tensor, qmap: Tensor, step: int, **hyperparameters: Any
) -> None:
    """One RLion step on 8-bit state, in place: dequantise, :func:`rlion_update_`, requantise.

    Uses ``bitsandbytes.functional.dequantize_blockwise`` and, through :func:`quantize_blockwise`,
    its ``quantize_blockwise``, with ``blocksize=256``; every fast path is tested against this.
    ``hyperparameters`` are :func:`rlion_update_`'s keywords.
    """
    check_8bit_state(param, codes, absmax, qmap)
    exp_avg = bnb_functional.dequantize_blockwise(codes, absmax=absmax, code=qmap, blocksize=BLOCKSIZE)
    rlion_update_(param, grad, exp_avg, step, **hyperparameters)
    new_codes, new_absmax = quantize_blockwise(exp_avg, qmap)
    codes.copy_(new_codes)
    absmax.copy_(new_absmax)


#: Blocks whose absmax is below the smallest normal float32 are scaled by this before quantising.
_SUBNORMAL_BLOCK_SCALE = 2.0**64


def quantize_blockwise(values: Tensor, qmap: Tensor) -> tuple[Tensor, Tensor]:
    """bitsandbytes' ``quantize_blockwise`` (blocks of 256): ``(codes, absmax)``, safe for tiny blocks.

    bitsandbytes scales a block by ``1 / absmax``, which overflows to inf when absmax is below
    2^-128 (momentum that has decayed for thousands of zero-gradient steps); a zero then becomes
    ``0 · inf = NaN`` and is stored as code 0, that is ``-0.993 · absmax``. Here a block with
    absmax below the smallest normal float32 is scaled by 2^64 first (exact: a power of two) and
    its absmax scaled back (exact again). For every other block, and for these wherever
    bitsandbytes' ``1 / absmax`` is finite, the codes are bitsandbytes' own (tested); the fused
    kernel does the same. ``values`` are float32 (the dequantised momentum).
    """
    flat = values.reshape(-1)
    padded = torch.nn.functional.pad(flat, (0, -flat.numel() % BLOCKSIZE)).view(-1, BLOCKSIZE)
    tiny = padded.abs().amax(dim=1) < torch.finfo(torch.float32).smallest_normal
    factor = torch.where(tiny, _SUBNORMAL_BLOCK_SCALE, 1.0).to(flat.dtype)
    scaled = (padded * factor[:, None]).view(-1)[: flat.numel()].view_as(values)
    codes, quant_state = bnb_functional.quantize_blockwise(scaled, code=qmap, blocksize=BLOCKSIZE)
    return codes, quant_state.absmax / factor.to(quant_state.absmax.dtype)
