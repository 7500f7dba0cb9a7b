"""The generic optimizer conformance suite, run on every implementation path of RLion and RLion8bit.

Modelled on PyTorch's ``OptimizerInfo`` tests (``torch/testing/_internal/common_optimizers.py`` and
``test/test_optim.py``: a table of optimizer inputs, generic tests every ``torch.optim`` optimizer
must pass) and on bitsandbytes' ``tests/test_optim.py`` (an 8-bit optimizer run side by side with
its 32-bit twin on the same parameters and gradients). The code is this project's own.

Implementation paths (``IMPLEMENTATIONS``): ``RLion`` per-tensor reference (``foreach=False``),
``foreach=True`` and the fused C kernel (``fused=True``); ``RLion8bit`` through bitsandbytes'
quantise/dequantise (``fused=False``) and through the fused 8-bit C kernel (``fused=True``), both with
``min_8bit_size=1`` so that the small test tensors get 8-bit state; and ``RLion8bit`` with its
default ``min_8bit_size`` (4096), where every tensor here is small and keeps RLion's 32-bit state.
Optimizer inputs (``OPTIMIZER_INPUTS``): the hyperparameter combinations every generic test runs
with (weight decay, maximize, fixed and RMS-normalised α, bias correction, betas, large α).

Generic cases, and the ones that do not apply:

==================================================  ======================================================
torch / bitsandbytes case                           here
==================================================  ======================================================
optim_infos_do_not_specify_global_cliquey_kwargs    test_optimizer_inputs_leave_the_implementation_to_the_test
errors (bad arguments, empty/duplicate params)      test_construction_errors(_8bit_options),
                                                    test_empty_or_non_iterable_params_raise,
                                                    test_duplicate_parameters
forloop_goes_right_direction (contiguous or not)    test_goes_right_direction
param_group_with_lrscheduler_goes_right_direction   test_lr_scheduler_with_param_groups_goes_right_direction
tensor_lr                                           test_tensor_lr_is_rejected (RLion takes float lr only)
complex, complex_2d                                 test_complex_parameters_are_rejected (no complex rule)
foreach_matches_forloop, fused_matches_forloop      test_matches_the_reference_path
mixed_device_dtype                                  test_mixed_dtypes_match_the_reference_path (CPU only)
param_groups_weight_decay, param_groups_lr          test_param_groups_weight_decay, test_param_groups_lr
step_is_noop_when_params_have_no_grad               test_step_is_noop_when_params_have_no_grad
step_is_noop_for_zero_grads                         test_step_is_noop_for_zero_grads
non_empty_state / "no grad for some params"         test_no_grad_for_some_params
optimizer_can_be_printed                            test_optimizer_can_be_printed
state_dict_deterministic                            test_state_dict_deterministic
save_load_equality_with_weights_only                test_state_dict_survives_torch_save_weights_only
can_load_older_state_dict                           test_can_load_older_state_dict
load_nontensor_step                                 test_load_nontensor_step
deepcopy_copies_all_public_attrs                    test_deepcopy_and_pickle_continue_identically
step_pre/post_hook, global step hooks               test_step_hooks
state_dict_pre/post_hook                            test_state_dict_hooks
load_state_dict_pre_hook_and_prepend, post_hook     test_load_state_dict_pre_hooks_run_in_order_and_their_result_is_loaded,
                                                    test_load_state_dict_post_hooks_see_the_state_as_loaded,
                                                    test_load_state_dict_pre_hook_can_adapt_an_older_layout
add_param_group validation                          test_add_param_group_rejects_a_bad_group_and_keeps_none
closure                                             test_closure_is_called_once_and_its_loss_returned
zero_grad                                           test_zero_grad
low precision (fp16/bf16 params, fp32 state)        test_low_precision_params_keep_float32_state
rosenbrock / convergence                            test_minimizes_rosenbrock
bnb test_optimizer8bit (8-bit vs 32-bit)            test_8bit_state_is_the_nearest_code_of_the_32bit_momentum,
                                                    test_8bit_tracks_32bit_over_many_steps
RLion <-> RLion8bit checkpoints                     test_loading_the_other_class_state_dict
differentiable                                      NOT APPLICABLE (see ``NOT_APPLICABLE``)
capturable, CUDA graphs, fused CUDA grad scaling    NOT APPLICABLE
sparse gradients (rosenbrock_sparse)                NOT APPLICABLE
multi-device, CUDA state_dict, cpu_load_state_dict  NOT APPLICABLE
peak_memory_foreach, foreach/fused_large_tensor     NOT APPLICABLE
set_default_dtype_works_with_foreach                test_default_dtype_float64_keeps_float32_step_counts
==================================================  ======================================================

The not-applicable cases are test functions too: each skips with its reason from ``NOT_APPLICABLE``.
"""

from __future__ import annotations

import copy
import inspect
import io
import pickle
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnb_functional  # noqa: E402

from hf_rlion import RLion  # noqa: E402
from hf_rlion.kernels import cpu_rlion, cpu_rlion8bit  # noqa: E402
from hf_rlion import rlion8bit  # noqa: E402
from hf_rlion.rlion8bit import RLion8bit  # noqa: E402

# ---------------------------------------------------------------------------------------------
# The tables: implementation paths and optimizer inputs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Implementation:
    """One implementation path: the class and the constructor flags that select the path."""

    name: str
    optimizer_class: type
    flags: dict = field(default_factory=dict)
    #: the path this one is compared against (None: it is a reference itself)
    reference: str | None = None
    #: parameter dtypes the path runs; fused=True raises RuntimeError for the others
    dtypes: tuple = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
    #: whether the path holds 8-bit state for the (small) tensors of these tests
    eight_bit: bool = False
    needs_kernel: bool = False

    def __call__(self, params, **kwargs) -> torch.optim.Optimizer:
        return self.optimizer_class(params, **{**self.flags, **kwargs})

    def __str__(self) -> str:
        return self.name


_FLOAT_KERNEL = (torch.float32, torch.bfloat16, torch.float16)
IMPLEMENTATIONS = {
    impl.name: impl
    for impl in [
        Implementation("RLion-forloop", RLion, dict(foreach=False, fused=False)),
        Implementation("RLion-foreach", RLion, dict(foreach=True, fused=False), reference="RLion-forloop"),
        Implementation(
            "RLion-fused", RLion, dict(fused=True), reference="RLion-forloop", dtypes=_FLOAT_KERNEL, needs_kernel=True
        ),
        Implementation("RLion8bit-reference", RLion8bit, dict(fused=False, min_8bit_size=1), eight_bit=True),
        Implementation(
            "RLion8bit-fused",
            RLion8bit,
            dict(fused=True, min_8bit_size=1),
            reference="RLion8bit-reference",
            dtypes=(torch.float32, torch.bfloat16),
            eight_bit=True,
            needs_kernel=True,
        ),
        # default min_8bit_size (4096): every tensor of these tests keeps RLion's 32-bit state
        Implementation("RLion8bit-32bit-state", RLion8bit, {}, reference="RLion-forloop"),
    ]
}


def _kernels_available() -> bool:
    return cpu_rlion.kernel_available() and cpu_rlion8bit.kernel_available()


