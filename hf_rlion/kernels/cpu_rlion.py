r"""The fused CPU RLion step: one C kernel call per param group, one memory pass per tensor.

:class:`hf_rlion.RLion` picks this path by default for CPU parameters (``fused=None``) and on
request (``fused=True``). The kernel (``hf_rlion/kernels/rlion_cpu.c``, built by
:mod:`hf_rlion.kernels.native`) does the whole update in a single pass per tensor, element-wise::

    c = lerp(m, g, 1 - β1);   u = atan(k · c);   θ ← θ·(1 − η λ) − η (2/π) u;   m ← lerp(m, g, 1 − β2)

with ``k = min(α / (1 − β1^t), F)`` (``alpha_scaling="fixed"``) or
``k = min(α / max(RMS(ĉ), tiny) / (1 − β1^t), F)`` (``"rms"``; RMS over the whole tensor, sum of
squares in float64), F the largest finite float32 (so a tensor whose c is zero gets ``k · 0 = 0``,
never ``∞ · 0 = NaN``; α itself counts as at most F). That is the rule of
:func:`hf_rlion.rlion.rlion_update_`, which the tests compare it against.

Why it is fast: torch's eager step makes one pass over memory per operation (lerp, mul, atan,
add, lerp: ~10 passes) and ``torch.atan`` runs at ~0.45 G elements/s on two cores. The kernel
reads θ, g, m and writes θ, m once (20 bytes per float32 parameter; the ``"rms"`` rule reads g
and m once more, tensor by tensor, so that the second read partly hits the cache), with a
vectorised arctan (:func:`atan`, within 1 ulp of the correctly rounded value). It allocates no
tensor-sized temporaries. On one core it is compute-bound (the arctan): see docs/benchmarks.md.

Supported: CPU tensors, parameters float32, bfloat16 or float16 with a gradient of the same
dtype and float32 momentum (the state policy of :class:`~hf_rlion.RLion`). Tensors outside that
(non-contiguous, another dtype: :func:`kernel_eligible` is false) are refused here; RLion's dispatch
(``hf_rlion.rlion._fused_cpu_rlion``) sends them to its reference path in the same step.
The kernel uses ``torch.get_num_threads()`` threads.
"""

from __future__ import annotations

import ctypes
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor

from . import native
from .native import pointer_array

__all__ = [
    "is_supported", "check_supported", "kernel_eligible", "fused_rlion", "atan", "finite_mask",
    "kernel_available",
]  # fmt: skip

_KERNEL_SOURCE = "rlion_cpu.c"
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_FLOAT32_MAX = torch.finfo(torch.float32).max
#: A tensor with fewer elements than this is read (RMS reduction, NaN/inf check) and updated by one
#: thread, with no synchronisation; larger ones are split across threads. The threshold is raised
#: to a quarter of each thread's share of the group so that the per-thread tensors still balance
#: (:func:`split_numel`; the 8-bit kernel uses the same rule).
RMS_SPLIT_MIN_NUMEL = 1 << 20

_library: Optional[ctypes.CDLL] = None
_library_loaded = False


#: The kernel's exported functions (name -> restype, argtypes), checked against its rlion_abi_signature().
_KERNEL_FUNCTIONS = {
    "rlion_step": (
        ctypes.c_int32,
        [
            ctypes.c_int32,  # n
            ctypes.c_void_p,  # params
            ctypes.c_void_p,  # grads
            ctypes.c_void_p,  # exp_avgs
            ctypes.c_void_p,  # numels
            ctypes.c_void_p,  # dtypes
            ctypes.c_void_p,  # inv_bias_correction
            ctypes.c_float,  # w1
            ctypes.c_float,  # w2
            ctypes.c_float,  # lr
            ctypes.c_float,  # weight_decay
            ctypes.c_float,  # alpha
            ctypes.c_int32,  # rms
            ctypes.c_int32,  # maximize
            ctypes.c_int64,  # split_numel
            ctypes.c_int32,  # num_threads
            ctypes.c_int32,  # check_finite
            ctypes.c_void_p,  # skipped (int32 per tensor, out)
        ],
    ),
    "rlion_atan_f32": (None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32]),
    # first, last, counts, worst_ulp, worst_bits, num_threads (benchmarks/atan_exhaustive.py)
    "rlion_atan_check": (
        ctypes.c_int64,
        [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32],
    ),
    "rlion_increment_steps": (None, [ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p]),
    "rlion_finite_mask": (None, [ctypes.c_int32] + [ctypes.c_void_p] * 4 + [ctypes.c_int32]),
}


