"""RLion against the formula: a float64 reference, the Lion limit, the SGD limit, bounds, state round trips."""

import io
import math

import pytest
import torch

from hf_rlion import RLion

PATHS = [dict(foreach=False, fused=False), dict(foreach=True, fused=False)]
PATH_IDS = ["single_tensor", "foreach"]


def reference_rlion(params, grads_per_step, groups):
    """Plain float64 RLion, written straight from the rule in the docs (no shared code with hf_rlion)."""
    theta = [p.detach().double().clone() for p in params]
    m = [torch.zeros_like(t) for t in theta]
    for t, grads in enumerate(grads_per_step, start=1):
        for i, g in enumerate(grads):
            hp = groups[i]
            b1, b2 = hp["betas"]
            g = g.double() * (-1.0 if hp.get("maximize", False) else 1.0)
            c = b1 * m[i] + (1 - b1) * g
            if hp["bias_correction"]:
                c = c / (1 - b1**t)
            if hp["alpha_scaling"] == "rms":
                a = hp["alpha"] / max(math.sqrt(float((c * c).mean())), torch.finfo(torch.float32).tiny)
            else:
                a = hp["alpha"]
            u = (2 / math.pi) * torch.atan(a * c)
            theta[i] = theta[i] - hp["lr"] * (u + hp["weight_decay"] * theta[i])
            m[i] = b2 * m[i] + (1 - b2) * g
    return theta, m


def make_problem(seed=0, steps=40):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (13,), (3, 4, 2), (1,), (64,)]
    params = [torch.randn(s, generator=gen) for s in shapes]
    # gradients of mixed scales, as in real nets (1e-4 .. 1)
    scales = [1e-3, 1.0, 1e-2, 0.3, 1e-4]
    grads = [[torch.randn(s, generator=gen) * sc for s, sc in zip(shapes, scales)] for _ in range(steps)]
    return params, grads