def implementation_params(names=None):
    """``pytest.param`` for each implementation (skipped where its C kernel cannot be built)."""
    result = []
    for impl in IMPLEMENTATIONS.values():
        if names is not None and impl.name not in names:
            continue
        marks = []
        if impl.needs_kernel:
            marks.append(pytest.mark.skipif(not _kernels_available(), reason="no C compiler: fused kernels absent"))
        result.append(pytest.param(impl, id=impl.name, marks=marks))
    return result


ALL = implementation_params()
DERIVED = implementation_params([i.name for i in IMPLEMENTATIONS.values() if i.reference is not None])


@dataclass(frozen=True)
class OptimizerInput:
    """Constructor keywords (hyperparameters only; the implementation flags come from the path)."""

    desc: str
    kwargs: dict

    def __str__(self) -> str:
        return self.desc


OPTIMIZER_INPUTS = [
    OptimizerInput("default", {}),
    OptimizerInput("lr", {"lr": 0.01}),
    OptimizerInput("weight_decay", {"weight_decay": 0.1}),
    OptimizerInput("maximize", {"weight_decay": 0.1, "maximize": True}),
    OptimizerInput("fixed", {"alpha_scaling": "fixed", "alpha": 10.0}),
    OptimizerInput("fixed_bias_correction", {"alpha_scaling": "fixed", "alpha": 10.0, "bias_correction": True}),
    OptimizerInput("rms_bias_correction", {"bias_correction": True}),
    OptimizerInput("betas", {"betas": (0.95, 0.98), "lr": 3e-3}),
    OptimizerInput("large_alpha", {"alpha": 100.0}),
]
INPUTS = [pytest.param(i, id=i.desc) for i in OPTIMIZER_INPUTS]

#: Generic cases of torch's / bitsandbytes' suites that do not apply, with the reason.
NOT_APPLICABLE = {
    "differentiable": (
        "RLion has no differentiable=True mode: step() runs under torch.no_grad and updates parameters and "
        "momentum in place (torch's non-differentiable contract), and the fused C kernels and the 8-bit "
        "quantisation (rounding to codes) have no autograd formula. The constructor has no such argument."
    ),
    "capturable": (
        "No capturable= argument and no fused step taking grad_scale/found_inf: GradScaler unscales and skips inf "
        "steps itself before step() (tested in test_precision_and_faults.py). The GPU (Triton) path keeps step "
        "counts and skips on the device so step() can be graph-captured, but CUDA graphs need a GPU: "
        "benchmarks/gpu_check.py checks capture there; the interpreter path is tested in test_triton_dispatch.py."
    ),
    "sparse": (
        "Sparse gradients are refused with a RuntimeError (torch's dense optimizers do the same; "
        "tested in test_rlion.py::test_sparse_gradients_raise_clearly), so rosenbrock_sparse does not apply."
    ),
    "multi_device": (
        "Multi-device and CUDA state_dict cases need accelerators; CI is CPU-only. RLion's update is "
        "element-wise per tensor, so tensors on different devices never interact."
    ),
    "peak_memory": (
        "torch's peak-memory and 2**32-element tests are CUDA-only; the CPU paths' temporaries are bounded "
        "by test_fused_cpu.py::test_a_step_allocates_no_tensor_sized_temporaries and "
        "test_rlion8bit.py::test_step_temporary_memory_is_bounded_by_one_tensor_not_the_model."
    ),
}


