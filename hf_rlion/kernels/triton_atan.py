r"""arctan in float32 for Triton kernels: the C kernels' ``rlion_atanf``, operation for operation.

Range reduction ``x = |a|``; ``t = x`` for ``x < 1``, ``t = 1/x`` (correctly rounded, ``div_rn``)
for ``x >= 1``; on ``[0, 1]`` ``atan(t) = t + t z P(z)``, ``z = t²``, ``P`` the degree-8 minimax
polynomial of ``hf_rlion/kernels/rlion_atan.h`` (the same float32 coefficients, read from that
header, and the same Horner order with ``fma``). For ``x >= 1``, ``π/2 - atan(t)`` with
``PIO2_HI - t`` split exactly (Fast2Sum), then the sign of ``a`` is put back. ``±0`` keep their
sign, ``±inf`` give ``±π/2`` (float32), NaN stays NaN.

Where the C code multiplies and adds separately, so does this code, but a GPU compiler may contract
such a pair into an ``fma`` (Triton allows it by default) and Triton's interpreter evaluates ``fma``
as a multiply then an add: the result may then differ from the C function by 1 ulp (tested under the
interpreter against :func:`hf_rlion.kernels.cpu_rlion.atan`).
"""

import re
from pathlib import Path

import triton
import triton.language as tl

#: The C header whose ``static const float NAME = <hexfloat>f;`` lines hold the coefficients.
ATAN_HEADER = Path(__file__).with_name("rlion_atan.h")
_CONSTANT = re.compile(r"^static const float (?P<name>\w+) = (?P<value>[-+]?0x[0-9a-fA-F.]+p[-+]?\d+)f;", re.M)


def header_constants(path: Path = ATAN_HEADER) -> dict[str, float]:
    """The float32 constants of the C arctangent (``ATAN_C0`` .. ``ATAN_C8``, ``PIO2_HI``, ``PIO2_LO``),
    read from its header with :meth:`float.fromhex` (exact: they are float32 values)."""
    return {m["name"]: float.fromhex(m["value"]) for m in _CONSTANT.finditer(path.read_text())}


_C = header_constants()
ATAN_C0 = tl.constexpr(_C["ATAN_C0"])
ATAN_C1 = tl.constexpr(_C["ATAN_C1"])
ATAN_C2 = tl.constexpr(_C["ATAN_C2"])
ATAN_C3 = tl.constexpr(_C["ATAN_C3"])
ATAN_C4 = tl.constexpr(_C["ATAN_C4"])
ATAN_C5 = tl.constexpr(_C["ATAN_C5"])
ATAN_C6 = tl.constexpr(_C["ATAN_C6"])
ATAN_C7 = tl.constexpr(_C["ATAN_C7"])
ATAN_C8 = tl.constexpr(_C["ATAN_C8"])
#: float32(π/2), above π/2 by 4.37e-8, and π/2 - PIO2_HI
PIO2_HI = tl.constexpr(_C["PIO2_HI"])
PIO2_LO = tl.constexpr(_C["PIO2_LO"])


@triton.jit
def atan_f32(a):
    """arctan of a float32 tensor (see the module docstring)."""
    x = tl.abs(a)
    big = x >= 1.0
    # 1 / x only where it is used, so that 1 / 0 never appears in the unused lane
    t = tl.where(big, tl.math.div_rn(tl.full(x.shape, 1.0, tl.float32), tl.where(big, x, 1.0)), x)
    z = t * t
    poly = tl.full(x.shape, ATAN_C8, tl.float32)
    poly = tl.fma(poly, z, ATAN_C7)
    poly = tl.fma(poly, z, ATAN_C6)
    poly = tl.fma(poly, z, ATAN_C5)
    poly = tl.fma(poly, z, ATAN_C4)
    poly = tl.fma(poly, z, ATAN_C3)
    poly = tl.fma(poly, z, ATAN_C2)
    poly = tl.fma(poly, z, ATAN_C1)
    poly = tl.fma(poly, z, ATAN_C0)
    tail = (t * z) * poly
    small_result = t + tail
    head = PIO2_HI - t
    head_err = (PIO2_HI - head) - t
    big_result = head + ((head_err + PIO2_LO) - tail)
    result = tl.where(big, big_result, small_result)
    # copysign(result, a): result is >= 0 or NaN
    return tl.where(a.to(tl.int32, bitcast=True) < 0, -result, result)


@triton.jit
def _atan_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    tl.store(y_ptr + offsets, atan_f32(x), mask=mask)


def atan(x, block_size: int = 1024):
    """``atan_f32`` of a contiguous float32 tensor (a new tensor): for tests and checks."""
    import torch

    if x.dtype != torch.float32:
        raise ValueError(f"atan: x must be float32, got {x.dtype}")
    x = x.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    if n:
        _atan_kernel[(triton.cdiv(n, block_size),)](x, out, n, BLOCK=block_size)
    return out
