"""The optimizers' device path: RLion / RLion8bit stepping by the Triton kernels.

``fused=True`` on CPU tensors runs the Triton kernels when Triton's interpreter is on and the C kernels are
off: every body below runs in one worker subprocess started with ``TRITON_INTERPRET=1`` and
``HF_RLION_NATIVE=0`` (the pytest process keeps the C kernels, for the cross-path state tests). On a GPU
the same code path runs compiled kernels (``fused=None`` picks it there).
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

pytest.importorskip("triton")

from _interpreter_worker import interpreter_worker  # noqa: E402

from hf_rlion import RLion  # noqa: E402
from hf_rlion.kernels import cpu_rlion, cpu_rlion8bit  # noqa: E402
from hf_rlion.rlion import _fused_cpu_rlion  # noqa: E402
from hf_rlion._optimizer_base import finite_gradient_mask  # noqa: E402

GROUPS = [dict(lr=1e-2, weight_decay=0.0), dict(lr=3e-2, weight_decay=0.1, maximize=True)]


@pytest.fixture(scope="module")
def interpreter():
    """A worker process with Triton's interpreter on and the C kernels off; tests submit bodies to it."""
    with interpreter_worker({"TRITON_INTERPRET": "1", "HF_RLION_NATIVE": "0"}, _worker_ready) as run:
        yield run


def _worker_ready() -> None:
    warnings.simplefilter("ignore", UserWarning)  # "CPU kernel unavailable (HF_RLION_NATIVE=0)"
    import hf_rlion.kernels.triton_rlion  # noqa: F401  (imports triton under the interpreter)


# --------------------------------------------------------------------------------------------
# Problems: parameters, gradients and optimizers, built the same way in both processes
# --------------------------------------------------------------------------------------------


def _params(dtype, seed=0):
    torch.manual_seed(seed)
    shapes = [(700,), (13, 7), (), (300,)]
    return [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in shapes]


def _grads(params, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[(torch.randn(p.shape, generator=g) * 1e-2).to(p.dtype) for p in params] for _ in range(steps)]


def _optimizer(kind, params, scaling, **switches):
    groups = [dict(params=params[:2], **GROUPS[0]), dict(params=params[2:], **GROUPS[1])]
    common = dict(alpha_scaling=scaling, bias_correction=True, **switches)
    if kind == "8bit":
        from hf_rlion import RLion8bit

        return RLion8bit(groups, min_8bit_size=256, **common)  # (13, 7) and () keep 32-bit state
    return RLion(groups, **common)


def _run(optimizer, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        optimizer.step()


def _train(kind, dtype, scaling, steps, switches, state_dict=None, start=None):
    """``steps`` steps from ``start`` (parameters) and ``state_dict``, or from scratch; returns the
    parameters, the optimizer's state_dict and whether the Triton kernels ran."""
    params = _params(dtype)
    if start is not None:
        with torch.no_grad():
            for p, value in zip(params, start):
                p.copy_(value)
    optimizer = _optimizer(kind, params, scaling, **switches)
    if state_dict is not None:
        optimizer.load_state_dict(state_dict)
        for group in optimizer.param_groups:  # the saved fused/foreach switches are loaded too (as in torch)
            group.update(switches)
    grads = _grads(params, 5)
    first = 0 if state_dict is None else int(state_dict["state"][0]["step"])
    _run(optimizer, params, grads[first : first + steps])
    return [p.detach().clone() for p in params], optimizer.state_dict(), _triton_ran(optimizer)


def _triton_ran(optimizer) -> bool:
    from hf_rlion import rlion

    if isinstance(optimizer, RLion):
        group = optimizer.param_groups[0]
        return optimizer._implementation(group, group["params"]) is rlion._triton_kernel
    return optimizer._triton_candidates(optimizer.param_groups[0]) is not None


def _assert_close_to_reference(kind, dtype, params, reference, lr=max(g["lr"] for g in GROUPS)):
    for p, r in zip(params, reference):
        if kind == "8bit":
            # codes may differ by one next to a midpoint (nearest vs bitsandbytes' table): momentum and then
            # the parameter drift apart by a small fraction of a step
            assert (p.float() - r.float()).abs().max() <= 0.01 * lr, (p.float() - r.float()).abs().max()
        elif dtype == torch.float32:
            torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-6)  # float32 rounding (atan within 1 ulp)
        else:
            # one rounding to bfloat16 of float32 results that agree to float32 rounding: one ulp apart at most
            assert ((p.float() - r.float()).abs() <= r.float().abs() * 2**-8 + 1e-30).all()


# --------------------------------------------------------------------------------------------
# Bodies (run in the worker)
# --------------------------------------------------------------------------------------------