@pytest.mark.parametrize("case", sorted(NOT_APPLICABLE))
def test_not_applicable(case):
    pytest.skip(f"NOT APPLICABLE ({case}): {NOT_APPLICABLE[case]}")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def class_defaults(optimizer_class) -> dict:
    return {
        name: p.default
        for name, p in inspect.signature(optimizer_class.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def linear_problem(dtype=torch.float32, contiguous=True, seed=0):
    """torch's generic problem: loss = ||W x + b||², W (10, 5), b (10,)."""
    generator = torch.Generator().manual_seed(seed)
    if contiguous:
        weight = torch.randn(10, 5, generator=generator, dtype=dtype)
        bias = torch.randn(10, generator=generator, dtype=dtype)
    else:
        weight = torch.randn(10, 5, 2, generator=generator, dtype=dtype)[..., 0]
        bias = torch.randn(10, 2, generator=generator, dtype=dtype)[..., 0]
    x = torch.randn(5, generator=generator, dtype=dtype)
    return nn.Parameter(weight), nn.Parameter(bias), x


def linear_loss(weight, bias, x):
    return (weight.mv(x) + bias).pow(2).sum()


def fresh_copy(params):
    return [nn.Parameter(p.detach().clone()) for p in params]


def dequantised(state: dict) -> torch.Tensor:
    """The momentum a state holds, as float32: RLion's exp_avg or RLion8bit's decoded codes."""
    if "exp_avg" in state:
        return state["exp_avg"].float()
    values = bnb_functional.dequantize_blockwise(
        state["state1"], absmax=state["absmax1"], code=state["qmap1"], blocksize=rlion8bit.BLOCKSIZE
    )
    return values.view_as(state["state1"])


def assert_same_tree(a, b, path="state_dict"):
    """Exact equality of nested dicts/lists/tensors (tensors: same dtype, same values)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            assert_same_tree(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def assert_states_close(state, other, rtol, atol):
    """Two per-parameter states agree: the same keys, step counts equal, momentum close; 8-bit codes
    within one code of each other (a gradient one ulp apart can cross a rounding boundary)."""
    assert set(state) == set(other)
    assert float(state["step"]) == float(other["step"])
    if "state1" in state:
        assert state["state1"].dtype == other["state1"].dtype == torch.uint8
        if state["state1"].numel():
            assert (state["state1"].int() - other["state1"].int()).abs().max() <= 1
        torch.testing.assert_close(state["absmax1"], other["absmax1"], rtol=rtol, atol=atol)
        torch.testing.assert_close(state["qmap1"], other["qmap1"], rtol=0, atol=0)
    else:
        assert state["exp_avg"].dtype == other["exp_avg"].dtype
        torch.testing.assert_close(state["exp_avg"], other["exp_avg"], rtol=rtol, atol=atol)


def closure_for(optimizer, weight, bias, x):
    def closure():
        optimizer.zero_grad()
        loss = linear_loss(weight, bias, x)
        loss.backward()
        return loss

    return closure


def state_dtypes(optimizer) -> list[dict]:
    return [
        {k: v.dtype for k, v in optimizer.state[p].items() if isinstance(v, torch.Tensor)}
        for group in optimizer.param_groups
        for p in group["params"]
        if p in optimizer.state
    ]


# ---------------------------------------------------------------------------------------------
# construction and errors
# ---------------------------------------------------------------------------------------------


def test_optimizer_inputs_leave_the_implementation_to_the_test():
    """As torch's: the inputs are hyperparameters; the implementation flags come from the path only."""
    for optimizer_input in OPTIMIZER_INPUTS:
        assert not {"foreach", "fused", "min_8bit_size", "optim_bits"} & set(optimizer_input.kwargs)


_ERROR_INPUTS = [
    (dict(lr=-1.0), ValueError, "lr must be"),
    (dict(lr=float("nan")), ValueError, "lr must be"),
    (dict(betas=(1.0, 0.99)), ValueError, "beta1"),
    (dict(betas=(0.9, -0.1)), ValueError, "beta2"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay"),
    (dict(alpha=0.0), ValueError, "alpha must be"),
    (dict(alpha=float("inf")), ValueError, "alpha must be"),
    (dict(alpha_scaling="sign"), ValueError, "alpha_scaling"),
    (dict(bias_correction=1), ValueError, "bias_correction"),
    (dict(maximize="yes"), ValueError, "maximize"),
    (dict(foreach=True, fused=True), ValueError, "foreach and fused"),
    (dict(differentiable=True), TypeError, "differentiable"),
]


@pytest.mark.parametrize("optimizer_class", [RLion, RLion8bit])
@pytest.mark.parametrize("kwargs, error, match", _ERROR_INPUTS, ids=[str(k) for k, _, _ in _ERROR_INPUTS])
def test_construction_errors(optimizer_class, kwargs, error, match):
    with pytest.raises(error, match=match):
        optimizer_class([nn.Parameter(torch.randn(3))], **kwargs)


@pytest.mark.parametrize("kwargs, match", [(dict(min_8bit_size=-1), "min_8bit_size"), (dict(optim_bits=16), "optim_bits")])
def test_construction_errors_8bit_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RLion8bit([nn.Parameter(torch.randn(3))], **kwargs)


@pytest.mark.parametrize("optimizer_class", [RLion, RLion8bit])
def test_empty_or_non_iterable_params_raise(optimizer_class):
    with pytest.raises(ValueError, match="empty parameter list"):
        optimizer_class([])
    with pytest.raises(TypeError, match="iterable of Tensors or dicts"):
        optimizer_class(nn.Parameter(torch.randn(3)))


@pytest.mark.parametrize("optimizer_class", [RLion, RLion8bit])
def test_duplicate_parameters(optimizer_class):
    """torch's rule: duplicates in one group warn, across groups they are an error."""
    p = nn.Parameter(torch.randn(3))
    with pytest.warns(UserWarning, match="duplicate parameters"):
        optimizer_class([p, p])
    with pytest.raises(ValueError, match="more than one parameter group"):
        optimizer_class([{"params": [p]}, {"params": [p]}])


@pytest.mark.parametrize("impl", ALL)
def test_tensor_lr_is_rejected(impl):
    """torch's test_tensor_lr accepts ValueError "lr as a Tensor is not supported" as an answer: here
    a tensor lr is refused with a ValueError saying so, in the constructor, a group, or add_param_group."""
    w, b = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(2))
    with pytest.raises(ValueError, match="tensor learning rates are not supported"):
        impl([w], lr=torch.tensor(1e-3))
    with pytest.raises(ValueError, match="tensor learning rates are not supported"):
        impl([{"params": [w], "lr": torch.tensor(1e-3)}])
    optimizer = impl([w])
    with pytest.raises(ValueError, match="tensor learning rates are not supported"):
        optimizer.add_param_group({"params": [b], "lr": torch.tensor(1e-3)})


@pytest.mark.parametrize("impl", ALL)
def test_complex_parameters_are_rejected(impl):
    """RLion's rule has no complex form (arctan of a complex momentum is not a bounded step): complex
    parameters are refused at construction, alone or mixed with real ones (torch's test_complex mixes)."""
    real = nn.Parameter(torch.randn(4))
    for params in ([nn.Parameter(torch.randn(4, dtype=torch.complex64))], [real, torch.randn(2, dtype=torch.cfloat)]):
        with pytest.raises(ValueError, match="complex"):
            impl(params)


@pytest.mark.parametrize("impl", ALL)
def test_optimizer_can_be_printed(impl):
    w, b, _ = linear_problem()
    text = repr(impl([w, b], lr=0.01, alpha=5.0))
    assert impl.optimizer_class.__name__ in text and "alpha: 5.0" in text and "lr: 0.01" in text


# ---------------------------------------------------------------------------------------------
# the update goes where it should
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "non_contiguous"])
@pytest.mark.parametrize("optimizer_input", INPUTS)
@pytest.mark.parametrize("impl", ALL)
def test_goes_right_direction(impl, optimizer_input, contiguous):
    weight, bias, x = linear_problem(contiguous=contiguous)
    optimizer = impl([weight, bias], **optimizer_input.kwargs)
    closure = closure_for(optimizer, weight, bias, x)
    initial = closure().item()
    if impl.name == "RLion8bit-fused" and not contiguous:
        # fused=True demands the kernel, which takes contiguous tensors only: a clear error, not a fallback
        with pytest.raises(RuntimeError, match="non-contiguous"):
            optimizer.step()
        return
    for _ in range(20):
        optimizer.step(closure)
    final = closure().item()
    if optimizer_input.kwargs.get("maximize", False):
        assert final > initial
    else:
        assert final < initial


@pytest.mark.parametrize("impl", ALL)
def test_lr_scheduler_with_param_groups_goes_right_direction(impl):
    """Two groups, one with its own lr, under StepLR and ReduceLROnPlateau (torch's scheduler inputs)."""
    for make_scheduler in (
        lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5),
        lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=1),
    ):
        weight, weight2, _ = linear_problem(seed=1)
        weight2 = nn.Parameter(torch.randn(10, 5, generator=torch.Generator().manual_seed(2)))
        x = torch.randn(5, generator=torch.Generator().manual_seed(3))
        optimizer = impl([{"params": [weight]}, {"params": [weight2], "lr": 0.01}])
        scheduler = make_scheduler(optimizer)

        def closure():
            optimizer.zero_grad()
            loss = (weight.mv(x) + weight2.mv(x)).pow(2).sum()
            loss.backward()
            return loss

        initial = closure().item()
        for _ in range(20):
            loss = optimizer.step(closure)
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(loss.item())
            else:
                scheduler.step()
        assert closure().item() < initial
        if isinstance(scheduler, torch.optim.lr_scheduler.StepLR):
            assert optimizer.param_groups[1]["lr"] == 0.01 * 0.5**4  # it acted on the group's own lr


def rosenbrock_and_gradient(p: torch.Tensor):
    x, y = p.double().tolist()
    value = (1 - x) ** 2 + 100 * (y - x * x) ** 2
    grad = torch.tensor([-400 * x * (y - x * x) - 2 * (1 - x), 200 * (y - x * x)], dtype=p.dtype)
    return value, grad


@pytest.mark.parametrize("optimizer_input", [INPUTS[0], INPUTS[4], INPUTS[6]])
@pytest.mark.parametrize("impl", ALL)
def test_minimizes_rosenbrock(impl, optimizer_input):
    """torch's Rosenbrock start (1.5, 1.5), 300 steps with lr decaying exponentially from 0.02 to 2e-4
    (each coordinate moves at most lr per step, |u| < 1): the loss falls by more than 1000× and the
    point gets within 0.25 of the minimum (1, 1), from 0.71 (torch asks only that the distance shrinks)."""
    p = nn.Parameter(torch.tensor([1.5, 1.5]))
    optimizer = impl([p], **{**optimizer_input.kwargs, "lr": 0.02})
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.01 ** (1 / 300))
    initial, _ = rosenbrock_and_gradient(p.detach())
    for _ in range(300):
        _, p.grad = rosenbrock_and_gradient(p.detach())
        optimizer.step()
        scheduler.step()
    final, _ = rosenbrock_and_gradient(p.detach())
    assert final < 1e-3 * initial
    assert torch.dist(p.detach(), torch.tensor([1.0, 1.0])) < 0.25


# ---------------------------------------------------------------------------------------------
# the paths agree
# ---------------------------------------------------------------------------------------------


