"""What RLion and RLion8bit share: argument checks, which parameters step, state loading."""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterable, Iterator, Optional

import torch
from torch import Tensor

low_precision_dtypes = (torch.bfloat16, torch.float16)

#: The values of ``alpha_scaling`` (see :class:`hf_rlion.RLion`).
ALPHA_SCALINGS = ("rms", "fixed")

#: Elements per quantisation block of the 8-bit state (bitsandbytes' blockwise optimizers use 256).
BLOCKSIZE = 256
#: The per-parameter state layouts this package writes: RLion's, and RLion8bit's 8-bit one
#: (bitsandbytes' names). Both optimizers load either (``load_state_dict`` converts).
STATE_LAYOUTS = {
    "32-bit": frozenset({"step", "exp_avg"}),
    "8-bit": frozenset({"step", "state1", "absmax1", "qmap1"}),
}


def _is_real_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_hyperparameters(group: dict) -> None:
    """Raise ``ValueError`` naming the argument and its allowed range for any bad value."""
    lr = group.get("lr")
    if isinstance(lr, Tensor):
        raise ValueError("lr must be a Python float (tensor learning rates are not supported)")
    if not _is_real_number(lr) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
    betas = group.get("betas")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for name, beta in zip(("beta1", "beta2"), betas):
        if not _is_real_number(beta) or not 0.0 <= beta < 1.0:
            raise ValueError(f"betas: {name} must be in [0, 1), got {beta!r}")
    wd = group.get("weight_decay")
    if not _is_real_number(wd) or not math.isfinite(wd) or wd < 0:
        raise ValueError(f"weight_decay must be a finite number >= 0, got {wd!r}")
    alpha = group.get("alpha")
    if not _is_real_number(alpha) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if group.get("alpha_scaling") not in ALPHA_SCALINGS:
        raise ValueError(f"alpha_scaling must be one of {list(ALPHA_SCALINGS)}, got {group.get('alpha_scaling')!r}")
    for flag in ("bias_correction", "maximize"):
        if not isinstance(group.get(flag), bool):
            raise ValueError(f"{flag} must be True or False, got {group.get(flag)!r}")
    for flag in ("foreach", "fused"):
        if group.get(flag, None) not in (None, True, False):
            raise ValueError(f"{flag} must be None, True or False, got {group.get(flag)!r}")
    if group.get("foreach") and group.get("fused"):
        raise ValueError("foreach and fused cannot both be True")


def finite_gradient_mask(grads: list[Tensor]) -> list[bool]:
    """For each gradient, whether every element is finite (no NaN, no ±inf).

    Two reductions per tensor on its device (max and min; NaN propagates through both), no
    temporary the size of the tensor; the answers of all plain tensors on one device are stacked
    and read with one ``tolist()``: one host synchronisation per device, not one per tensor. A
    tensor subclass (DTensor) is read on its own (its reduction may need its other shards).
    """
    mask = [True] * len(grads)
    by_device: dict[torch.device, tuple[list[int], list[Tensor]]] = {}
    for i, g in enumerate(grads):
        if g.numel() == 0 or g.is_meta:  # a meta tensor has no values to check
            continue
        hi, lo = torch.aminmax(g)
        finite = torch.isfinite(hi) & torch.isfinite(lo)
        if type(finite) is not Tensor:
            mask[i] = bool(finite)
            continue
        indices, flags = by_device.setdefault(finite.device, ([], []))
        indices.append(i)
        flags.append(finite)
    for indices, flags in by_device.values():
        for i, finite in zip(indices, torch.stack(flags).tolist()):
            mask[i] = finite
    return mask


def dequantize_blockwise(codes: Tensor, absmax: Tensor, qmap: Tensor) -> Tensor:
    """The momentum ``m = qmap[codes] * absmax[block]`` (float32, shaped like ``codes``) of 8-bit state.

    bitsandbytes' ``dequantize_blockwise`` with ``blocksize=256``, in plain torch (one float32
    product per element, so the same values, tested), for RLion, which does not need bitsandbytes.
    """
    values = qmap.to(torch.float32)[codes.reshape(-1).long()]
    numel = values.numel()
    blocks = torch.nn.functional.pad(values, (0, -numel % BLOCKSIZE)).view(-1, BLOCKSIZE)
    return (blocks * absmax.to(torch.float32)[:, None]).view(-1)[:numel].view(codes.shape)