def _load() -> Optional[ctypes.CDLL]:
    """The compiled kernel, or ``None`` (no compiler, build failure, ``HF_RLION_NATIVE=0``, see :mod:`.native`)."""
    global _library, _library_loaded
    if _library_loaded:
        return _library
    lib = native.load(_KERNEL_SOURCE, _KERNEL_FUNCTIONS, "rlion_abi_signature")
    _library, _library_loaded = lib, True
    return lib


def kernel_available() -> bool:
    """Whether the C kernel could be built and loaded on this machine (compiles it on first call)."""
    return _load() is not None


def _unsupported_reason(params: list[Tensor]) -> Optional[str]:
    for p in params:
        if not p.is_cpu:
            return f"parameters must be on the CPU (got one on {p.device}); use foreach=True on accelerators"
        if p.dtype not in _DTYPE_CODES:
            return f"parameter dtype must be one of float32, bfloat16, float16 (got {p.dtype})"
    if _load() is None:
        return "the C kernel is unavailable (no C compiler, a failed build, or HF_RLION_NATIVE=0)"
    return None


def is_supported(params: list[Tensor]) -> bool:
    """Whether RLion should pick :func:`fused_rlion` by itself for these parameters.

    CPU, float32/bfloat16/float16, kernel built, and plain tensors only: tensor subclasses
    (FSDP2's DTensor shards) stay on torch's dispatch, where the per-tensor RMS is a global
    reduction over all shards. (``fused=True`` asks only :func:`check_supported`.)
    """
    return _unsupported_reason(params) is None and all(type(p) in _PLAIN_TYPES for p in params)


def check_supported(params: list[Tensor]) -> None:
    """Raise ``RuntimeError`` saying why ``fused=True`` cannot be honoured for these parameters."""
    reason = _unsupported_reason(params)
    if reason is not None:
        raise RuntimeError(f"RLion(fused=True): {reason}")


# Plain tensors only: a tensor subclass (DTensor, ...) has a data_ptr that is not the whole tensor.
# nn.Parameter of a subclass takes the subclass's type, so type(p) is Parameter means plain data.
_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


def kernel_eligible(p: Tensor, g: Tensor, m: Tensor) -> bool:
    """Whether :func:`fused_rlion` takes this (parameter, gradient, momentum) triple."""
    # checked for every tensor at every step: cheap attributes first (is_cpu, not device.type)
    return (
        type(p) in _PLAIN_TYPES
        and type(g) is Tensor
        and type(m) is Tensor
        and p.dtype in _DTYPE_CODES
        and g.dtype == p.dtype
        and m.dtype == torch.float32
        and p.is_cpu
        and g.is_cpu
        and m.is_cpu
        and p.is_contiguous()
        and g.is_contiguous()
        and m.is_contiguous()
        and g.shape == p.shape == m.shape
    )


def steps_countable(step_tensors: Iterable[Tensor]) -> bool:
    """Whether the C step counter takes these step-count tensors: all float32 CPU scalars (what
    RLion creates and ``torch.load`` restores)."""
    return all(type(s) is Tensor and s.dtype == torch.float32 and s.is_cpu and s.numel() == 1 for s in step_tensors)


def increment_steps(step_tensors: list[Tensor]) -> Optional[list[int]]:
    """``step += 1`` for each of an optimizer's step-count tensors by one C call; the new counts.

    Only when :func:`steps_countable` and the kernel is loaded; ``None`` otherwise (use torch's
    ``_foreach_add_``, ~1.5 µs per scalar on the CPU, against ~0.2 µs here).
    """
    if _load() is None or not steps_countable(step_tensors):
        return None
    return list(increment_step_pointers(pointer_array(step_tensors)))


def increment_step_pointers(pointers: ctypes.Array) -> ctypes.Array:
    """:func:`increment_steps` on the data pointers of step-count tensors that it accepted before
    (kept by a caller that reuses them from step to step); the new counts, as a C ``int64`` array."""
    counts = (ctypes.c_int64 * len(pointers))()
    _load().rlion_increment_steps(len(pointers), pointers, counts)
    return counts


