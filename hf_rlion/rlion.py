r"""RLion: Lion with the sign replaced by a scaled arctangent.

This module holds the update rule. Everything else in the package (8-bit state,
the transformers registration, the recipes) builds on :class:`RLion`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor

from ._optimizer_base import ALPHA_SCALINGS, RLionBase, as_32bit_state, finite_gradient_mask, low_precision_dtypes

__all__ = ["RLion", "rlion_update_", "ALPHA_SCALINGS"]

# The foreach path works on groups of tensors whose element count is bounded by
# this (or by the largest single tensor), so the temporaries of one step never
# grow with the model size.
_FOREACH_CHUNK_NUMEL = 1 << 22

_TWO_OVER_PI = 2.0 / math.pi

#: F, the largest finite float32: every path caps the multiplier of c_t, α_t / (1 − β1^t), at F.
FLOAT32_MAX = torch.finfo(torch.float32).max
_FLOAT32_TINY = torch.finfo(torch.float32).tiny


def _alpha_cap(bias_divisor: float) -> float:
    """The largest α_t: F · (1 − β1^t), so that α_t · ĉ_t = (α_t / (1 − β1^t)) · c_t multiplies c_t
    by at most F (``bias_divisor`` = 1 − β1^t, or 1 without bias correction)."""
    return FLOAT32_MAX * bias_divisor


def _effective_alpha(c_hat: Tensor, alpha: float, alpha_scaling: str, bias_divisor: float) -> float | Tensor:
    """The α_t that multiplies ĉ_t: α, or α / max(RMS(ĉ_t), tiny) for one tensor, capped by
    :func:`_alpha_cap` (α itself is taken as at most F). Finite, so a zero ĉ_t gives a zero update."""
    alpha = min(alpha, FLOAT32_MAX)
    if alpha_scaling == "fixed":
        return min(alpha, _alpha_cap(bias_divisor))
    norm_dtype = torch.promote_types(c_hat.dtype, torch.float32)
    rms = torch.linalg.vector_norm(c_hat, dtype=norm_dtype) / math.sqrt(max(c_hat.numel(), 1))
    return (alpha / rms.clamp_min(_FLOAT32_TINY)).clamp_max_(_alpha_cap(bias_divisor))


def rlion_update_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    step: int,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    alpha: float,
    alpha_scaling: str,
    bias_correction: bool,
    maximize: bool,
    scale: Optional[float] = None,
) -> None:
    """One RLion step on one tensor, in place: the plain reference every fast path is tested against.

    ``exp_avg`` is float32 (or float64) even when ``param`` is bfloat16/float16; the arithmetic
    runs in the momentum's dtype and the parameter is rounded once at the end.

    ``scale``: the multiplier α_t of ĉ_t when the caller has computed it (a sharded tensor, whose
    RMS is taken over all its shards: :mod:`hf_rlion.sharded8bit`); ``None`` computes it here from
    ``alpha`` and ``alpha_scaling`` (:func:`_effective_alpha`).
    """
    compute_dtype = exp_avg.dtype
    g = grad.to(compute_dtype)
    if maximize:
        g = -g
    # c_t = β1·m_{t-1} + (1-β1)·g_t   (a fresh tensor: m_{t-1} is still needed below)
    c = torch.lerp(exp_avg, g, 1.0 - beta1)
    bias_divisor = 1.0 - beta1**step if bias_correction else 1.0
    if bias_correction:
        c.div_(bias_divisor)
    # u_t = (2/π)·arctan(α_t·ĉ_t)
    alpha_t = _effective_alpha(c, alpha, alpha_scaling, bias_divisor) if scale is None else scale
    c.mul_(alpha_t).atan_().mul_(_TWO_OVER_PI)
    # θ_t = θ_{t-1} − η·(u_t + λ·θ_{t-1})
    if param.dtype == compute_dtype:
        if weight_decay != 0.0:
            param.mul_(1.0 - lr * weight_decay)
        param.add_(c, alpha=-lr)
    else:
        p = param.to(compute_dtype)
        if weight_decay != 0.0:
            p.mul_(1.0 - lr * weight_decay)
        p.add_(c, alpha=-lr)
        param.copy_(p)
    # m_t = β2·m_{t-1} + (1−β2)·g_t
    exp_avg.lerp_(g, 1.0 - beta2)


def _single_tensor_rlion(params, grads, exp_avgs, steps, **hp) -> None:
    for param, grad, exp_avg, step in zip(params, grads, exp_avgs, steps):
        rlion_update_(param, grad, exp_avg, step, **hp)


def _chunks_by_numel(indices: list[int], numels: list[int], limit: int):
    chunk, total = [], 0
    for i in indices:
        if chunk and total + numels[i] > limit:
            yield chunk
            chunk, total = [], 0
        chunk.append(i)
        total += numels[i]
    if chunk:
        yield chunk


def _foreach_rlion(
    params, grads, exp_avgs, steps, *, lr, beta1, beta2, weight_decay, alpha, alpha_scaling, bias_correction, maximize
) -> None:
    """The same rule with torch's ``_foreach_*`` kernels, on bounded chunks of same-dtype tensors."""
    # foreach kernels need every list to share device and dtype; group and chunk.
    groups: dict[tuple, list[int]] = {}
    for i, (p, m) in enumerate(zip(params, exp_avgs)):
        groups.setdefault((p.device, p.dtype, m.dtype, steps[i]), []).append(i)
    numels = [p.numel() for p in params]
    limit = max([_FOREACH_CHUNK_NUMEL] + numels)
    for (_, p_dtype, m_dtype, step), indices in groups.items():
        for chunk in _chunks_by_numel(indices, numels, limit):
            ps = [params[i] for i in chunk]
            ms = [exp_avgs[i] for i in chunk]
            gs = [grads[i] if grads[i].dtype == m_dtype else grads[i].to(m_dtype) for i in chunk]
            if maximize:
                gs = torch._foreach_neg(gs)
            cs = torch._foreach_lerp(ms, gs, 1.0 - beta1)
            bias_divisor = 1.0 - beta1**step if bias_correction else 1.0
            if bias_correction:
                torch._foreach_div_(cs, bias_divisor)
            capped_alpha = min(alpha, FLOAT32_MAX)  # as in _effective_alpha
            if alpha_scaling == "fixed":
                torch._foreach_mul_(cs, min(capped_alpha, _alpha_cap(bias_divisor)))
            else:
                norms = torch._foreach_norm(cs)
                scales = [capped_alpha / (n / math.sqrt(c.numel())).clamp_min(_FLOAT32_TINY) for n, c in zip(norms, cs)]
                torch._foreach_clamp_max_(scales, _alpha_cap(bias_divisor))
                torch._foreach_mul_(cs, scales)
            torch._foreach_atan_(cs)
            work = ps if p_dtype == m_dtype else [p.to(m_dtype) for p in ps]
            if weight_decay != 0.0:
                torch._foreach_mul_(work, 1.0 - lr * weight_decay)
            torch._foreach_add_(work, cs, alpha=-lr * _TWO_OVER_PI)
            if work is not ps:
                torch._foreach_copy_(ps, work)
            torch._foreach_lerp_(ms, gs, 1.0 - beta2)