def _matches_reference_body(kind, dtype, scaling) -> None:
    params, state, used_triton = _train(kind, dtype, scaling, 4, dict(fused=True))
    assert used_triton
    reference, reference_state, used = _train(kind, dtype, scaling, 4, dict(fused=False, foreach=False))
    assert not used
    _assert_close_to_reference(kind, dtype, params, reference)
    for i, s in state["state"].items():
        assert s["step"].item() == reference_state["state"][i]["step"].item() == 4
        if "exp_avg" in s:
            torch.testing.assert_close(s["exp_avg"], reference_state["state"][i]["exp_avg"], rtol=1e-5, atol=1e-7)
        if "state1" in s:
            gap = (s["state1"].long() - reference_state["state"][i]["state1"].long()).abs()
            assert gap.max() <= 1 and gap.float().mean() < 0.02


def _nonfinite_body(kind) -> None:
    params = _params(torch.float32)
    optimizer = _optimizer(kind, params, "rms", fused=True)
    grads = _grads(params, 3)
    _run(optimizer, params, grads[:1])
    grads[1][0][5] = math.nan  # a tensor with state
    # a tensor stepping for the first time, with an inf gradient: it must not move either
    newcomer = torch.nn.Parameter(torch.randn(500))
    optimizer.add_param_group(dict(params=[newcomer], lr=1e-2))
    newcomer.grad = torch.full((500,), math.inf)
    before = [p.detach().clone() for p in params] + [newcomer.detach().clone()]
    state_before = {k: v.clone() for k, v in optimizer.state[params[0]].items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # step() itself does not look at the device counter
        _run(optimizer, params, grads[1:2])
    assert torch.equal(params[0], before[0]) and torch.equal(newcomer, before[-1])
    for key, value in optimizer.state[params[0]].items():
        assert torch.equal(value, state_before[key]), key  # momentum (or codes, absmax) and step unchanged
    assert optimizer.state[params[0]]["step"].item() == 1
    fresh = optimizer.state[newcomer]  # kept, with step 0 and zero momentum: the same as no state
    assert fresh["step"].item() == 0
    assert all(not torch.any(v) for k, v in fresh.items() if k in ("exp_avg", "absmax1"))
    assert all(not torch.equal(p, b) for p, b in zip(params[1:], before[1:-1]))  # the others stepped
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert copy.deepcopy(optimizer)._total_skips() == 2  # a copy takes the device count along, silently
    with pytest.warns(RuntimeWarning, match="NaN/inf"):
        assert optimizer.nonfinite_skips == 2
    newcomer.grad = torch.randn(500) * 1e-2
    _run(optimizer, params, grads[2:3])
    assert optimizer.state[params[0]]["step"].item() == 2 and fresh["step"].item() == 1
    assert not torch.equal(newcomer, before[-1])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # warned once only
        assert optimizer.nonfinite_skips == 2


def _periodic_warning_body() -> None:
    params = _params(torch.float32)
    optimizer = _optimizer("rlion", params, "fixed", fused=True)
    optimizer.nonfinite_warn_interval = 2
    grads = _grads(params, 4)
    grads[0][1][0] = math.nan
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run(optimizer, params, grads[:2])
        assert not caught  # the counter was copied at step 2, without waiting
        _run(optimizer, params, grads[2:3])  # and looked at on a later step
    assert len(caught) == 1 and "NaN/inf" in str(caught[0].message)
    assert optimizer.nonfinite_skips == 1


def _no_host_reads_body(kind) -> None:
    """After a first step (tables built, the map's midpoints read once), step() reads no tensor value on the
    host: the NaN/inf policy, the step counts and the skip count stay on the device."""
    params = _params(torch.float32)
    optimizer = _optimizer(kind, params, "rms", fused=True)
    grads = _grads(params, 3)
    grads[2][1][0] = math.nan
    _run(optimizer, params, grads[:1])

    def refuse(*args, **kwargs):
        raise AssertionError("a host read of a tensor in step()")

    names = ("item", "tolist", "__bool__", "__int__", "__float__", "numpy")
    saved = {name: getattr(torch.Tensor, name) for name in names}
    try:
        for name in names:
            setattr(torch.Tensor, name, refuse)
        _run(optimizer, params, grads[1:])
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)
    with pytest.warns(RuntimeWarning):
        assert optimizer.nonfinite_skips == 1


def _dispatch_body() -> None:
    from hf_rlion import rlion
    from hf_rlion.rlion import _single_tensor_rlion

    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.zeros(4)
    fused = RLion([p], fused=True)
    assert fused._implementation(fused.param_groups[0], [p]) is rlion._triton_kernel is not None
    automatic = RLion([p])  # on CPU, fused=None never picks the interpreter: the reference path here
    assert automatic._implementation(automatic.param_groups[0], [p]) is _single_tensor_rlion
    float64 = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    float64.grad = torch.zeros(4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="fused=True"):
        RLion([float64], fused=True).step()


