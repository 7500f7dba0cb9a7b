r"""RLion with 8-bit blockwise-quantised momentum: :class:`RLion8bit`, :class:`PagedRLion8bit`.

The update rule is :class:`hf_rlion.RLion`'s, unchanged; only the storage of the momentum
``m_t`` differs. It is kept as bitsandbytes keeps the state of its own 8-bit optimizers
(``Lion8bit``, ``Adam8bit``):

- ``state1``: uint8 codes, one per element, indices into ``qmap1``;
- ``absmax1``: float32, ``max |m|`` of each block of 256 consecutive elements;
- ``qmap1``: the 256-entry signed dynamic map, ``bitsandbytes.functional.create_dynamic_map(signed=True)``;
- ``step``: float32 scalar tensor, as in :class:`RLion`.

``m = qmap1[state1] * absmax1[block]``. One step: dequantise ``m`` to float32, one RLion step
(:func:`hf_rlion.rlion.rlion_update_`), requantise. State memory is
``1 + 4/256 ≈ 1.016`` bytes per parameter instead of 4.

Three implementations, chosen automatically (``fused=`` forces one):

- the reference (:mod:`hf_rlion.reference8bit`): bitsandbytes' public ``dequantize_blockwise`` →
  ``rlion_update_`` → ``quantize_blockwise`` (any device; temporaries the size of one tensor);
- on CPU, for float32 and bfloat16 parameters, a fused C kernel (``hf_rlion/kernels/rlion8bit_cpu.c``,
  :mod:`hf_rlion.kernels.cpu_rlion8bit`, built by :func:`hf_rlion.kernels.native.load`) that
  streams each tensor once per pass with no temporaries beyond one 256-element block per thread. Its codes and ``absmax`` equal the reference's
  exactly (tested); the parameter differs from the reference only through the arctangent
  (the fp32 RLion kernel's, within 1 ulp of the correctly rounded value, so within 2 ulp of
  ``torch.atan``) and the summation order of the ``"rms"`` norm: about one float32 ulp of the
  parameter per step (tested);
- on GPUs, the Triton kernels (:mod:`hf_rlion.kernels.triton_rlion8bit`): same layout, codes the
  nearest map entry (bitsandbytes' CUDA rule), no host synchronisation (``docs/kernels.md``).

Tensors with fewer than ``min_8bit_size`` elements, and parameters that bitsandbytes'
``GlobalOptimManager`` marks ``optim_bits=32`` (:func:`keep_embeddings_in_32bit` does that for
``nn.Embedding`` weights), keep RLion's ``exp_avg`` state and RLion's implementations.

Distributed (``docs/8bit.md``): DDP works, every rank holds the same full state. FSDP2
(``fully_shard``: ``DTensor`` parameters, ``Shard(0)``) works, each rank holding the 8-bit state of
its shard quantised on one process's 256-element blocks, with the per-tensor RMS and NaN/inf
decision taken over the whole tensor (:mod:`hf_rlion.sharded8bit`); its checkpoints load bit for
bit on any number of ranks. FSDP1's flattened ``FlatParameter`` is refused with a ``ValueError``.
"""

from __future__ import annotations

import ctypes
import inspect
import warnings
from collections import defaultdict
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor, nn

from . import sharded8bit
from ._bitsandbytes import GlobalOptimManager, bnb_functional
from ._optimizer_base import BLOCKSIZE, RLionBase, as_32bit_state, low_precision_dtypes, validate_hyperparameters
from .kernels import cpu_rlion
from .kernels.cpu_rlion8bit import (
    check_8bit_state,
    _KernelTensors,
    _load_kernel,
    _run_kernel,
    fused_update_many_,
    kernel_available,
    unsupported_reason,
)
from .kernels.native import pointer_array
from .reference8bit import quantize_blockwise, rlion8bit_reference_update_
from .rlion import RLion

__all__ = ["RLion8bit", "PagedRLion8bit", "keep_embeddings_in_32bit", "rlion8bit_reference_update_", "BLOCKSIZE"]

#: bitsandbytes allocates paged state only for tensors at least this large (its ``get_state_buffer``).
_PAGED_MIN_NUMEL = 100_000
_OPTIM_BITS = (8, 32)
# Per-parameter overrides from GlobalOptimManager that we apply; bitsandbytes keys with no
# meaning for RLion (eps, max_unorm, skip_zeros, ...) are ignored with one warning.
_STATE_OVERRIDE_KEYS = ("optim_bits", "min_8bit_size")
_HYPERPARAMETER_KEYS = ("lr", "betas", "weight_decay", "alpha", "alpha_scaling", "bias_correction", "maximize")

