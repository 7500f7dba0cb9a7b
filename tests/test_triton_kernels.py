"""The Triton kernels (hf_rlion/kernels/triton_*.py), run on CPU tensors by Triton's interpreter.

The interpreter is switched on by ``TRITON_INTERPRET=1`` before triton is imported, so every test body
runs in one worker subprocess started with that variable (and without ``HF_RLION_NATIVE``, so the C
kernels it compares against are built); the pytest process itself is unaffected. On a GPU the same
kernels are compiled instead: ``benchmarks/gpu_check.py`` checks them there.
"""

from __future__ import annotations

import math
import os

import pytest

pytest.importorskip("triton")

from _interpreter_worker import interpreter_worker  # noqa: E402

HYPERPARAMETERS = dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1, alpha=3.0, bias_correction=True)


@pytest.fixture(scope="module")
def interpreter():
    """A worker process whose triton runs kernels in the interpreter; tests submit their bodies to it."""
    with interpreter_worker({"TRITON_INTERPRET": "1", "HF_RLION_NATIVE": None}, _interpreter_on) as run:
        yield run


def _interpreter_on() -> None:
    import hf_rlion.kernels.triton_rlion  # noqa: F401  (imports triton under the interpreter)

    assert os.environ.get("TRITON_INTERPRET") == "1"


# --------------------------------------------------------------------------------------------
# Bodies (run in the worker)
# --------------------------------------------------------------------------------------------


def _ordered(bits):
    import torch

    bits = bits.to(torch.int64)
    return torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)


def _atan_body() -> None:
    import torch

    from hf_rlion.kernels import cpu_rlion
    from hf_rlion.kernels import triton_atan

    g = torch.Generator().manual_seed(0)
    one = torch.ones(2000)
    x = torch.cat(
        [
            torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1.0, -1.0, 1e-45, -1e-45, 1e-40, 3.4e38, -3.4e38]),
            torch.randn(20000, generator=g),
            torch.randn(10000, generator=g) * 1e4,
            torch.exp(torch.empty(20000).uniform_(-90, 88, generator=g)) * torch.randn(20000, generator=g).sign(),
            # the 1000 floats on either side of 1, where the range reduction switches
            (one.view(torch.int32) + torch.arange(-1000, 1000, dtype=torch.int32)).view(torch.float32),
            # any bit pattern: subnormals, NaNs with payloads, everything
            torch.randint(-(2**31), 2**31 - 1, (20000,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32),
        ]
    )
    ours = triton_atan.atan(x, block_size=4096)
    reference = cpu_rlion.atan(x)
    nan = torch.isnan(x)
    assert torch.isnan(ours[nan]).all()
    ulps = (_ordered(ours.view(torch.int32)) - _ordered(reference.view(torch.int32))).abs()[~nan]
    assert ulps.max().item() <= 1, ulps.max().item()
    assert (ulps == 0).float().mean().item() > 0.98  # the same polynomial, not merely an accurate one
    assert torch.equal(ours[~nan].signbit(), x[~nan].signbit())


def _own_rounding(dtype) -> float:
    """The relative rounding step of storing a float32 result as ``dtype`` (0 for float32 itself)."""
    import torch

    return 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps


def _rlion_case(scaling: str, maximize: bool, device_steps: bool):
    """Tensors of three dtypes (three dtype groups in one call) and awkward sizes, a float64 copy each."""
    import torch

    torch.manual_seed(1)
    shapes = [(1023,), (), (0,), (1025,), (40, 77), (1,)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.bfloat16, torch.float16]
    params = [torch.randn(s).to(d) for s, d in zip(shapes, dtypes)]
    grads = [(torch.randn(s) * 10.0 ** torch.randint(-4, 1, ())).to(d) for s, d in zip(shapes, dtypes)]
    exp_avgs = [torch.randn(s) * 1e-2 for s in shapes]
    steps = [1, 2, 3, 4, 5, 6]
    return params, grads, exp_avgs, (torch.tensor(steps, dtype=torch.float32) if device_steps else steps), steps