def momentum_dtype(param: Tensor) -> torch.dtype:
    """The dtype of RLion's 32-bit ``exp_avg`` for ``param``: float32 for bfloat16/float16
    parameters (the arithmetic runs in float32), the parameter's dtype otherwise."""
    return torch.float32 if param.dtype in low_precision_dtypes else param.dtype


def as_32bit_state(param: Tensor, state: dict) -> dict:
    """A checked state (:func:`state_problem`) in RLion's layout: 8-bit momentum is dequantised
    (:func:`dequantize_blockwise`) into an ``exp_avg`` of :func:`momentum_dtype` on ``param``'s device."""
    if "state1" not in state:
        return state
    exp_avg = dequantize_blockwise(state["state1"], state["absmax1"], state["qmap1"])
    return {"step": state["step"], "exp_avg": exp_avg.to(device=param.device, dtype=momentum_dtype(param))}


def on_mesh_device(tensor: Tensor, mesh) -> Tensor:
    """``tensor`` on the device a device mesh's collectives take (FSDP2 shards offloaded to the CPU
    while the mesh, and NCCL, are on the GPU); unchanged when it is there already."""
    if tensor.device.type == mesh.device_type:
        return tensor
    return tensor.to(torch.device(mesh.device_type, getattr(torch, mesh.device_type).current_device()))


def _finite_range(tensor: Tensor) -> tuple[float, float]:
    """``(min, max)`` of a tensor by one reduction (NaN shows in both); ``(0, 0)`` when empty.

    For a ``DTensor`` (FSDP2 state) the range of the whole tensor, the same on every rank (one
    ``all_reduce`` of the local ranges; a rank's shard may be empty), so that every rank accepts
    or refuses a loaded state alike.
    """
    if tensor.numel() == 0:
        return 0.0, 0.0
    local = tensor.to_local() if hasattr(tensor, "device_mesh") and hasattr(tensor, "to_local") else None
    if local is None:
        lo, hi = torch.aminmax(tensor.detach())
        return float(lo), float(hi)
    import torch.distributed as dist

    summary = torch.full((3,), -math.inf, dtype=torch.float64, device=local.device)  # (-min, max, NaN seen)
    if local.numel():
        lo, hi = torch.aminmax(local.detach())
        summary = torch.stack([-lo.double(), hi.double(), torch.isnan(lo).double()])
        summary = torch.where(torch.isnan(summary), 0.0, summary)
    summary = on_mesh_device(summary, tensor.device_mesh)
    dist.all_reduce(summary, op=dist.ReduceOp.MAX, group=tensor.device_mesh.get_group())
    negated_lo, hi, nan_seen = summary.tolist()
    return (math.nan, math.nan) if nan_seen > 0 else (-negated_lo, hi)