def _small_network(dtype=torch.float32):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(2, 3), nn.Sigmoid(), nn.Linear(3, 1), nn.Sigmoid()).to(dtype)
    scalar = nn.Parameter(torch.rand((), dtype=dtype))  # 0-dim parameter (torch's "empty_param")
    empty = nn.Parameter(torch.empty(0, 4, dtype=dtype))  # zero-size parameter
    return model, scalar, empty


@pytest.mark.parametrize("optimizer_input", INPUTS)
@pytest.mark.parametrize("impl", DERIVED)
def test_matches_the_reference_path(impl, optimizer_input):
    """torch's foreach/fused_matches_forloop: 7 steps of a small network, a step with no gradients
    (i = 2), a layer frozen for two steps (i = 3, 4); parameters and states agree with the reference
    path after every step, within float32 rounding (the fused kernels' arctan is within 1 ulp, and
    the RMS sums run in another order)."""
    reference = IMPLEMENTATIONS[impl.reference]
    x = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]).reshape(3, 2)
    runs = []
    for path in (reference, impl):
        model, scalar, empty = _small_network()
        params = list(model.parameters()) + [scalar, empty]
        optimizer = path(params, **optimizer_input.kwargs)
        runs.append((model, scalar, empty, params, optimizer))
    for i in range(7):
        for model, scalar, empty, params, optimizer in runs:
            optimizer.zero_grad()
            if i == 3:
                model[2].requires_grad_(False)
            if i == 5:
                model[2].requires_grad_(True)
            if i != 2:
                (model(x).sum() + scalar * 0.5).backward()
                empty.grad = torch.zeros_like(empty)
            optimizer.step()
        (_, _, _, ref_params, ref_opt), (_, _, _, params, opt) = runs
        for ref_p, p in zip(ref_params, params):
            torch.testing.assert_close(p, ref_p, rtol=1e-5, atol=1e-6)
            assert (ref_p in ref_opt.state) == (p in opt.state)
            if p in opt.state:
                assert_states_close(opt.state[p], ref_opt.state[ref_p], rtol=1e-5, atol=1e-6)


def _tolerance(dtype):
    rtol, atol = {
        torch.float64: (1e-7, 1e-7),
        torch.float32: (1.3e-6, 1e-5),
        torch.bfloat16: (1.6e-2, 1e-5),
        torch.float16: (1e-3, 1e-5),
    }[dtype]
    return dict(rtol=5 * rtol, atol=5 * atol)  # torch's: 5× the single-op tolerance