def _rlion_reference_body(scaling: str, maximize: bool, device_steps: bool) -> None:
    import torch

    from hf_rlion.kernels.triton_rlion import fused_rlion
    from hf_rlion.rlion import rlion_update_

    params, grads, exp_avgs, steps, step_list = _rlion_case(scaling, maximize, device_steps)
    wide = [(p.double(), g.double(), m.double()) for p, g, m in zip(params, grads, exp_avgs)]
    hyperparameters = dict(HYPERPARAMETERS, alpha_scaling=scaling, maximize=maximize)
    flags = fused_rlion(params, grads, exp_avgs, steps, block_size=1024, **hyperparameters)
    assert flags.dtype == torch.int32 and flags.tolist() == [0] * len(params)
    for (p64, g64, m64), step, p, m in zip(wide, step_list, params, exp_avgs):
        rlion_update_(p64, g64, m64, step, **hyperparameters)
        assert p.shape == p64.shape and m.shape == m64.shape
        # the parameter: two float32 roundings (p * decay, the fma: one float32 ulp together), then its
        # own rounding (half an ulp of bfloat16/float16), plus float32 arithmetic on the step
        eps = _own_rounding(p.dtype) / 2 + torch.finfo(torch.float32).eps
        tolerance = p64.abs() * eps + HYPERPARAMETERS["lr"] * 1e-5
        assert ((p.double() - p64).abs() <= tolerance).all(), (p.dtype, (p.double() - p64).abs().max())
        m_tolerance = (m64.abs() + g64.abs()) * 4 * torch.finfo(torch.float32).eps
        assert ((m.double() - m64).abs() <= m_tolerance).all()


def _zero_tensor_body() -> None:
    import torch

    from hf_rlion.kernels.triton_rlion import fused_rlion

    # RMS(c) = 0: k = alpha / FLT_MIN * inv_bc overflows float32 at inv_bc = 10 unless clamped, and inf * 0 = NaN
    param = torch.randn(3000)
    before = param.clone()
    exp_avg = torch.zeros(3000)
    hyperparameters = dict(HYPERPARAMETERS, alpha_scaling="rms", maximize=False, weight_decay=0.0)
    fused_rlion([param], [torch.zeros(3000)], [exp_avg], [1], block_size=1024, **hyperparameters)
    assert torch.equal(param, before)
    assert torch.equal(exp_avg, torch.zeros(3000))


def _nonfinite_body(scaling: str) -> None:
    import torch

    from hf_rlion.kernels.triton_rlion import fused_rlion

    torch.manual_seed(2)
    params = [torch.randn(2500), torch.randn(700).bfloat16(), torch.randn(1500)]
    grads = [torch.randn(2500), torch.randn(700).bfloat16(), torch.randn(1500)]
    grads[0][2100] = math.nan  # in the last chunk only
    grads[1][3] = -math.inf
    exp_avgs = [torch.randn(p.shape) for p in params]
    before = [(p.clone(), m.clone()) for p, m in zip(params, exp_avgs)]
    hyperparameters = dict(HYPERPARAMETERS, alpha_scaling=scaling, maximize=False)
    flags = fused_rlion(params, grads, exp_avgs, [1, 1, 1], block_size=1024, **hyperparameters)
    assert flags.tolist() == [1, 1, 0]
    for i in (0, 1):
        assert torch.equal(params[i], before[i][0]) and torch.equal(exp_avgs[i], before[i][1])
    assert not torch.equal(params[2], before[2][0]) and torch.isfinite(params[2]).all()
    # without the check nothing is flagged (the caller promised finite gradients)
    grads[1][3] = 0.0
    flags = fused_rlion(params[1:], grads[1:], exp_avgs[1:], [2, 2], check_finite=False, block_size=1024, **hyperparameters)
    assert flags.tolist() == [0, 0] and not torch.equal(params[1], before[1][0])


def _new_gradients_body() -> None:
    import torch

    from hf_rlion.kernels.triton_rlion import fused_rlion

    params = [torch.randn(1500), torch.randn(10)]
    exp_avgs = [torch.zeros(1500), torch.zeros(10)]
    hyperparameters = dict(HYPERPARAMETERS, alpha_scaling="fixed", maximize=False)
    first = [torch.randn(1500), torch.randn(10)]
    assert fused_rlion(params, first, exp_avgs, [1, 1], block_size=1024, **hyperparameters).tolist() == [0, 0]
    second = [torch.randn(1500), torch.full((10,), math.nan)]  # the same parameters, new gradient tensors
    del first
    before = params[1].clone()
    assert fused_rlion(params, second, exp_avgs, [2, 2], block_size=1024, **hyperparameters).tolist() == [0, 1]
    assert torch.equal(params[1], before)
    # new state tensors for the same parameters: their own pointers are used
    fresh = [torch.zeros(1500), torch.zeros(10)]
    second[1].zero_()
    fused_rlion(params, second, fresh, [1, 1], block_size=1024, **hyperparameters)
    assert fresh[0].abs().sum() > 0 and torch.equal(fresh[1], torch.zeros(10))


