"""Property-based checks (hypothesis): every path equals the reference on any valid input, and bad input fails fast.

Shapes cover 0-d, zero-size, non-contiguous views and channels_last; groups mix dtypes.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from hf_rlion import RLion
from hf_rlion.rlion import _effective_alpha, rlion_update_

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

hyperparameters = st.fixed_dictionaries(
    {
        "lr": st.floats(0.0, 1.0),
        "betas": st.tuples(st.floats(0.0, 0.999), st.floats(0.0, 0.999)),
        "weight_decay": st.floats(0.0, 1.0),
        "alpha": st.floats(1e-3, 1e6),
        "alpha_scaling": st.sampled_from(["rms", "fixed"]),
        "bias_correction": st.booleans(),
        "maximize": st.booleans(),
    }
)


def _layouts():
    """(name, factory(seed) -> tensor) for the tensor layouts the optimizer must handle."""
    return st.sampled_from(
        [
            ("scalar", lambda g: torch.randn((), generator=g)),
            ("empty", lambda g: torch.randn(0, 3, generator=g)),
            ("vector", lambda g: torch.randn(17, generator=g)),
            ("transposed", lambda g: torch.randn(6, 4, generator=g).t()),  # non-contiguous
            ("strided", lambda g: torch.randn(10, 8, generator=g)[:, ::2]),  # non-contiguous
            (
                "channels_last",
                lambda g: torch.randn(2, 3, 4, 5, generator=g).contiguous(memory_format=torch.channels_last),
            ),
        ]
    )


PATHS = [dict(foreach=False, fused=False), dict(foreach=True, fused=False), dict()]

EPS32 = 2.0**-23


def _float32_update_error(ref_m, grad, step, hp):
    """How far float32 arithmetic may move one step's u = (2/π)·atan(k·ĉ) from float64's, per element.

    ĉ is formed in float32 from m and g (m itself carrying a few steps of rounding): off by about
    8·ε·(|m| + |g|). arctan's slope k / (1 + (k·ĉ)²) turns that into an error of u, large only where
    k·ĉ is near 0 while k is huge (α reaches 1e6), and never more than u's range. Plus arctan's own ulp.
    """
    beta1 = hp["betas"][0]
    g = -grad if hp["maximize"] else grad
    inv_bc = 1.0 / (1.0 - beta1**step) if hp["bias_correction"] else 1.0
    c_hat = torch.lerp(ref_m, g, 1.0 - beta1) * inv_bc
    k = _effective_alpha(c_hat, hp["alpha"], hp["alpha_scaling"], 1.0 / inv_bc)
    delta = 8 * EPS32 * (ref_m.abs() + g.abs()) * inv_bc
    nearest = ((k * c_hat).abs() - k * delta).clamp(min=0)  # |k·ĉ| at its closest to 0 within the error
    slope = k / (1 + nearest**2)
    return (2 / math.pi) * (slope * delta + 2 * EPS32).clamp(max=2.0)


@SETTINGS
@given(hp=hyperparameters, layout=_layouts(), seed=st.integers(0, 2**16), steps=st.integers(1, 4))
@pytest.mark.parametrize("path", PATHS, ids=["single_tensor", "foreach", "default"])
def test_every_path_matches_the_reference_on_any_layout(path, hp, layout, seed, steps):
    name, make = layout
    gen = torch.Generator().manual_seed(seed)
    start = make(gen)
    param = torch.nn.Parameter(start.clone())
    if name in ("transposed", "strided"):
        param = torch.nn.Parameter(start)  # keep the non-contiguous view as the parameter
    assume(param.is_contiguous() == (name not in ("transposed", "strided")))
    opt = RLion([param], **hp, **path)
    ref_param = start.detach().double().clone()
    ref_m = torch.zeros_like(ref_param)
    tolerance = torch.zeros_like(ref_param)
    for step in range(1, steps + 1):
        grad = torch.randn(start.shape, generator=gen) * 10 ** torch.empty(()).uniform_(-4, 1, generator=gen).item()
        param.grad = grad.clone()
        opt.step()
        tolerance += hp["lr"] * _float32_update_error(ref_m, grad.double(), step, hp)
        rlion_update_(
            ref_param, grad.double(), ref_m, step,
            lr=hp["lr"], beta1=hp["betas"][0], beta2=hp["betas"][1], weight_decay=hp["weight_decay"],
            alpha=hp["alpha"], alpha_scaling=hp["alpha_scaling"], bias_correction=hp["bias_correction"],
            maximize=hp["maximize"],
        )  # fmt: skip
    assert param.shape == start.shape and param.stride() == start.stride()
    assert torch.isfinite(param).all()
    # float32 vs float64: equal up to float32 rounding, which arctan's slope amplifies where k·ĉ ≈ 0
    difference = (param.detach().double() - ref_param).abs()
    allowed = tolerance + 1e-5 * ref_param.abs() + 1e-6 * max(hp["lr"], 1e-3) * steps
    worst = (difference - allowed).argmax() if difference.numel() else None
    assert (difference <= allowed).all(), (
        f"element {worst}: |float32 - float64| = {difference.flatten()[worst]:.3g} > allowed {allowed.flatten()[worst]:.3g}"
    )


@SETTINGS
@given(hp=hyperparameters, seed=st.integers(0, 2**16))
def test_a_step_never_moves_a_weight_more_than_lr(hp, seed):
    gen = torch.Generator().manual_seed(seed)
    param = torch.nn.Parameter(torch.randn(64, generator=gen, dtype=torch.float64))
    before = param.detach().clone()
    opt = RLion([param], **hp)
    param.grad = torch.randn(64, generator=gen, dtype=torch.float64) * 1e6
    opt.step()
    bound = hp["lr"] * (1 + hp["weight_decay"] * before.abs())
    rounding = 4 * torch.finfo(torch.float64).eps * before.abs()  # θ − η·u is rounded to θ's ulp
    assert torch.all((param.detach() - before).abs() <= bound * (1 + 1e-12) + rounding + 1e-300)


@SETTINGS
@given(seed=st.integers(0, 2**16), dtypes=st.lists(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]), min_size=2, max_size=4))
def test_groups_of_mixed_dtypes(seed, dtypes):
    """One optimizer, one group per dtype: each keeps its dtype and float32-or-wider state."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(33, generator=gen).to(d)) for d in dtypes]
    for path in PATHS:
        opt = RLion([{"params": [p]} for p in params], lr=1e-2, **path)
        for p in params:
            p.grad = (torch.randn(33, generator=gen) * 1e-2).to(p.dtype)
        opt.step()
        for p, d in zip(params, dtypes):
            assert p.dtype == d and torch.isfinite(p.float()).all()
            assert opt.state[p]["exp_avg"].dtype == (torch.float64 if d == torch.float64 else torch.float32)


bad_values = st.one_of(
    st.tuples(st.just("lr"), st.one_of(st.floats(max_value=-1e-12), st.just(math.inf), st.just(math.nan))),
    st.tuples(st.just("weight_decay"), st.one_of(st.floats(max_value=-1e-12), st.just(math.nan))),
    st.tuples(st.just("alpha"), st.one_of(st.floats(max_value=0.0), st.just(math.inf), st.just(math.nan))),
    st.tuples(st.just("betas"), st.tuples(st.one_of(st.floats(min_value=1.0), st.floats(max_value=-1e-12)), st.just(0.9))),
    st.tuples(st.just("betas"), st.tuples(st.just(0.9), st.one_of(st.floats(min_value=1.0), st.floats(max_value=-1e-12)))),
    st.tuples(st.just("alpha_scaling"), st.text(max_size=8).filter(lambda s: s not in ("rms", "fixed"))),
)


@SETTINGS
@given(bad=bad_values)
def test_any_out_of_range_hyperparameter_fails_naming_it(bad):
    key, value = bad
    with pytest.raises(ValueError) as info:
        RLion([torch.nn.Parameter(torch.zeros(2))], **{key: value})
    assert key.rstrip("s") in str(info.value)  # "betas: beta1 must be …" names beta too
