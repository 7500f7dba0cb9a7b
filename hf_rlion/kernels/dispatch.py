"""Where the Triton kernels run, and what they take: the optimizers' device-path checks.

``fused=True`` means "this device's fused kernel": the C kernels on CPU, the Triton kernels on GPUs
(CUDA, which includes ROCm builds, and XPU). On CPU tensors the Triton kernels run only in Triton's
interpreter (``TRITON_INTERPRET=1`` set before Triton is imported), which is how they are tested on
machines without a GPU. Nothing here imports Triton unless a device path is asked about.
"""

from __future__ import annotations

import functools
import os
from typing import Sequence

import torch
from torch import Tensor

#: Device types where Triton compiles kernels.
TRITON_DEVICE_TYPES = ("cuda", "xpu")
#: Parameter dtypes the Triton kernels take (gradients of the same dtype, float32 momentum).
TRITON_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# plain tensors only: a subclass (DTensor) has a data pointer that is not the whole tensor
_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    """Whether ``import triton`` works here (asked once)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_on() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_device(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of this device (CPU only under the interpreter)."""
    if device.type == "cpu":
        return interpreter_on() and triton_importable()
    return device.type in TRITON_DEVICE_TYPES and triton_importable()


def triton_unsupported_reason(params: Sequence[Tensor], states: Sequence[dict] = ()) -> str:
    """Why the Triton kernels cannot step these parameters (``""`` if they can).

    Every parameter a plain, contiguous float32/bfloat16/float16 tensor on one Triton device, with a
    contiguous gradient of its dtype; any ``exp_avg`` already in ``states`` float32 and contiguous.
    O(number of tensors), no device access.
    """
    if not params:
        return "no parameters"
    device = params[0].device
    if not triton_device(device):
        if device.type == "cpu":
            return "CPU tensors (Triton runs on CPU tensors only in its interpreter, TRITON_INTERPRET=1)"
        return f"parameters on {device.type} (Triton unavailable there)"
    for p in params:
        g = p.grad
        if type(p) not in _PLAIN_TYPES or type(g) is not Tensor:
            return "tensor subclasses (DTensor) as parameters or gradients"
        if p.device != device:
            return "parameters on several devices in one group"
        if p.dtype not in TRITON_PARAM_DTYPES or g.dtype != p.dtype:
            return f"{p.dtype} parameters / {g.dtype} gradients (the kernels take float32, bfloat16 or float16, alike)"
        if not (p.is_contiguous() and g.is_contiguous()):
            return "non-contiguous parameters or gradients"
    for state in states:
        m = state.get("exp_avg")
        if m is not None and (m.dtype != torch.float32 or not m.is_contiguous() or m.device != device):
            return "exp_avg state that is not contiguous float32 on the parameters' device"
    return ""
