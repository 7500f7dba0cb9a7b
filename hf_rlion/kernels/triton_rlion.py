r"""The fused GPU RLion step in Triton (float32 momentum), many tensors per launch.

The rule is :func:`hf_rlion.rlion.rlion_update_`'s, with the arithmetic of the C kernel
(``hf_rlion/kernels/rlion_cpu.c``), element-wise in float32::

    g' = -g if maximize else g
    c  = lerp(m, g', 1 - β1)                      torch.lerp's two-sided formula (lerp_f32)
    u  = atan(k · c)                              atan_f32, the C kernel's arctan
    p  = fma(-(η·2/π), u, p · (1 - η λ))          rounded once to p's dtype
    m  = lerp(m, g', 1 - β2)

with, per tensor, ``k = min(α · inv_bc, FLT_MAX)`` (``"fixed"``) or
``k = min(α / max(RMS(c) · inv_bc, FLT_MIN) · inv_bc, FLT_MAX)`` (``"rms"``, RMS over the whole
tensor), ``inv_bc = 1 / (1 - β1^t)`` (1 without bias correction). The clamp to the largest finite
float32 keeps ``k · 0 = 0``: an all-zero tensor gets an exactly zero update.

Launches per step and parameter dtype (the tensors of one dtype share every launch):

1. ``_prepass_kernel`` (``"rms"`` or ``check_finite``): one program per chunk of ``BLOCK`` elements
   of any tensor (a chunk table maps a program to ``(tensor, first element)``); it writes the chunk's
   float32 sum of ``c²`` (as float64) and whether its gradient holds NaN/inf to per-chunk buffers.
2. ``_scale_kernel``: one program per tensor adds its chunk sums in chunk order (float64; the result
   does not depend on scheduling) and writes ``k`` and the skip flag of the tensor to device buffers.
3. ``_update_kernel``: one program per chunk; it reads ``k`` and the flag from device memory and
   leaves a flagged tensor untouched (parameter and momentum).

``"fixed"`` without ``check_finite`` is launch 3 alone, with ``k`` computed in it. Nothing reads a
device value on the host: :func:`fused_rlion` returns the flags as a device tensor.

Tensors are addressed through int64 tables of data pointers (cast to typed pointers in the kernel),
built once per set of tensors and kept while the same tensors come back (a cache keyed by pointers,
sizes and dtypes: it holds no tensor). Under ``TRITON_INTERPRET=1`` this works for CPU tensors
(the interpreter dereferences host addresses), which is how the tests run it; CUDA tensors under the
interpreter are not supported (the interpreter copies kernel arguments to the host, but not the
tensors a pointer table refers to).

Memory traffic per parameter: the update reads p, g, m and writes p, m (20 bytes for float32
parameters, 14 for bfloat16/float16); the pre-pass reads g, and m under ``"rms"`` (4-8 bytes more
for float32, 2-6 for 16-bit parameters).
"""

from __future__ import annotations

import math
import struct
from collections import OrderedDict
from typing import Sequence, Union

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_atan import atan_f32

__all__ = ["fused_rlion", "DEFAULT_BLOCK_SIZE"]

#: Elements per program of the pre-pass and update kernels.
DEFAULT_BLOCK_SIZE = 2048
#: Chunk sums one program of the scale kernel adds per iteration.
_SCALE_BLOCK = 256
_PARAM_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
FLT_MIN = tl.constexpr(1.1754943508222875e-38)
FLT_MAX = tl.constexpr(3.4028234663852886e38)
_TWO_OVER_PI = 2.0 / math.pi


