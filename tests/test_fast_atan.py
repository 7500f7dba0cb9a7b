"""The fused kernel's float32 arctan against the correctly rounded value and against torch.atan.

Guarantee tested here (and on all 2^32 inputs by benchmarks/atan_exhaustive.py): at most 1 ulp
from the correctly rounded arctan, hence at most 1 ulp from torch.atan where torch is itself
correctly rounded; specials exactly as torch.atan.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_rlion.kernels import cpu_rlion

pytestmark = pytest.mark.skipif(not cpu_rlion.kernel_available(), reason="no C compiler for the CPU kernel")


def ordered(bits: np.ndarray) -> np.ndarray:
    b = bits.astype(np.int64)
    return np.where(b >= 0x80000000, 0x80000000 - b, b)


def ulp_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Number of float32 values between a and b (0 = identical, +0/-0 count as 0 apart)."""
    return np.abs(ordered(a.view(np.uint32)) - ordered(b.view(np.uint32)))


def correctly_rounded_atan(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.arctan(x.astype(np.float64)).astype(np.float32)


def kernel_atan(x: np.ndarray) -> np.ndarray:
    return cpu_rlion.atan(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()


def test_ulp_distance_helper_counts_representable_floats():
    one = np.array([1.0], dtype=np.float32)
    assert ulp_distance(one, np.nextafter(one, np.float32(2))) == 1
    assert ulp_distance(np.array([-0.0], np.float32), np.array([0.0], np.float32)) == 0
    tiny = np.array([np.float32(1e-45)])
    assert ulp_distance(-tiny, tiny) == 2


def test_dense_sample_of_all_bit_patterns_within_one_ulp():
    # ~1M patterns spread over the whole 32-bit space (both signs, every exponent incl. subnormals)
    bits = np.arange(12345, 1 << 32, 4093, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    ours = kernel_atan(x)
    finite_or_inf = ~np.isnan(x)
    exact = correctly_rounded_atan(x)
    theirs = torch.atan(torch.from_numpy(x)).numpy()
    d_exact = ulp_distance(ours[finite_or_inf], exact[finite_or_inf])
    d_torch = ulp_distance(ours[finite_or_inf], theirs[finite_or_inf])
    assert d_exact.max() <= 1
    assert d_torch.max() <= 1
    # nearly every value is the correctly rounded one (all 2^32: 99.82 %)
    assert np.mean(d_exact == 0) > 0.995
    assert np.isnan(ours[~finite_or_inf]).all()


def test_specials_match_torch_exactly():
    f32 = np.float32
    specials = np.array(
        [0.0, -0.0, np.inf, -np.inf, 1.0, -1.0, np.finfo(f32).max, -np.finfo(f32).max, 1e38, -3e37,
         np.finfo(f32).tiny, -np.finfo(f32).tiny, 1e-45, -1e-45, 2e-40, 1e-20, 1e20, 16777216.0],
        dtype=f32,
    )
    ours = kernel_atan(specials)
    theirs = torch.atan(torch.from_numpy(specials)).numpy()
    assert ulp_distance(ours, theirs).max() == 0
    assert np.array_equal(np.signbit(ours), np.signbit(specials))  # -0 stays -0
    assert ours[2] == f32(math.pi / 2) and ours[3] == -f32(math.pi / 2)


def test_nan_propagates_for_every_payload_and_sign():
    bits = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FFFFFFF, 0x7FA00000], dtype=np.uint32)
    assert np.isnan(kernel_atan(bits.view(np.float32))).all()


def test_subnormals_and_tiny_values_come_back_unchanged():
    # atan(x) = x - x^3/3 + ...: below ~2^-12 the cubic term is under half an ulp
    bits = np.concatenate([np.arange(1, 1 << 23, 997, dtype=np.uint32), np.array([0x007FFFFF], dtype=np.uint32)])
    x = np.concatenate([bits.view(np.float32), -bits.view(np.float32), np.float32([1e-30, 2.0**-13])])
    ours = kernel_atan(x)
    assert np.array_equal(ours, x)
    assert np.array_equal(ours, torch.atan(torch.from_numpy(x)).numpy())


def test_around_the_range_reduction_point_one():
    # the kernel switches from atan(x) to pi/2 - atan(1/x) at |x| = 1: check the floats around it
    one = np.float32(1.0)
    around = [one]
    lo = hi = one
    for _ in range(2000):
        lo, hi = np.nextafter(lo, np.float32(0)), np.nextafter(hi, np.float32(2))
        around += [lo, hi]
    x = np.array(around + [-v for v in around], dtype=np.float32)
    assert ulp_distance(kernel_atan(x), correctly_rounded_atan(x)).max() <= 1


def test_large_arrays_and_threads_give_the_same_values():
    x = torch.randn(300_000) * 10.0  # above the kernel's parallel threshold
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = cpu_rlion.atan(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, cpu_rlion.atan(x))
    assert ulp_distance(single.numpy(), correctly_rounded_atan(x.numpy())).max() <= 1


def test_rejects_other_dtypes_with_a_clear_error():
    with pytest.raises(ValueError, match="float32"):
        cpu_rlion.atan(torch.zeros(3, dtype=torch.float64))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1, max_size=64))
def test_any_float32_within_one_ulp(values):
    x = np.array(values, dtype=np.float32)
    ours = kernel_atan(x)
    nan = np.isnan(x)
    assert np.isnan(ours[nan]).all()
    assert ulp_distance(ours[~nan], correctly_rounded_atan(x)[~nan]).max(initial=0) <= 1


def test_the_exhaustive_checker_counts_a_slice_correctly():
    """benchmarks/atan_exhaustive.py's C sweep, on the 2^20 floats from 0.5 up (where 1-ulp cases exist)."""
    import ctypes

    check = cpu_rlion._load().rlion_atan_check
    check.restype = ctypes.c_int64
    check.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32]
    counts, worst, worst_bits = (ctypes.c_int64 * 4)(), ctypes.c_int64(-1), ctypes.c_uint32(0)
    first = int(np.float32(0.5).view(np.uint32))
    problems = check(first, first + (1 << 20), counts, ctypes.byref(worst), ctypes.byref(worst_bits), 2)
    assert problems == 0 and sum(counts) == 1 << 20 and worst.value == 1
    # the same slice through numpy gives the same histogram
    x = np.arange(first, first + (1 << 20), dtype=np.uint32).view(np.float32)
    d = ulp_distance(kernel_atan(x), correctly_rounded_atan(x))
    assert list(counts) == np.bincount(np.minimum(d, 3), minlength=4).tolist()
