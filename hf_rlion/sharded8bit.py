r""":class:`~hf_rlion.RLion8bit` on FSDP2-sharded parameters: the step and the checkpoint layout.

FSDP2 (``torch.distributed.fsdp.fully_shard``) hands the optimizer ``DTensor`` parameters on a
1-D device mesh with placement ``Shard(0)``: rank ``r`` holds rows ``[r·⌈R/W⌉, (r+1)·⌈R/W⌉)`` of
dim 0 (``torch.chunk``'s split; the last ranks may hold fewer rows or none), which is one
contiguous range ``[start, end)`` of the flattened tensor.

**The state: one process's blocks.** The 8-bit momentum of a sharded tensor is quantised on the
blocks ONE process would use: 256-element blocks of the flattened whole tensor. Each rank keeps

- ``state1``: uint8 codes of its own elements, a ``DTensor`` sharded like the parameter;
- ``absmax1``: a plain float32 tensor with the absmax of every block its range ``[start, end)``
  touches, ``⌈end/256⌉ − ⌊start/256⌋`` entries. A block that straddles two ranks (a shard that
  does not start or end on a multiple of 256) has its absmax on both, equal;
- ``qmap1`` and ``step`` as in :class:`RLion8bit`; tensors with RLion's 32-bit state keep
  ``exp_avg`` as a ``DTensor``.

Gathered, the codes and absmax are bit for bit those of a one-process :class:`RLion8bit` holding
the same momentum, whatever the number of ranks.

**The step.** Three things of the rule are per whole tensor or per block and need the other shards:

- ``alpha_scaling="rms"``: ``α_t = α / RMS(ĉ_t)`` with the RMS over the whole tensor;
- the non-finite policy: a tensor with NaN/inf anywhere in its gradient is not updated at all;
- the absmax of a straddling block of the new momentum ``m_t``.

So a step makes two passes over the local shards. The first computes, per tensor, the float32
norm of the local ``ĉ_t`` (squared in float64), whether the local gradient holds NaN/inf, and the
local absmax of ``m_t`` on the (at most two) straddling blocks. These six numbers per tensor, for
all sharded tensors of the step, are exchanged in ONE ``all_gather`` per device mesh and combined
in rank order (sums added, flags or-ed, absmax max-ed). The second pass skips tensors with a
non-finite flag on any rank and updates the others with ``α_t = min(α / max(RMS, FLT_MIN), cap)``,
``RMS = sqrt(Σ_ranks ‖ĉ‖² / numel)`` as a fixed α: the blocks wholly inside the shard (a
contiguous range) by the device's fused kernel (the Triton kernels on GPUs, or under Triton's
interpreter with ``fused=True`` where the C kernel is off; the C kernel on CPU) or by
:func:`hf_rlion.reference8bit.rlion8bit_reference_update_`; the straddling pieces (under 256
elements each) by the reference update, quantised against the combined absmax with the same
code rule as the kernel (nearest code for Triton, bitsandbytes' ``quantize_blockwise`` otherwise).
Temporaries stay the size of one local shard.

**The checkpoint layout** (what :meth:`RLion8bit.state_dict` returns for a sharded tensor, so what
``torch.distributed.checkpoint`` saves), as ``DTensor`` s DCP can reshard to any number of ranks:

- ``state1``: the live uint8 codes, a ``DTensor`` with the parameter's shape and placement;
- ``absmax1``: float32, shape ``(⌈numel/256⌉,)``, a ``DTensor`` with placement ``Shard(0)``.

Gathered (``full_state_dict=True``) this is exactly a one-process :class:`RLion8bit` state. Saving
and loading move no value: a checkpoint loads bit for bit on any number of ranks, and a
one-process state loads onto shards bit for bit. ``state_dict()`` and ``load_state_dict()`` are
collective (every rank calls them, as DCP's ``get/set_optimizer_state_dict`` do): the absmax of a
tensor is combined with one ``all_reduce`` (``numel/64`` bytes).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor, Shard = None, None

__all__ = ["is_sharded", "check_supported", "step", "local_momentum", "portable_state_dict", "restore_local_layout"]

from ._bitsandbytes import bnb_functional
from ._optimizer_base import BLOCKSIZE, on_mesh_device
from .kernels import dispatch
from .kernels.cpu_rlion8bit import fused_update_many_, kernel_available
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
    """Where this rank's shard of a ``Shard(0)`` ``DTensor`` lies in the flattened tensor, and on its blocks.

    ``start``/``numel``: the shard's range of elements; ``blocks``: blocks of the whole tensor;
    ``first_block``/``touched``: the blocks the shard's range touches (``absmax1`` holds these);
    ``edges``: ``(offset, length, index in absmax1)`` of the shard's pieces of blocks it shares
    with another rank (at most two, each under ``blocksize`` elements); ``interior``: the range of
    the shard between them, whose blocks (``absmax1[interior_blocks[0]:interior_blocks[1]]``) are
    whole blocks of this rank, or the tensor's last, short block; ``block_chunk``: this rank's range
    of blocks in a ``Shard(0)`` ``DTensor`` of ``blocks`` entries (the checkpoint's ``absmax1``).
    """

    def __init__(self, param: Tensor, blocksize: int):
        mesh = param.device_mesh
        self.mesh, self.group = mesh, mesh.get_group()
        world, rank = mesh.size(), mesh.get_local_rank()
        rows, total = param.shape[0], param.numel()
        row_numel = total // rows if rows else 0
        per_rank = -(-rows // world)
        first_row, last_row = min(rank * per_rank, rows), min((rank + 1) * per_rank, rows)
        self.start, self.numel = first_row * row_numel, (last_row - first_row) * row_numel
        self.blocksize, self.world = blocksize, world
        self.blocks = -(-total // blocksize)
        per_rank_blocks = -(-self.blocks // world)
        self.block_chunk = (min(rank * per_rank_blocks, self.blocks), min((rank + 1) * per_rank_blocks, self.blocks))
        end = self.start + self.numel
        self.first_block = self.start // blocksize
        self.touched = -(-end // blocksize) - self.first_block if self.numel else 0
        head = min(self.numel, -self.start % blocksize)  # the rest of a block begun on an earlier rank
        tail = end % blocksize if self.numel > head and end != total else 0  # a block ended on a later rank
        self.edges = [(0, head, 0)] if head else []
        if tail:
            self.edges.append((self.numel - tail, tail, self.touched - 1))
        self.interior = (head, self.numel - tail)
        self.interior_blocks = (1 if head else 0, self.touched - (1 if tail else 0))
        local = param.to_local()
        if local.numel() != self.numel:
            raise RuntimeError(
                f"a Shard(0) DTensor of shape {tuple(param.shape)} has {local.numel()} local elements on rank "
                f"{rank} of {world}, not the {self.numel} of torch.chunk's split"
            )


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
    for the blocks the local shard touches."""
    optimizer._init_state(param, state, group, overrides)
    if "state1" in state:
        touched = _ShardLayout(param, BLOCKSIZE).touched
        state["absmax1"] = torch.zeros(touched, dtype=torch.float32, device=param.to_local().device)


def _dequantize_piece(codes: Tensor, absmax: Tensor, qmap: Tensor) -> Tensor:
    """``qmap[code] · absmax`` for codes of one block (bitsandbytes' ``dequantize_blockwise``, elementwise)."""
    return qmap[codes.long()] * absmax


def local_momentum(param: Tensor, state: dict, layout: _ShardLayout | None = None) -> Tensor:
    """The local shard's momentum m_{t-1}, flattened: the dequantised 8-bit state (float32) or the
    ``exp_avg`` shard. ``layout``: the parameter's :class:`_ShardLayout`, if the caller has it."""
    if "state1" not in state:
        return state["exp_avg"].to_local().reshape(-1)
    layout = layout or _ShardLayout(param, BLOCKSIZE)
    codes, absmax, qmap = state["state1"].to_local().reshape(-1), state["absmax1"], state["qmap1"]
    momentum = torch.empty(codes.numel(), dtype=torch.float32, device=codes.device)
    low, high = layout.interior
    if high > low:
        first, last = layout.interior_blocks
        momentum[low:high] = bnb_functional.dequantize_blockwise(
            codes[low:high], absmax=absmax[first:last], code=qmap, blocksize=BLOCKSIZE
        )
    for offset, length, index in layout.edges:
        momentum[offset : offset + length] = _dequantize_piece(codes[offset : offset + length], absmax[index], qmap)
    return momentum


def _local_statistics(param: Tensor, state: dict, layout, kernel, step: int, hp: dict) -> tuple[Tensor, Tensor, list]:
    """(‖ĉ_t‖² of the local shard, float64; 1.0 if the local gradient holds NaN/inf else 0.0;
    ``[(block, local absmax of m_t)]`` of the blocks shared with other ranks). ``layout`` and
    ``kernel``: the shard's :class:`_ShardLayout` and :func:`_local_kernel` choice (``None`` for
    32-bit state)."""
    grad = param.grad.to_local()
    zero = torch.zeros((), dtype=torch.float64, device=grad.device)
    if grad.numel() == 0:
        return zero, zero, []
    hi, lo = torch.aminmax(grad)
    nonfinite = (~(torch.isfinite(hi) & torch.isfinite(lo))).to(torch.float64)
    edges = layout.edges if layout is not None else []
    if hp["alpha_scaling"] != "rms" and not edges:
        return zero, nonfinite, []
    momentum, flat_grad = local_momentum(param, state, layout), grad.reshape(-1)
    sum_of_squares = zero
    if hp["alpha_scaling"] == "rms":
        g = flat_grad.to(momentum.dtype)
        if hp["maximize"]:
            g = -g
        c = torch.lerp(momentum, g, 1.0 - hp["beta1"])  # as rlion_update_ forms ĉ_t
        if hp["bias_correction"]:
            c.div_(1.0 - hp["beta1"] ** step)
        sum_of_squares = torch.linalg.vector_norm(c, dtype=torch.promote_types(c.dtype, torch.float32))
        sum_of_squares = sum_of_squares.to(torch.float64).square()
    shared = []
    if edges:
        flat_param = param.to_local().reshape(-1)
        for offset, length, index in edges:
            piece = slice(offset, offset + length)
            new_momentum = momentum[piece].clone()  # m_t as the update will form it (it does not depend on α_t)
            _edge_update(flat_param[piece].clone(), flat_grad[piece], new_momentum, step, 1.0, hp, kernel)
            shared.append((layout.first_block + index, new_momentum.abs().amax().to(torch.float64)))
    return sum_of_squares, nonfinite, shared


def _edge_update(param: Tensor, grad: Tensor, momentum: Tensor, step: int, scale: float, hp: dict, kernel: str) -> None:
    """:func:`rlion_update_` with α_t = ``scale`` on a piece of a shared block, in place; the new
    momentum formed with the arithmetic of the kernel that steps the other blocks (Triton's own
    for ``kernel == "triton"``; the C kernel's equals torch's)."""
    previous = momentum.clone() if kernel == "triton" else None
    rlion_update_(param, grad, momentum, step, scale=scale, **hp)
    if previous is not None:
        from .kernels.triton_rlion8bit import new_momentum

        momentum.copy_(new_momentum(previous, grad, hp["beta2"], hp["maximize"]))


def _combine_over_ranks(items, statistics) -> list[tuple[float, bool, dict[int, float]]]:
    """Per tensor: (Σ over ranks of ‖ĉ‖², whether any rank's gradient holds NaN/inf, {shared block:
    absmax of m_t over all ranks}). One ``all_gather`` per device mesh; combined in rank order."""
    by_mesh: dict[Any, list[int]] = {}
    for i, (p, _, _, _) in enumerate(items):
        # DeviceMesh compares by its ranks and device type: equal meshes (one per fully_shard call,
        # possibly distinct objects) share one all_gather
        by_mesh.setdefault(p.device_mesh, []).append(i)
    combined: list = [None] * len(items)
    for indices in by_mesh.values():
        mesh = items[indices[0]][0].device_mesh
        values, blocks = [], []  # per tensor: (‖ĉ‖², flag, absmax, absmax) on the device; (block, block)
        for i in indices:
            sum_of_squares, nonfinite, shared = statistics[i]
            shared = shared + [(-1, torch.zeros_like(sum_of_squares))] * (2 - len(shared))  # -1: no block
            values += [sum_of_squares, nonfinite, shared[0][1], shared[1][1]]
            blocks += [float(shared[0][0]), float(shared[1][0])]
        device_values = torch.stack(values).view(-1, 4)
        block_values = torch.tensor(blocks, dtype=torch.float64, device=device_values.device).view(-1, 2)
        vector = on_mesh_device(torch.cat([device_values, block_values], dim=1).reshape(-1), mesh)
        gathered = [torch.empty_like(vector) for _ in range(mesh.size())]
        dist.all_gather(gathered, vector, group=mesh.get_group())
        table = torch.stack(gathered).view(mesh.size(), len(indices), 6).tolist()
        for k, i in enumerate(indices):
            total, nonfinite, shared = 0.0, False, {}
            for rank_rows in table:
                sum_of_squares, flag, first_absmax, last_absmax, first_block, last_block = rank_rows[k]
                total += sum_of_squares
                nonfinite = nonfinite or flag > 0
                for block, absmax in ((first_block, first_absmax), (last_block, last_absmax)):
                    if block >= 0:
                        shared[int(block)] = max(shared.get(int(block), 0.0), absmax)
            combined[i] = (total, nonfinite, shared)
    return combined


def _scale(hp: dict, sum_of_squares: float, numel: int, step: int) -> float:
    """α_t as :func:`hf_rlion.rlion._effective_alpha` computes it, with the RMS over all shards:
    ``α`` (fixed) or ``α / max(RMS(ĉ_t), FLT_MIN)``, capped at ``F · (1 − β1^t)`` (F the largest float32)."""
    bias_divisor = 1.0 - hp["beta1"] ** step if hp["bias_correction"] else 1.0
    alpha, cap = min(hp["alpha"], FLOAT32_MAX), _alpha_cap(bias_divisor)
    if hp["alpha_scaling"] != "rms":
        return min(alpha, cap)
    rms = math.sqrt(sum_of_squares / max(numel, 1))
    return min(alpha / max(rms, _FLT_MIN), cap)


def _local_kernel(optimizer, group: dict, local: Tensor, grad: Tensor, codes: Tensor, qmap: Tensor):
    """Which kernel steps this rank's whole blocks: ``("triton", None)``, ``("c", library)`` or
    ``("reference", None)``; the same choice :class:`RLion8bit` makes for a plain tensor of this device."""
    fused = group["fused"]
    if fused is False:
        return "reference", None
    triton_takes = (
        dispatch.triton_device(local.device) and local.dtype in dispatch.TRITON_PARAM_DTYPES and grad.dtype == local.dtype
    )
    if local.device.type != "cpu":
        if triton_takes:
            return "triton", None
        if fused:
            raise RuntimeError(
                f"{type(optimizer).__name__}(fused=True): the Triton kernel cannot step a {local.dtype} shard with "
                f"{grad.dtype} gradients on {local.device}"
            )
        return "reference", None
    if fused and triton_takes and not kernel_available():  # CPU tensors under Triton's interpreter
        return "triton", None
    library = optimizer._use_kernel(group, local, grad, {"state1": codes, "qmap1": qmap})
    return ("c", library) if library is not None else ("reference", None)


def _quantize_shared_piece(values: Tensor, absmax: Tensor, qmap: Tensor, nearest: bool) -> Tensor:
    """Codes of a piece (< 256 values) of a block whose absmax over all ranks is ``absmax``: the
    piece is quantised as a block of its own holding also ``absmax`` itself (so the block's absmax
    is the shared one), by the rule of the kernel that steps the rest (Triton's nearest code, or
    bitsandbytes' ``quantize_blockwise``)."""
    block = values.new_zeros(BLOCKSIZE)
    block[: values.numel()] = values
    block[-1] = absmax
    if nearest:
        from .kernels.triton_rlion8bit import quantize_blockwise as quantize_nearest_blockwise

        codes, _ = quantize_nearest_blockwise(block, qmap)
    else:
        codes, _ = quantize_blockwise(block, qmap)
    return codes[: values.numel()]


def _update_8bit_shard(param, state, layout, kernel, library, step_count, scale, hp, shared_absmax) -> None:
    """Step this rank's shard of an 8-bit tensor with α_t = ``scale``: shared pieces by the reference
    update against the combined absmax, the whole blocks between them by ``kernel`` (:func:`_local_kernel`)."""
    local, grad = param.to_local(), param.grad.to_local()
    codes, absmax, qmap = state["state1"].to_local(), state["absmax1"], state["qmap1"]
    flat_param, flat_grad, flat_codes = local.view(-1), grad.reshape(-1), codes.view(-1)
    for offset, length, index in layout.edges:
        piece = slice(offset, offset + length)
        momentum = _dequantize_piece(flat_codes[piece], absmax[index], qmap)
        _edge_update(flat_param[piece], flat_grad[piece], momentum, step_count, scale, hp, kernel)
        new_absmax = torch.tensor(shared_absmax[layout.first_block + index], dtype=torch.float32, device=absmax.device)
        flat_codes[piece] = _quantize_shared_piece(momentum, new_absmax, qmap, nearest=kernel == "triton")
        absmax[index] = new_absmax
    low, high = layout.interior
    if high <= low:
        return
    first, last = layout.interior_blocks
    tensors = (flat_param[low:high], flat_grad[low:high], flat_codes[low:high], absmax[first:last])
    fixed = dict(hp, alpha=scale, alpha_scaling="fixed")  # the kernels take α_t as a fixed α
    if kernel == "triton":
        from .kernels.triton_rlion8bit import fused_rlion8bit

        fused_rlion8bit(*([t] for t in tensors), qmap, [step_count], check_finite=False, **fixed)
    elif kernel == "c":
        fused_update_many_(library, *([t] for t in tensors), [qmap], [step_count], **fixed)
    else:
        rlion8bit_reference_update_(*tensors, qmap, step_count, scale=scale, **hp)


@torch.no_grad()
def step(optimizer) -> None:
    """One step of every sharded parameter of ``optimizer`` (an :class:`RLion8bit`) that has a gradient."""
    items = _items(optimizer)
    if not items:
        return
    steps = [int(state["step"].item()) + 1 for _, state, _, _ in items]
    # per 8-bit shard, once a step: where it lies on the blocks, and which kernel steps it
    layouts = [_ShardLayout(p, BLOCKSIZE) if "state1" in state else None for p, state, _, _ in items]
    kernels = [
        _local_kernel(optimizer, group, p.to_local(), p.grad.to_local(), state["state1"].to_local(), state["qmap1"])
        if layout is not None and layout.numel
        else (None, None)
        for (p, state, _, group), layout in zip(items, layouts)
    ]
    statistics = [
        _local_statistics(p, state, layout, kernel, s, hp)
        for (p, state, hp, _), layout, (kernel, _), s in zip(items, layouts, kernels, steps)
    ]
    skipped = []
    for (p, state, hp, _), layout, (kernel, library), count, (sum_of_squares, bad, shared) in zip(
        items, layouts, kernels, steps, _combine_over_ranks(items, statistics)
    ):
        if bad:
            if count == 1:  # never stepped: no state, as if it had not been seen
                del optimizer.state[p]
            skipped.append(p)
            continue
        state["step"] += 1
        scale = _scale(hp, sum_of_squares, p.numel(), count)
        if p.to_local().numel() == 0:
            continue
        if "state1" not in state:
            rlion_update_(p.to_local(), p.grad.to_local(), state["exp_avg"].to_local(), count, scale=scale, **hp)
        else:
            _update_8bit_shard(p, state, layout, kernel, library, count, scale, hp, shared)
    optimizer._record_nonfinite(skipped)


# ---------------------------------------------------------------------------------------------
# the checkpoint layout
# ---------------------------------------------------------------------------------------------


def portable_state_dict(optimizer, state_dict: dict) -> dict:
    """Replace, in ``optimizer.state_dict()``'s output, each sharded parameter's ``absmax1`` (the
    blocks its shard touches) by the whole tensor's, sharded as a ``DTensor``. Collective."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, param in enumerate(params):
        entry = state_dict["state"].get(index)
        if entry is None or not is_sharded(param) or "state1" not in entry:
            continue
        layout = _ShardLayout(param, BLOCKSIZE)
        local_absmax = entry["absmax1"]
        whole = torch.zeros(layout.blocks, dtype=torch.float32, device=local_absmax.device)
        whole[layout.first_block : layout.first_block + layout.touched] = local_absmax
        whole = on_mesh_device(whole, layout.mesh)
        dist.all_reduce(whole, op=dist.ReduceOp.MAX, group=layout.group)  # shared blocks: equal on both ranks
        whole = whole.to(local_absmax.device)
        low, high = layout.block_chunk
        state_dict["state"][index] = dict(
            entry,
            absmax1=DTensor.from_local(
                whole[low:high].clone(), layout.mesh, [Shard(0)], run_check=False, shape=(layout.blocks,), stride=(1,)
            ),
        )
    return state_dict


def restore_local_layout(optimizer) -> None:
    """After ``load_state_dict``: each sharded parameter's loaded state (checkpoint layout, or a
    one-process state) in the live layout: its rows of the codes, the absmax of the blocks they touch."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param)
            if not state or not is_sharded(param) or "state1" not in state:
                continue
            layout = _ShardLayout(param, BLOCKSIZE)
            local_codes = _local_rows(state["state1"], param, layout)
            absmax = state["absmax1"]
            whole = absmax.full_tensor() if is_sharded(absmax) else absmax
            whole = whole.to(device=local_codes.device, dtype=torch.float32).reshape(-1)
            if whole.numel() != layout.blocks:
                raise ValueError(
                    f"{type(optimizer).__name__}.load_state_dict: absmax1 of a parameter of shape {tuple(param.shape)} "
                    f"has {whole.numel()} blocks, expected {layout.blocks} (one per 256 elements)"
                )
            state["state1"] = DTensor.from_local(
                local_codes.contiguous(), layout.mesh, [Shard(0)], run_check=False, shape=param.shape,
                stride=param.stride(),
            )  # fmt: skip
            state["absmax1"] = whole[layout.first_block : layout.first_block + layout.touched].clone()
            state["qmap1"] = state["qmap1"].to(device=local_codes.device, dtype=torch.float32)


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