def split_numel(numels: list[int], threads: int) -> int:
    """Tensors below this many elements are read and updated by one thread each, larger ones split
    across the threads (both kernels, ``rlion_cpu.c`` and ``rlion8bit_cpu.c``)."""
    if threads <= 1:
        return 1 << 62  # one thread: never split, never synchronise
    return max(RMS_SPLIT_MIN_NUMEL, sum(numels) // (4 * threads))


def fused_rlion(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    steps: list[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    alpha: float,
    alpha_scaling: str,
    bias_correction: bool,
    maximize: bool,
    check_finite: bool = False,
) -> list[int]:
    """One RLion step, in place, for every tensor: the contract of ``_single_tensor_rlion``.

    Every triple must be :func:`kernel_eligible` (``ValueError`` otherwise).
    ``steps[i]`` is tensor i's step count after incrementing (used for bias correction).
    With ``check_finite=False`` gradients must be finite (``RLion.step`` drops tensors with
    NaN/inf gradients first). With ``check_finite=True`` this function applies the policy itself:
    a tensor whose gradient holds NaN/inf is left untouched, and the returned list holds the
    indices of those tensors (the kernel checks each tensor right before updating it, while its
    gradient is in cache: cheaper than a separate pass over every gradient).
    """
    if not len(params) == len(grads) == len(exp_avgs) == len(steps):
        raise ValueError("fused_rlion: params, grads, exp_avgs and steps must have the same length")
    if not all(kernel_eligible(p, g, m) for p, g, m in zip(params, grads, exp_avgs)):
        raise ValueError(
            "fused_rlion: every tensor must be kernel_eligible (plain contiguous CPU tensors, float32/bfloat16/"
            "float16 parameters with gradients of their dtype, float32 momentum of their shape)"
        )
    if alpha_scaling not in ("rms", "fixed"):
        raise ValueError(f"alpha_scaling must be one of ['rms', 'fixed'], got {alpha_scaling!r}")
    lib = _load()
    if lib is None:
        raise RuntimeError("RLion(fused=True): the C kernel is unavailable")
    if not params:
        return []
    n = len(params)
    inv_bias_correction = (ctypes.c_double * n)(
        *[1.0 / (1.0 - beta1**step) if bias_correction else 1.0 for step in steps]
    )
    numel_list = [p.numel() for p in params]
    numels = (ctypes.c_int64 * n)(*numel_list)
    threads = torch.get_num_threads()
    dtypes = (ctypes.c_int32 * n)(*[_DTYPE_CODES[p.dtype] for p in params])
    skipped_flags = (ctypes.c_int32 * n)()
    status = lib.rlion_step(
        n,
        pointer_array(params),
        pointer_array(grads),
        pointer_array(exp_avgs),
        numels,
        dtypes,
        inv_bias_correction,
        1.0 - beta1,
        1.0 - beta2,
        lr,
        weight_decay,
        min(alpha, _FLOAT32_MAX),  # a float32 argument: never inf
        1 if alpha_scaling == "rms" else 0,
        1 if maximize else 0,
        split_numel(numel_list, threads),
        threads,
        1 if check_finite else 0,
        skipped_flags,
    )
    if status != 0:
        raise MemoryError("fused RLion kernel: could not allocate its chunk table")
    return [i for i, flag in enumerate(skipped_flags) if flag]


def atan(x: Tensor) -> Tensor:
    """``arctan`` of a float32 CPU tensor with the kernel's vectorised arctan (a new tensor).

    Within 1 ulp of the correctly rounded arctan for every float32 input (checked on all
    2^32 bit patterns by ``benchmarks/atan_exhaustive.py``); ``atan(±0) = ±0``,
    ``atan(±inf) = ±π/2`` (float32), NaN in → NaN out.
    """
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(f"atan: x must be a float32 CPU tensor, got {x.dtype} on {x.device}")
    lib = _load()
    if lib is None:
        raise RuntimeError("atan: the C kernel is unavailable")
    x = x.contiguous()
    out = torch.empty_like(x)
    lib.rlion_atan_f32(x.data_ptr(), out.data_ptr(), x.numel(), torch.get_num_threads())
    return out


def finite_mask(grads: list[Tensor], fallback: Callable[[list[Tensor]], list[bool]]) -> list[bool]:
    """For each gradient, whether every element is finite: one read pass in C, no temporaries.

    CPU float32/bfloat16/float16 contiguous plain tensors go through the kernel, any other through
    ``fallback`` (the optimizers pass :func:`hf_rlion._optimizer_base.finite_gradient_mask`, which
    gives the same answer).
    """
    lib = _load()
    fast = [
        i
        for i, g in enumerate(grads)
        if lib is not None
        and type(g) is Tensor
        and g.device.type == "cpu"
        and g.dtype in _DTYPE_CODES
        and g.is_contiguous()
    ]
    mask = [True] * len(grads)
    fast_set = set(fast)
    slow = [i for i in range(len(grads)) if i not in fast_set]
    if slow:
        for i, ok in zip(slow, fallback([grads[i] for i in slow])):
            mask[i] = ok
    if fast:
        n = len(fast)
        ok = (ctypes.c_uint8 * n)()
        lib.rlion_finite_mask(
            n,
            pointer_array([grads[i] for i in fast]),
            (ctypes.c_int64 * n)(*[grads[i].numel() for i in fast]),
            (ctypes.c_int32 * n)(*[_DTYPE_CODES[grads[i].dtype] for i in fast]),
            ok,
            torch.get_num_threads(),
        )
        for i, flag in zip(fast, ok):
            mask[i] = bool(flag)
    return mask