def _refusals_body() -> None:
    import torch

    from hf_rlion.kernels.triton_rlion import fused_rlion
    from hf_rlion.kernels.triton_rlion8bit import fused_rlion8bit

    hyperparameters = dict(HYPERPARAMETERS, alpha_scaling="rms", maximize=False)
    p, g = torch.zeros(300), torch.zeros(300)
    cases = [
        lambda: fused_rlion([p], [g], [torch.zeros(300)], [1], block_size=1000, **hyperparameters),
        lambda: fused_rlion([p], [g], [torch.zeros(299)], [1], **hyperparameters),
        lambda: fused_rlion([p], [g], [torch.zeros(300, dtype=torch.float64)], [1], **hyperparameters),
        lambda: fused_rlion([p], [g.half()], [torch.zeros(300)], [1], **hyperparameters),
        lambda: fused_rlion([p], [g], [torch.zeros(600)[::2]], [1], **hyperparameters),
        lambda: fused_rlion([p], [g], [torch.zeros(300)], [1], **dict(hyperparameters, alpha_scaling="x")),
        lambda: fused_rlion8bit([p], [g], [torch.zeros(300, dtype=torch.uint8)], [torch.zeros(1)], torch.zeros(256), [1], **hyperparameters),
        lambda: fused_rlion8bit([p], [g], [torch.zeros(300, dtype=torch.uint8)], [torch.zeros(2)], torch.zeros(256), [1], blocks_per_program=3, **hyperparameters),
    ]
    for case in cases:
        try:
            case()
        except ValueError:
            continue
        raise AssertionError("accepted arguments the kernels cannot take")
    assert torch.equal(p, torch.zeros(300))


def _nearest_codes_reference(values, qmap):
    """Brute force: bitsandbytes' normalisation v = x * (1 / absmax) in float32 (tiny blocks scaled by
    2^64 first), then the index of the nearest qmap entry by exact distance, ties to the lower index."""
    import numpy as np

    x = values.numpy().astype(np.float32).reshape(-1, 256)
    absmax = np.abs(x).max(axis=1, keepdims=True)
    tiny = absmax < np.finfo(np.float32).tiny
    scale = np.where(tiny, np.float32(2.0**64), np.float32(1.0)).astype(np.float32)
    scaled, scaled_max = x * scale, absmax * scale
    inverse = np.float32(1.0) / np.where(scaled_max == 0, np.float32(1.0), scaled_max)
    v = (scaled * inverse).astype(np.float64)
    distance = np.abs(v[..., None] - qmap.numpy().astype(np.float64)[None, None, :])
    return np.argmin(distance, axis=-1).reshape(-1), absmax.reshape(-1)


def _quantize_body() -> None:
    import bitsandbytes.functional as bnb_functional
    import numpy as np
    import torch

    from hf_rlion import reference8bit, rlion8bit
    from hf_rlion.kernels import triton_rlion8bit
    from hf_rlion.kernels.triton_rlion8bit import quantize_blockwise

    assert triton_rlion8bit.BLOCKSIZE == rlion8bit.BLOCKSIZE
    assert triton_rlion8bit.SUBNORMAL_BLOCK_SCALE == reference8bit._SUBNORMAL_BLOCK_SCALE
    torch.manual_seed(3)
    qmap = bnb_functional.create_dynamic_map(signed=True)
    q = qmap.double()
    blocks = [torch.randn(256) * torch.exp(torch.randn(256) * 3)]  # wide dynamic range
    blocks.append(torch.zeros(256))  # all zero: absmax 0, the code of 0.0
    blocks.append(torch.randn(256) * 1e-41)  # subnormal absmax: scaled by 2^64 first
    blocks.append(torch.randn(256) * 3e-39)  # just below the smallest normal
    ties = ((q[:-1] + q[1:]) / 2).float()  # midpoints; those representable in float32 are exact ties
    blocks.append(torch.cat([torch.ones(1), ties]))  # absmax 1: v = x
    blocks.append(torch.randn(100))  # a partial last block
    values = torch.cat(blocks)
    codes, absmax = quantize_blockwise(values, qmap, blocks_per_program=2)
    padded = torch.nn.functional.pad(values, (0, -values.numel() % 256))
    expected_codes, expected_absmax = _nearest_codes_reference(padded, qmap)
    assert np.array_equal(absmax.numpy(), expected_absmax)  # exact
    assert np.array_equal(codes.numpy().astype(np.int64), expected_codes[: values.numel()])
    assert (codes[256:512] == 127).all() and qmap[127] == 0 and absmax[1] == 0
    exact_ties = (ties.double() == (q[:-1] + q[1:]) / 2).sum().item()
    assert exact_ties > 10  # the tie rule (lower code) was exercised