def _fused_cpu():
    from .kernels import cpu_rlion  # imported on first use

    return cpu_rlion


def _fused_cpu_rlion(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    steps: list[int],
    *,
    check_finite: bool = False,
    **hyperparameters: Any,
) -> list[int]:
    """The fused CPU path: the C kernel (:func:`hf_rlion.kernels.cpu_rlion.fused_rlion`) for
    the tensors it takes, :func:`_single_tensor_rlion` for the others (non-contiguous, another dtype),
    in the same call.

    With ``check_finite=True`` a tensor whose gradient holds NaN/inf is left untouched, on either
    path, and its index is returned (see ``fused_rlion``).
    """
    cpu_rlion = _fused_cpu()
    eligible = [cpu_rlion.kernel_eligible(p, g, m) for p, g, m in zip(params, grads, exp_avgs)]
    if all(eligible):
        return cpu_rlion.fused_rlion(
            params, grads, exp_avgs, steps, check_finite=check_finite, **hyperparameters
        )
    kernel = [i for i, ok in enumerate(eligible) if ok]
    fallback = [i for i, ok in enumerate(eligible) if not ok]
    skipped: list[int] = []
    if check_finite:
        finite = finite_gradient_mask([grads[i] for i in fallback])
        skipped = [i for i, ok in zip(fallback, finite) if not ok]
        fallback = [i for i, ok in zip(fallback, finite) if ok]
    if fallback:
        _single_tensor_rlion(
            [params[i] for i in fallback],
            [grads[i] for i in fallback],
            [exp_avgs[i] for i in fallback],
            [steps[i] for i in fallback],
            **hyperparameters,
        )
    if kernel:
        skipped_in_kernel = cpu_rlion.fused_rlion(
            [params[i] for i in kernel], [grads[i] for i in kernel], [exp_avgs[i] for i in kernel],
            [steps[i] for i in kernel], check_finite=check_finite, **hyperparameters,
        )  # fmt: skip
        skipped += [kernel[i] for i in skipped_in_kernel]
    return sorted(skipped)


