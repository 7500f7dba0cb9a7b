r""":class:`~hf_rlion.RLion8bit` on FSDP2-sharded parameters: the step and the checkpoint layout.

FSDP2 (``torch.distributed.fsdp.fully_shard``) hands the optimizer ``DTensor`` parameters on a
1-D device mesh with placement ``Shard(0)``: rank ``r`` holds rows ``[r·⌈R/W⌉, (r+1)·⌈R/W⌉)`` of
dim 0 (``torch.chunk``'s split; the last ranks may hold fewer rows or none), which is one
contiguous range ``[start, end)`` of the flattened tensor.

**The step.** Each rank keeps the state of its own shard: ``state1`` a uint8 ``DTensor`` sharded
like the parameter, ``absmax1`` a plain float32 tensor with one entry per 256-element block of the
LOCAL shard (blocks start at the shard's first element), ``qmap1`` and ``step`` as in
:class:`RLion8bit`. Tensors with RLion's 32-bit state keep ``exp_avg`` as a ``DTensor``. Two
things of RLion's rule are per whole tensor and need the other shards:

- ``alpha_scaling="rms"``: ``α_t = α / RMS(ĉ_t)`` with the RMS over the whole tensor;
- the non-finite policy: a tensor with NaN/inf anywhere in its gradient is not updated at all.

So a step makes two passes over the local shards. The first computes, per tensor, the float32
norm of the local ``ĉ_t`` (squared in float64) and whether the local gradient holds NaN/inf.
These ``2·n`` numbers, for all ``n`` sharded tensors of the step, are summed over the ranks in
ONE ``all_reduce`` (per device mesh). The second pass skips tensors with a non-finite flag on any
rank and updates the others with ``α_t = min(α / max(RMS, FLT_MIN), FLT_MAX)``,
``RMS = sqrt(Σ_ranks ‖ĉ‖² / numel)``: :func:`hf_rlion.reference8bit.rlion8bit_reference_update_`
(or the fused CPU kernel, given ``α_t`` as a fixed α) on ``p.to_local()``, ``p.grad.to_local()``
and the local codes. The first pass dequantises and forms ``ĉ_t`` once more than a one-process
step; temporaries stay the size of one local shard.

**The checkpoint layout** (what :meth:`RLion8bit.state_dict` returns for a sharded tensor, so what
``torch.distributed.checkpoint`` saves): the momentum as one process would hold it, quantised on
the GLOBAL grid of 256-element blocks of the flattened tensor, as ``DTensor`` s that DCP can
reshard to any number of ranks:

- ``state1``: uint8 codes, a ``DTensor`` with the parameter's shape and placement;
- ``absmax1``: float32, shape ``(⌈numel/256⌉,)``, a ``DTensor`` with placement ``Shard(0)``.

Gathered (``full_state_dict=True``) this is exactly a one-process :class:`RLion8bit` state.
When every shard starts at a multiple of 256 elements (``⌈R/W⌉ · row_numel % 256 == 0``, true for
the usual transformer widths), the local blocks ARE global blocks: the checkpoint holds the
live codes and absmax, and loading it on the same layout restores them bit for bit. Otherwise a
global block straddles two shards, and saving re-quantises the (dequantised) momentum on the
global grid (each value moves by at most half a code step of its global block), as loading onto
such a layout re-quantises it on the local blocks. ``state_dict()`` and ``load_state_dict()``
are then collective (every rank calls them, as DCP's ``get/set_optimizer_state_dict`` do): the
absmax of a tensor is all-gathered (``numel/64`` bytes).
"""

from __future__ import annotations

import math
from typing import Any

import bitsandbytes.functional as bnb_functional
import torch
import torch.distributed as dist
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor, Shard = None, None

__all__ = ["is_sharded", "check_supported", "step", "portable_state_dict", "restore_local_layout"]

from ._optimizer_base import BLOCKSIZE
from .kernels.cpu_rlion8bit import fused_update_many_
from .reference8bit import quantize_blockwise, rlion8bit_reference_update_
from .rlion import FLOAT32_MAX, _alpha_cap, rlion_update_

_FLT_MIN = torch.finfo(torch.float32).tiny


def is_sharded(param: Tensor) -> bool:
    """Whether ``param`` is a ``DTensor`` (FSDP2's parameters)."""
    return DTensor is not None and isinstance(param, DTensor)