@pytest.mark.parametrize("impl", DERIVED)
def test_mixed_dtypes_match_the_reference_path(impl):
    """torch's test_mixed_device_dtype on one device: one group of float64, float32, bfloat16 and
    float16 parameters, 7 steps, against the reference path. fused=True paths refuse the dtypes their
    kernel cannot take with a RuntimeError naming the dtype, and run the others."""
    reference = IMPLEMENTATIONS[impl.reference]
    all_dtypes = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    base = [torch.rand(2, 3, generator=generator, dtype=d) for d in all_dtypes]
    grads = [torch.rand(2, 3, generator=generator, dtype=d) for d in all_dtypes]

    def params_of(dtypes):
        result = []
        for t, g in zip(base, grads):
            if t.dtype in dtypes:
                result.append(nn.Parameter(t.clone()))
                result[-1].grad = g.clone()
        return result

    unsupported = [d for d in all_dtypes if d not in impl.dtypes]
    if unsupported:
        optimizer = impl(params_of(all_dtypes))
        with pytest.raises(RuntimeError, match="float|dtype"):
            optimizer.step()
    results = []
    for path in (reference, impl):
        params = params_of(impl.dtypes)
        optimizer = path(params, weight_decay=0.1)
        for _ in range(7):
            optimizer.step()
        results.append((params, optimizer))
    (ref_params, ref_opt), (params, opt) = results
    for ref_p, p in zip(ref_params, params):
        torch.testing.assert_close(p, ref_p, **_tolerance(p.dtype))
        assert_states_close(opt.state[p], ref_opt.state[ref_p], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("impl", ALL)
def test_low_precision_params_keep_float32_state(impl, dtype):
    """bf16/fp16 parameters: the momentum is float32 (RLion) or uint8 codes with float32 absmax
    (RLion8bit); a derived path agrees with its reference on the same low-precision parameters."""
    weight, bias, x = linear_problem(dtype=dtype)
    if dtype not in impl.dtypes:
        optimizer = impl([weight, bias])
        closure_for(optimizer, weight, bias, x)()
        with pytest.raises(RuntimeError, match="float"):
            optimizer.step()
        return
    runs = []
    for path in [impl] + ([IMPLEMENTATIONS[impl.reference]] if impl.reference else []):
        params = fresh_copy([weight, bias])
        optimizer = path(params, lr=0.01)
        closure = closure_for(optimizer, params[0], params[1], x)
        for _ in range(5):
            optimizer.step(closure)
        runs.append((params, optimizer))
    params, optimizer = runs[0]
    for p in params:
        state = optimizer.state[p]
        if impl.eight_bit:
            assert state["state1"].dtype == torch.uint8 and state["absmax1"].dtype == torch.float32
        else:
            assert state["exp_avg"].dtype == torch.float32
        assert p.dtype == dtype
    if len(runs) == 2:
        for p, ref_p in zip(params, runs[1][0]):
            torch.testing.assert_close(p, ref_p, **_tolerance(dtype))


# ---------------------------------------------------------------------------------------------
# param groups, frozen parameters, no-op steps
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer_input", INPUTS)
@pytest.mark.parametrize("impl", ALL)
def test_param_groups_weight_decay(impl, optimizer_input):
    weight, bias, x = linear_problem()
    bias_kwargs = {**optimizer_input.kwargs, "weight_decay": 0.0}
    optimizer = impl([dict(params=[weight], **optimizer_input.kwargs), dict(params=[bias], **bias_kwargs)])
    closure = closure_for(optimizer, weight, bias, x)
    initial = closure().item()
    for _ in range(20):
        optimizer.step(closure)
    final = closure().item()
    assert final > initial if optimizer_input.kwargs.get("maximize") else final < initial


@pytest.mark.parametrize("optimizer_input", INPUTS)
@pytest.mark.parametrize("impl", ALL)
def test_param_groups_lr(impl, optimizer_input):
    """A group with lr 0 is not moved at all (also with weight decay), while the other group learns."""
    weight, bias, x = linear_problem()
    irrelevant = nn.Parameter(torch.randn(2))
    untouched = irrelevant.detach().clone()
    kwargs = {**optimizer_input.kwargs}
    kwargs.setdefault("lr", 1e-3)
    optimizer = impl([dict(params=[weight, bias], **kwargs), dict(params=[irrelevant])], lr=0.0, weight_decay=0.1)
    closure = closure_for(optimizer, weight, bias, x)
    initial = closure().item()
    for _ in range(20):
        optimizer.zero_grad()
        loss = linear_loss(weight, bias, x)
        loss.backward()
        irrelevant.grad = torch.rand_like(irrelevant)
        optimizer.step()
    final = linear_loss(weight, bias, x).item()
    assert final > initial if kwargs.get("maximize") else final < initial
    assert torch.equal(irrelevant.detach(), untouched)


@pytest.mark.parametrize("optimizer_input", INPUTS)
@pytest.mark.parametrize("impl", ALL)
def test_step_is_noop_when_params_have_no_grad(impl, optimizer_input):
    params = [torch.randn(2, 3, requires_grad=False) for _ in range(2)]
    old = [p.clone() for p in params]
    optimizer = impl(params, **optimizer_input.kwargs)
    loss = optimizer.step(lambda: torch.tensor([1.0]))
    assert loss.item() == 1.0
    for p, o in zip(params, old):
        assert torch.equal(p, o)
    assert len(optimizer.state) == 0


@pytest.mark.parametrize("optimizer_input", INPUTS)
@pytest.mark.parametrize("impl", ALL)
def test_step_is_noop_for_zero_grads(impl, optimizer_input):
    """A zero gradient on zero momentum gives c = 0, u = arctan(0) = 0: the parameter does not move and
    the momentum stays 0 (torch skips weight-decay inputs; here the decay alone must act, θ·(1 − ηλ))."""
    param = nn.Parameter(torch.randn(5, 1))
    old = param.detach().clone()
    optimizer = impl([param], **optimizer_input.kwargs)
    defaults = optimizer.defaults
    for _ in range(2):
        param.grad = torch.zeros_like(param)
        optimizer.step(lambda: torch.tensor([1.0]))
    if defaults["weight_decay"] == 0:
        assert torch.equal(param.detach(), old), f"moved to {param.detach().flatten().tolist()}"
    else:
        decay = 1.0 - defaults["lr"] * defaults["weight_decay"]
        torch.testing.assert_close(param.detach(), old * decay * decay)
    assert torch.equal(dequantised(optimizer.state[param]), torch.zeros(5, 1))


@pytest.mark.parametrize("impl", ALL)
def test_no_grad_for_some_params(impl):
    """Parameters without a gradient are not touched and get no state; they join when they get one."""
    a, b, c = (nn.Parameter(torch.randn(4, 3)) for _ in range(3))
    b_old, c_old = b.detach().clone(), c.detach().clone()
    optimizer = impl([a, b, c], weight_decay=0.1)
    for _ in range(3):
        a.grad = torch.randn_like(a)
        optimizer.step()
    assert torch.equal(b.detach(), b_old) and torch.equal(c.detach(), c_old)
    assert set(optimizer.state) == {a} and float(optimizer.state[a]["step"]) == 3
    c.grad = torch.randn_like(c)
    optimizer.step()
    assert float(optimizer.state[c]["step"]) == 1 and float(optimizer.state[a]["step"]) == 4
    assert not torch.equal(c.detach(), c_old) and b not in optimizer.state


@pytest.mark.parametrize("impl", ALL)
def test_default_dtype_float64_keeps_float32_step_counts(impl):
    """torch's set_default_dtype_works_with_foreach, on the CPU: under a float64 default dtype the
    step count is still a float32 scalar and the path steps exactly as under float32."""
    runs = []
    for default in (torch.float64, torch.float32):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(default)
        try:
            weight, bias, x = linear_problem(dtype=torch.float32)
            optimizer, weight, bias, x = _primed(impl, steps=3, params=(weight, bias, x))
        finally:
            torch.set_default_dtype(previous)
        assert all(optimizer.state[p]["step"].dtype == torch.float32 for p in (weight, bias))
        runs.append((weight, bias))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("impl", ALL)
def test_zero_grad(impl):
    weight, bias, x = linear_problem()
    optimizer = impl([weight, bias])
    linear_loss(weight, bias, x).backward()
    optimizer.zero_grad(set_to_none=False)
    assert torch.equal(weight.grad, torch.zeros_like(weight)) and torch.equal(bias.grad, torch.zeros_like(bias))
    linear_loss(weight, bias, x).backward()
    optimizer.zero_grad()
    assert weight.grad is None and bias.grad is None
    before = [weight.detach().clone(), bias.detach().clone()]
    optimizer.step()  # no gradients: nothing moves
    assert torch.equal(weight.detach(), before[0]) and torch.equal(bias.detach(), before[1])


@pytest.mark.parametrize("impl", ALL)
def test_closure_is_called_once_and_its_loss_returned(impl):
    weight, bias, x = linear_problem()
    optimizer = impl([weight, bias])
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        optimizer.zero_grad()
        loss = linear_loss(weight, bias, x)
        loss.backward()  # needs grad mode: step() runs under no_grad, the closure must not
        return loss

    before = weight.detach().clone()
    loss = optimizer.step(closure)
    assert calls == [True]
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    assert not torch.equal(weight.detach(), before)
    assert optimizer.step() is None


@pytest.mark.parametrize("impl", ALL)
def test_add_param_group_rejects_a_bad_group_and_keeps_none(impl):
    """A group that fails validation raises ValueError and is not left in ``param_groups`` (a later
    step would otherwise run with it, or fail far from the cause)."""
    weight, bias, x = linear_problem()
    optimizer = impl([weight])
    bad_groups = [
        {"params": [bias], "lr": -1.0},
        {"params": [bias], "betas": (0.9, 1.5)},
        {"params": [bias], "alpha_scaling": "sign"},
        {"params": [bias], "lr": torch.tensor(0.1)},
        {"params": [nn.Parameter(torch.randn(3, dtype=torch.complex64))]},
    ]
    if impl.optimizer_class is RLion8bit:
        bad_groups.append({"params": [bias], "optim_bits": 16})
    for bad in bad_groups:
        with pytest.raises(ValueError):
            optimizer.add_param_group(bad)
        assert len(optimizer.param_groups) == 1, f"a rejected group ({sorted(bad)}) was left in param_groups"
    optimizer.add_param_group({"params": [bias], "lr": 0.01})
    assert len(optimizer.param_groups) == 2
    closure_for(optimizer, weight, bias, x)()
    optimizer.step()
    assert float(optimizer.state[bias]["step"]) == 1


# ---------------------------------------------------------------------------------------------
# state_dict, copies, hooks
# ---------------------------------------------------------------------------------------------


def _primed(impl, kwargs=None, steps=10, params=None):
    weight, bias, x = linear_problem() if params is None else params
    optimizer = impl([weight, bias], **(kwargs or {}))
    closure = closure_for(optimizer, weight, bias, x)
    for _ in range(steps):
        optimizer.step(closure)
    return optimizer, weight, bias, x


@pytest.mark.parametrize("optimizer_input", INPUTS)
@pytest.mark.parametrize("impl", ALL)
def test_state_dict_deterministic(impl, optimizer_input):
    """torch's test: a new optimizer on equal (not identical) parameters, loaded with the state_dict,
    steps bit-identically; the state_dicts are then equal; load_state_dict leaves its input as it was;
    repeated groups are represented identically."""
    optimizer, weight, bias, x = _primed(impl, optimizer_input.kwargs)
    weight_c, bias_c = fresh_copy([weight, bias])
    optimizer_c = impl([weight_c, bias_c], **optimizer_input.kwargs)
    saved = copy.deepcopy(optimizer.state_dict())
    given = copy.deepcopy(saved)
    optimizer_c.load_state_dict(given)
    assert_same_tree(given, saved)
    closure, closure_c = closure_for(optimizer, weight, bias, x), closure_for(optimizer_c, weight_c, bias_c, x)
    for _ in range(10):
        optimizer.step(closure)
        optimizer_c.step(closure_c)
        assert torch.equal(weight, weight_c) and torch.equal(bias, bias_c)
    assert_same_tree(optimizer.state_dict(), optimizer_c.state_dict())
    optimizer_c.param_groups.extend(optimizer_c.param_groups)
    assert_same_tree(optimizer.state_dict()["param_groups"][-1], optimizer_c.state_dict()["param_groups"][-1])


@pytest.mark.parametrize("impl", ALL)
def test_state_dict_survives_torch_save_weights_only(impl):
    """The state round-trips through torch.save / torch.load(weights_only=True) with its dtypes
    (float32 momentum of bf16 parameters, uint8 codes, float32 absmax), and continues bit-identically."""
    weight, bias, x = linear_problem(dtype=torch.bfloat16)
    optimizer, weight, bias, x = _primed(impl, dict(lr=0.01), steps=3, params=(weight, bias, x))
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    weight_c, bias_c = fresh_copy([weight, bias])
    optimizer_c = impl([weight_c, bias_c], lr=0.01)
    optimizer_c.load_state_dict(loaded)
    assert state_dtypes(optimizer_c) == state_dtypes(optimizer)
    optimizer.step(closure_for(optimizer, weight, bias, x))
    optimizer_c.step(closure_for(optimizer_c, weight_c, bias_c, x))
    assert torch.equal(weight, weight_c) and torch.equal(bias, bias_c)


def _newer_keys(impl) -> tuple[str, ...]:
    keys = ("maximize", "foreach", "fused", "alpha_scaling", "bias_correction")
    return keys + (("min_8bit_size", "optim_bits") if impl.optimizer_class is RLion8bit else ())


@pytest.mark.parametrize("impl", ALL)
def test_can_load_older_state_dict(impl):
    """A state_dict saved before a group option existed (the key is missing) loads, the option takes
    its default, and the optimizer steps exactly like one loaded with the full state_dict."""
    optimizer, weight, bias, x = _primed(impl, steps=3)
    full = copy.deepcopy(optimizer.state_dict())
    defaults = class_defaults(impl.optimizer_class)
    older = copy.deepcopy(full)
    removed = set()
    for group in older["param_groups"]:
        for key in _newer_keys(impl):
            if key in group and group[key] == defaults[key]:
                del group[key]
                removed.add(key)
    assert removed
    runs = []
    for state_dict in (full, older):
        params = fresh_copy([weight, bias])
        opt = impl(params)
        opt.load_state_dict(copy.deepcopy(state_dict))
        runs.append((params, opt))
    (params_full, _), (params_older, opt_older) = runs
    for key in removed:
        assert opt_older.param_groups[0][key] == defaults[key]
    for params, opt in runs:
        opt.step(closure_for(opt, params[0], params[1], x))
    for p, q in zip(params_full, params_older):
        assert torch.equal(p, q)


@pytest.mark.parametrize("impl", ALL)
def test_load_nontensor_step(impl):
    """A state_dict whose ``step`` is a plain number (older torch, hand-made checkpoints) loads and the
    optimizer continues exactly as with the tensor step count."""
    optimizer, weight, bias, x = _primed(impl, dict(bias_correction=True, alpha_scaling="fixed"), steps=3)
    with_tensor_step = copy.deepcopy(optimizer.state_dict())
    with_number_step = copy.deepcopy(with_tensor_step)
    for state in with_number_step["state"].values():
        state["step"] = state["step"].item()
    runs = []
    for state_dict in (with_tensor_step, with_number_step):
        params = fresh_copy([weight, bias])
        opt = impl(params, bias_correction=True, alpha_scaling="fixed")
        opt.load_state_dict(state_dict)
        closure = closure_for(opt, params[0], params[1], x)
        for _ in range(2):
            opt.step(closure)
        runs.append((params, opt))
    (p_tensor, opt_tensor), (p_number, opt_number) = runs
    for p, q in zip(p_tensor, p_number):
        assert torch.equal(p, q)
    for p, q in zip(p_tensor, p_number):
        assert float(opt_number.state[q]["step"]) == float(opt_tensor.state[p]["step"]) == 5


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("impl", ALL)
def test_deepcopy_and_pickle_continue_identically(impl, how):
    """torch's deepcopy_copies_all_public_attrs, and the copy (of parameters and state) steps exactly
    like the original."""
    optimizer, weight, bias, x = _primed(impl, dict(weight_decay=0.1), steps=3)
    twin = copy.deepcopy(optimizer) if how == "deepcopy" else pickle.loads(pickle.dumps(optimizer))

    def public(obj):
        return {k for k in obj.__dict__ if not k.startswith("_")}

    assert public(twin) == public(optimizer)

    def hyperparameters(opt):
        return [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]

    assert hyperparameters(twin) == hyperparameters(optimizer)
    twin_params = twin.param_groups[0]["params"]
    assert twin_params[0] is not weight and torch.equal(twin_params[0], weight)
    for _ in range(3):
        grads = [torch.randn_like(weight), torch.randn_like(bias)]
        for p, g in zip([weight, bias], grads):
            p.grad = g.clone()
        for p, g in zip(twin_params, grads):
            p.grad = g.clone()
        optimizer.step()
        twin.step()
    assert torch.equal(twin_params[0], weight) and torch.equal(twin_params[1], bias)


@pytest.mark.parametrize("impl", ALL)
def test_step_hooks(impl):
    """Step pre/post hooks (per optimizer and global) run in order around the update; a pre hook may
    replace the arguments; removed hooks no longer run."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    weight, bias, x = linear_problem()
    optimizer = impl([weight, bias])
    events = []

    def pre(opt, args, kwargs):
        assert opt is optimizer
        events.append(("pre", weight.detach().clone()))

    def post(opt, args, kwargs):
        events.append(("post", weight.detach().clone()))

    handles = [optimizer.register_step_pre_hook(pre), optimizer.register_step_post_hook(post)]
    global_handles = [
        register_optimizer_step_pre_hook(lambda opt, a, k: events.append(("global_pre", None))),
        register_optimizer_step_post_hook(lambda opt, a, k: events.append(("global_post", None))),
    ]
    try:
        closure_for(optimizer, weight, bias, x)()
        optimizer.step()
    finally:
        for handle in global_handles:
            handle.remove()
    assert [name for name, _ in events] == ["global_pre", "pre", "post", "global_post"]
    assert not torch.equal(events[1][1], events[2][1])  # the update happened between pre and post
    assert torch.equal(events[2][1], weight.detach())

    marker = torch.tensor(7.0)
    # torch passes the bound arguments (self first); a pre hook may return replacements
    swap = optimizer.register_step_pre_hook(lambda opt, args, kwargs: ((opt,), {"closure": lambda: marker}))
    assert optimizer.step() is marker
    swap.remove()
    for handle in handles:
        handle.remove()
    events.clear()
    optimizer.step()
    assert events == []


@pytest.mark.parametrize("impl", ALL)
def test_state_dict_hooks(impl):
    """state_dict pre hooks see the optimizer before packing; post hooks may edit or replace the result."""
    optimizer, *_ = _primed(impl, steps=2)
    seen = []
    optimizer.register_state_dict_pre_hook(lambda opt: seen.append(("pre", len(opt.state))))

    def post(opt, state_dict):
        seen.append(("post", sorted(state_dict)))
        state_dict["extra"] = "kept"
        return state_dict

    optimizer.register_state_dict_post_hook(post)
    state_dict = optimizer.state_dict()
    assert seen == [("pre", 2), ("post", ["param_groups", "state"])]
    assert state_dict["extra"] == "kept"


def _primed_mixed_dtypes(impl):
    """An optimizer of a float32 (10, 5) and a bfloat16 (10,) parameter after two steps."""
    weight, bias, x = linear_problem()
    bias = nn.Parameter(bias.detach().to(torch.bfloat16))
    optimizer = impl([weight, bias], lr=0.01)
    for _ in range(2):
        optimizer.zero_grad()
        (weight.mv(x).pow(2).sum() + bias.float().pow(2).sum()).backward()
        optimizer.step()
    return optimizer, weight, bias


@pytest.mark.parametrize("impl", ALL)
def test_load_state_dict_pre_hooks_run_in_order_and_their_result_is_loaded(impl):
    """Pre hooks run in registration order (prepend=True first); what a hook returns is what loads."""
    optimizer, weight, bias = _primed_mixed_dtypes(impl)
    order = []

    def set_lr(opt, state_dict):
        order.append("set_lr")
        state_dict = copy.deepcopy(state_dict)
        state_dict["param_groups"][0]["lr"] = 0.002
        return state_dict

    def check_first(opt, state_dict):
        order.append("first")
        assert state_dict["param_groups"][0]["lr"] == 0.01

    target = impl(fresh_copy([weight, bias]), lr=0.01)
    target.register_load_state_dict_pre_hook(set_lr)
    target.register_load_state_dict_pre_hook(check_first, prepend=True)
    handle = target.register_load_state_dict_post_hook(lambda opt: order.append("post"))
    target.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    assert order == ["first", "set_lr", "post"]
    assert target.param_groups[0]["lr"] == 0.002
    handle.remove()
    order.clear()
    target.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    assert order == ["first", "set_lr"]


@pytest.mark.parametrize("impl", ALL)
def test_load_state_dict_post_hooks_see_the_state_as_loaded(impl):
    """A post hook sees the state the optimizer will step with: saved dtypes kept."""
    optimizer, weight, bias = _primed_mixed_dtypes(impl)
    seen = []
    target = impl(fresh_copy([weight, bias]), lr=0.01)
    target.register_load_state_dict_post_hook(lambda opt: seen.append(state_dtypes(opt)))
    target.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    assert seen == [state_dtypes(target)] == [state_dtypes(optimizer)]


@pytest.mark.parametrize("impl", ALL)
def test_load_state_dict_pre_hook_can_adapt_an_older_layout(impl):
    """torch's documented use of a pre hook: adapt a state dict written by older code. Here the
    older code named the momentum "momentum" and α "scale"; the hook renames them, and the
    optimizer then loads and continues exactly like one given the current layout."""
    optimizer, weight, bias = _primed_mixed_dtypes(impl)
    current = copy.deepcopy(optimizer.state_dict())
    older = copy.deepcopy(current)
    renames = {"exp_avg": "momentum", "state1": "codes"}
    for state in older["state"].values():
        for new, old in renames.items():
            if new in state:
                state[old] = state.pop(new)
    for group in older["param_groups"]:
        group["scale"] = group.pop("alpha")

    def adapt(opt, state_dict):
        state_dict = copy.deepcopy(state_dict)
        for state in state_dict["state"].values():
            for new, old in renames.items():
                if old in state:
                    state[new] = state.pop(old)
        for group in state_dict["param_groups"]:
            group["alpha"] = group.pop("scale")
        return state_dict

    runs = []
    for state_dict, hook in ((current, None), (older, adapt)):
        params = fresh_copy([weight, bias])
        target = impl(params, lr=0.01)
        if hook is not None:
            target.register_load_state_dict_pre_hook(hook)
        target.load_state_dict(state_dict)
        runs.append((params, target))
    (params_current, opt_current), (params_older, opt_older) = runs
    assert state_dtypes(opt_older) == state_dtypes(opt_current)
    for params, opt in runs:
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    for p, q in zip(params_current, params_older):
        assert torch.equal(p, q)


@pytest.mark.parametrize("impl", ALL)
def test_load_state_dict_hooks_stay_registered_after_a_rejected_state_dict(impl):
    """load_state_dict sets torch's hook dicts aside while torch's own loading runs; a state dict
    rejected there must not leave the optimizer without its hooks."""
    optimizer, weight, bias = _primed_mixed_dtypes(impl)
    calls = []
    target = impl(fresh_copy([weight, bias]), lr=0.01)
    target.register_load_state_dict_pre_hook(lambda opt, sd: calls.append("pre"))
    target.register_load_state_dict_post_hook(lambda opt: calls.append("post"))
    bad = copy.deepcopy(optimizer.state_dict())
    bad["state"][0]["step"] = torch.tensor(-1.0)
    with pytest.raises(ValueError, match="'step' must be a finite number >= 0"):
        target.load_state_dict(bad)
    assert calls == ["pre"]
    target.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    assert calls == ["pre", "pre", "post"]


# ---------------------------------------------------------------------------------------------
# RLion8bit against RLion (bitsandbytes' test_optimizer8bit pattern)
# ---------------------------------------------------------------------------------------------

#: (shape, whether RLion8bit's default min_8bit_size=4096 gives it 8-bit state)
SHAPES = [
    ((64, 64), True),  # 4096 elements: exactly min_8bit_size, whole blocks
    ((67, 71), True),  # 4757: last block partial
    ((9001,), True),  # 1-D, last block partial
    ((63, 64), False),  # 4032: just below min_8bit_size
    ((7, 3), False),  # tiny
]
EIGHT_BIT_PATHS = [
    pytest.param(False, id="reference"),
    pytest.param(
        True,
        id="kernel",
        marks=pytest.mark.skipif(not cpu_rlion8bit.kernel_available(), reason="no C compiler: 8-bit kernel absent"),
    ),
]
DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in (torch.float32, torch.bfloat16, torch.float16)]


def ulp(x: torch.Tensor) -> torch.Tensor:
    """One unit in the last place of each element of ``x`` in its own dtype, as float32."""
    _, exponent = torch.frexp(x.float().abs().clamp_min(torch.finfo(x.dtype).tiny))
    return torch.finfo(x.dtype).eps * torch.pow(2.0, (exponent - 1).float())


def _qmap_neighbours(qmap, codes):
    lower = qmap[(codes.long() - 1).clamp_min(0)]
    upper = qmap[(codes.long() + 1).clamp_max(qmap.numel() - 1)]
    return lower, upper


@pytest.mark.parametrize("shape, eight_bit", SHAPES, ids=["x".join(map(str, s)) for s, _ in SHAPES])
@pytest.mark.parametrize("fused", EIGHT_BIT_PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_8bit_state_is_the_nearest_code_of_the_32bit_momentum(dtype, fused, shape, eight_bit):
    """bitsandbytes' pattern: RLion8bit (parameters in ``dtype``) and RLion (float32 copy) take the same
    gradients; after each step RLion's parameter and momentum are reset to RLion8bit's (the states would
    otherwise drift apart), so every step measures one step's error. For 50 steps:

    - each 8-bit code is the map entry nearest to RLion's momentum / block absmax (no entry next to
      it is closer, up to bitsandbytes' 2/65535 lookup grid), and absmax is the block's max |momentum|;
    - tensors below min_8bit_size keep float32 ``exp_avg`` equal to RLion's (float32 rounding);
    - the parameter equals RLion's rounded to ``dtype``: exactly on the reference path (the same
      float32 arithmetic, one rounding); the kernel's may be one ``dtype`` ulp away plus two float32
      ulps of the update lr·u (its arctan is within 2 ulp of torch's).

    Every 10 steps the state round-trips through torch.save/torch.load into a new RLion8bit
    with codes, absmax and qmap unchanged."""
    if fused and dtype == torch.float16:
        pytest.skip("the 8-bit kernel takes float32/bfloat16 parameters; fp16 with fused=True raises (tested above)")
    generator = torch.Generator().manual_seed(0)
    start = (torch.randn(shape, generator=generator) * 0.1).to(dtype)
    p8 = nn.Parameter(start.clone())
    p32 = nn.Parameter(start.float().clone())
    opt8 = RLion8bit([p8], fused=fused)
    opt32 = RLion([p32], foreach=False, fused=False)
    lr = opt8.defaults["lr"]
    for i in range(50):
        g = (torch.randn(shape, generator=generator) * 0.01).to(dtype)
        p8.grad, p32.grad = g.clone(), g.float()
        opt8.step()
        opt32.step()
        state8, m32 = opt8.state[p8], opt32.state[p32]["exp_avg"]
        if eight_bit:
            codes, absmax, qmap = state8["state1"], state8["absmax1"], state8["qmap1"]
            flat = m32.flatten()
            padded = torch.nn.functional.pad(flat, (0, -flat.numel() % 256)).view(-1, 256)
            torch.testing.assert_close(absmax, padded.abs().amax(dim=1), rtol=1e-6, atol=0)
            block_absmax = absmax.repeat_interleave(256)[: flat.numel()]
            normalised = flat / block_absmax
            chosen = qmap[codes.flatten().long()]
            lower, upper = _qmap_neighbours(qmap, codes.flatten())
            error = (normalised - chosen).abs()
            slack = 2.0 / 65535
            assert (error <= (normalised - lower).abs() + slack).all()
            assert (error <= (normalised - upper).abs() + slack).all()
            momentum8 = dequantised(state8)
        else:
            assert "state1" not in state8 and state8["exp_avg"].dtype == torch.float32
            torch.testing.assert_close(state8["exp_avg"], m32, rtol=1e-6, atol=1e-9)
            momentum8 = state8["exp_avg"]
        expected = p32.detach().to(dtype)
        if fused:
            bound = ulp(expected) + 2 * lr * torch.finfo(torch.float32).eps
            assert ((p8.detach().float() - expected.float()).abs() <= bound).all(), i
        else:
            assert torch.equal(p8.detach(), expected), i
        if i % 10 == 0 and i > 0:
            before = {k: v.clone() for k, v in state8.items()}
            buffer = io.BytesIO()
            torch.save(opt8.state_dict(), buffer)
            buffer.seek(0)
            opt8 = RLion8bit([p8], fused=fused)
            opt8.load_state_dict(torch.load(buffer, weights_only=True))
            assert_same_tree(dict(opt8.state[p8]), before)
        # keep the two runs on the same parameters and momentum (bitsandbytes resets them likewise)
        with torch.no_grad():
            p32.copy_(p8.float())
            m32.copy_(momentum8)


@pytest.mark.parametrize("fused", EIGHT_BIT_PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_8bit_tracks_32bit_over_many_steps(dtype, fused):
    """RLion8bit and RLion run freely side by side (no resets) for 100 steps on every shape of
    ``SHAPES`` at once, parameters of the same ``dtype``, the same gradients (a fixed direction plus
    noise, so that the parameters travel as in training). After every step, per tensor:

    - 8-bit state: bitsandbytes' mean absolute error stays below 3 % of the mean distance the
      parameters travelled (measured: 1.7 % at most) and below 2e-3 in absolute terms (lr 1e-3);
    - 32-bit state (below min_8bit_size): RLion's numbers, up to float32 rounding (the kernel's arctan),
      0.1 % of the distance travelled."""
    if fused and dtype == torch.float16:
        pytest.skip("the 8-bit kernel takes float32/bfloat16 parameters; fp16 with fused=True raises (tested above)")
    generator = torch.Generator().manual_seed(1)
    starts = [(torch.randn(shape, generator=generator) * 0.1).to(dtype) for shape, _ in SHAPES]
    p8 = [nn.Parameter(s.clone()) for s in starts]
    p32 = [nn.Parameter(s.clone()) for s in starts]
    opt8 = RLion8bit(p8, fused=fused)
    opt32 = RLion(p32, foreach=False, fused=False)
    drift = [torch.randn(shape, generator=generator) * 0.01 for shape, _ in SHAPES]
    for step in range(1, 101):
        for a, b, d in zip(p8, p32, drift):
            g = (d + torch.randn(d.shape, generator=generator) * 0.01).to(dtype)
            a.grad, b.grad = g.clone(), g.clone()
        opt8.step()
        opt32.step()
        for (shape, eight_bit), a, b, s in zip(SHAPES, p8, p32, starts):
            error = (a.detach().float() - b.detach().float()).abs().mean().item()
            travelled = (b.detach().float() - s.float()).abs().mean().item()
            if eight_bit:
                assert error <= 0.03 * travelled and error <= 2e-3, (shape, step, error, travelled)
            else:
                assert error <= 1e-3 * travelled, (shape, step, error, travelled)


@pytest.mark.parametrize("direction", ["RLion_to_RLion8bit", "RLion8bit_to_RLion"])
def test_loading_the_other_class_state_dict(direction):
    """Switching between RLion and RLion8bit at a checkpoint (``--optim rlion`` ↔ ``rlion_8bit`` on
    resume): load_state_dict either refuses with a ValueError, or the loaded optimizer continues with
    the saved momentum (within 8-bit quantisation) and the right state layout for its class. It never
    loads something that fails or silently mis-steps later."""
    source_class, target_class = (RLion, RLion8bit) if direction == "RLion_to_RLion8bit" else (RLion8bit, RLion)
    generator = torch.Generator().manual_seed(0)
    big, small = torch.randn(64, 80, generator=generator), torch.randn(10, generator=generator)
    source_params = [nn.Parameter(big.clone()), nn.Parameter(small.clone())]
    source = source_class(source_params)
    for _ in range(3):
        for p in source_params:
            p.grad = torch.randn(p.shape, generator=generator)
        source.step()
    momentum = [dequantised(source.state[p]).clone() for p in source_params]
    target_params = fresh_copy(source_params)
    target = target_class(target_params)
    try:
        target.load_state_dict(copy.deepcopy(source.state_dict()))
    except ValueError as err:
        assert "RLion" in str(err)
        return
    for p, m in zip(target_params, momentum):
        state = target.state[p]
        if target_class is RLion:
            assert set(state) == {"step", "exp_avg"}
        elif p.numel() >= 4096:
            assert "state1" in state and "exp_avg" not in state, "an 8-bit optimizer kept 32-bit state"
        step_size = (m.abs().max() * 0.01).item()  # the 8-bit map's worst gap is below 1 % of absmax
        torch.testing.assert_close(dequantised(state), m, rtol=0, atol=step_size)
        assert float(state["step"]) == 3
    grads = [torch.randn(p.shape, generator=generator) for p in source_params]
    for params, opt in ((source_params, source), (target_params, target)):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    for p, q in zip(source_params, target_params):
        torch.testing.assert_close(q, p, rtol=0, atol=2e-3 * 0.1)  # lr 1e-3: the steps agree within 10 %