def _fused_rlion():
    return _fused_cpu_rlion


_triton_kernel: Optional[Callable] = None  # set by _triton_rlion, on first use of the device path


def _triton_rlion() -> Callable:
    global _triton_kernel
    if _triton_kernel is None:
        from .kernels import triton_rlion  # imports triton

        _triton_kernel = triton_rlion.fused_rlion
    return _triton_kernel


class RLion(RLionBase):
    r"""RLion (Rong et al., *A refined lion optimizer for deep learning*, Sci. Rep. 15, 2025).

    Lion with the discrete ``sign`` replaced by a bounded, continuous arctangent. For every
    parameter tensor, element-wise:

    .. math::
        \begin{aligned}
        c_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t \\
        \hat c_t &= c_t / (1-\beta_1^t) \ \text{if bias\_correction else}\ c_t \\
        u_t &= \tfrac{2}{\pi}\arctan(\alpha_t \hat c_t),\qquad
            \alpha_t = \begin{cases} \alpha & \text{alpha\_scaling="fixed" (the paper)}\\
                                      \alpha / \mathrm{RMS}(\hat c_t) & \text{alpha\_scaling="rms"}\end{cases} \\
        \theta_t &= \theta_{t-1} - \eta\,(u_t + \lambda\,\theta_{t-1}) \\
        m_t &= \beta_2 m_{t-1} + (1-\beta_2) g_t
        \end{aligned}

    Every implementation caps the multiplier of ``c_t``, ``α_t / (1 − β1^t)`` (``α_t`` without bias
    correction), at the largest finite float32 ``F ≈ 3.4e38`` (``α`` itself counts as at most ``F``).
    Uncapped, ``α / RMS`` overflows to ∞ when ``ĉ_t`` is zero (RMS clamped to the smallest normal
    float32, ``tiny``) and ``∞ · 0`` is NaN; capped, a tensor whose ``ĉ_t`` is zero (LoRA's A while B
    is zero, zero-initialised branches) gets ``u_t = 0`` and changes only by weight decay. Where
    the cap binds, ``u_t`` is ``sign(c_t)`` to float32 precision unless ``|c_t| < 1e-31``.

    ``|u_t| < 1``, so no step moves a weight by more than ``lr * (1 + weight_decay * |θ|)``.
    As ``alpha → ∞`` RLion is Lion; as ``alpha → 0`` (with ``lr * alpha`` fixed, fixed
    scaling) it is SGD with Lion-style momentum. ``RMS`` is taken over the whole tensor, so
    with ``alpha_scaling="rms"`` the step is invariant to the scale of the gradient, like
    Lion's, while staying continuous; ``bias_correction`` then has no effect (it rescales
    ``ĉ_t`` uniformly).

    Args:
        params: parameters or param groups (dicts), as for any ``torch.optim`` optimizer.
        lr (float): learning rate η. Default ``1e-3``, AdamW's usual rate: in the study
            (``docs/results.md``) RLion with the default α learned on every task there without
            warm-up, within −1 to +7 points of AdamW at that rate on the paper's architectures
            (not consistently better, and below AdamW on a held-out task). Its step is about 0.6× Lion's, and Lion's
            advice for large pretrained models (3–10× below AdamW's rate) applies to fine-tuning.
        betas (tuple[float, float]): (β1, β2) = interpolation and momentum decay. Default
            ``(0.9, 0.99)``, Lion's (Chen et al. 2023), which the paper keeps.
        weight_decay (float): decoupled decay λ, applied as ``θ ← θ − η λ θ``. Default ``0``.
        alpha (float): the scaling factor α (``> 0``, finite). Default ``3.0``; with
            ``alpha_scaling="rms"`` that puts a one-RMS momentum entry at
            ``(2/π)·arctan(3) ≈ 0.80`` of Lion's step.
        alpha_scaling (str): ``"rms"`` (default) divides α by each tensor's RMS(ĉ_t);
            ``"fixed"`` is the paper's rule, exactly, with α a constant.
        bias_correction (bool): divide ``c_t`` by ``1 − β1^t``. Default ``False``.
        maximize (bool): ascend instead of descend. Default ``False``.
        foreach (bool, optional): use torch's ``_foreach`` kernels (the default on GPUs where
            the Triton kernel cannot run).
        fused (bool, optional): use this device's fused kernel: the C kernel on CPU
            (:mod:`hf_rlion.kernels.cpu_rlion`), the Triton kernel on GPUs
            (:mod:`hf_rlion.kernels.triton_rlion`; CUDA/ROCm, XPU). ``None`` (default) picks it
            where it can run; ``True`` raises ``RuntimeError`` where it cannot. The Triton path
            never waits for the GPU in ``step()`` (see ``docs/kernels.md``).

    Where the defaults come from: ``docs/results.md`` (RLion vs AdamW vs Lion on four offline
    tasks, lr × α grid, several seeds; ``benchmarks/compare_optimizers.py``). With the paper's
    fixed α at 1 or 10 (the values public copies use) RLion learned nothing at lr ≤ 1e-3 on any
    task: ``arctan(α·c) ≈ α·c`` for gradients of size 1e-3. The scale-free ``"rms"`` rule
    learned at every lr from 1e-4 to 1e-2; α = 3 (mean |u| ≈ 0.63 for Gaussian-like ĉ) was
    within noise of the best at lr 1e-3 everywhere, where α ≥ 10 inherits Lion's failures at
    high lr and α = 1 steps too little. ``bias_correction`` is an exact no-op under ``"rms"``
    and was mixed (±0.03) under ``"fixed"``, so it stays off. β's were not varied: Lion's.

    State (per parameter): ``step`` (float32 scalar tensor; on the parameter's device on the
    Triton path, on the CPU otherwise) and ``exp_avg`` (m_t). ``exp_avg``
    is float32 for bfloat16/float16 parameters (the arithmetic runs in float32 and the
    parameter is rounded once per step) and the parameter's dtype otherwise.
    ``load_state_dict`` keeps that dtype (plain ``torch.optim.Optimizer`` would cast it to
    the parameter's), checks every state tensor against its parameter first (``ValueError``
    naming the parameter) and takes an :class:`~hf_rlion.RLion8bit` state too (its 8-bit
    momentum dequantised into ``exp_avg``).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        alpha: float = 3.0,
        alpha_scaling: str = "rms",
        bias_correction: bool = False,
        maximize: bool = False,
        *,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
    ):
        defaults = dict(
            lr=lr,
            betas=betas,
            weight_decay=weight_decay,
            alpha=alpha,
            alpha_scaling=alpha_scaling,
            bias_correction=bias_correction,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
        )
        super().__init__(params, defaults)

    def _init_state(self, param: Tensor, state: dict, on_device: bool = False) -> None:
        """Zero momentum; ``step`` a float32 scalar, on the CPU or (device path) on the parameter's device."""
        state["step"] = torch.zeros((), dtype=torch.float32, device=param.device if on_device else None)
        state_dtype = torch.float32 if param.dtype in low_precision_dtypes else param.dtype
        state["exp_avg"] = torch.zeros_like(param, dtype=state_dtype, memory_format=torch.preserve_format)

    def _convert_state(self, param: Tensor, state: dict, group: dict, group_index: int, param_index: int) -> dict:
        """RLion8bit's 8-bit state becomes ``exp_avg``: the dequantised momentum
        ``qmap1[state1] * absmax1[block]`` (:func:`~hf_rlion._optimizer_base.as_32bit_state`)."""
        return as_32bit_state(param, state)

    def _implementation(self, group: dict, params: list[Tensor]) -> Callable:
        """The one place that picks how a group steps (see ``fused``/``foreach`` in the class docstring):

        - ``fused=True``: the C kernel on CPU (or, where it is unavailable and Triton's interpreter is on,
          the Triton kernel), the Triton kernel on GPUs; ``RuntimeError`` if neither can run;
        - ``fused=None`` and ``foreach=None``: the Triton kernel for GPU tensors it takes, the C kernel for
          CPU tensors it takes, else torch's foreach kernels (GPU) or the per-tensor reference (CPU);
        - ``fused=False`` or an explicit ``foreach``: foreach (``foreach=True``, or the default on GPUs)
          or the per-tensor reference.
        """
        from .kernels import dispatch

        fused, foreach = group["fused"], group["foreach"]
        on_cpu = all(p.device.type == "cpu" for p in params)
        states = lambda: [self.state.get(p, {}) for p in params]  # noqa: E731  (only off the CPU path)
        if fused:
            if not on_cpu:
                reason = dispatch.triton_unsupported_reason(params, states())
                if reason:
                    raise RuntimeError(f"{type(self).__name__}(fused=True): the Triton kernel cannot run: {reason}")
                return _triton_rlion()
            if (
                dispatch.interpreter_on()
                and not _fused_cpu().kernel_available()
                and not dispatch.triton_unsupported_reason(params, states())
            ):
                return _triton_rlion()  # Triton's interpreter: the GPU path, tested without a GPU
            _fused_cpu().check_supported(params)
            return _fused_rlion()
        if fused is None and foreach is None:
            if on_cpu:
                if _fused_cpu().is_supported(params):
                    return _fused_rlion()
            elif not dispatch.triton_unsupported_reason(params, states()):
                return _triton_rlion()
            foreach = not on_cpu
        return _foreach_rlion if foreach else _single_tensor_rlion

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None):
        """Performs a single optimization step.

        Args:
            closure (Callable, optional): re-evaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        device_path = False
        for group in self.param_groups:
            candidates = list(self._params_with_grad(group["params"]))
            if not candidates:
                continue
            implementation = self._implementation(group, candidates)
            beta1, beta2 = group["betas"]
            hyperparameters = dict(
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                weight_decay=group["weight_decay"],
                alpha=group["alpha"],
                alpha_scaling=group["alpha_scaling"],
                bias_correction=group["bias_correction"],
                maximize=group["maximize"],
            )
            if implementation is _triton_kernel:
                device_path = True
                self._triton_step(implementation, candidates, hyperparameters)
                continue
            # The fused CPU kernel applies the non-finite policy itself, tensor by tensor, on the
            # read pass right before each update (its gradient is then in cache); the other paths
            # drop tensors with NaN/inf gradients first.
            checks_itself = implementation is _fused_rlion()
            params = candidates if checks_itself else self._skip_nonfinite(candidates)
            if not params:
                continue
            grads, exp_avgs, step_tensors = [], [], []
            for p in params:
                state = self.state[p]
                if len(state) == 0:
                    self._init_state(p, state)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                step_tensors.append(state["step"])
            steps = self._count_steps(step_tensors, by_kernel=checks_itself)
            if checks_itself:
                skipped = implementation(params, grads, exp_avgs, steps, check_finite=True, **hyperparameters)
                self._undo_kernel_skips([params[i] for i in skipped])
            else:
                implementation(params, grads, exp_avgs, steps, **hyperparameters)
        if device_path:
            self._poll_device_skips()
        return loss

    def _triton_step(self, kernel: Callable, params: list[Tensor], hyperparameters: dict) -> None:
        """The device path: one Triton call for the group, no host synchronisation. Step counts are
        device scalars; the kernel decides the NaN/inf policy per tensor and returns device flags, which
        undo the flagged tensors' step counts and add to the skip counter on the device."""
        states = []
        for p in params:
            state = self.state[p]
            if len(state) == 0:
                self._init_state(p, state, on_device=True)
            states.append(state)
        step_tensors = self._device_step_counts(params, states)
        flags = kernel(
            params, [p.grad for p in params], [state["exp_avg"] for state in states], torch.stack(step_tensors),
            check_finite=True, **hyperparameters,
        )  # fmt: skip
        self._count_device_skips(step_tensors, flags)