# RLion's defaults, read from its signature so they are defined in one place only.
_RLION_DEFAULTS = {
    name: parameter.default
    for name, parameter in inspect.signature(RLion.__init__).parameters.items()
    if parameter.default is not inspect.Parameter.empty
}


# --------------------------------------------------------------------------------------------
# The fused CPU kernel's call, kept from step to step
# --------------------------------------------------------------------------------------------


#: The state tensors a :class:`_KernelPlan` holds pointers to: replacing one in place of another in
#: the state dict invalidates the plan.
_PLANNED_STATE_KEYS = ("step", "state1", "absmax1", "qmap1")


class _KernelPlan:
    """One parameter group's 8-bit kernel call, kept from one step to the next.

    :meth:`RLion8bit.step`'s full path creates state, applies per-parameter overrides and chooses
    the kernel or the reference for each tensor. Most groups then send all their 8-bit tensors
    to the kernel in one call, with the same state, step after step. After such a step this
    keeps that call's fixed part: the kernel's per-tensor arguments (:class:`_KernelTensors`),
    the parameters' data pointers and the step-count tensors' pointers.

    The next steps use it after :meth:`gradients` has checked that it still holds: the group
    and the optimizer's state mapping are the same objects; each kernel tensor is the same
    parameter at the same position of ``group["params"]``, with the same data pointer, the
    same state dict and in it the same state tensors (``step``, ``state1``, ``absmax1``,
    ``qmap1``); its gradient is a dense, contiguous tensor of the parameter's dtype. Any other
    change sends the step down the full path, which builds the plan again.

    What it saves is Python work per tensor: for 50 tensors right after a 25M-parameter step,
    when Python's objects are out of cache, 0.86 -> 0.46 ms around the kernel (``docs/8bit.md``).
    """

    __slots__ = ("group", "state_map", "length", "positions", "params", "states", "state_tensors", "dtype",
                 "param_pointers", "step_pointers", "tensors", "others")  # fmt: skip

    def __init__(self, group: dict, state_map: dict, params: list[Tensor], states: list[dict]):
        position = {id(p): i for i, p in enumerate(group["params"])}
        self.group, self.state_map, self.length = group, state_map, len(group["params"])
        self.positions = tuple(position[id(p)] for p in params)
        self.params, self.states, self.dtype = tuple(params), tuple(states), params[0].dtype
        self.state_tensors = tuple(tuple(state[key] for key in _PLANNED_STATE_KEYS) for state in states)
        self.param_pointers = pointer_array(params)
        self.step_pointers = pointer_array([state["step"] for state in states])
        self.tensors = _KernelTensors(
            params, [state["state1"] for state in states], [state["absmax1"] for state in states],
            [state["qmap1"] for state in states],
        )  # fmt: skip
        kernel = set(self.positions)
        # the group's other parameters, left to the full path's per-tensor handling every step
        self.others = tuple(i for i in range(self.length) if i not in kernel)

    def gradients(self, group: dict, state_map: dict) -> Optional[tuple[ctypes.Array, tuple[int, ...]]]:
        """The kernel tensors' gradients (their data pointers, as a C array) and the positions of the
        group's other parameters, or ``None`` if the plan no longer holds."""
        if group is not self.group or state_map is not self.state_map or group["fused"] is False:
            return None
        params = group["params"]
        if len(params) != self.length:
            return None
        grad_pointers = []
        dtype, strided = self.dtype, torch.strided
        for position, param, state, tensors, pointer in zip(
            self.positions, self.params, self.states, self.state_tensors, self.param_pointers
        ):
            grad = param.grad
            if (
                params[position] is not param
                or type(grad) is not Tensor
                or grad.layout is not strided
                or grad.dtype is not dtype
                or not grad.is_contiguous()
                or param.data_ptr() != pointer
                or state_map.get(param) is not state
                or any(state.get(key) is not tensor for key, tensor in zip(_PLANNED_STATE_KEYS, tensors))
            ):
                return None
            grad_pointers.append(grad.data_ptr())
        return (ctypes.c_void_p * len(grad_pointers))(*grad_pointers), self.others


def _plannable(kernel_batches: dict, group_key: tuple, checked_here: list, any_skipped: bool) -> bool:
    """Whether a full-path step of a group can leave a :class:`_KernelPlan` for the next: its 8-bit
    tensors all went to the kernel in one call with the group's own hyperparameters, none was skipped,
    every other tensor has RLion's 32-bit state, and the C step counter takes the step counts
    (:func:`hf_rlion.kernels.cpu_rlion.steps_countable`)."""
    if any_skipped or len(kernel_batches) != 1:
        return False
    ((_, key), items), = kernel_batches.items()
    return (
        key == group_key
        and all("exp_avg" in state for _, state, _, _ in checked_here)
        and cpu_rlion.steps_countable(state["step"] for _, state, _ in items)
    )