@triton.jit
def lerp_f32(start, end, weight, WEIGHT_BELOW_HALF: tl.constexpr):
    """torch.lerp(start, end, weight): ``fma(w, end - start, start)`` for ``w < 0.5``, else
    ``fma(-(1 - w), end - start, end)`` (exact at ``w = 1``)."""
    diff = end - start
    if WEIGHT_BELOW_HALF:
        return tl.fma(diff, weight, start)
    else:
        return tl.fma(diff, -(1.0 - weight), end)


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """float32 x rounded to nearest (even) in DTYPE, as torch rounds. bfloat16 is rounded with integer
    arithmetic (the C kernel's store_bf16): Triton's interpreter truncates float32 to bfloat16, where
    GPUs round to nearest; this gives the same bits on both."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        quiet_nan = (bits >> 16) | 0x40
        is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
        return tl.where(is_nan, quiet_nan, rounded).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def nonfinite_count(x):
    """How many entries of x are NaN or ±inf (int32)."""
    return tl.sum(((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32), axis=0)


@triton.jit
def scale_from_sum(total, numel, inv_bc, alpha, RMS: tl.constexpr):
    """The multiplier k (float32) of a tensor from its float64 sum of c² (see the module docstring);
    alpha is a float32 value, inv_bc float64."""
    if RMS:
        # float64 division and square root are correctly rounded on GPUs (div.rn.f64, sqrt.rn.f64)
        rms_c_hat = tl.sqrt(total / numel.to(tl.float64)) * inv_bc
        # NaN / inf sums: a NaN gives FLT_MIN (the tensor is flagged anyway); +inf gives k = 0
        rms_c_hat = tl.where(rms_c_hat >= FLT_MIN, rms_c_hat, FLT_MIN)
        k = alpha / rms_c_hat * inv_bc
    else:
        k = alpha * inv_bc
    return tl.minimum(k, FLT_MAX).to(tl.float32)


@triton.jit
def _scale_kernel(
    group_tensors,  # int32 [tensors of the group]: global tensor index
    chunk_lo,  # int64 [n]: first global chunk of tensor t
    chunk_hi,  # int64 [n]: one past its last chunk
    numels,  # int64 [n]
    inv_bc,  # float64 [n]
    chunk_sumsq,  # float64 [chunks]
    chunk_bad,  # int32 [chunks]
    scales,  # float32 [n], out
    flags,  # int32 [n], out
    alpha,
    group_offset,
    RMS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t = tl.load(group_tensors + group_offset + tl.program_id(0))
    lo = tl.load(chunk_lo + t)
    hi = tl.load(chunk_hi + t)
    acc = tl.zeros((BLOCK,), tl.float64)
    bad = tl.zeros((BLOCK,), tl.int32)
    for start in range(lo, hi, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < hi
        if RMS:
            acc += tl.load(chunk_sumsq + offsets, mask=mask, other=0.0)
        bad |= tl.load(chunk_bad + offsets, mask=mask, other=0)
    total = tl.sum(acc, axis=0)
    tl.store(scales + t, scale_from_sum(total, tl.load(numels + t), tl.load(inv_bc + t), alpha, RMS))
    tl.store(flags + t, (tl.max(bad, axis=0) != 0).to(tl.int32))


@triton.jit
def _prepass_kernel(
    grad_table,  # int64 [n]: data pointers
    exp_avg_table,  # int64 [n]
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
    BLOCK: tl.constexpr,
):
    chunk = chunk_offset + tl.program_id(0)
    t = tl.load(chunk_tensor + chunk)
    offsets = tl.load(chunk_start + chunk) + tl.arange(0, BLOCK)
    mask = offsets < tl.load(numels + t)
    g_ptr = tl.load(grad_table + t).to(tl.pointer_type(P_DTYPE))
    g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(chunk_bad + chunk, (nonfinite_count(g) != 0).to(tl.int32))
    if RMS:
        if MAXIMIZE:
            g = -g
        m_ptr = tl.load(exp_avg_table + t).to(tl.pointer_type(tl.float32))
        m = tl.load(m_ptr + offsets, mask=mask, other=0.0)
        c = lerp_f32(m, g, w1, W1_BELOW_HALF)  # 0 where masked
        tl.store(chunk_sumsq + chunk, tl.sum(c * c, axis=0).to(tl.float64))


@triton.jit
def _update_kernel(
    param_table,  # int64 [n]
    grad_table,  # int64 [n]
    exp_avg_table,  # int64 [n]
    numels,  # int64 [n]
    chunk_tensor,  # int32 [chunks]
    chunk_start,  # int64 [chunks]
    scales,  # float32 [n] (SCALES) or unused
    flags,  # int32 [n] (CHECK) or unused
    inv_bc,  # float64 [n] (not SCALES) or unused
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
    BLOCK: tl.constexpr,
):
    chunk = chunk_offset + tl.program_id(0)
    t = tl.load(chunk_tensor + chunk)
    offsets = tl.load(chunk_start + chunk) + tl.arange(0, BLOCK)
    mask = offsets < tl.load(numels + t)
    if CHECK:
        mask = mask & (tl.load(flags + t) == 0)
    if SCALES:
        k = tl.load(scales + t)
    else:
        k = scale_from_sum(0.0, 1, tl.load(inv_bc + t), alpha, False)
    p_ptr = tl.load(param_table + t).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(grad_table + t).to(tl.pointer_type(P_DTYPE))
    m_ptr = tl.load(exp_avg_table + t).to(tl.pointer_type(tl.float32))
    g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if MAXIMIZE:
        g = -g
    m = tl.load(m_ptr + offsets, mask=mask, other=0.0)
    p = tl.load(p_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    u = atan_f32(k * lerp_f32(m, g, w1, W1_BELOW_HALF))
    if DECAY:
        p = p * decay
    tl.store(p_ptr + offsets, round_to(tl.fma(u, -step_lr, p), P_DTYPE), mask=mask)
    tl.store(m_ptr + offsets, lerp_f32(m, g, w2, W2_BELOW_HALF), mask=mask)


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def pointer_table(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    """int64 tensor of data pointers on ``device`` (copied without waiting for the device)."""
    table = torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64)
    return _to_device(table, device)


def _to_device(table: Tensor, device: torch.device) -> Tensor:
    if device.type == "cpu":
        return table
    return table.pin_memory().to(device, non_blocking=True)


class ChunkPlan:
    """The chunk tables of one list of tensors, grouped by a key (the parameter dtype).

    Global tensor indices ``t`` follow the input order. Chunks of ``block`` elements are numbered
    group by group, so each group's chunks form one range ``[first, first + count)``:
    ``chunk_tensor[c]``, ``chunk_start[c]`` (first element), ``chunk_lo[t]``/``chunk_hi[t]`` (the
    tensor's chunk range), ``group_tensors`` (tensor indices, group by group). ``groups`` lists
    ``(key, first_chunk, n_chunks, first_tensor, n_tensors)``; empty tensors get no chunk.
    """

    def __init__(self, numels: Sequence[int], keys: Sequence, block: int, device: torch.device):
        by_key: dict = {}
        for t, key in enumerate(keys):
            by_key.setdefault(key, []).append(t)
        chunk_tensor, chunk_start, group_tensors, groups = [], [], [], []
        chunk_lo, chunk_hi = [0] * len(numels), [0] * len(numels)
        for key, members in by_key.items():
            first_chunk, first_tensor = len(chunk_tensor), len(group_tensors)
            for t in members:
                chunk_lo[t] = len(chunk_tensor)
                for start in range(0, numels[t], block):
                    chunk_tensor.append(t)
                    chunk_start.append(start)
                chunk_hi[t] = len(chunk_tensor)
                if numels[t] > 0:
                    group_tensors.append(t)
            groups.append((key, first_chunk, len(chunk_tensor) - first_chunk, first_tensor, len(group_tensors) - first_tensor))
        self.groups = groups
        self.n_chunks = len(chunk_tensor)
        self.chunk_tensor = _to_device(torch.tensor(chunk_tensor, dtype=torch.int32), device)
        self.chunk_start = _to_device(torch.tensor(chunk_start, dtype=torch.int64), device)
        self.chunk_lo = _to_device(torch.tensor(chunk_lo, dtype=torch.int64), device)
        self.chunk_hi = _to_device(torch.tensor(chunk_hi, dtype=torch.int64), device)
        self.numels = _to_device(torch.tensor(list(numels), dtype=torch.int64), device)
        self.group_tensors = _to_device(torch.tensor(group_tensors, dtype=torch.int32), device)


class PlanCache:
    """A few recent plans, keyed by whatever identifies the tensors (pointers, sizes, dtypes)."""

    def __init__(self, size: int = 64):
        self._plans: OrderedDict = OrderedDict()
        self._size = size

    def get(self, key, build):
        plan = self._plans.get(key)
        if plan is None:
            plan = build()
            self._plans[key] = plan
            if len(self._plans) > self._size:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        return plan


class TensorTables:
    """What the kernels need to know of one list of tensors: its :class:`ChunkPlan` (grouped by the
    parameter dtype), the data-pointer tables of the parameters and of each list of state tensors, and
    that of the gradients, rebuilt only when their pointers change."""

    def __init__(self, params: Sequence[Tensor], states: Sequence[Sequence[Tensor]], block: int, device: torch.device):
        self.chunks = ChunkPlan([p.numel() for p in params], [p.dtype for p in params], block, device)
        self.param_table = pointer_table(params, device)
        self.state_tables = [pointer_table(tensors, device) for tensors in states]
        self._device = device
        self._grad_key = None
        self._grad_table = None

    def grad_table(self, grads: Sequence[Tensor]) -> Tensor:
        key = tuple(g.data_ptr() for g in grads)
        if key != self._grad_key:
            self._grad_table, self._grad_key = pointer_table(grads, self._device), key
        return self._grad_table


#: Up to 64 sets of tensors (one per kernel call of a step: parameter group, hyperparameter set, map) keep
#: their tables; a CUDA graph captured around ``step()`` reads the tables of its calls, so they must stay.
_tables = PlanCache()


def tables_for(params: Sequence[Tensor], states: Sequence[Sequence[Tensor]], block: int, device: torch.device):
    """The :class:`TensorTables` of these tensors, built on first use and kept while they come back."""
    key = (device, block, tuple((p.data_ptr(), p.numel(), p.dtype) for p in params))
    key += tuple(tuple(t.data_ptr() for t in tensors) for tensors in states)
    return _tables.get(key, lambda: TensorTables(params, states, block, device))


class StepBuffers:
    """One step's device buffers: the skip ``flags`` it returns and, for a step with a pre-pass, the
    per-chunk sums of squares and NaN/inf marks and the per-tensor multipliers ``scales``."""

    def __init__(self, n: int, n_chunks: int, device: torch.device, two_pass: bool, check_finite: bool):
        self.flags = torch.zeros(n, dtype=torch.int32, device=device)
        # without check_finite the returned flags stay zero: the scale kernel writes its own
        self.scale_flags = self.flags if check_finite else torch.empty_like(self.flags)
        size = max(n_chunks, 1) if two_pass else 1  # a 1-element stand-in for unused pointer arguments
        self.scales = torch.empty(n if two_pass else 1, dtype=torch.float32, device=device)
        self.chunk_sumsq = torch.empty(size, dtype=torch.float64, device=device)
        self.chunk_bad = torch.empty(size, dtype=torch.int32, device=device)

    def launch_scale(self, chunks: ChunkPlan, inv_bc: Tensor, alpha: float, first_tensor: int, n_tensors: int, rms: bool):
        """The scale kernel for one dtype group: ``scales`` and ``scale_flags`` of its tensors."""
        _scale_kernel[(n_tensors,)](
            chunks.group_tensors, chunks.chunk_lo, chunks.chunk_hi, chunks.numels, inv_bc, self.chunk_sumsq,
            self.chunk_bad, self.scales, self.scale_flags, alpha, first_tensor, RMS=rms, BLOCK=_SCALE_BLOCK,
        )  # fmt: skip


def inverse_bias_corrections(
    steps: Union[Sequence[int], Tensor], beta1: float, bias_correction: bool, n: int, device: torch.device
) -> Tensor:
    """float64 ``1 / (1 - β1^t)`` per tensor on ``device`` (ones without bias correction).

    ``steps`` may be a list of ints or a tensor of step counts, on the device or not: a device
    tensor is turned into the factors by device operations (no synchronisation).
    """
    if not bias_correction:
        return torch.ones(n, dtype=torch.float64, device=device)
    if isinstance(steps, Tensor):
        steps = steps.to(device=device, dtype=torch.float64, non_blocking=True).reshape(-1)
        return 1.0 / (1.0 - torch.pow(beta1, steps))
    return _to_device(torch.tensor([1.0 / (1.0 - beta1**s) for s in steps], dtype=torch.float64), device)


def f32(value: float) -> float:
    """``value`` rounded to float32: scalar kernel arguments are float32 on the GPU but stay Python
    floats under the interpreter, so they are rounded here, once, for both."""
    return struct.unpack("f", struct.pack("f", value))[0]


def check_options(alpha_scaling: str, block: int) -> None:
    """``alpha_scaling`` is known and the elements per program a power of two (``tl.arange``'s rule)."""
    if alpha_scaling not in ("rms", "fixed"):
        raise ValueError(f"alpha_scaling must be one of ['rms', 'fixed'], got {alpha_scaling!r}")
    if block < 1 or block & (block - 1):
        raise ValueError(f"elements per program must be a power of two, got {block}")


def check_tensors(params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[Tensor], dtypes) -> torch.device:
    """The common device of all tensors; raises ``ValueError`` for anything the kernels do not take."""
    if not (len(params) == len(grads) == len(states)):
        raise ValueError("params, grads and states must have the same length")
    device = params[0].device if params else torch.device("cpu")
    for p, g, s in zip(params, grads, states):
        if p.dtype not in dtypes or g.dtype != p.dtype:
            raise ValueError(f"parameters must be one of {list(dtypes)} with gradients alike, got {p.dtype}/{g.dtype}")
        if not (p.is_contiguous() and g.is_contiguous() and s.is_contiguous()):
            raise ValueError("parameters, gradients and state must be contiguous")
        if g.shape != p.shape or s.numel() != p.numel() or not (p.device == g.device == s.device == device):
            raise ValueError("gradients' shapes, states' sizes and all devices must match the parameters'")
    return device


def fused_rlion(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
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
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Tensor:
    """One RLion step, in place, on every tensor; returns int32 skip flags on the device.

    The arguments are :func:`hf_rlion.kernels.cpu_rlion.fused_rlion`'s: ``steps[i]`` is tensor i's step count
    after incrementing (a list of ints, or a tensor of counts that may live on the device). Parameters
    are float32, bfloat16 or float16, gradients of the same dtype, momenta float32, all contiguous on
    one device. With ``check_finite`` a tensor whose gradient holds NaN/inf is left untouched
    (parameter and momentum) and its flag is 1; the flags are never read here (no host sync).
    """
    check_options(alpha_scaling, block_size)
    device = check_tensors(params, grads, exp_avgs, _PARAM_DTYPES)
    for m in exp_avgs:
        if m.dtype != torch.float32:
            raise ValueError(f"exp_avg must be float32, got {m.dtype}")
    n = len(params)
    if n == 0:
        return torch.zeros(0, dtype=torch.int32, device=device)
    tables = tables_for(params, [exp_avgs], block_size, device)
    (exp_avg_table,) = tables.state_tables
    chunks, grad_table = tables.chunks, tables.grad_table(grads)
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
            _prepass_kernel[(n_chunks,)](
                grad_table, exp_avg_table, chunks.numels, chunks.chunk_tensor, chunks.chunk_start,
                buffers.chunk_sumsq, buffers.chunk_bad, w1, first_chunk,
                P_DTYPE=p_dtype, RMS=rms, MAXIMIZE=maximize, W1_BELOW_HALF=w1 < 0.5, BLOCK=block_size,
            )  # fmt: skip
            buffers.launch_scale(chunks, inv_bc, alpha, first_tensor, n_tensors, rms)
        _update_kernel[(n_chunks,)](
            tables.param_table, grad_table, exp_avg_table, chunks.numels, chunks.chunk_tensor,
            chunks.chunk_start, buffers.scales, buffers.flags, inv_bc, alpha, w1, w2, f32(1.0 - lr * weight_decay),
            f32(lr * _TWO_OVER_PI), first_chunk,
            P_DTYPE=p_dtype, SCALES=two_pass, CHECK=check_finite, MAXIMIZE=maximize,
            DECAY=weight_decay != 0.0, W1_BELOW_HALF=w1 < 0.5, W2_BELOW_HALF=w2 < 0.5, BLOCK=block_size,
        )  # fmt: skip
    return buffers.flags
