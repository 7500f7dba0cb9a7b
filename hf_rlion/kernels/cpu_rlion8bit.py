r"""The fused CPU RLion8bit step: the C kernel ``rlion8bit_cpu.c`` and its Python glue.

:class:`hf_rlion.RLion8bit` sends float32 and bfloat16 CPU tensors with 8-bit state here
(:meth:`~hf_rlion.RLion8bit._use_kernel` decides per tensor, :func:`unsupported_reason` says why
not). The state layout is bitsandbytes' (``state1`` uint8 codes into the 256-entry ``qmap1``,
``absmax1`` float32 per block of :data:`BLOCKSIZE`); :func:`check_8bit_state` checks it before any
pointer reaches C. The kernel, built by :mod:`hf_rlion.kernels.native`, dequantises, steps and
requantises each tensor in one pass (formulas: ``rlion8bit_cpu.c`` and
:func:`hf_rlion.reference8bit.rlion8bit_reference_update_`, which the tests compare it against);
codes are found with bitsandbytes' CPU lookup table (:func:`quantize_lut`).
"""

from __future__ import annotations

import ctypes
import math
import threading
import weakref
from typing import Any, Iterable, Optional

import torch
from torch import Tensor

from . import cpu_rlion, native
from .native import pointer_array

__all__ = [
    "BLOCKSIZE", "check_8bit_state", "kernel_available", "unsupported_reason", "quantize_lut", "fused_update_many_",
    "fast_atan",
]  # fmt: skip

#: Elements per quantisation block (bitsandbytes' blockwise optimizers use 256; the same as
#: ``hf_rlion._optimizer_base.BLOCKSIZE``, tested).
BLOCKSIZE = 256
#: Below this many elements in one call the kernel runs on one thread (waking a thread team costs more).
_PARALLEL_MIN_NUMEL = 1 << 16
#: Parameter dtypes the C kernel takes (the code it expects); float16 uses the reference path.
KERNEL_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_TWO_OVER_PI = 2.0 / math.pi
_FLOAT32_MAX = torch.finfo(torch.float32).max


