r"""The fused GPU RLion8bit step in Triton: RLion on bitsandbytes' 8-bit blockwise momentum.

State layout (bitsandbytes', see :mod:`hf_rlion.rlion8bit`): ``codes`` (uint8, one per element,
indices into the 256-entry signed dynamic map ``qmap``, sorted ascending) and ``absmax`` (float32,
one per block of 256 consecutive elements); ``m = qmap[code] · absmax[block]``.

One program handles ``BLOCKS`` whole blocks of one tensor (a chunk table maps programs to
``(tensor, first element)``, as in :mod:`.triton_rlion`). Per block: dequantise ``m``, the RLion
update of :mod:`.triton_rlion` (same arithmetic, same ``k``, same NaN/inf policy), the new momentum
``m' = lerp(m, g', 1 - β2)``, its ``absmax = max |m'|`` (a reduction over the block: exact), and
the requantisation (:func:`quantize_nearest`):

- ``v = m' · RN(1 / absmax)``, bitsandbytes' normalisation;
- code = the index of the entry of ``qmap`` nearest to ``v``, found by an 8-step binary search over
  the 255 midpoints between consecutive entries (bitsandbytes' CUDA kernels also binary-search the
  sorted map; its CPU path looks ``v`` up in a 65,536-entry table instead, which can differ by one
  code next to a midpoint). Ties (``v`` exactly on a midpoint) take the lower code. The midpoints are
  float64 values rounded down to float32, so ``v > midpoint`` is the exact comparison;
- a block with ``absmax`` below the smallest normal float32 is scaled by 2^64 first (exact), as
  :func:`hf_rlion.reference8bit.quantize_blockwise` does (``1 / absmax`` would overflow);
- an all-zero block gets ``absmax = 0`` and the code of 0.0 (bitsandbytes' CPU path stores code 0,
  ``-1 · 0``: the same momentum).

Launches per step and parameter dtype: pre-pass (``"rms"`` or ``check_finite``), scale, update,
as in :mod:`.triton_rlion`. Memory traffic per float32 parameter: the update reads p, g, codes and
writes p, codes (4 + 4 + 1 + 4 + 1 = 14 bytes, plus 8 bytes per 256 for absmax; 8 bytes for
bfloat16/float16 parameters); the pre-pass reads g (and the codes under ``"rms"``): 4-5 bytes more
(2-3 for 16-bit parameters). The midpoints of a new ``qmap`` are computed once on the host
(:func:`midpoints_of`, one read of the map: the only synchronisation, at the first step).
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_atan import atan_f32
from .triton_rlion import (
    _PARAM_DTYPES,
    _TWO_OVER_PI,
    FLT_MIN,
    StepBuffers,
    check_options,
    check_tensors,
    f32,
    inverse_bias_corrections,
    lerp_f32,
    nonfinite_count,
    round_to,
    scale_from_sum,
    tables_for,
)

__all__ = ["fused_rlion8bit", "quantize_blockwise", "new_momentum", "midpoints_of", "BLOCKSIZE", "DEFAULT_BLOCKS_PER_PROGRAM"]

# BLOCKSIZE and the 2^64 scale are hf_rlion.reference8bit's values, repeated so that this module does not
# import bitsandbytes.
#: Elements per quantisation block (bitsandbytes' blockwise optimizers).
BLOCKSIZE = 256
#: Quantisation blocks per program of the pre-pass and update kernels (a power of two).
DEFAULT_BLOCKS_PER_PROGRAM = 8
#: Blocks whose absmax is below the smallest normal float32 are scaled by this before quantising.
SUBNORMAL_BLOCK_SCALE = tl.constexpr(2.0**64)
QBLOCK = tl.constexpr(BLOCKSIZE)


@triton.jit
def quantize_nearest(values, absmax, midpoints):
    """uint8 codes of ``values`` (float32, one block per row) in a block with this absmax (one per row,
    keepdims): the nearest entry of the map whose rounded-down midpoints are given (see the module)."""
    tiny = absmax < FLT_MIN
    scaled = tl.where(tiny, values * SUBNORMAL_BLOCK_SCALE, values)
    scaled_max = tl.where(tiny, absmax * SUBNORMAL_BLOCK_SCALE, absmax)
    # an all-zero block: values are 0, any finite divisor gives v = 0
    inverse = tl.math.div_rn(tl.full(scaled_max.shape, 1.0, tl.float32), tl.where(scaled_max == 0.0, 1.0, scaled_max))
    v = scaled * inverse
    code = tl.zeros(values.shape, tl.int32)
    # code = number of midpoints below v: a branch-free binary search over the 255 midpoints
    for i in tl.static_range(8):
        candidate = code + (128 >> i)
        code = tl.where(v > tl.load(midpoints + candidate - 1), candidate, code)
    return code.to(tl.uint8)


@triton.jit
def dequantize(code_ptr, absmax_ptr, qmap, offsets, mask):
    """m = qmap[code] · absmax[offset // 256]; 0 where masked."""
    code = tl.load(code_ptr + offsets, mask=mask, other=0).to(tl.int32)
    scale = tl.load(absmax_ptr + offsets // QBLOCK, mask=mask, other=0.0)
    return tl.load(qmap + code) * scale


@triton.jit
def _prepass8_kernel(
    grad_table,  # int64 [n]: data pointers
    code_table,  # int64 [n]
    absmax_table,  # int64 [n]
    qmap,  # float32 [256]
    numels,  # int64 [n]
    chunk_tensor,  # int32 [chunks]
    chunk_start,  # int64 [chunks]
    chunk_sumsq,  # float64 [chunks], out
    chunk_bad,  # int32 [chunks], out
    w1,
    chunk_offset,
    P_DTYPE: tl.constexpr,
    RMS: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    W1_BELOW_HALF: tl.constexpr,
    BLOCKS: tl.constexpr,
):
    chunk = chunk_offset + tl.program_id(0)
    t = tl.load(chunk_tensor + chunk)
    offsets = tl.load(chunk_start + chunk) + tl.arange(0, BLOCKS * QBLOCK)
    mask = offsets < tl.load(numels + t)
    g_ptr = tl.load(grad_table + t).to(tl.pointer_type(P_DTYPE))
    g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(chunk_bad + chunk, (nonfinite_count(g) != 0).to(tl.int32))
    if RMS:
        if MAXIMIZE:
            g = -g
        code_ptr = tl.load(code_table + t).to(tl.pointer_type(tl.uint8))
        absmax_ptr = tl.load(absmax_table + t).to(tl.pointer_type(tl.float32))
        m = dequantize(code_ptr, absmax_ptr, qmap, offsets, mask)
        c = lerp_f32(m, g, w1, W1_BELOW_HALF)  # 0 where masked
        tl.store(chunk_sumsq + chunk, tl.sum(c * c, axis=0).to(tl.float64))


@triton.jit
def _update8_kernel(
    param_table,  # int64 [n]
    grad_table,  # int64 [n]
    code_table,  # int64 [n]
    absmax_table,  # int64 [n]
    qmap,  # float32 [256]
    midpoints,  # float32 [256]: 255 midpoints, rounded down, and one unused entry
    numels,  # int64 [n]
    chunk_tensor,  # int32 [chunks]
    chunk_start,  # int64 [chunks]
    scales,  # float32 [n] (SCALES)
    flags,  # int32 [n] (CHECK)
    inv_bc,  # float64 [n] (not SCALES)
    alpha,
    w1,
    w2,
    decay,
    step_lr,
    chunk_offset,
    P_DTYPE: tl.constexpr,
    SCALES: tl.constexpr,
    CHECK: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    DECAY: tl.constexpr,
    W1_BELOW_HALF: tl.constexpr,
    W2_BELOW_HALF: tl.constexpr,
    BLOCKS: tl.constexpr,
):
    chunk = chunk_offset + tl.program_id(0)
    t = tl.load(chunk_tensor + chunk)
    start = tl.load(chunk_start + chunk)
    numel = tl.load(numels + t)
    rows = tl.arange(0, BLOCKS)[:, None]
    offsets = start + rows * QBLOCK + tl.arange(0, QBLOCK)[None, :]
    mask = offsets < numel
    if CHECK:
        mask = mask & (tl.load(flags + t) == 0)
    if SCALES:
        k = tl.load(scales + t)
    else:
        k = scale_from_sum(0.0, 1, tl.load(inv_bc + t), alpha, False)
    p_ptr = tl.load(param_table + t).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(grad_table + t).to(tl.pointer_type(P_DTYPE))
    code_ptr = tl.load(code_table + t).to(tl.pointer_type(tl.uint8))
    absmax_ptr = tl.load(absmax_table + t).to(tl.pointer_type(tl.float32))
    m = dequantize(code_ptr, absmax_ptr, qmap, offsets, mask)
    g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if MAXIMIZE:
        g = -g
    p = tl.load(p_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    u = atan_f32(k * lerp_f32(m, g, w1, W1_BELOW_HALF))
    if DECAY:
        p = p * decay
    tl.store(p_ptr + offsets, round_to(tl.fma(u, -step_lr, p), P_DTYPE), mask=mask)
    new_m = tl.where(mask, lerp_f32(m, g, w2, W2_BELOW_HALF), 0.0)
    absmax = tl.max(tl.abs(new_m), axis=1, keep_dims=True)
    tl.store(code_ptr + offsets, quantize_nearest(new_m, absmax, midpoints), mask=mask)
    block_mask = start + rows * QBLOCK < numel
    if CHECK:
        block_mask = block_mask & (tl.load(flags + t) == 0)
    tl.store(absmax_ptr + start // QBLOCK + rows, absmax, mask=block_mask)


@triton.jit
def _quantize_kernel(values, codes, absmaxes, midpoints, numel, BLOCKS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)[:, None]
    offsets = rows * QBLOCK + tl.arange(0, QBLOCK)[None, :]
    mask = offsets < numel
    x = tl.load(values + offsets, mask=mask, other=0.0)
    absmax = tl.max(tl.abs(x), axis=1, keep_dims=True)
    tl.store(codes + offsets, quantize_nearest(x, absmax, midpoints), mask=mask)
    tl.store(absmaxes + rows, absmax, mask=rows * QBLOCK < numel)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------

_midpoints_cache: dict = {}


@triton.jit
def _new_momentum_kernel(momentum, grad, out, numel, w2, MAXIMIZE: tl.constexpr, W2_BELOW_HALF: tl.constexpr):
    offsets = tl.program_id(0) * QBLOCK + tl.arange(0, QBLOCK)
    mask = offsets < numel
    m = tl.load(momentum + offsets, mask=mask, other=0.0)
    g = tl.load(grad + offsets, mask=mask, other=0.0).to(tl.float32)
    if MAXIMIZE:
        g = -g
    tl.store(out + offsets, lerp_f32(m, g, w2, W2_BELOW_HALF), mask=mask)


def new_momentum(momentum: Tensor, grad: Tensor, beta2: float, maximize: bool) -> Tensor:
    """``m_t = lerp(m_{t-1}, ±g, 1 − β2)`` with the update kernel's arithmetic, for float32 ``momentum``
    and a gradient of a kernel dtype: the momentum of pieces of a block stepped outside the kernel
    (:mod:`hf_rlion.sharded8bit`, a block shared by two FSDP2 shards), bit for bit the kernel's."""
    momentum, grad = momentum.contiguous().reshape(-1), grad.contiguous().reshape(-1)
    if momentum.dtype != torch.float32 or grad.dtype not in _PARAM_DTYPES or momentum.numel() != grad.numel():
        raise ValueError("momentum must be float32 and grad a float32/bfloat16/float16 tensor of as many elements")
    out = torch.empty_like(momentum)
    n = momentum.numel()
    if n:
        w2 = f32(1.0 - beta2)
        _new_momentum_kernel[(triton.cdiv(n, BLOCKSIZE),)](
            momentum, grad, out, n, w2, MAXIMIZE=maximize, W2_BELOW_HALF=w2 < 0.5
        )
    return out


def midpoints_of(qmap: Tensor) -> Tensor:
    """The 255 midpoints between consecutive entries of a sorted 256-entry ``qmap`` (float32), each
    the exact float64 midpoint rounded down to float32, plus one unused entry; on qmap's device.

    For a float32 ``v``, ``v > midpoints[j]`` exactly when ``v`` lies above the exact midpoint. Read from
    ``qmap`` once per (tensor, version): that read waits for the device.
    """
    key = (qmap.data_ptr(), qmap.device, qmap._version)
    table = _midpoints_cache.get(key)
    if table is None:
        q = qmap.detach().to("cpu", torch.float64).reshape(-1)
        if q.numel() != 256 or not bool((q[1:] > q[:-1]).all()):
            raise ValueError("qmap must hold 256 strictly increasing values")
        exact = (q[:-1] + q[1:]) / 2
        rounded = exact.to(torch.float32)
        rounded = torch.where(rounded.double() > exact, torch.nextafter(rounded, torch.tensor(-float("inf"))), rounded)
        table = torch.cat([rounded, rounded.new_ones(1)]).to(qmap.device)
        if len(_midpoints_cache) > 16:
            _midpoints_cache.clear()
        _midpoints_cache[key] = table
    return table


def quantize_blockwise(values: Tensor, qmap: Tensor, blocks_per_program: int = DEFAULT_BLOCKS_PER_PROGRAM):
    """``(codes, absmax)`` of float32 ``values`` with the step's requantisation (:func:`quantize_nearest`)."""
    values = values.contiguous().reshape(-1)
    if values.dtype != torch.float32:
        raise ValueError(f"values must be float32, got {values.dtype}")
    n = values.numel()
    codes = torch.empty(n, dtype=torch.uint8, device=values.device)
    absmax = torch.empty(triton.cdiv(n, BLOCKSIZE), dtype=torch.float32, device=values.device)
    if n:
        grid = (triton.cdiv(n, BLOCKSIZE * blocks_per_program),)
        _quantize_kernel[grid](values, codes, absmax, midpoints_of(qmap), n, BLOCKS=blocks_per_program)
    return codes, absmax


def fused_rlion8bit(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    codes: Sequence[Tensor],
    absmaxes: Sequence[Tensor],
    qmap: Tensor,
    steps: Union[Sequence[int], Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    alpha: float,
    alpha_scaling: str,
    bias_correction: bool,
    maximize: bool,
    check_finite: bool = True,
    blocks_per_program: int = DEFAULT_BLOCKS_PER_PROGRAM,
) -> Tensor:
    """One RLion step, in place, on parameters with 8-bit state; returns int32 skip flags on the device.

    ``codes[i]`` (uint8, ``params[i].numel()`` elements) and ``absmaxes[i]`` (float32,
    ``ceil(numel / 256)``) are tensor i's state, ``qmap`` the map they index (one for the call).
    Everything else is :func:`hf_rlion.kernels.triton_rlion.fused_rlion`'s: a tensor whose gradient
    holds NaN/inf is left untouched (parameter, codes, absmax) and flagged when ``check_finite``.
    """
    check_options(alpha_scaling, BLOCKSIZE * blocks_per_program)
    device = check_tensors(params, grads, codes, _PARAM_DTYPES)
    for p, c, a in zip(params, codes, absmaxes):
        if c.dtype != torch.uint8:
            raise ValueError(f"codes must be uint8, got {c.dtype}")
        if a.dtype != torch.float32 or a.numel() != triton.cdiv(p.numel(), BLOCKSIZE) or not a.is_contiguous():
            raise ValueError("absmax must be contiguous float32 with one value per block of 256")
        if a.device != device:
            raise ValueError("absmax must be on the parameters' device")
    n = len(params)
    if n == 0:
        return torch.zeros(0, dtype=torch.int32, device=device)
    tables = tables_for(params, [codes, absmaxes], BLOCKSIZE * blocks_per_program, device)
    code_table, absmax_table = tables.state_tables
    chunks, grad_table = tables.chunks, tables.grad_table(grads)
    qmap = qmap.to(device=device, dtype=torch.float32).contiguous()
    midpoints = midpoints_of(qmap)
    inv_bc = inverse_bias_corrections(steps, beta1, bias_correction, n, device)
    rms = alpha_scaling == "rms"
    two_pass = rms or check_finite
    buffers = StepBuffers(n, chunks.n_chunks, device, two_pass, check_finite)
    w1, w2, alpha = f32(1.0 - beta1), f32(1.0 - beta2), f32(alpha)
    for dtype, first_chunk, n_chunks, first_tensor, n_tensors in chunks.groups:
        if n_chunks == 0:
            continue
        p_dtype = _PARAM_DTYPES[dtype]
        if two_pass:
            _prepass8_kernel[(n_chunks,)](
                grad_table, code_table, absmax_table, qmap, chunks.numels, chunks.chunk_tensor,
                chunks.chunk_start, buffers.chunk_sumsq, buffers.chunk_bad, w1, first_chunk,
                P_DTYPE=p_dtype, RMS=rms, MAXIMIZE=maximize, W1_BELOW_HALF=w1 < 0.5, BLOCKS=blocks_per_program,
            )  # fmt: skip
            buffers.launch_scale(chunks, inv_bc, alpha, first_tensor, n_tensors, rms)
        _update8_kernel[(n_chunks,)](
            tables.param_table, grad_table, code_table, absmax_table, qmap, midpoints, chunks.numels,
            chunks.chunk_tensor, chunks.chunk_start, buffers.scales, buffers.flags, inv_bc, alpha, w1, w2,
            f32(1.0 - lr * weight_decay), f32(lr * _TWO_OVER_PI), first_chunk,
            P_DTYPE=p_dtype, SCALES=two_pass, CHECK=check_finite, MAXIMIZE=maximize,
            DECAY=weight_decay != 0.0, W1_BELOW_HALF=w1 < 0.5, W2_BELOW_HALF=w2 < 0.5, BLOCKS=blocks_per_program,
        )  # fmt: skip
    return buffers.flags