GROUP_SETTINGS = [
    dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, alpha=3.0, alpha_scaling="rms", bias_correction=False),
    dict(lr=3e-3, betas=(0.8, 0.95), weight_decay=0.0, alpha=50.0, alpha_scaling="fixed", bias_correction=True),
    dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.5, alpha=1000.0, alpha_scaling="fixed", bias_correction=False),
    dict(lr=5e-3, betas=(0.5, 0.9), weight_decay=0.01, alpha=1.0, alpha_scaling="rms", bias_correction=True),
    dict(lr=2e-2, betas=(0.9, 0.999), weight_decay=0.0, alpha=10.0, alpha_scaling="fixed", bias_correction=True),
]


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_matches_float64_reference_over_many_steps_and_groups(path):
    params, grads = make_problem()
    torch_params = [torch.nn.Parameter(p.clone()) for p in params]
    groups = [{"params": [p], **hp} for p, hp in zip(torch_params, GROUP_SETTINGS)]
    opt = RLion(groups, **path)
    for step_grads in grads:
        for p, g in zip(torch_params, step_grads):
            p.grad = g.clone()
        opt.step()
    expected_theta, expected_m = reference_rlion(params, grads, GROUP_SETTINGS)
    for p, e_theta, e_m in zip(torch_params, expected_theta, expected_m):
        torch.testing.assert_close(p.detach().double(), e_theta, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(opt.state[p]["exp_avg"].double(), e_m, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("alpha_scaling", ["fixed", "rms"])
def test_huge_alpha_is_lion(alpha_scaling):
    """alpha → ∞: (2/π)·arctan(α·c) → sign(c); compare with lion-pytorch's Lion step for step."""
    lion_pytorch = pytest.importorskip("lion_pytorch")
    params, grads = make_problem(seed=1, steps=25)
    ours = [torch.nn.Parameter(p.clone()) for p in params]
    theirs = [torch.nn.Parameter(p.clone()) for p in params]
    opt = RLion(ours, lr=1e-2, weight_decay=0.1, alpha=1e30, alpha_scaling=alpha_scaling)
    lion = lion_pytorch.Lion(theirs, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99))
    for step_grads in grads:
        for a, b, g in zip(ours, theirs, step_grads):
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        lion.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_small_alpha_is_sgd_with_lion_momentum():
    """alpha → 0 with lr·alpha fixed: u ≈ (2α/π)·c, so θ moves by lr·(2α/π)·c."""
    params, grads = make_problem(seed=2, steps=5)
    alpha, lr_alpha = 1e-4, 1e-3
    ours = [torch.nn.Parameter(p.double().clone()) for p in params]
    opt = RLion(ours, lr=lr_alpha / alpha, alpha=alpha, alpha_scaling="fixed")
    expected = [p.double().clone() for p in params]
    m = [torch.zeros_like(e) for e in expected]
    for step_grads in grads:
        for i, (p, g) in enumerate(zip(ours, step_grads)):
            p.grad = g.double().clone()
            c = 0.9 * m[i] + 0.1 * g.double()
            expected[i] -= lr_alpha * (2 / math.pi) * c
            m[i] = 0.99 * m[i] + 0.01 * g.double()
        opt.step()
    for p, e in zip(ours, expected):
        # arctan(x) = x - x³/3 + ...: relative error ~ (α·c)² ≈ 1e-8 here
        torch.testing.assert_close(p.detach(), e, rtol=1e-7, atol=1e-10)


def test_step_is_bounded_by_lr():
    """|u| < 1: no weight moves by more than lr·(1 + λ|θ|), even for enormous gradients."""
    p = torch.nn.Parameter(torch.randn(1000))
    before = p.detach().clone()
    opt = RLion([p], lr=0.01, weight_decay=0.1, alpha=1e6, alpha_scaling="fixed")
    p.grad = torch.randn(1000) * 1e20
    opt.step()
    moved = (p.detach() - before).abs()
    assert torch.all(moved <= 0.01 * (1 + 0.1 * before.abs()) + 1e-7)


def test_momentum_is_updated_in_place():
    """Guards the published bug `exp_avg.mul_(β2).add(grad, ...)` that leaves momentum at zero."""
    p = torch.nn.Parameter(torch.zeros(4))
    opt = RLion([p], lr=0.1, betas=(0.9, 0.99))
    p.grad = torch.tensor([1.0, -2.0, 0.5, 0.0])
    opt.step()
    torch.testing.assert_close(opt.state[p]["exp_avg"], 0.01 * p.grad)


def test_weight_decay_is_lr_times_wd_not_lr_squared():
    """Zero gradient: θ ← θ·(1 − lr·λ) exactly (the lr²·λ bug would give 1 − 1e-4·λ here)."""
    p = torch.nn.Parameter(torch.full((3,), 2.0, dtype=torch.float64))
    opt = RLion([p], lr=1e-2, weight_decay=0.5)
    p.grad = torch.zeros(3, dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3,), 2.0 * (1 - 1e-2 * 0.5), dtype=torch.float64))


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_maximize_ascends(path):
    p = torch.nn.Parameter(torch.zeros(5))
    opt = RLion([p], lr=0.1, maximize=True, **path)
    p.grad = torch.ones(5)
    opt.step()
    assert torch.all(p.detach() > 0)