def check_8bit_state(param: Tensor, codes: Tensor, absmax: Tensor, qmap: Tensor) -> None:
    """Raise ``ValueError`` unless one tensor's 8-bit state has the sizes, dtypes and layout that
    the C kernel and bitsandbytes read and write (both trust them; a wrong size is a memory error
    there): uint8 codes with one entry per element of ``param``, float32 ``absmax`` with one entry
    per block of 256, a 256-entry float32 ``qmap``, codes and absmax contiguous, all on
    ``param``'s device. O(1): no element is read (``load_state_dict`` checks the values)."""
    numel, device = param.numel(), param.device
    blocks = -(-numel // BLOCKSIZE)
    if (
        codes.dtype != torch.uint8
        or codes.numel() != numel
        or absmax.dtype != torch.float32
        or absmax.numel() != blocks
        or qmap.dtype != torch.float32
        or qmap.numel() != 256
        or not (codes.is_contiguous() and absmax.is_contiguous())
        or not (codes.device == absmax.device == qmap.device == device)
    ):
        raise ValueError(
            f"RLion8bit: the 8-bit state of a parameter of shape {tuple(param.shape)} on {device} does not fit it: "
            f"state1 {codes.dtype} {tuple(codes.shape)} on {codes.device}, absmax1 {absmax.dtype} "
            f"{tuple(absmax.shape)}, qmap1 {qmap.dtype} {tuple(qmap.shape)} (expected contiguous uint8 codes with "
            f"{numel} entries, float32 absmax1 with {blocks}, 256 float32 qmap1 entries, all on {device}); "
            "was optimizer.state changed by hand?"
        )


_kernel_lock = threading.Lock()
_kernel: Optional[ctypes.CDLL] = None
_kernel_loaded = False
_lut_cache: dict[bytes, Tensor] = {}
# the table of each qmap tensor seen (by id, with a weak reference to tell a new tensor at a
# reused id apart) and the tensor's version counter when it was built: a step then finds it
# without converting the qmap to bytes (3.8 µs per tensor per step)
_lut_by_qmap: dict[int, tuple[weakref.ref, int, Tensor]] = {}


_p, _i64, _f32, _i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
#: The kernel's exported functions (name -> restype, argtypes), checked against its rlion8bit_abi_signature().
_KERNEL_FUNCTIONS = {
    "rlion8bit_step_many": (
        _i32,
        [_i64, _i32, _p, _p, _p, _p, _p, _p, _p, _p, _f32, _f32, _i32]
        + [_f32, _i32, _f32, _f32, _i32, _f32, _i32, _i32, _i64, _p],
    ),
    "rlion8bit_atan_f32": (None, [_p, _p, _i64]),
    "rlion8bit_table_index": (None, [_p, _p, _i64]),
}


def _load_kernel() -> Optional[ctypes.CDLL]:
    """The compiled ``rlion8bit_cpu.c`` with its signatures declared, or ``None``."""
    global _kernel, _kernel_loaded
    if _kernel_loaded:  # every step asks: no lock once loaded
        return _kernel
    with _kernel_lock:
        if _kernel_loaded:
            return _kernel
        library = native.load("rlion8bit_cpu.c", _KERNEL_FUNCTIONS, "rlion8bit_abi_signature")
        _kernel, _kernel_loaded = library, True
        return library


def kernel_available() -> bool:
    """Whether the fused CPU kernel could be built and loaded here."""
    return _load_kernel() is not None


def quantize_lut(qmap: Tensor) -> Tensor:
    """The 65536-entry table bitsandbytes' CPU ``quantize_blockwise`` uses to find a code.

    Entry ``i`` is the code nearest to ``v = -1 + 2i/65535`` (the number of midpoints between
    consecutive ``qmap`` entries that lie below ``v``); a normalised value ``v`` is looked up at
    ``round((v + 1) / 2 · 65535)``. Built in float32 with bitsandbytes' own operation order, so
    codes match its ``quantize_blockwise`` exactly (tested).
    """
    qmap_cpu = qmap.detach().to("cpu", torch.float32).contiguous()
    key = qmap_cpu.numpy().tobytes()
    table = _lut_cache.get(key)
    if table is None:
        midpoints = 0.5 * (qmap_cpu[:-1] + qmap_cpu[1:])
        grid = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535
        table = torch.searchsorted(midpoints, grid, right=False).to(torch.uint8).contiguous()
        _lut_cache[key] = table
    return table


def unsupported_reason(param: Tensor, grad: Tensor, codes: Tensor, qmap: Tensor) -> str:
    if not param.is_cpu:
        return f"parameters on {param.device.type} (the kernel is CPU-only)"
    if param.dtype not in KERNEL_DTYPES or grad.dtype != param.dtype:
        return f"{param.dtype} parameters / {grad.dtype} gradients (the kernel takes float32 or bfloat16, both alike)"
    if not (param.is_contiguous() and codes.is_contiguous()):
        return "non-contiguous parameters or state"
    if qmap.numel() != 256 or qmap.dtype != torch.float32:
        return "a quantisation map that is not 256 float32 entries"
    return ""


def _lut_of(qmap: Tensor) -> Tensor:
    """:func:`quantize_lut` of a qmap state tensor, remembered per tensor and version."""
    cached = _lut_by_qmap.get(id(qmap))
    if cached is not None and cached[0]() is qmap and cached[1] == qmap._version:
        return cached[2]
    lut = quantize_lut(qmap)
    key = id(qmap)
    _lut_by_qmap[key] = (weakref.ref(qmap, lambda _, key=key: _lut_by_qmap.pop(key, None)), qmap._version, lut)
    return lut


class _KernelTensors:
    """The per-tensor arguments of ``rlion8bit_step_many`` that stay the same from step to step.

    The state's data pointers (codes, absmax, qmap and its code table, :func:`_lut_of`) and the
    sizes, as C arrays. It holds the tensors, so the pointers stay valid while it lives. Each
    tensor's state is checked against its parameter first (:func:`check_8bit_state`).
    """

    __slots__ = ("count", "codes", "absmaxes", "qmaps", "luts", "numels", "total_numel", "_tensors")

    def __init__(self, params: list[Tensor], codes: list[Tensor], absmaxes: list[Tensor], qmaps: list[Tensor]):
        for param, code, absmax, qmap in zip(params, codes, absmaxes, qmaps, strict=True):
            check_8bit_state(param, code, absmax, qmap)
        luts = [_lut_of(q) for q in qmaps]
        qmaps = [q.contiguous() for q in qmaps]
        numels = [c.numel() for c in codes]
        self.count = len(codes)
        self.codes, self.absmaxes = pointer_array(codes), pointer_array(absmaxes)
        self.qmaps, self.luts = pointer_array(qmaps), pointer_array(luts)
        self.numels = (ctypes.c_int64 * len(numels))(*numels)
        self.total_numel = sum(numels)
        self._tensors = (codes, absmaxes, qmaps, luts)


def _run_kernel(
    library: ctypes.CDLL,
    tensors: _KernelTensors,
    dtype: torch.dtype,
    param_pointers: ctypes.Array,
    grad_pointers: ctypes.Array,
    steps: Iterable[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    alpha: float,
    alpha_scaling: str,
    bias_correction: bool,
    maximize: bool,
) -> list[int]:
    """One ``rlion8bit_step_many`` call (see :func:`fused_update_many_`); the skipped tensors' indices."""
    count = tensors.count
    threads = max(torch.get_num_threads(), 1) if tensors.total_numel >= _PARALLEL_MIN_NUMEL else 1
    split_numel = cpu_rlion.split_numel([tensors.total_numel], threads)
    bias_divs = (ctypes.c_float * count)(*[1.0 - beta1**s for s in steps]) if bias_correction else None
    skipped = (ctypes.c_int32 * count)()
    skipped_count = library.rlion8bit_step_many(
        count, KERNEL_DTYPES[dtype], param_pointers, grad_pointers, tensors.codes, tensors.absmaxes, tensors.qmaps,
        tensors.luts, tensors.numels, bias_divs, 1.0 - beta1, 1.0 - beta2, int(bias_correction),
        min(alpha, _FLOAT32_MAX),  # a float32 argument: never inf
        int(alpha_scaling == "rms"), _TWO_OVER_PI, 1.0 - lr * weight_decay, int(weight_decay != 0.0), -lr,
        int(maximize), threads, split_numel, skipped,
    )  # fmt: skip
    if skipped_count < 0:
        raise MemoryError("RLion8bit: the 8-bit kernel could not allocate its chunk table")
    return [i for i, flag in enumerate(skipped) if flag] if skipped_count else []


def fused_update_many_(
    library: ctypes.CDLL,
    params: list[Tensor],
    grads: list[Tensor],
    codes: list[Tensor],
    absmaxes: list[Tensor],
    qmaps: list[Tensor],
    steps: list[int],
    **hyperparameters: Any,
) -> list[int]:
    """The step of :func:`hf_rlion.reference8bit.rlion8bit_reference_update_` on many CPU tensors, by the C kernel.

    All parameters share one dtype (float32 or bfloat16) and their gradients have it too.
    ``hyperparameters``: ``lr``, ``beta1``, ``beta2``, ``weight_decay``, ``alpha``,
    ``alpha_scaling``, ``bias_correction``, ``maximize``.

    One call, one parallel region for all tensors. Each tensor gets a read pass right before its
    update: under ``alpha_scaling="rms"`` it sums ĉ² (the per-tensor α is then computed as
    :func:`hf_rlion.rlion._effective_alpha` computes it, each intermediate rounded to float32, and
    capped as there),
    under ``"fixed"`` it only scans g. That pass also applies the non-finite policy: a tensor whose
    gradient holds NaN/inf is left untouched (parameter, codes, absmax). Returns the indices of
    those tensors (the caller undoes their step count and counts them). Tensors below
    :func:`hf_rlion.kernels.cpu_rlion.split_numel` elements are done by one thread each, larger ones split.
    """
    grads = [g.contiguous() for g in grads]
    tensors = _KernelTensors(params, codes, absmaxes, qmaps)
    return _run_kernel(
        library, tensors, params[0].dtype, pointer_array(params), pointer_array(grads), steps, **hyperparameters
    )


def fast_atan(x: Tensor) -> Tensor:
    """The kernel's arctangent on a float32 CPU tensor (for tests and accuracy checks)."""
    library = _load_kernel()
    if library is None:
        raise RuntimeError("the hf_rlion 8-bit CPU kernel is not available here")
    x = x.detach().to("cpu", torch.float32).contiguous()
    out = torch.empty_like(x)
    library.rlion8bit_atan_f32(x.data_ptr(), out.data_ptr(), x.numel())
    return out