def _rlion8bit_state(shapes, dtypes, qmap, seed):
    import torch

    from hf_rlion.rlion8bit import quantize_blockwise as cpu_quantize

    torch.manual_seed(seed)
    params = [torch.randn(s).to(d) for s, d in zip(shapes, dtypes)]
    grads = [(torch.randn(s) * 1e-2).to(d) for s, d in zip(shapes, dtypes)]
    states = [cpu_quantize(torch.randn(s) * 1e-2, qmap) for s in shapes]
    return params, grads, [c.clone() for c, _ in states], [a.clone() for _, a in states]


def _rlion8bit_round_trip_body(scaling: str) -> None:
    """Triton-format state and the CPU path's state are one format: three steps on one state, by the
    Triton kernel, then :func:`rlion8bit_reference_update_` (on what the kernel wrote), then the kernel
    again (on what the CPU path wrote); each Triton step is compared with a reference step from the same
    state."""
    import bitsandbytes.functional as bnb_functional
    import torch

    from hf_rlion.kernels.triton_rlion8bit import fused_rlion8bit
    from hf_rlion.rlion8bit import rlion8bit_reference_update_

    qmap = bnb_functional.create_dynamic_map(signed=True)
    shapes = [(1000,), (), (0,), (257,), (30, 41)]
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.float16, torch.float32]
    params, grads, codes, absmaxes = _rlion8bit_state(shapes, dtypes, qmap, seed=4)
    hyperparameters = dict(HYPERPARAMETERS, alpha_scaling=scaling, maximize=False)

    def dequantised(c, a):
        return bnb_functional.dequantize_blockwise(c, absmax=a, code=qmap, blocksize=256).double()

    for step in (1, 2, 3):
        if step == 2:
            for i in range(len(params)):
                rlion8bit_reference_update_(params[i], grads[i], codes[i], absmaxes[i], qmap, step, **hyperparameters)
            continue
        ref = [[t.clone() for t in tensors] for tensors in (params, codes, absmaxes)]
        flags = fused_rlion8bit(params, grads, codes, absmaxes, qmap, [step] * len(params), blocks_per_program=2, **hyperparameters)
        assert flags.tolist() == [0] * len(params)
        for i in range(len(params)):
            rlion8bit_reference_update_(ref[0][i], grads[i], ref[1][i], ref[2][i], qmap, step, **hyperparameters)
            if params[i].numel() == 0:
                continue
            # two float32 results each within one float32 ulp of the exact step, then both rounded to the
            # parameter's dtype: they may land one bfloat16/float16 ulp apart
            eps = _own_rounding(params[i].dtype) + 2 * torch.finfo(torch.float32).eps
            tolerance = ref[0][i].double().abs() * eps + HYPERPARAMETERS["lr"] * 1e-5
            assert ((params[i].double() - ref[0][i].double()).abs() <= tolerance).all(), (step, i)
            # absmax: the same max |m'| up to float32 arithmetic; codes: nearest (here) or table-nearest
            # (CPU path) of nearly the same value, so at most one code apart, rarely
            assert torch.allclose(absmaxes[i], ref[2][i], rtol=1e-6, atol=0)
            code_gap = (codes[i].long() - ref[1][i].long()).abs()
            assert code_gap.max() <= 1 and code_gap.float().mean() < 0.02, (step, i, code_gap.float().mean())
            gap = (dequantised(codes[i], absmaxes[i]) - dequantised(ref[1][i], ref[2][i])).abs()
            assert (gap <= 0.03 * absmaxes[i].max()).all()


def _rlion8bit_nonfinite_body() -> None:
    import bitsandbytes.functional as bnb_functional
    import torch

    from hf_rlion.kernels.triton_rlion8bit import fused_rlion8bit

    qmap = bnb_functional.create_dynamic_map(signed=True)
    shapes = [(600,), (300,), (5,)]
    dtypes = [torch.float32, torch.bfloat16, torch.float32]
    params, grads, codes, absmaxes = _rlion8bit_state(shapes, dtypes, qmap, seed=5)
    grads[0][555] = math.inf
    grads[1][0] = math.nan
    state = [params, codes, absmaxes]
    before = [[t.clone() for t in tensors] for tensors in state]
    for scaling in ("rms", "fixed"):
        flags = fused_rlion8bit(params, grads, codes, absmaxes, qmap, [1, 1, 1], blocks_per_program=1,
                                alpha_scaling=scaling, maximize=True, **HYPERPARAMETERS)  # fmt: skip
        assert flags.tolist() == [1, 1, 0]
        for tensors, saved in zip(state, before):
            assert torch.equal(tensors[0], saved[0]) and torch.equal(tensors[1], saved[1])
    assert not torch.equal(params[2], before[0][2])