# --------------------------------------------------------------------------------------------
# GlobalOptimManager (bitsandbytes' per-parameter overrides)
# --------------------------------------------------------------------------------------------


def keep_embeddings_in_32bit(model: nn.Module) -> int:
    """Ask for 32-bit state on every ``nn.Embedding`` weight of ``model``; returns how many.

    Does what transformers' Trainer does before building a bitsandbytes 8-bit optimizer:
    ``GlobalOptimManager.get_instance().register_module_override(module, "weight", {"optim_bits": 32})``
    (embedding rows are updated sparsely and suffer most from 8-bit state; bitsandbytes'
    ``StableEmbedding`` advice). Idempotent: a module already registered is not added again.
    """
    manager = GlobalOptimManager.get_instance()
    registered = {id(module) for module, attr, _ in manager.module_weight_config_triple if attr == "weight"}
    count = 0
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            if id(module) not in registered:
                manager.register_module_override(module, "weight", {"optim_bits": 32})
                registered.add(id(module))
            count += 1
    return count


def _manager_overrides(param: Tensor, group_index: int, param_index: int) -> dict[str, Any]:
    """bitsandbytes' override config for one parameter (same sources, same precedence as its ``get_config``)."""
    manager = GlobalOptimManager.get_instance()
    config: dict[str, Any] = {}
    for module, attr, module_config in manager.module_weight_config_triple:
        if getattr(module, attr, None) is param:
            config.update(module_config)
    config.update(manager.index2config.get((group_index, param_index), {}))
    config.update(manager.pid2config.get(id(param), {}))
    return config


# --------------------------------------------------------------------------------------------
# The optimizers
# --------------------------------------------------------------------------------------------


def _check_not_fsdp1(param: Tensor) -> None:
    if not torch.distributed.is_available():
        return
    try:
        from torch.distributed.fsdp._flat_param import FlatParameter
    except ImportError:  # pragma: no cover - older/newer torch layouts
        return
    if isinstance(param, FlatParameter):
        raise ValueError(
            "RLion8bit got an FSDP-sharded parameter (FSDP1's FlatParameter); 8-bit RLion state is per whole "
            "tensor (blockwise codes and the per-tensor RMS of alpha_scaling='rms') and does not support FSDP1's "
            "flattened parameters. Use FSDP2 (fully_shard), DDP (every rank holds the full state), or optim='rlion' "
            "with FSDP. See docs/8bit.md."
        )