def _train_body(kind, dtype, scaling, steps, switches, state_dict, start):
    return _train(kind, dtype, scaling, steps, switches, state_dict, start)


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["rlion", "8bit"])
@pytest.mark.parametrize("dtype,scaling", [(torch.float32, "rms"), (torch.bfloat16, "fixed")])
def test_fused_true_runs_triton_and_matches_the_reference_path(interpreter, kind, dtype, scaling):
    """Four steps, two param groups (one with weight decay and maximize), 0-d and off-block sizes: RLion's
    parameters equal the per-tensor reference's to float32 rounding (bfloat16: one ulp), momentum too;
    RLion8bit's within 1 % of a step, codes at most one apart; step counts 4 everywhere."""
    interpreter(_matches_reference_body, kind, dtype, scaling)


@pytest.mark.parametrize("kind", ["rlion", "8bit"])
def test_nonfinite_gradient_skips_tensor_and_counts_it_lazily(interpreter, kind):
    """A NaN gradient in a stepped tensor and an inf one in a never-stepped tensor: both untouched (state
    bit-identical, step counts 1 and 0), the others step; step() does not warn; reading nonfinite_skips
    gives 2 and warns once; the skipped tensors step normally afterwards."""
    interpreter(_nonfinite_body, kind)


def test_first_skip_warns_from_step_every_interval(interpreter):
    """Without reading nonfinite_skips, the first skip warns from a later step(), every
    nonfinite_warn_interval steps, without waiting for the device."""
    interpreter(_periodic_warning_body)


@pytest.mark.parametrize("kind", ["rlion", "8bit"])
def test_device_path_step_reads_no_tensor_on_the_host(interpreter, kind):
    """Tensor.item/tolist/bool/int/float/numpy refused during step() (a NaN gradient included): the
    device path never synchronises with the device for the NaN/inf policy or the step counts."""
    interpreter(_no_host_reads_body, kind)


def test_dispatch_under_the_interpreter(interpreter):
    """fused=True on CPU with the C kernel off and the interpreter on: Triton; fused=None: the reference
    (the interpreter is never chosen by itself); a dtype neither kernel takes: RuntimeError."""
    interpreter(_dispatch_body)


def test_fused_none_on_cpu_still_picks_the_c_kernel():
    if not cpu_rlion.kernel_available():
        pytest.skip("no C compiler here")
    p = torch.nn.Parameter(torch.zeros(4))
    optimizer = RLion([p])
    assert optimizer._implementation(optimizer.param_groups[0], [p]) is _fused_cpu_rlion


@pytest.mark.parametrize("kind", ["rlion", "8bit"])
@pytest.mark.parametrize("direction", ["triton_then_c", "c_then_triton"])
def test_state_saved_on_one_path_continues_on_the_other(interpreter, kind, direction):
    """Two steps on one path, state_dict and parameters to the other process, three more steps there:
    the same result as five reference steps (the state layout is one: step counts, float32 momentum,
    8-bit codes and absmax)."""
    if not (cpu_rlion.kernel_available() and cpu_rlion8bit.kernel_available()):
        pytest.skip("no C compiler here")
    dtype, scaling = torch.float32, "rms"
    c_path = dict(fused=None)

    def here(steps, state_dict=None, start=None):
        params, state, used_triton = _train(kind, dtype, scaling, steps, c_path, state_dict, start)
        assert not used_triton
        return params, state

    def there(steps, state_dict=None, start=None):
        triton_path = dict(fused=True)
        params, state, used_triton = interpreter(_train_body, kind, dtype, scaling, steps, triton_path, state_dict, start)
        assert used_triton
        return params, state

    first, second = (there, here) if direction == "triton_then_c" else (here, there)
    params, state = first(2)
    params, state = second(3, state, params)
    assert all(s["step"].item() == 5 for s in state["state"].values())
    reference, _, _ = _train(kind, dtype, scaling, 5, dict(fused=False, foreach=False))
    _assert_close_to_reference(kind, dtype, params, reference)


def test_fallback_finite_check_reads_the_host_once_per_device(monkeypatch):
    """The torch fallback of the NaN/inf check stacks every tensor's answer and reads them together:
    no bool() per tensor (one host sync per tensor on a GPU), the same mask."""
    grads = [torch.randn(50) for _ in range(20)] + [torch.zeros(0), torch.randn(3, 4).t()]
    grads[3][7], grads[11][0], grads[21][1, 2] = math.nan, -math.inf, math.inf

    def refuse(self):
        raise AssertionError("bool() of a tensor")

    monkeypatch.setattr(torch.Tensor, "__bool__", refuse)
    mask = finite_gradient_mask(grads)
    monkeypatch.undo()
    assert mask == [i not in (3, 11, 21) for i in range(22)]