def check_supported(param: Tensor, optimizer_name: str, paged: bool) -> None:
    """``ValueError`` unless ``param`` is laid out as FSDP2 shards it: a 1-D mesh, ``Shard(0)``."""
    placements = tuple(param.placements)
    if param.device_mesh.ndim != 1 or placements != (Shard(0),) or param.dim() == 0:
        raise ValueError(
            f"{optimizer_name} supports DTensor parameters sharded as FSDP2 shards them (a 1-D device mesh, "
            f"placement Shard(0)); got {param.dim()}-D parameter on a {param.device_mesh.ndim}-D mesh with "
            f"{placements}. Use optim='rlion' (which runs on any DTensor layout). See docs/8bit.md."
        )
    if paged:
        raise ValueError(
            f"{optimizer_name} does not page sharded (FSDP2) state; use RLion8bit (its state is already "
            "split over the ranks). See docs/8bit.md."
        )


class _ShardLayout:
    """Where this rank's shard of a ``Shard(0)`` ``DTensor`` lies in the flattened tensor.

    ``start``/``numel``: the shard's range of elements; ``aligned``: every rank's shard starts
    at a multiple of ``blocksize`` elements; ``blocks``: blocks of the whole tensor;
    ``block_chunk``: this rank's range of them in a ``Shard(0)`` ``DTensor`` of ``blocks`` entries.
    """

    def __init__(self, param: Tensor, blocksize: int):
        mesh = param.device_mesh
        self.mesh, self.group = mesh, mesh.get_group()
        world, rank = mesh.size(), mesh.get_local_rank()
        rows = param.shape[0]
        row_numel = param.numel() // rows if rows else 0
        per_rank = -(-rows // world)
        first_rows = [min(r * per_rank, rows) for r in range(world + 1)]
        #: every rank's shard size, in elements
        self.shard_numels = [(first_rows[r + 1] - first_rows[r]) * row_numel for r in range(world)]
        self.start, self.numel = first_rows[rank] * row_numel, self.shard_numels[rank]
        self.aligned = all(first_rows[r] * row_numel % blocksize == 0 for r in range(world) if self.shard_numels[r])
        self.blocksize, self.world = blocksize, world
        self.blocks = -(-param.numel() // blocksize)
        self.local_blocks = -(-self.numel // blocksize)
        per_rank_blocks = -(-self.blocks // world)
        self.block_chunk = (min(rank * per_rank_blocks, self.blocks), min((rank + 1) * per_rank_blocks, self.blocks))
        local = param.to_local()
        if local.numel() != self.numel:
            raise RuntimeError(
                f"a Shard(0) DTensor of shape {tuple(param.shape)} has {local.numel()} local elements on rank "
                f"{rank} of {world}, not the {self.numel} of torch.chunk's split"
            )

    def padded(self, values: Tensor) -> Tensor:
        """The local values placed on the global grid: zeros before ``start % blocksize`` and after
        the end, viewed as ``(global blocks covered, blocksize)``; row ``i`` is global block
        ``start // blocksize + i``."""
        front = self.start % self.blocksize
        back = -(front + self.numel) % self.blocksize
        return torch.nn.functional.pad(values.reshape(-1), (front, back)).view(-1, self.blocksize)

    @property
    def first_global_block(self) -> int:
        return self.start // self.blocksize


# ---------------------------------------------------------------------------------------------
# the step
# ---------------------------------------------------------------------------------------------


def _items(optimizer) -> list[tuple[Tensor, dict, dict, dict]]:
    """``(param, state, hyperparameters, group)`` of every sharded parameter with a gradient; state created."""
    items = []
    for group_index, group in enumerate(optimizer.param_groups):
        group_hyperparameters = None
        for position, p in enumerate(group["params"]):
            if p.grad is None or not is_sharded(p):
                continue
            overrides = optimizer._overrides.get(id(p))
            if overrides is None:
                overrides = optimizer._overrides[id(p)] = optimizer._resolve_overrides(p, group_index, position)
            state = optimizer.state[p]
            if len(state) == 0:
                _init_state(optimizer, p, state, group, overrides)
            if overrides:
                hyperparameters = optimizer._hyperparameters(group, overrides)
            else:
                if group_hyperparameters is None:
                    group_hyperparameters = optimizer._hyperparameters(group, {})
                hyperparameters = group_hyperparameters
            items.append((p, state, hyperparameters, group))
    return items


def _init_state(optimizer, param: Tensor, state: dict, group: dict, overrides: dict) -> None:
    """:meth:`RLion8bit._init_state` (which tensors are 8-bit: by the global size), with ``absmax1``
    per block of the local shard."""
    optimizer._init_state(param, state, group, overrides)
    if "state1" in state:
        local = param.to_local()
        blocks = -(-local.numel() // BLOCKSIZE)
        state["absmax1"] = torch.zeros(blocks, dtype=torch.float32, device=local.device)


def _local_momentum(state: dict) -> Tensor:
    """The local shard's momentum m_{t-1}: dequantised 8-bit state (float32) or the ``exp_avg`` shard."""
    if "state1" not in state:
        return state["exp_avg"].to_local()
    codes = state["state1"].to_local()
    if codes.numel() == 0:
        return torch.zeros(codes.shape, dtype=torch.float32, device=codes.device)
    return bnb_functional.dequantize_blockwise(
        codes, absmax=state["absmax1"], code=state["qmap1"], blocksize=BLOCKSIZE
    )


def _local_statistics(param: Tensor, state: dict, step: int, hp: dict) -> tuple[Tensor, Tensor]:
    """(‖ĉ_t‖² of the local shard, float64; 1.0 if the local gradient holds NaN/inf else 0.0)."""
    grad = param.grad.to_local()
    device = grad.device
    if grad.numel() == 0:
        zero = torch.zeros((), dtype=torch.float64, device=device)
        return zero, zero
    hi, lo = torch.aminmax(grad)
    nonfinite = (~(torch.isfinite(hi) & torch.isfinite(lo))).to(torch.float64)
    if hp["alpha_scaling"] != "rms":
        return torch.zeros((), dtype=torch.float64, device=device), nonfinite
    momentum = _local_momentum(state)
    g = grad.to(momentum.dtype)
    if hp["maximize"]:
        g = -g
    c = torch.lerp(momentum, g, 1.0 - hp["beta1"])  # as rlion_update_ forms ĉ_t
    if hp["bias_correction"]:
        c.div_(1.0 - hp["beta1"] ** step)
    norm = torch.linalg.vector_norm(c, dtype=torch.promote_types(c.dtype, torch.float32))
    return norm.to(torch.float64).square(), nonfinite


def _reduce_over_ranks(items, sums: list[Tensor], flags: list[Tensor]) -> tuple[list[float], list[bool]]:
    """Σ over ranks of each tensor's local ‖ĉ‖² and non-finite flag: one ``all_reduce`` per device mesh."""
    by_mesh: dict[Any, list[int]] = {}
    for i, (p, _, _, _) in enumerate(items):
        # DeviceMesh compares by its ranks and device type: equal meshes (one per fully_shard call,
        # possibly distinct objects) share one all_reduce
        by_mesh.setdefault(p.device_mesh, []).append(i)
    total_sums, any_nonfinite = [0.0] * len(items), [False] * len(items)
    for indices in by_mesh.values():
        mesh = items[indices[0]][0].device_mesh
        vector = torch.stack([sums[i] for i in indices] + [flags[i] for i in indices])
        if vector.device.type != mesh.device_type:  # shards offloaded to CPU, mesh (and NCCL) on the GPU
            vector = vector.to(torch.device(mesh.device_type, getattr(torch, mesh.device_type).current_device()))
        dist.all_reduce(vector, group=mesh.get_group())
        values = vector.tolist()
        for k, i in enumerate(indices):
            total_sums[i], any_nonfinite[i] = values[k], values[len(indices) + k] > 0
    return total_sums, any_nonfinite


def _scale(hp: dict, sum_of_squares: float, numel: int, step: int) -> float:
    """α_t as :func:`hf_rlion.rlion._effective_alpha` computes it, with the RMS over all shards:
    ``α`` (fixed) or ``α / max(RMS(ĉ_t), FLT_MIN)``, capped at ``F · (1 − β1^t)`` (F the largest float32)."""
    bias_divisor = 1.0 - hp["beta1"] ** step if hp["bias_correction"] else 1.0
    alpha, cap = min(hp["alpha"], FLOAT32_MAX), _alpha_cap(bias_divisor)
    if hp["alpha_scaling"] != "rms":
        return min(alpha, cap)
    rms = math.sqrt(sum_of_squares / max(numel, 1))
    return min(alpha / max(rms, _FLT_MIN), cap)


@torch.no_grad()
def step(optimizer) -> None:
    """One step of every sharded parameter of ``optimizer`` (an :class:`RLion8bit`) that has a gradient."""
    items = _items(optimizer)
    if not items:
        return
    steps = [int(state["step"].item()) + 1 for _, state, _, _ in items]
    statistics = [_local_statistics(p, state, s, hp) for (p, state, hp, _), s in zip(items, steps)]
    sums, nonfinite = _reduce_over_ranks(items, [s for s, _ in statistics], [f for _, f in statistics])
    skipped = []
    for (p, state, hp, group), count, sum_of_squares, bad in zip(items, steps, sums, nonfinite):
        if bad:
            if count == 1:  # never stepped: no state, as if it had not been seen
                del optimizer.state[p]
            skipped.append(p)
            continue
        state["step"] += 1
        scale = _scale(hp, sum_of_squares, p.numel(), count)
        local, grad = p.to_local(), p.grad.to_local()
        if local.numel() == 0:
            continue
        if "state1" not in state:
            rlion_update_(local, grad, state["exp_avg"].to_local(), count, scale=scale, **hp)
            continue
        codes = state["state1"].to_local()
        library = optimizer._use_kernel(group, local, grad, {"state1": codes, "qmap1": state["qmap1"]})
        if library is not None:  # the kernel with α_t as its fixed α
            fused_update_many_(
                library, [local], [grad], [codes], [state["absmax1"]], [state["qmap1"]], [count],
                **dict(hp, alpha=scale, alpha_scaling="fixed"),
            )  # fmt: skip
        else:
            rlion8bit_reference_update_(local, grad, codes, state["absmax1"], state["qmap1"], count, scale=scale, **hp)
    optimizer._record_nonfinite(skipped)


# ---------------------------------------------------------------------------------------------
# the checkpoint layout
# ---------------------------------------------------------------------------------------------


def _all_gather_absmax(layout: _ShardLayout, absmax: Tensor) -> Tensor:
    """The whole tensor's absmax (global grid) from aligned shards' local absmax: one ``all_gather``."""
    counts = [-(-n // layout.blocksize) for n in layout.shard_numels]
    padded = torch.zeros(max(counts), dtype=torch.float32, device=absmax.device)
    padded[: absmax.numel()] = absmax
    pieces = [torch.empty_like(padded) for _ in range(layout.world)]
    dist.all_gather(pieces, padded, group=layout.group)
    return torch.cat([piece[:count] for piece, count in zip(pieces, counts)])


def _global_grid(layout: _ShardLayout, codes: Tensor, absmax: Tensor, qmap: Tensor) -> tuple[Tensor, Tensor]:
    """(this shard's codes, the whole tensor's absmax) of the momentum quantised on the global grid."""
    if layout.aligned:
        return codes, _all_gather_absmax(layout, absmax)
    device = absmax.device
    global_absmax = torch.zeros(layout.blocks, dtype=torch.float32, device=device)
    if layout.numel:
        momentum = bnb_functional.dequantize_blockwise(codes, absmax=absmax, code=qmap, blocksize=layout.blocksize)
        padded = layout.padded(momentum)
        first = layout.first_global_block
        global_absmax[first : first + padded.shape[0]] = padded.abs().amax(dim=1)
    dist.all_reduce(global_absmax, op=dist.ReduceOp.MAX, group=layout.group)
    if not layout.numel:
        return codes, global_absmax
    return _quantize_on_grid(layout, momentum, global_absmax, qmap).view_as(codes), global_absmax


def _quantize_on_grid(layout: _ShardLayout, values: Tensor, global_absmax: Tensor, qmap: Tensor) -> Tensor:
    """Codes of the local ``values`` against the given absmax of their global blocks (nearest ``qmap`` entry)."""
    padded = layout.padded(values)
    first = layout.first_global_block
    scale = global_absmax[first : first + padded.shape[0]]
    normalised = torch.where(scale[:, None] > 0, padded / scale.clamp_min(_FLT_MIN)[:, None], 0.0)
    midpoints = 0.5 * (qmap[:-1] + qmap[1:])
    front = layout.start % layout.blocksize
    codes = torch.bucketize(normalised.reshape(-1)[front : front + layout.numel], midpoints)
    return codes.to(torch.uint8)


def portable_state_dict(optimizer, state_dict: dict) -> dict:
    """Replace, in ``optimizer.state_dict()``'s output, the local 8-bit state of each sharded parameter
    by the checkpoint layout of the module docstring. Collective."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, param in enumerate(params):
        entry = state_dict["state"].get(index)
        if entry is None or not is_sharded(param) or "state1" not in entry:
            continue
        layout = _ShardLayout(param, BLOCKSIZE)
        live_codes = entry["state1"].to_local()
        codes, global_absmax = _global_grid(layout, live_codes, entry["absmax1"], entry["qmap1"])
        low, high = layout.block_chunk
        state_dict["state"][index] = dict(
            entry,
            state1=entry["state1"] if codes is live_codes else DTensor.from_local(
                codes, layout.mesh, [Shard(0)], run_check=False, shape=param.shape, stride=param.stride()
            ),
            absmax1=DTensor.from_local(
                global_absmax[low:high].clone(), layout.mesh, [Shard(0)], run_check=False,
                shape=(layout.blocks,), stride=(1,),
            ),
        )  # fmt: skip
    return state_dict


def restore_local_layout(optimizer) -> None:
    """After ``load_state_dict``: turn each sharded parameter's loaded checkpoint-layout state into
    the live layout (local blocks); exact where the shards start at multiples of 256. Collective."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param)
            if not state or not is_sharded(param) or "state1" not in state:
                continue
            layout = _ShardLayout(param, BLOCKSIZE)
            codes, absmax, qmap = state["state1"], state["absmax1"], state["qmap1"]
            local_codes = _local_rows(codes, param, layout)
            global_absmax = absmax.full_tensor() if is_sharded(absmax) else absmax
            global_absmax = global_absmax.to(device=local_codes.device, dtype=torch.float32).reshape(-1)
            if global_absmax.numel() != layout.blocks:
                raise ValueError(
                    f"{type(optimizer).__name__}.load_state_dict: absmax1 of a parameter of shape {tuple(param.shape)} "
                    f"has {global_absmax.numel()} blocks, expected {layout.blocks} (one per 256 elements)"
                )
            qmap = qmap.to(device=local_codes.device, dtype=torch.float32)
            if layout.aligned:
                first = layout.first_global_block
                local_absmax = global_absmax[first : first + layout.local_blocks].clone()
            elif layout.numel:
                padded_codes = layout.padded(local_codes)
                first = layout.first_global_block
                scale = global_absmax[first : first + padded_codes.shape[0]]
                momentum = (qmap[padded_codes.long()] * scale[:, None]).reshape(-1)
                front = layout.start % layout.blocksize
                momentum = momentum[front : front + layout.numel].view_as(local_codes)
                local_codes, local_absmax = quantize_blockwise(momentum, qmap)
                local_codes = local_codes.view_as(param.to_local())
            else:
                local_absmax = torch.zeros(0, dtype=torch.float32, device=local_codes.device)
            state["state1"] = DTensor.from_local(
                local_codes.contiguous(), layout.mesh, [Shard(0)], run_check=False, shape=param.shape,
                stride=param.stride(),
            )  # fmt: skip
            state["absmax1"] = local_absmax.contiguous()
            state["qmap1"] = qmap


def _local_rows(codes: Tensor, param: Tensor, layout: _ShardLayout) -> Tensor:
    """This rank's shard of loaded codes: a ``DTensor``'s local tensor, or the rows of a whole tensor."""
    if codes.dtype != torch.uint8 or tuple(codes.shape) != tuple(param.shape):
        raise ValueError(
            f"RLion8bit.load_state_dict: state1 must be uint8 codes shaped like the parameter {tuple(param.shape)}, "
            f"got {codes.dtype} of shape {tuple(codes.shape)}"
        )
    if is_sharded(codes):
        if tuple(codes.placements) != (Shard(0),) or codes.device_mesh != param.device_mesh:
            codes = codes.redistribute(param.device_mesh, [Shard(0)])
        return codes.to_local()
    flat = codes.reshape(-1)[layout.start : layout.start + layout.numel]
    return flat.view(param.to_local().shape).to(param.to_local().device)