class RLion8bit(RLionBase):
    r"""RLion with its momentum stored in 8 bits (bitsandbytes' blockwise dynamic quantisation).

    Same update as :class:`hf_rlion.RLion` (see its docstring for the formulas); the momentum
    ``m_t`` is dequantised to float32 for the step and requantised after it, per block of 256
    elements with a float32 ``absmax`` per block.

    Args:
        params, lr, betas, weight_decay, alpha, alpha_scaling, bias_correction, maximize: as
            :class:`hf_rlion.RLion`, with its defaults (read from its signature).
        min_8bit_size (int): tensors with fewer elements keep float32 ``exp_avg`` state (as
            :class:`RLion`). Default ``4096``, bitsandbytes'. The state of such small tensors
            is a negligible part of a model, and the per-block ``absmax`` would cost more
            there.
        optim_bits (int): ``8`` (default) or ``32``; ``32`` gives every tensor RLion's 32-bit
            state (as bitsandbytes' ``optim_bits``). Per-parameter overrides of ``optim_bits``,
            ``min_8bit_size`` and the hyperparameters set through bitsandbytes'
            ``GlobalOptimManager`` are applied, read when a parameter first gets state.
        foreach (bool, optional): implementation switch for the 32-bit-state tensors, as in
            :class:`RLion`.
        fused (bool, optional): ``None`` (default) uses this device's fused kernel where it can
            run: the C kernel for float32/bfloat16 CPU tensors, the Triton kernels
            (:mod:`hf_rlion.kernels.triton_rlion8bit`, nearest-code requantisation, the same state
            layout) for groups of float32/bfloat16/float16 GPU tensors; the bitsandbytes reference
            otherwise. ``True`` requires the kernel (``RuntimeError`` where it cannot run);
            ``False`` always uses the reference. The Triton path never waits for the GPU in
            ``step()``, except :class:`PagedRLion8bit`'s one synchronisation after its prefetches.

    Not taken from bitsandbytes' 8-bit optimizers: ``percentile_clipping`` (clip gradients
    before the optimizer instead), ``block_wise=False`` (bitsandbytes itself only uses the
    blockwise layout on current devices), ``max_unorm``, ``skip_zeros``.

    The state round-trips through ``state_dict`` / ``torch.save`` /
    ``torch.load(weights_only=True)`` / ``load_state_dict`` with its dtypes kept (uint8 codes,
    float32 absmax, also for bfloat16 parameters). ``load_state_dict`` checks every state tensor
    against its parameter first (``ValueError`` naming the parameter: sizes, dtypes, NaN/inf) and
    takes an :class:`~hf_rlion.RLion` state too (its ``exp_avg`` quantised where the tensor gets
    8-bit state); param groups saved without ``optim_bits``/``min_8bit_size`` get the constructor's.
    """

    _paged = False

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = _RLION_DEFAULTS["lr"],
        betas: tuple[float, float] = _RLION_DEFAULTS["betas"],
        weight_decay: float = _RLION_DEFAULTS["weight_decay"],
        alpha: float = _RLION_DEFAULTS["alpha"],
        alpha_scaling: str = _RLION_DEFAULTS["alpha_scaling"],
        bias_correction: bool = _RLION_DEFAULTS["bias_correction"],
        maximize: bool = _RLION_DEFAULTS["maximize"],
        *,
        min_8bit_size: int = 4096,
        optim_bits: int = 8,
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
            min_8bit_size=min_8bit_size,
            optim_bits=optim_bits,
            foreach=foreach,
            fused=fused,
        )
        _validate_8bit_options(defaults)
        self._overrides: dict[int, dict[str, Any]] = {}
        self._kernel_plans: dict[int, _KernelPlan] = {}  # by group index; see _KernelPlan
        self._warned_paging = False
        self._warned_ignored_overrides = False
        self._foreign_qmaps: dict[int, Tensor] = {}  # qmap1 tensors that are not the shared map (by id)
        self._sharded = False  # any DTensor parameter: those are stepped by hf_rlion.sharded8bit
        super().__init__(params, defaults)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # Overrides are remembered by id(param): a copy has new parameters, so they are read again.
        self.__dict__.setdefault("_overrides", {})
        self.__dict__.setdefault("_warned_paging", False)
        self.__dict__.setdefault("_warned_ignored_overrides", False)
        self.__dict__.setdefault("_foreign_qmaps", {})
        self.__dict__.setdefault(
            "_sharded", any(sharded8bit.is_sharded(p) for group in self.param_groups for p in group["params"])
        )
        self._kernel_plans = {}  # they hold the state before (load_state_dict) or the original's tensors (a copy)

    # -- construction -------------------------------------------------------------------------

    def _check_options(self, group: dict) -> None:
        super()._check_options(group)
        _validate_8bit_options(group)

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        for p in group["params"]:
            _check_not_fsdp1(p)
            if sharded8bit.is_sharded(p):
                sharded8bit.check_supported(p, type(self).__name__, self._paged)
                self._sharded = True

    # -- state_dict: sharded parameters' state in a layout that reshards (hf_rlion.sharded8bit) ---

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Optimizer.state_dict``; for DTensor (FSDP2) parameters the 8-bit state is given
        quantised on the tensor's global 256-element grid, as ``DTensor`` s (collective then, see
        :mod:`hf_rlion.sharded8bit`)."""
        state_dict = super().state_dict()
        return sharded8bit.portable_state_dict(self, state_dict) if self._sharded else state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """:meth:`RLionBase.load_state_dict`, then DTensor parameters' state back to the per-shard layout."""
        super().load_state_dict(state_dict)
        if self._sharded:
            sharded8bit.restore_local_layout(self)

    # -- state ----------------------------------------------------------------------------------

    def _resolve_overrides(self, param: Tensor, group_index: int, param_index: int) -> dict[str, Any]:
        config = _manager_overrides(param, group_index, param_index)
        ignored = sorted(set(config) - set(_STATE_OVERRIDE_KEYS) - set(_HYPERPARAMETER_KEYS))
        if ignored and not self._warned_ignored_overrides:
            self._warned_ignored_overrides = True
            warnings.warn(
                f"{type(self).__name__}: GlobalOptimManager override keys {ignored} have no meaning for RLion and "
                f"are ignored (applied: {', '.join(_STATE_OVERRIDE_KEYS + _HYPERPARAMETER_KEYS)})",
                stacklevel=3,
            )
        applied = {k: v for k, v in config.items() if k not in ignored}
        group = self.param_groups[group_index]
        try:
            validate_hyperparameters(dict(group, **{k: v for k, v in applied.items() if k in _HYPERPARAMETER_KEYS}))
        except ValueError as err:
            raise ValueError(f"GlobalOptimManager override for a parameter of shape {tuple(param.shape)}: {err}") from None
        return applied

    def _convert_state(self, param: Tensor, state: dict, group: dict, group_index: int, param_index: int) -> dict:
        """A loaded state in the layout :meth:`_init_state` would give ``param`` now (8-bit when
        ``optim_bits`` is 8 and the tensor has at least ``min_8bit_size`` elements, after the
        ``GlobalOptimManager`` overrides): RLion's ``exp_avg`` is quantised with
        :func:`quantize_blockwise` (bitsandbytes' codes), 8-bit state of a tensor that now keeps
        32-bit state is dequantised (as :class:`RLion` loads it)."""
        overrides = _manager_overrides(param, group_index, param_index)
        config = {k: v for k, v in overrides.items() if k in _STATE_OVERRIDE_KEYS}
        optim_bits = config.get("optim_bits", group["optim_bits"])
        min_8bit_size = config.get("min_8bit_size", group["min_8bit_size"])
        _validate_8bit_options({"optim_bits": optim_bits, "min_8bit_size": min_8bit_size}, source="override")
        wants_8bit = optim_bits == 8 and param.numel() >= min_8bit_size
        if wants_8bit and "exp_avg" in state:
            _check_materialised(param)
            qmap = _signed_dynamic_map(param.device)
            codes, absmax = quantize_blockwise(state["exp_avg"].to(device=param.device, dtype=torch.float32), qmap)
            return {"step": state["step"], "state1": codes, "absmax1": absmax, "qmap1": qmap}
        if not wants_8bit and "state1" in state:
            return as_32bit_state(param, state)
        return state

    def _state_buffer(self, param: Tensor) -> Tensor:
        """uint8 codes shaped like ``param``; bitsandbytes paged memory for large CUDA tensors when paged."""
        if self._paged:
            if param.device.type == "cuda" and param.numel() >= _PAGED_MIN_NUMEL:
                buffer = bnb_functional.get_paged(*param.shape, dtype=torch.uint8, device=param.device)
                bnb_functional.fill(buffer, 0)
                bnb_functional.GlobalPageManager.get_instance().paged_tensors.append(buffer)
                return buffer
            if param.device.type != "cuda" and not self._warned_paging:
                self._warned_paging = True
                warnings.warn(
                    f"{type(self).__name__}: paged state needs CUDA unified memory; on {param.device.type} the "
                    "state is ordinary memory (the optimizer behaves exactly like RLion8bit)",
                    stacklevel=4,
                )
        return torch.zeros_like(param, dtype=torch.uint8, memory_format=torch.contiguous_format)

    def _init_state(self, param: Tensor, state: dict, group: dict, overrides: dict, on_device: bool = False) -> None:
        optim_bits = overrides.get("optim_bits", group["optim_bits"])
        min_8bit_size = overrides.get("min_8bit_size", group["min_8bit_size"])
        _validate_8bit_options({"optim_bits": optim_bits, "min_8bit_size": min_8bit_size}, source="override")
        state["step"] = torch.zeros((), dtype=torch.float32, device=param.device if on_device else None)
        if optim_bits == 8 and param.numel() >= min_8bit_size:
            _check_materialised(param)
            blocks = -(-param.numel() // BLOCKSIZE)
            state["state1"] = self._state_buffer(param)
            state["absmax1"] = torch.zeros(blocks, dtype=torch.float32, device=param.device)
            state["qmap1"] = _signed_dynamic_map(param.device)
        else:
            state_dtype = torch.float32 if param.dtype in low_precision_dtypes else param.dtype
            state["exp_avg"] = torch.zeros_like(param, dtype=state_dtype, memory_format=torch.preserve_format)

    # -- step -----------------------------------------------------------------------------------

    def _overrides_and_state(
        self, param: Tensor, group: dict, group_index: int, positions: dict[int, int], on_device: bool = False
    ) -> tuple[dict, dict]:
        """``param``'s ``GlobalOptimManager`` overrides (resolved once, then cached) and its state
        (created if new). ``positions``: the group's ``{id(param): position}``, filled the first time
        a tensor needs resolving."""
        overrides = self._overrides.get(id(param))
        if overrides is None:
            if not positions:
                positions.update((id(q), i) for i, q in enumerate(group["params"]))
            overrides = self._overrides[id(param)] = self._resolve_overrides(param, group_index, positions[id(param)])
        state = self.state[param]
        if len(state) == 0:
            self._init_state(param, state, group, overrides, on_device=on_device)
        return overrides, state

    def _hyperparameters(self, group: dict, overrides: dict) -> dict[str, Any]:
        merged = {k: overrides.get(k, group[k]) for k in _HYPERPARAMETER_KEYS}
        beta1, beta2 = merged.pop("betas")
        return dict(merged, beta1=beta1, beta2=beta2)

    def _use_kernel(self, group: dict, param: Tensor, grad: Tensor, state: dict) -> Optional[ctypes.CDLL]:
        fused = group["fused"]
        if fused is False:
            return None
        reason = unsupported_reason(param, grad, state["state1"], state["qmap1"])
        library = _load_kernel() if not reason else None
        if library is None and not reason:
            reason = "the C kernel could not be built (see the earlier warning)"
        if fused and reason:
            raise RuntimeError(f"{type(self).__name__}(fused=True): the fused 8-bit CPU kernel cannot run: {reason}")
        return library

    def _checked_plans(self) -> list[tuple[Optional["_KernelPlan"], Optional[tuple]]]:
        """Each group's kernel plan and what :meth:`_KernelPlan.gradients` says of it (``None``:
        the plan no longer holds), after checking, before this step changes anything, the 8-bit
        state of every tensor the full path will step (:func:`check_8bit_state`, O(1) per tensor):
        state changed by hand raises here and leaves parameters, state and step counts as they were.
        A plan's own tensors were checked when it was built."""
        plans = []
        for group_index, group in enumerate(self.param_groups):
            plan = self._kernel_plans.pop(group_index, None)
            planned = plan.gradients(group, self.state) if plan is not None else None
            plans.append((plan, planned))
            params = group["params"]
            for p in params if planned is None else (params[i] for i in planned[1]):
                if self._sharded and sharded8bit.is_sharded(p):  # per-shard state: sharded8bit checks it
                    continue
                state = self.state.get(p) if p.grad is not None else None
                if state and "state1" in state:
                    check_8bit_state(p, state["state1"], state["absmax1"], state["qmap1"])
        return plans

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
        if self._sharded:
            sharded8bit.step(self)
        any_paged = False
        device_path = False
        plans = self._checked_plans()
        for group_index, (group, (plan, planned)) in enumerate(zip(self.param_groups, plans)):
            triton_params = self._triton_candidates(group)
            if triton_params is not None:
                device_path = True
                any_paged = self._triton_step(group, group_index, triton_params) or any_paged
                continue
            # the group's hyperparameters, built once: most tensors have no override
            group_hyperparameters = self._hyperparameters(group, {})
            if planned is not None:  # the plan holds: its tensors in one kernel call, the rest below
                grad_pointers, other_positions = planned
                steps = cpu_rlion.increment_step_pointers(plan.step_pointers)
                skipped = _run_kernel(
                    _load_kernel(), plan.tensors, plan.dtype, plan.param_pointers, grad_pointers, steps,
                    **group_hyperparameters,
                )  # fmt: skip
                if skipped:  # the undo may drop state: the next step takes the full path
                    self._undo_kernel_skips([plan.params[i] for i in skipped])
                else:
                    self._kernel_plans[group_index] = plan
                if not other_positions:
                    continue
                group_params = group["params"]
                candidates = self._params_with_grad([group_params[i] for i in other_positions])
            else:
                candidates = self._params_with_grad(group["params"])
            group_key = tuple(sorted(group_hyperparameters.items()))  # the batch key of tensors without overrides
            positions: dict[int, int] = {}  # built only when a tensor is new
            # RLion-state tensors, batched by their (possibly overridden) hyperparameters.
            batches: dict[tuple, tuple[list, list, list, list]] = defaultdict(lambda: ([], [], [], []))
            # 8-bit tensors for the C kernel, batched the same way (one kernel call per batch).
            kernel_batches: dict[tuple, list] = defaultdict(list)
            # The C kernel applies the non-finite policy itself, tensor by tensor, on the read pass
            # right before each update (the gradient is then in cache); every other tensor is checked
            # here first, in one separate pass.
            kernel_items, checked_here = [], []
            for p in candidates:
                overrides, state = self._overrides_and_state(p, group, group_index, positions)
                hyperparameters, key = group_hyperparameters, group_key
                if overrides:
                    hyperparameters = self._hyperparameters(group, overrides)
                    key = tuple(sorted(hyperparameters.items()))
                library = self._use_kernel(group, p, p.grad, state) if "state1" in state else None
                (kernel_items if library is not None else checked_here).append((p, state, hyperparameters, key))
            finite = {id(p) for p in self._skip_nonfinite([p for p, _, _, _ in checked_here])}
            for p, state, hyperparameters, key in checked_here:
                if id(p) not in finite:
                    if state["step"].item() == 0:  # never stepped: no state, as if it had not been seen
                        del self.state[p]
                    continue
                state["step"] += 1
                if "state1" not in state:
                    params, grads, exp_avgs, steps = batches[key]
                    params.append(p)
                    grads.append(p.grad)
                    exp_avgs.append(state["exp_avg"])
                    steps.append(int(state["step"].item()))
                    continue
                if getattr(state["state1"], "is_paged", False):
                    any_paged = True
                    bnb_functional.prefetch_tensor(state["state1"])
                rlion8bit_reference_update_(
                    p, p.grad, state["state1"], state["absmax1"], state["qmap1"], int(state["step"].item()),
                    **hyperparameters,
                )
            counts = self._count_steps([state["step"] for _, state, _, _ in kernel_items], by_kernel=True)
            for (p, state, _, key), count in zip(kernel_items, counts):
                kernel_batches[(p.dtype, key)].append((p, state, count))
            any_skipped = False
            for (_, key), items in kernel_batches.items():
                skipped = fused_update_many_(
                    _load_kernel(),
                    [p for p, _, _ in items],
                    [p.grad for p, _, _ in items],
                    [state["state1"] for _, state, _ in items],
                    [state["absmax1"] for _, state, _ in items],
                    [state["qmap1"] for _, state, _ in items],
                    [step for _, _, step in items],
                    **dict(key),
                )
                self._undo_kernel_skips([items[i][0] for i in skipped])
                any_skipped = any_skipped or bool(skipped)
            for key, (params, grads, exp_avgs, steps) in batches.items():
                hyperparameters = dict(key)
                # RLion's own choice of implementation (fused CPU kernel / foreach / per tensor).
                rlion_group = {"fused": None if group["fused"] else group["fused"], "foreach": group["foreach"]}
                implementation = RLion._implementation(self, rlion_group, params)
                implementation(params, grads, exp_avgs, steps, **hyperparameters)
            if planned is not None:
                if kernel_batches:  # a tensor new to the kernel: plan again next step, with it
                    self._kernel_plans.pop(group_index, None)
            elif _plannable(kernel_batches, group_key, checked_here, any_skipped):
                (_, items), = kernel_batches.items()
                self._kernel_plans[group_index] = _KernelPlan(
                    group, self.state, [p for p, _, _ in items], [state for _, state, _ in items]
                )
        if any_paged and torch.cuda.is_available():
            torch.cuda.synchronize()  # paged prefetches are asynchronous, as in bitsandbytes
        if device_path:
            self._poll_device_skips()
        return loss

    # -- the device path (Triton) -------------------------------------------------------------

    def _triton_candidates(self, group: dict) -> Optional[list[Tensor]]:
        """The dispatch point of a group: its parameters with gradients if the whole group takes the
        Triton kernels, else ``None`` (the C kernel or the reference, chosen per tensor by
        :meth:`_use_kernel`).

        Triton runs for GPU groups it takes (``fused`` ``None`` or ``True``; ``fused=True`` raises
        ``RuntimeError`` where it cannot), and for CPU groups only with ``fused=True`` under Triton's
        interpreter when the C kernel is unavailable (how the Triton path is tested without a GPU).
        """
        from .kernels import dispatch

        fused, params = group["fused"], group["params"]
        if fused is False or not params:
            return None
        on_cpu = params[0].device.type == "cpu"
        if on_cpu and not (fused and dispatch.interpreter_on() and not kernel_available()):
            return None
        candidates = list(self._params_with_grad(params))
        reason = dispatch.triton_unsupported_reason(candidates, [self.state.get(p, {}) for p in candidates])
        if candidates and reason:
            if fused and not on_cpu:
                raise RuntimeError(f"{type(self).__name__}(fused=True): the Triton kernel cannot run: {reason}")
            return None
        return candidates

    def _shared_qmap(self, state: dict) -> Tensor:
        """The state's ``qmap1``, replaced by the device's shared map when equal to it (a loaded state
        has one copy per tensor; comparing reads the device once per loaded tensor)."""
        qmap = state["qmap1"]
        shared = _signed_dynamic_map(qmap.device)
        if qmap is shared or id(qmap) in self._foreign_qmaps:
            return qmap
        if qmap.shape == shared.shape and qmap.dtype == shared.dtype and torch.equal(qmap, shared):
            state["qmap1"] = shared
            return shared
        self._foreign_qmaps[id(qmap)] = qmap  # kept alive: its id stays its own
        return qmap

    def _triton_step(self, group: dict, group_index: int, params: list[Tensor]) -> bool:
        """One group's step by the Triton kernels, with no host synchronisation: 8-bit tensors by
        ``fused_rlion8bit``, tensors with 32-bit state by ``fused_rlion``, one call per set of
        hyperparameters (overrides) and map. Step counts are device scalars; each kernel decides the
        NaN/inf policy per tensor and its device flags undo the step counts and add to the skip
        counter (:meth:`RLionBase._count_device_skips`). Returns whether a state buffer is paged."""
        from .kernels.triton_rlion import fused_rlion
        from .kernels.triton_rlion8bit import fused_rlion8bit

        self._kernel_plans.pop(group_index, None)
        group_hyperparameters = self._hyperparameters(group, {})
        group_key = tuple(sorted(group_hyperparameters.items()))
        positions: dict[int, int] = {}
        batches: dict[tuple, tuple[Optional[Tensor], list, list]] = {}
        any_paged = False
        for p in params:
            overrides, state = self._overrides_and_state(p, group, group_index, positions, on_device=True)
            key = tuple(sorted(self._hyperparameters(group, overrides).items())) if overrides else group_key
            qmap = None
            if "state1" in state:
                qmap = self._shared_qmap(state)
                if getattr(state["state1"], "is_paged", False):
                    any_paged = True
                    bnb_functional.prefetch_tensor(state["state1"])
            batch = batches.setdefault((key, id(qmap)), (qmap, [], []))
            batch[1].append(p)
            batch[2].append(state)
        for (key, _), (qmap, batch_params, states) in batches.items():
            step_tensors = self._device_step_counts(batch_params, states)
            grads = [p.grad for p in batch_params]
            if qmap is None:
                flags = fused_rlion(
                    batch_params, grads, [state["exp_avg"] for state in states], torch.stack(step_tensors),
                    check_finite=True, **dict(key),
                )  # fmt: skip
            else:
                flags = fused_rlion8bit(
                    batch_params, grads, [state["state1"] for state in states],
                    [state["absmax1"] for state in states], qmap, torch.stack(step_tensors), check_finite=True,
                    **dict(key),
                )  # fmt: skip
            self._count_device_skips(step_tensors, flags)
        return any_paged

    def _params_with_grad(self, params: Iterable[Tensor]):
        candidates = super()._params_with_grad(params)
        if self._sharded:  # stepped by sharded8bit.step
            return (p for p in candidates if not sharded8bit.is_sharded(p))
        return candidates

    # -- introspection --------------------------------------------------------------------------

    def state_bytes(self) -> int:
        """Bytes held by the optimizer state tensors (codes, absmax, qmap, exp_avg, step); on this rank
        only for DTensor (FSDP2) state."""
        seen: set[int] = set()
        total = 0
        for state in self.state.values():
            for value in state.values():
                if sharded8bit.is_sharded(value):
                    value = value.to_local()
                if isinstance(value, Tensor) and value.data_ptr() not in seen:
                    seen.add(value.data_ptr())
                    total += value.numel() * value.element_size()
        return total


class PagedRLion8bit(RLion8bit):
    """:class:`RLion8bit` with its 8-bit state in bitsandbytes' paged (CUDA unified) memory.

    On CUDA, codes of tensors with at least 100 000 elements (bitsandbytes' threshold) are
    allocated with ``bitsandbytes.functional.get_paged`` and prefetched before their step, so
    the driver can evict them to CPU memory under GPU memory pressure. Not run in this
    project's CI (no GPU). On CPU there is nothing to page: it warns once and behaves exactly
    like :class:`RLion8bit`. Paged buffers are not preserved by ``load_state_dict`` (the loaded
    state is ordinary device memory), as in bitsandbytes.
    """

    _paged = True


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

_qmaps: dict[torch.device, Tensor] = {}


def _signed_dynamic_map(device: torch.device) -> Tensor:
    """bitsandbytes' signed dynamic map on ``device``, one shared tensor per device (as bitsandbytes shares it)."""
    device = torch.device(device)
    if device not in _qmaps:
        _qmaps[device] = bnb_functional.create_dynamic_map(signed=True).to(device)
    return _qmaps[device]


def _check_materialised(param: Tensor) -> None:
    if param.is_meta:
        raise ValueError(
            f"RLion8bit: a parameter of shape {tuple(param.shape)} is on the meta device; meta tensors hold no "
            "data, so they cannot hold 8-bit state. Materialise the model first (e.g. model.to_empty(device=...) "
            "and load its weights), or use RLion."
        )


def _validate_8bit_options(options: dict, source: str = "argument") -> None:
    bits = options.get("optim_bits")
    if isinstance(bits, bool) or bits not in _OPTIM_BITS:
        raise ValueError(f"optim_bits must be one of {list(_OPTIM_BITS)} ({source}), got {bits!r}")
    size = options.get("min_8bit_size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"min_8bit_size must be an integer >= 0 ({source}), got {size!r}")
