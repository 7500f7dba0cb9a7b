"""Zero and subnormal momentum: no ∞·0 = NaN on any path.

A tensor whose c_t is exactly zero is common: LoRA's A while B is still zero, zero-initialised
residual branches, layers frozen and then unfrozen. Under ``alpha_scaling="rms"`` its RMS is zero,
``α / max(RMS, tiny)`` exceeds the largest float32 for α > ~4, and ``∞ · 0`` made the parameter NaN,
after which every gradient of the model was NaN and skipped. Every path caps the multiplier of
c_t, ``α_t / (1 − β1^t)``, at the largest finite float32 F, so a zero c_t gives u_t = 0 exactly.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hf_rlion import RLion
from hf_rlion.kernels import cpu_rlion

F32_MAX = torch.finfo(torch.float32).max
F32_TINY = torch.finfo(torch.float32).tiny
ALL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
LOW_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# path name -> (dtypes it takes, whether it needs the fp32 kernel / bitsandbytes)
PATHS = {
    "single_tensor": ALL_DTYPES,
    "foreach": ALL_DTYPES,
    "fused": LOW_DTYPES,
    "8bit_reference": LOW_DTYPES,
    "8bit_kernel": (torch.float32, torch.bfloat16),
}
PATH_DTYPES = [(path, dtype) for path, dtypes in PATHS.items() for dtype in dtypes]
PATH_DTYPE_IDS = [f"{path}-{str(dtype).removeprefix('torch.')}" for path, dtype in PATH_DTYPES]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: a second thread only adds wake-up latency (milliseconds on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_optimizer(path: str, params, **hyperparameters):
    """The optimizer of ``path``, with that implementation forced."""
    if path == "fused" and not cpu_rlion.kernel_available():
        pytest.skip("no C compiler for the CPU kernel")
    if path.startswith("8bit"):
        pytest.importorskip("bitsandbytes")
        from hf_rlion.kernels.cpu_rlion8bit import kernel_available
        from hf_rlion.rlion8bit import RLion8bit

        if path == "8bit_kernel" and not kernel_available():
            pytest.skip("no C compiler for the 8-bit kernel")
        return RLion8bit(params, min_8bit_size=0, fused=path == "8bit_kernel", **hyperparameters)
    path_options = {"single_tensor": dict(foreach=False, fused=False), "foreach": dict(foreach=True, fused=False)}
    return RLion(params, **path_options.get(path, dict(fused=True)), **hyperparameters)


def momentum(optimizer, param) -> torch.Tensor:
    """m_t of ``param`` as float64: RLion's ``exp_avg`` or RLion8bit's dequantised 8-bit state."""
    state = optimizer.state[param]
    if "exp_avg" in state:
        return state["exp_avg"].to(torch.float64, copy=True)
    import bitsandbytes.functional as bnb_functional

    m = bnb_functional.dequantize_blockwise(state["state1"], absmax=state["absmax1"], code=state["qmap1"],
                                            blocksize=256)
    return m.double()


def set_momentum(optimizer, param, values: torch.Tensor) -> None:
    state = optimizer.state[param]
    if "exp_avg" in state:
        state["exp_avg"].copy_(values)
        return
    from hf_rlion.rlion8bit import quantize_blockwise

    codes, absmax = quantize_blockwise(values.float(), state["qmap1"])
    state["state1"].copy_(codes.view_as(state["state1"]))
    state["absmax1"].copy_(absmax)


def assert_all_finite(optimizer, model_params) -> None:
    for p in model_params:
        assert torch.isfinite(p).all(), "a parameter holds NaN/inf"
        for value in optimizer.state[p].values():
            if torch.is_tensor(value) and value.is_floating_point():
                assert torch.isfinite(value).all(), "optimizer state holds NaN/inf"


class ZeroBranchModel(nn.Module):
    """``y = W x + b + B (A x)`` with B a zero buffer, LoRA's set-up before B has learned anything.

    A's gradient is exactly zero at every step, so its momentum stays exactly zero. A NaN in A
    would reach y (0 · NaN = NaN) and so every other gradient. Parameters are in ``dtype``; the
    forward pass runs in float32 (CPU half-precision matmuls are slow).
    """

    def __init__(self, dtype: torch.dtype, generator: torch.Generator):
        super().__init__()
        self.weight = nn.Parameter((torch.randn(4, 16, generator=generator) / 4).to(dtype))
        self.bias = nn.Parameter(torch.zeros(4, dtype=dtype))
        self.lora_a = nn.Parameter(torch.randn(8, 16, generator=generator).to(dtype))
        self.register_buffer("lora_b", torch.zeros(4, 8, dtype=dtype))

    def forward(self, x):
        a, b = self.lora_a.float(), self.lora_b.float()
        return x @ self.weight.float().T + self.bias.float() + (x @ a.T) @ b.T


@pytest.mark.parametrize("weight_decay", [0.0, 2.0**-2])
@pytest.mark.parametrize("bias_correction", [False, True])
@pytest.mark.parametrize("alpha", [3.0, 10.0, 1e30])
@pytest.mark.parametrize("alpha_scaling", ["rms", "fixed"])
@pytest.mark.parametrize("path, dtype", PATH_DTYPES, ids=PATH_DTYPE_IDS)
def test_tensor_with_zero_momentum_changes_only_by_weight_decay(
    path, dtype, alpha_scaling, alpha, bias_correction, weight_decay
):
    """c_t = 0 for the whole tensor: u_t = 0, so θ ← θ·(1 − ηλ) exactly (θ unchanged without decay),
    its momentum stays exactly 0, nothing anywhere turns NaN and no later gradient is skipped."""
    generator = torch.Generator().manual_seed(0)
    model = ZeroBranchModel(dtype, generator)
    lr = 2.0**-4  # η·λ = 2^-6 and 1 − η·λ are exact in every dtype
    optimizer = make_optimizer(
        path, model.parameters(), lr=lr, weight_decay=weight_decay, alpha=alpha, alpha_scaling=alpha_scaling,
        bias_correction=bias_correction,
    )  # fmt: skip
    compute_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    expected_a = model.lora_a.detach().clone()
    weight_before = model.weight.detach().clone()
    x, y = torch.randn(32, 16, generator=generator), torch.randn(32, 4, generator=generator)
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        assert torch.equal(model.lora_a.grad, torch.zeros_like(model.lora_a))
        optimizer.step()
        expected_a = (expected_a.to(compute_dtype) * (1.0 - lr * weight_decay)).to(dtype)
        assert torch.equal(model.lora_a.detach(), expected_a)
        assert torch.equal(momentum(optimizer, model.lora_a), torch.zeros_like(model.lora_a, dtype=torch.float64))
        assert_all_finite(optimizer, model.parameters())
    assert optimizer.nonfinite_skips == 0
    assert not torch.equal(model.weight.detach(), weight_before)  # the other tensors did learn


# torch.optim's generic check (test/test_optim.py, test_step_is_noop_for_zero_grads): zero gradients
# with zero momentum and weight_decay=0 leave the parameter exactly as it was.
NOOP_INPUTS = [
    dict(),
    dict(alpha=10.0),
    dict(alpha=1e30, bias_correction=True),
    dict(alpha=1e30, alpha_scaling="fixed"),
    dict(alpha=1.0, alpha_scaling="fixed", bias_correction=True),
    dict(bias_correction=True),
    dict(maximize=True, alpha=50.0),
    dict(lr=1e-1, betas=(0.0, 0.5)),
    dict(alpha=1e300),  # above the largest float32: counts as that
    dict(alpha=1e300, alpha_scaling="fixed", bias_correction=True),
]


@pytest.mark.parametrize("kwargs", NOOP_INPUTS, ids=[str(k) for k in NOOP_INPUTS])
@pytest.mark.parametrize("path", list(PATHS))
def test_step_is_noop_for_zero_grads(path, kwargs):
    param = torch.randn((5, 1), requires_grad=True)
    old_param = param.detach().clone()
    optimizer = make_optimizer(path, [param], **kwargs)
    param.grad = torch.zeros_like(param)
    loss = optimizer.step(lambda: torch.tensor([1.0]))
    assert torch.equal(loss, torch.tensor([1.0]))
    assert torch.equal(param.detach(), old_param)


@pytest.mark.parametrize("path", ["fused", "8bit_kernel"])
def test_zero_momentum_tensor_split_across_threads_changes_only_by_weight_decay(path):
    """The kernels' other branch: a tensor above ``split_numel`` has its read pass and update split
    across threads, and its multiplier computed after a barrier; it is capped there too."""
    torch.set_num_threads(2)  # undone by the one_thread fixture
    numel = cpu_rlion.split_numel([1 << 20], 2)
    param = nn.Parameter(torch.randn(numel, generator=torch.Generator().manual_seed(0)))
    expected = param.detach() * (1.0 - 2.0**-6)
    optimizer = make_optimizer(path, [param], lr=2.0**-4, weight_decay=2.0**-2, alpha=10.0, bias_correction=True)
    param.grad = torch.zeros_like(param)
    optimizer.step()
    assert torch.equal(param.detach(), expected)
    assert torch.equal(momentum(optimizer, param), torch.zeros(numel, dtype=torch.float64))
    assert optimizer.nonfinite_skips == 0


def expected_update(m, step, alpha, alpha_scaling, bias_correction, compute_dtype, beta1=0.9):
    """u_t for g_t = 0 from momentum m, in float64, from the documented rule: the multiplier of c_t,
    α_t / (1 − β1^t), capped at the largest float32 F. RMS(ĉ) is summed from squares rounded to the
    dtype the step computes in, as every path does (float32 squares of |ĉ| < 1e-23 are 0)."""
    c = beta1 * m
    divisor = 1.0 - beta1**step if bias_correction else 1.0
    c_hat = c / divisor
    alpha = min(alpha, F32_MAX)
    if alpha_scaling == "rms":
        rms = math.sqrt(float((c_hat.to(compute_dtype) ** 2).double().mean()))
        alpha_t = alpha / max(rms, F32_TINY)
    else:
        alpha_t = alpha
    alpha_t = min(alpha_t, F32_MAX * divisor)
    return (2 / math.pi) * torch.atan(alpha_t * c_hat)


# momentum values: one tensor all subnormal (its RMS is subnormal), one mostly zero with a few tiny entries
SUBNORMAL_MOMENTUM = torch.tensor([1e-40, -1e-40, 3e-41, -2e-39] * 16, dtype=torch.float64)
PARTLY_ZERO_MOMENTUM = torch.tensor([0.0, 1e-40, 0.0, -1e-30, 0.0, 5e-38, 0.0, -2e-33] * 8, dtype=torch.float64)
# |measured − expected| allowed per parameter dtype (θ = −η·u from θ = 0, rounded to the dtype):
# one ulp, and one step of the dtype's subnormals
UPDATE_TOLERANCE = {
    torch.float64: dict(rtol=1e-9, atol=0.0),
    torch.float32: dict(rtol=1e-4, atol=2.0**-149),
    torch.bfloat16: dict(rtol=2.0**-7, atol=2.0**-133),
    torch.float16: dict(rtol=2.0**-10, atol=2.0**-24),
}


@pytest.mark.parametrize("bias_correction", [False, True])
@pytest.mark.parametrize("alpha", [3.0, 10.0, 1e30])
@pytest.mark.parametrize("alpha_scaling", ["rms", "fixed"])
@pytest.mark.parametrize("path, dtype", PATH_DTYPES, ids=PATH_DTYPE_IDS)
def test_subnormal_and_partly_zero_momentum_give_finite_bounded_updates(path, dtype, alpha_scaling, alpha,
                                                                         bias_correction):
    """Momentum with a subnormal RMS, and momentum that is zero but for a few tiny entries: every
    u_t is finite, |u_t| ≤ 1, zero exactly where c_t is zero, of c_t's sign elsewhere, and the
    documented rule's value (arctan of a huge argument, i.e. ±1, where α_t·ĉ_t is huge)."""
    params = [nn.Parameter(torch.zeros(64, dtype=dtype)) for _ in range(2)]
    lr = 1.0
    optimizer = make_optimizer(path, params, lr=lr, alpha=alpha, alpha_scaling=alpha_scaling,
                               bias_correction=bias_correction)
    for p in params:  # a first step creates the state; zero momentum leaves θ = 0
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for p, values in zip(params, (SUBNORMAL_MOMENTUM, PARTLY_ZERO_MOMENTUM)):
        set_momentum(optimizer, p, values)
    moments = [momentum(optimizer, p) for p in params]
    assert moments[0].abs().max() < F32_TINY and (moments[0] != 0).all()
    optimizer.step()
    assert_all_finite(optimizer, params)
    assert optimizer.nonfinite_skips == 0
    for p, m in zip(params, moments):
        u = -p.detach().double() / lr
        compute_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        expected = expected_update(m, 2, alpha, alpha_scaling, bias_correction, compute_dtype)
        assert (u.abs() <= 1).all()
        assert (u[m == 0] == 0).all()
        assert (u * m >= 0).all()  # c_t's sign (or 0 where the dtype underflows)
        torch.testing.assert_close(u, expected.to(dtype).double(), **UPDATE_TOLERANCE[dtype])
