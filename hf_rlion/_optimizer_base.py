"""What RLion and RLion8bit share: argument checks, which parameters step, state loading."""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterable, Iterator, Optional

import torch
from torch import Tensor

low_precision_dtypes = (torch.bfloat16, torch.float16)


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
    from .rlion import ALPHA_SCALINGS

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
        if g.numel() == 0:
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
        if all(type(g) is Tensor for g in grads):  # plain tensors: one C pass each (fused_cpu), else torch
            from .fused_cpu import finite_mask

            mask = finite_mask(grads)
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
        the counts are float32 CPU scalars (:func:`hf_rlion.fused_cpu.increment_steps`); otherwise
        by one ``_foreach_add_``.
        """
        if not step_tensors:
            return []
        if by_kernel:
            from . import fused_cpu

            counts = fused_cpu.increment_steps(step_tensors)
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
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        validate_hyperparameters(group)
        for p in group["params"]:
            if p.is_complex():
                raise ValueError(f"{type(self).__name__} does not support complex parameters (got {p.dtype})")
            if not p.is_floating_point():
                raise ValueError(f"{type(self).__name__} needs floating-point parameters, got {p.dtype}")

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
        """Load state as ``torch.optim.Optimizer`` does, but keep each state tensor's saved dtype.

        torch casts every floating-point state tensor except ``step`` to its parameter's dtype;
        that would round float32 momentum of a bf16 parameter to bf16 and turn 8-bit codes or
        float32 absmax into the parameter's dtype.
        """
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        # state_dict keys are the parameters' positions across groups (torch's packing order).
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        for pid, param in zip(saved_ids, params):
            if pid not in saved_state or param not in self.state:
                continue
            state = self.state[param]
            for key, saved in saved_state[pid].items():
                if isinstance(saved, Tensor) and key in state and state[key].dtype != saved.dtype:
                    state[key] = saved.to(device=param.device, copy=True)
        for group in self.param_groups:
            validate_hyperparameters(group)