def test_closure_is_called_and_returned():
    p = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    opt = RLion([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == pytest.approx(2.0)
    assert torch.all(p.detach().abs() < 1.0)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_resume_from_saved_state_is_bit_identical(path):
    """Train 10 steps, save (torch.save), load with weights_only=True into a fresh optimizer, continue."""
    params, grads = make_problem(seed=3, steps=20)
    run_a = [torch.nn.Parameter(p.clone()) for p in params]
    groups = lambda ps: [{"params": ps[:2], "alpha_scaling": "fixed", "alpha": 30.0}, {"params": ps[2:]}]  # noqa: E731
    opt_a = RLion(groups(run_a), lr=1e-2, weight_decay=0.1, bias_correction=True, **path)
    for i, step_grads in enumerate(grads):
        if i == 10:
            buffer = io.BytesIO()
            torch.save({"optimizer": opt_a.state_dict(), "params": [p.detach().clone() for p in run_a]}, buffer)
        for p, g in zip(run_a, step_grads):
            p.grad = g.clone()
        opt_a.step()
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    run_b = [torch.nn.Parameter(p) for p in saved["params"]]
    opt_b = RLion(groups(run_b), lr=1e-2, weight_decay=0.1, bias_correction=True, **path)
    opt_b.load_state_dict(saved["optimizer"])
    for step_grads in grads[10:]:
        for p, g in zip(run_b, step_grads):
            p.grad = g.clone()
        opt_b.step()
    for a, b in zip(run_a, run_b):
        assert torch.equal(a, b)


def test_frozen_and_zero_size_parameters():
    frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    empty = torch.nn.Parameter(torch.empty(0, 4))
    scalar = torch.nn.Parameter(torch.tensor(1.0))
    opt = RLion([frozen, empty, scalar], lr=0.1)
    empty.grad = torch.empty(0, 4)
    scalar.grad = torch.tensor(2.0)
    opt.step()
    assert torch.equal(frozen.detach(), torch.ones(3))
    assert frozen not in opt.state
    assert empty.shape == (0, 4)
    assert scalar.item() < 1.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_low_precision_params_keep_float32_state(dtype, path):
    """bf16/fp16 params: fp32 momentum, fp32 math, one rounding of θ per step; survives load_state_dict."""
    torch.manual_seed(0)
    master = torch.randn(256)
    p = torch.nn.Parameter(master.to(dtype))
    opt = RLion([p], lr=1e-2, weight_decay=0.1, **path)
    ref = torch.nn.Parameter(master.to(dtype).float())
    ref_opt = RLion([ref], lr=1e-2, weight_decay=0.1, foreach=False)
    for _ in range(5):
        g = torch.randn(256) * 1e-3
        p.grad, ref.grad = g.to(dtype), g.to(dtype).float()
        opt.step()
        ref_opt.step()
        ref.data = ref.data.to(dtype).float()  # the same single rounding per step
    assert opt.state[p]["exp_avg"].dtype == torch.float32
    torch.testing.assert_close(p.detach().float(), ref.detach(), rtol=0, atol=0)
    torch.testing.assert_close(opt.state[p]["exp_avg"], ref_opt.state[ref]["exp_avg"])
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    fresh = RLion([p], lr=1e-2, weight_decay=0.1, **path)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.state[p]["exp_avg"].dtype == torch.float32  # torch's own load would cast it to the param dtype
    torch.testing.assert_close(fresh.state[p]["exp_avg"], opt.state[p]["exp_avg"], rtol=0, atol=0)


def test_per_group_hyperparameters_are_used():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = RLion([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.01}], alpha=1e6, alpha_scaling="fixed")
    a.grad, b.grad = torch.ones(2), torch.ones(2)
    opt.step()
    torch.testing.assert_close(a.detach(), torch.full((2,), -0.1))
    torch.testing.assert_close(b.detach(), torch.full((2,), -0.01))


def test_nonfinite_gradient_skips_that_tensor_only():
    bad, good = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = RLion([bad, good], lr=0.1)
    bad.grad = torch.tensor([1.0, float("nan"), 1.0])
    good.grad = torch.ones(3)
    with pytest.warns(RuntimeWarning, match="NaN/inf"):
        opt.step()
    assert torch.equal(bad.detach(), torch.ones(3)) and bad not in opt.state
    assert torch.all(good.detach() < 1)
    bad.grad = torch.tensor([float("inf"), 0.0, 0.0])
    opt.step()  # second skip: counted, no second warning
    assert opt.nonfinite_skips == 2
    bad.grad = torch.ones(3)
    opt.step()
    assert opt.state[bad]["step"].item() == 1 and torch.isfinite(opt.state[bad]["exp_avg"]).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=-1.0), "lr must be"),
        (dict(lr=float("nan")), "lr must be"),
        (dict(lr=float("inf")), "lr must be"),
        (dict(betas=(1.0, 0.99)), "beta1 must be in \\[0, 1\\)"),
        (dict(betas=(0.9, -0.1)), "beta2 must be in \\[0, 1\\)"),
        (dict(betas=(0.9,)), "betas must be a pair"),
        (dict(weight_decay=-0.1), "weight_decay must be"),
        (dict(alpha=0.0), "alpha must be a finite number > 0"),
        (dict(alpha=-3.0), "alpha must be a finite number > 0"),
        (dict(alpha=float("inf")), "alpha must be a finite number > 0"),
        (dict(alpha=float("nan")), "alpha must be a finite number > 0"),
        (dict(alpha_scaling="sign"), "alpha_scaling must be one of"),
        (dict(bias_correction="yes"), "bias_correction must be True or False"),
        (dict(foreach=True, fused=True), "foreach and fused cannot both be True"),
    ],
)
def test_bad_hyperparameters_raise_naming_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RLion([torch.nn.Parameter(torch.zeros(1))], **kwargs)


def test_bad_hyperparameters_in_a_param_group_raise():
    p, q = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = RLion([p])
    with pytest.raises(ValueError, match="alpha must be"):
        opt.add_param_group({"params": [q], "alpha": -1.0})


def test_sparse_gradients_raise_clearly():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = RLion(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()


def test_integer_and_complex_parameters_are_rejected():
    with pytest.raises(ValueError, match="complex"):
        RLion([torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))])