def state_problem(param: Tensor, state: dict) -> Optional[str]:
    """What is wrong with one parameter's saved state for this parameter, or ``None``.

    Accepts either layout of :data:`STATE_LAYOUTS` (or an empty dict) and checks each tensor
    against ``param``: ``step`` a finite scalar >= 0 (tensor or number); ``exp_avg`` a floating
    tensor shaped like ``param``, finite; ``state1`` uint8 codes shaped like ``param``;
    ``absmax1`` float32, one entry per block of 256 elements, finite and >= 0; ``qmap1`` 256
    float32 entries, finite, ascending, within [-1, 1]. Cost: one reduction per state tensor.
    """
    if not isinstance(state, dict):
        return f"the state is a {type(state).__name__}, not a dict"
    if not state:
        return None
    keys = set(state)
    if keys not in STATE_LAYOUTS.values():
        expected = " or ".join(f"{sorted(layout)} ({name})" for name, layout in STATE_LAYOUTS.items())
        return f"the state has keys {sorted(keys, key=str)}, expected {expected}"
    shape = tuple(param.shape)
    for key, value in state.items():
        if key == "step":
            if isinstance(value, Tensor):
                if value.numel() != 1 or value.is_complex():
                    return f"'step' must be a real scalar, got a tensor of shape {tuple(value.shape)}"
                value = value.item()
            if not _is_real_number(value) or not math.isfinite(value) or value < 0:
                return f"'step' must be a finite number >= 0, got {value!r}"
            continue
        if not isinstance(value, Tensor):
            return f"{key!r} must be a tensor, got {type(value).__name__}"
        if key in ("exp_avg", "state1") and tuple(value.shape) != shape:
            return f"{key!r} has shape {tuple(value.shape)}, expected {shape} (the parameter's)"
        if key == "exp_avg":
            if not value.is_floating_point():
                return f"'exp_avg' must be a floating-point tensor, got {value.dtype}"
            lo, hi = _finite_range(value)
            if not (math.isfinite(lo) and math.isfinite(hi)):
                return "'exp_avg' (the momentum) holds NaN or inf values"
        elif key == "state1":
            if value.dtype != torch.uint8:
                return f"'state1' (the 8-bit codes) must be uint8, got {value.dtype}"
        elif key == "absmax1":
            blocks = -(-param.numel() // BLOCKSIZE)
            if value.dtype != torch.float32 or value.numel() != blocks:
                return (
                    f"'absmax1' must be float32 with {blocks} entries (one per block of {BLOCKSIZE}), "
                    f"got {value.dtype} with {value.numel()}"
                )
            lo, hi = _finite_range(value)
            if not (math.isfinite(lo) and math.isfinite(hi)) or lo < 0:
                return "'absmax1' (the block scales) holds NaN, inf or negative values"
        elif key == "qmap1":
            if value.dtype != torch.float32 or value.numel() != 256:
                return f"'qmap1' must be 256 float32 entries, got {value.dtype} with {value.numel()}"
            qmap = value.detach().reshape(-1)
            lo, hi = _finite_range(qmap)
            if not (-1.0 <= lo and hi <= 1.0) or bool((qmap[1:] < qmap[:-1]).any()):
                return "'qmap1' (the quantisation map) must be ascending values within [-1, 1]"
    return None


#: Device path: every this many ``step()`` calls the optimizer starts a copy of its device skip
#: counter to the host without waiting, and looks at it (again without waiting) on a later step, to
#: issue the first-skip warning. Reading ``nonfinite_skips`` warns at once.
NONFINITE_WARN_INTERVAL = 100


class RLionBase(torch.optim.Optimizer):
    """``torch.optim.Optimizer`` with RLion's argument checks and a dtype-preserving ``load_state_dict``."""

    #: see :data:`NONFINITE_WARN_INTERVAL`
    nonfinite_warn_interval = NONFINITE_WARN_INTERVAL

    def __init__(self, params, defaults: dict):
        validate_hyperparameters(defaults)
        defaults["betas"] = tuple(defaults["betas"])
        super().__init__(params, defaults)
        self._nonfinite_counted = 0  # skips already on the host (see nonfinite_skips)
        self._warned_nonfinite = False
        self._reset_device_skips()

    def _reset_device_skips(self) -> None:
        self._nonfinite_on_device: dict[torch.device, Tensor] = {}  # int64 scalar counter per device
        self._nonfinite_probe: Optional[tuple[list[Tensor], list]] = None  # (host copies, events) in flight
        self._device_steps = 0

    @property
    def nonfinite_skips(self) -> int:
        """Tensor-steps skipped because the tensor's gradient held NaN/inf (see ``_skip_nonfinite``).

        On the device (Triton) path the count lives on the device and is read here, when asked:
        reading it waits for the device once. The first time it is not 0 it warns.
        """
        count = self._total_skips()
        if count and not self._warned_nonfinite:
            self._warn_nonfinite(f"{count} parameter tensor-step(s) with NaN/inf gradients", 2)
        return count

    @nonfinite_skips.setter
    def nonfinite_skips(self, value: int) -> None:
        for counter in self._nonfinite_on_device.values():
            counter.zero_()  # in place: a captured CUDA graph keeps adding to this tensor
        self._nonfinite_counted = int(value)

    def _total_skips(self) -> int:
        """The host count plus the device counters (cumulative; read, not reset)."""
        on_device = sum(int(counter.item()) for counter in self._nonfinite_on_device.values())
        return self._nonfinite_counted + on_device

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["nonfinite_skips"], state["_warned_nonfinite"] = self._total_skips(), self._warned_nonfinite
        return state

    def __setstate__(self, state: dict) -> None:
        """Unpickling and ``copy.deepcopy``: torch keeps only ``defaults``, ``state`` and
        ``param_groups`` (this class adds the NaN/inf skip count and its warn-once flag); the other
        attributes of this package's optimizers come back with their initial values.
        ``load_state_dict`` comes here too."""
        state = dict(state)
        skips = state.pop("nonfinite_skips", None)
        super().__setstate__(state)
        self.__dict__.setdefault("_nonfinite_counted", 0)
        self.__dict__.setdefault("_warned_nonfinite", False)
        if "_nonfinite_on_device" not in self.__dict__:
            self._reset_device_skips()
        if skips is not None:
            self.nonfinite_skips = skips

    def _skip_nonfinite(self, params: list[Tensor]) -> list[Tensor]:
        """The non-finite-gradient policy: drop tensors whose gradient holds NaN/inf from this step.

        Such a tensor is not updated at all (parameter, momentum and step count unchanged),
        so one bad batch cannot poison weights or momentum. Each skip is counted in
        ``self.nonfinite_skips``; the first one per optimizer warns, naming the tensor.
        Works with fp16 loss scaling (which skips the whole step itself before we see inf)
        and with gradient clipping (a clipped NaN stays NaN and is skipped here).
        """
        grads = [p.grad for p in params]
        if all(type(g) is Tensor for g in grads):  # plain tensors: one C pass each (cpu_rlion), else torch
            from .kernels.cpu_rlion import finite_mask

            mask = finite_mask(grads, finite_gradient_mask)
        else:
            mask = finite_gradient_mask(grads)
        if all(mask):
            return params
        self._record_nonfinite([p for p, ok in zip(params, mask) if not ok])
        return [p for p, ok in zip(params, mask) if ok]

    @staticmethod
    def _count_steps(step_tensors: list[Tensor], by_kernel: bool) -> list[int]:
        """``step += 1`` for each step-count tensor; returns the new counts.

        By one C call when ``by_kernel`` (a kernel path, where the CPU kernel is loaded anyway) and
        the counts are float32 CPU scalars (:func:`hf_rlion.kernels.cpu_rlion.increment_steps`); otherwise
        by one ``_foreach_add_``.
        """
        if not step_tensors:
            return []
        if by_kernel:
            from .kernels import cpu_rlion

            counts = cpu_rlion.increment_steps(step_tensors)
            if counts is not None:
                return counts
        torch._foreach_add_(step_tensors, 1.0)  # one call, not one tensor op per parameter
        return [int(s) for s in torch.stack(step_tensors).tolist()]

    def _undo_kernel_skips(self, skipped: list[Tensor]) -> None:
        """For tensors a kernel left untouched (NaN/inf gradient) after ``step()`` counted them:
        their step count goes back, state created this step goes away, and the skip is recorded."""
        for param in skipped:
            state = self.state[param]
            state["step"] -= 1
            if state["step"].item() == 0:
                del self.state[param]
        self._record_nonfinite(skipped)

    def _record_nonfinite(self, skipped: list[Tensor]) -> None:
        """Count tensors skipped for NaN/inf gradients; warn the first time (see ``_skip_nonfinite``)."""
        if not skipped:
            return
        self._nonfinite_counted += len(skipped)
        if not self._warned_nonfinite:
            shapes = ", ".join(str(tuple(p.shape)) for p in skipped[:5])
            self._warn_nonfinite(f"{len(skipped)} parameter tensor(s) with NaN/inf gradients (shapes {shapes})", 5)

    def _warn_nonfinite(self, what: str, stacklevel: int) -> None:
        self._warned_nonfinite = True
        warnings.warn(
            f"{type(self).__name__}: {what} were not updated; later skips are counted in "
            "optimizer.nonfinite_skips without warning",
            RuntimeWarning,
            stacklevel=stacklevel + 1,
        )

    # -- the device path: step counts and the NaN/inf policy decided on the device -------------

    @staticmethod
    def _device_step_counts(params: list[Tensor], states: list[dict]) -> list[Tensor]:
        """``state["step"] += 1`` on the parameters' device (float32 scalars, as torch's fused AdamW
        keeps them; one moved there if it was loaded elsewhere, without waiting); the step tensors."""
        step_tensors = []
        for p, state in zip(params, states):
            step = state["step"]
            if step.device != p.device or step.dtype != torch.float32:
                step = state["step"] = step.to(device=p.device, dtype=torch.float32, non_blocking=True)
            step_tensors.append(step)
        torch._foreach_add_(step_tensors, 1.0)
        return step_tensors

    def _count_device_skips(self, step_tensors: list[Tensor], flags: Tensor) -> None:
        """After a kernel left the flagged tensors untouched (NaN/inf gradient): their step count goes
        back and they are added to the device skip counter, all on the device (no host sync). A
        skipped tensor that had never stepped keeps its state with step 0 and zero momentum, which is
        the same as no state."""
        if not step_tensors:
            return
        torch._foreach_sub_(step_tensors, list(flags.to(torch.float32).unbind()))
        counter = self._nonfinite_on_device.get(flags.device)
        if counter is None:
            counter = self._nonfinite_on_device[flags.device] = torch.zeros((), dtype=torch.int64, device=flags.device)
        counter.add_(flags.sum())

    def _poll_device_skips(self) -> None:
        """Once per ``step()`` on the device path: the first-skip warning without waiting for the
        device (see :data:`NONFINITE_WARN_INTERVAL`). Nothing is done while a CUDA graph is captured."""
        self._device_steps += 1
        if self._warned_nonfinite or not self._nonfinite_on_device:
            return
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return
        if self._nonfinite_probe is not None:
            copied, events = self._nonfinite_probe
            if all(event.query() for event in events):
                self._nonfinite_probe = None
                if sum(int(c) for c in copied) and not self._warned_nonfinite:
                    self._warn_nonfinite("parameter tensor(s) with NaN/inf gradients", 3)
                return
        if self._device_steps % self.nonfinite_warn_interval == 0 and self._nonfinite_probe is None:
            counters = list(self._nonfinite_on_device.values())
            copied = [c.to("cpu", non_blocking=True) for c in counters]  # pinned, filled later
            events = []
            for c in counters:
                if c.device.type != "cpu":
                    events.append(torch.Event(device=c.device))
                    events[-1].record()
            self._nonfinite_probe = (copied, events)

    def add_param_group(self, param_group: dict) -> None:
        """``torch.optim.Optimizer.add_param_group``, with the group checked before it is added:
        a rejected group never stays behind in ``param_groups``."""
        params = param_group["params"]
        if isinstance(params, Tensor):
            param_group["params"] = [params]
        elif not isinstance(params, set):  # torch rejects sets itself
            param_group["params"] = list(params)
        if isinstance(param_group.get("betas"), list):
            param_group["betas"] = tuple(param_group["betas"])
        self._check_group(dict(self.defaults, **param_group))
        super().add_param_group(param_group)

    def _check_group(self, group: dict) -> None:
        """Raise ``ValueError`` for a group (options filled from the defaults) this optimizer cannot take."""
        self._check_options(group)
        for p in group["params"]:
            if not isinstance(p, Tensor):
                continue  # torch's add_param_group raises for it
            if p.is_complex():
                raise ValueError(f"{type(self).__name__} does not support complex parameters (got {p.dtype})")
            if not p.is_floating_point():
                raise ValueError(f"{type(self).__name__} needs floating-point parameters, got {p.dtype}")

    def _check_options(self, group: dict) -> None:
        """Raise ``ValueError`` for a bad option value in a param group (those of ``defaults``)."""
        validate_hyperparameters(group)

    def _params_with_grad(self, params: Iterable[Tensor]) -> Iterator[Tensor]:
        """The parameters (of a group) that have a gradient; frozen ones (grad None) are skipped."""
        for p in params:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(
                    f"{type(self).__name__} does not support sparse gradients; use dense gradients "
                    "(for nn.Embedding, sparse=False)"
                )
            yield p

    def load_state_dict(self, state_dict: dict) -> None:
        """Load state as ``torch.optim.Optimizer`` does, after checking all of it, keeping dtypes.

        Everything is checked before anything changes (a rejected state dict leaves the optimizer
        as it was): the group options (an option missing from an older state dict takes this
        optimizer's default, as torch's optimizers do in ``__setstate__``) and each parameter's
        state against the parameter (:func:`state_problem`: shapes, sizes, dtypes, NaN/inf).
        A problem raises ``ValueError`` naming the parameter. A ``step`` saved as a Python number
        becomes a float32 tensor. State in the other optimizer's layout is converted
        (:meth:`_convert_state`: RLion8bit's 8-bit codes into RLion's ``exp_avg`` and back).

        torch casts every floating-point state tensor except ``step`` to its parameter's dtype;
        that would round float32 momentum of a bf16 parameter to bf16 and turn 8-bit codes or
        float32 absmax into the parameter's dtype. Here each keeps its saved dtype.

        The registered hooks run as in torch, around all of this: the pre hooks
        (``hook(optimizer, state_dict)``, which may return a new state dict) before the checks,
        so a hook can adapt a state dict in an older layout; the post hooks (``hook(optimizer)``)
        once the state is loaded with its saved dtypes.
        """
        state_dict = state_dict.copy()  # shallow, as torch does
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            hook_result = pre_hook(self, state_dict)
            if hook_result is not None:
                state_dict = hook_result
        pre_hooks, post_hooks = self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks
        # torch's load_state_dict (called inside) would run the hooks at the wrong moments
        self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = {}, {}
        try:
            self._load_checked_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks = pre_hooks
            self._optimizer_load_state_dict_post_hooks = post_hooks
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _load_checked_state_dict(self, state_dict: dict) -> None:
        """``load_state_dict`` without running the hooks: check, convert, load, restore saved dtypes."""
        name = f"{type(self).__name__}.load_state_dict"
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"{name}: the state dict has {len(saved_groups)} parameter group(s), this optimizer "
                f"{len(self.param_groups)}"
            )
        groups = []
        for index, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    f"{name}: group {index} of the state dict has {len(saved['params'])} parameters, this "
                    f"optimizer's {len(group['params'])}"
                )
            options = dict(self.defaults, **saved)
            if isinstance(options.get("betas"), list):
                options["betas"] = tuple(options["betas"])
            try:
                self._check_options(options)
            except ValueError as err:
                raise ValueError(f"{name}: group {index}: {err}") from None
            groups.append(options)
        saved_state = state_dict["state"]
        state = dict(saved_state)
        position = 0
        for group_index, (group, options) in enumerate(zip(self.param_groups, groups)):
            for param_index, (param, pid) in enumerate(zip(group["params"], options["params"])):
                where = (
                    f"{name}: parameter {position} (group {group_index}, position {param_index}, shape "
                    f"{tuple(param.shape)})"
                )
                position += 1
                if pid not in saved_state:
                    continue
                problem = state_problem(param, saved_state[pid])
                if problem is not None:
                    raise ValueError(f"{where}: {problem}")
                if not saved_state[pid]:
                    continue
                entry = dict(saved_state[pid])
                if not isinstance(entry["step"], Tensor):  # torch's convention: a float32 tensor
                    entry["step"] = torch.tensor(float(entry["step"]), dtype=torch.float32)
                elif entry["step"].dtype != torch.float32:
                    entry["step"] = entry["step"].to(torch.float32)
                try:
                    state[pid] = self._convert_state(param, entry, options, group_index, param_index)
                except ValueError as err:
                    raise ValueError(f"{where}: {err}") from None
        super().load_state_dict(dict(state_dict, param_groups=groups, state=state))
        for group, options in zip(self.param_groups, groups):
            for param, pid in zip(group["params"], options["params"]):
                if pid not in state or param not in self.state:
                    continue
                loaded = self.state[param]
                for key, saved in state[pid].items():
                    if isinstance(saved, Tensor) and key in loaded and loaded[key].dtype != saved.dtype:
                        loaded[key] = saved.to(device=param.device, copy=True)

    def _convert_state(self, param: Tensor, state: dict, group: dict, group_index: int, param_index: int) -> dict:
        """One parameter's checked saved state (a new dict) in the layout this optimizer keeps for it."""
        return state
