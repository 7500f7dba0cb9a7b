"""Faults during training: NaN/inf gradients with loss scaling and clipping; bf16/fp16 training.

The policy under test (hf_rlion/_optimizer_base.py): a tensor whose gradient holds NaN/inf is
not updated that step (weights, momentum and step count unchanged), counted in
``optimizer.nonfinite_skips``, and the first skip warns.
"""

import warnings

import pytest
import torch
from torch import nn

from hf_rlion import RLion


def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 10))


def snapshot(model, optimizer):
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    return weights, state


def test_nan_loss_with_gradient_clipping_leaves_weights_and_momentum_untouched():
    """clip_grad_norm_ turns one NaN into all-NaN gradients; every tensor is then skipped."""
    x, y = digits()
    model = mlp()
    opt = RLion(model.parameters(), lr=1e-2)
    for i in range(3):  # build some momentum first
        nn.functional.cross_entropy(model(x[i * 32 : (i + 1) * 32]), y[i * 32 : (i + 1) * 32]).backward()
        opt.step()
        opt.zero_grad()
    weights, state = snapshot(model, opt)
    loss = nn.functional.cross_entropy(model(x[:32]), y[:32]) * torch.tensor(float("nan"))
    loss.backward()
    total_norm = nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    assert not torch.isfinite(total_norm)
    with pytest.warns(RuntimeWarning, match="NaN/inf gradients"):
        opt.step()
    assert opt.nonfinite_skips == len(list(model.parameters()))
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), weights[n])
        assert all(torch.equal(v, state[id(p)][k]) for k, v in opt.state[p].items())
    # training goes on normally afterwards
    opt.zero_grad()
    nn.functional.cross_entropy(model(x[:32]), y[:32]).backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.state[next(model.parameters())]["step"].item() == 4


def test_one_poisoned_tensor_is_skipped_the_others_step():
    model = mlp()
    opt = RLion(model.parameters(), lr=1e-2)
    x, y = digits()
    nn.functional.cross_entropy(model(x[:32]), y[:32]).backward()
    first = model[0].weight
    first.grad[0, 0] = float("inf")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        opt.step()
    assert torch.equal(first.detach(), before["0.weight"])
    assert not torch.equal(model[3].weight.detach(), before["3.weight"])
    assert opt.nonfinite_skips == 1


def test_fp16_loss_scaling_skips_inf_steps_before_the_optimizer_sees_them():
    """torch.amp.GradScaler: an overflowing step is skipped by the scaler and the scale drops."""
    x, y = digits()
    model = mlp()
    opt = RLion(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    for i in range(3):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.cross_entropy(model(x[i * 32 : (i + 1) * 32]), y[i * 32 : (i + 1) * 32])
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    weights, state = snapshot(model, opt)
    scale = scaler.get_scale()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = nn.functional.cross_entropy(model(x[:32]), y[:32]) * 1e38  # overflows when scaled
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < scale
    assert opt.nonfinite_skips == 0  # the scaler, not the optimizer, dropped this step
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), weights[n])
        assert torch.equal(opt.state[p]["exp_avg"], state[id(p)]["exp_avg"])


def train_digits(model, autocast_dtype=None, epochs=4, lr=1e-3):
    x, y = digits()
    opt = RLion(model.parameters(), lr=lr, weight_decay=0.01)
    param_dtype = next(model.parameters()).dtype
    for epoch in range(epochs):
        for i in range(0, 1400, 32):
            with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
                logits = model(x[i : i + 32].to(param_dtype))
            loss = nn.functional.cross_entropy(logits.float(), y[i : i + 32])
            loss.backward()
            opt.step()
            opt.zero_grad()
    with torch.no_grad():
        accuracy = (model(x[1400:].to(param_dtype)).argmax(-1) == y[1400:]).float().mean().item()
    return accuracy, opt


@pytest.fixture(scope="module")
def float32_accuracy():
    return train_digits(mlp())[0]


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_autocast_training_matches_float32(autocast_dtype, float32_accuracy):
    accuracy, opt = train_digits(mlp(), autocast_dtype)
    assert accuracy > float32_accuracy - 0.03 and accuracy > 0.85, (accuracy, float32_accuracy)
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())


def test_bf16_parameters_learn_with_float32_momentum(float32_accuracy):
    """Pure bf16 weights: momentum stays fp32 (bf16 momentum would round away (1-β2)·g updates)."""
    model = mlp().to(torch.bfloat16)
    accuracy, opt = train_digits(model)
    assert accuracy > float32_accuracy - 0.05 and accuracy > 0.85, (accuracy, float32_accuracy)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())


@pytest.mark.parametrize("alpha_scaling", ["rms", "fixed"])
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
def test_fused_kernel_checks_each_tensor_itself_like_the_reference(alpha_scaling, bad_value):
    """The fused CPU path applies the policy inside the kernel (small tensors and ones split across threads)."""
    from hf_rlion.kernels import cpu_rlion

    if not cpu_rlion.kernel_available():
        pytest.skip("no C compiler here: the fused path is unavailable")
    torch.manual_seed(0)
    shapes = [(3000,), (2_200_000,), (64, 64), (2_100_000,)]  # two above the kernel's split size
    start = [torch.randn(s) for s in shapes]
    grads = [torch.randn(s) * 1e-3 for s in shapes]
    for poisoned in (1, 2):  # one large (split) and one small tensor get a bad element
        grads[poisoned].view(-1)[grads[poisoned].numel() // 2] = bad_value
    runs = {}
    for path in (dict(fused=True), dict(foreach=False, fused=False)):
        params = [nn.Parameter(t.clone()) for t in start]
        opt = RLion(params, lr=1e-2, weight_decay=0.1, alpha_scaling=alpha_scaling, **path)
        for _ in range(2):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                opt.step()
        runs[str(path)] = (params, opt)
    (fused_params, fused_opt), (ref_params, ref_opt) = runs.values()
    assert fused_opt.nonfinite_skips == ref_opt.nonfinite_skips == 4
    for i, (a, b, s) in enumerate(zip(fused_params, ref_params, start)):
        if i in (1, 2):
            assert torch.equal(a.detach(), s) and a not in fused_opt.state
        else:
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-6)
            assert fused_opt.state[a]["step"].item() == 2