def _rlion8bit_zero_body() -> None:
    import bitsandbytes.functional as bnb_functional
    import torch

    from hf_rlion.kernels.triton_rlion8bit import fused_rlion8bit

    qmap = bnb_functional.create_dynamic_map(signed=True)
    param = torch.randn(513)
    before = param.clone()
    codes = torch.full((513,), 127, dtype=torch.uint8)
    absmax = torch.zeros(3)
    fused_rlion8bit([param], [torch.zeros(513)], [codes], [absmax], qmap, [1], alpha_scaling="rms", maximize=False,
                    **dict(HYPERPARAMETERS, weight_decay=0.0))  # fmt: skip
    assert torch.equal(param, before)
    assert torch.equal(absmax, torch.zeros(3)) and (codes == 127).all()


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def test_atan_is_the_c_kernels_arctan(interpreter):
    """The Triton arctan is rlion_atanf: within 1 ulp (the interpreter does not fuse fma), nearly always
    equal, on specials (±0, ±inf, NaN, subnormals, both sides of 1) and random bit patterns."""
    interpreter(_atan_body)


@pytest.mark.parametrize(
    "scaling,maximize,device_steps", [("rms", False, False), ("fixed", True, True), ("rms", True, True)]
)
def test_rlion_step_matches_float64_reference(interpreter, scaling, maximize, device_steps):
    """Multi-tensor launch over float32/bfloat16/float16 groups with 0-d, empty and off-block sizes:
    parameters within half an ulp of their dtype (plus float32 arithmetic) of the float64 reference,
    momentum within float32 rounding; steps given as ints or as a tensor of counts."""
    interpreter(_rlion_reference_body, scaling, maximize, device_steps)


def test_rlion_all_zero_tensor_gets_zero_update(interpreter):
    """k is clamped to FLT_MAX: RMS(c) = 0 with bias correction leaves the parameter exactly unchanged."""
    interpreter(_zero_tensor_body)


@pytest.mark.parametrize("scaling", ["rms", "fixed"])
def test_rlion_nonfinite_gradient_leaves_tensor_untouched(interpreter, scaling):
    """A NaN/inf gradient anywhere in a tensor: parameter and momentum bit-identical, flag 1 on the
    device; other tensors of the same launch are updated; check_finite=False flags nothing."""
    interpreter(_nonfinite_body, scaling)


def test_pointer_tables_follow_new_gradient_and_state_tensors(interpreter):
    """The kept pointer tables are not stale: new gradient tensors (one with a NaN) and new momentum
    tensors for the same parameters are the ones read and written."""
    interpreter(_new_gradients_body)


def test_arguments_the_kernels_cannot_take_are_refused(interpreter):
    """Non-power-of-two blocks, state of the wrong size, dtype or layout, mixed gradient dtypes and an
    unknown alpha_scaling raise ValueError before any kernel runs."""
    interpreter(_refusals_body)


def test_requantisation_absmax_exact_and_codes_nearest(interpreter):
    """Block absmax is exactly max |x|; each code is the nearest map entry (brute force, ties to the
    lower code) including all-zero, subnormal and partial blocks and values exactly on midpoints."""
    interpreter(_quantize_body)


@pytest.mark.parametrize("scaling", ["rms", "fixed"])
def test_rlion8bit_state_round_trips_with_cpu_path(interpreter, scaling):
    """Triton steps and the CPU reference path alternate on the same 8-bit state; parameters, absmax and
    codes stay with the reference-only run (codes at most one apart, < 2 % of them)."""
    interpreter(_rlion8bit_round_trip_body, scaling)


def test_rlion8bit_nonfinite_gradient_leaves_state_untouched(interpreter):
    """NaN/inf gradient: parameter, codes and absmax bit-identical and flagged; the finite tensor moves."""
    interpreter(_rlion8bit_nonfinite_body)


def test_rlion8bit_all_zero_block_keeps_zero_state(interpreter):
    """Zero momentum and gradient: absmax stays 0, codes the code of 0.0, the parameter unchanged."""
    interpreter(_rlion8bit_zero_body)
