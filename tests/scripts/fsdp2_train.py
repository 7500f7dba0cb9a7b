"""FSDP2 (torch.distributed.fsdp.fully_shard) on CPU/gloo with RLion or RLion8bit: parameters are DTensor shards.

accelerate enables FSDP only for accelerator back-ends (on CPU it silently falls back to DDP),
so this script shards with torch directly. Run with torchrun --nproc_per_node N.
Saves the full (gathered) weights to OUTPUT_DIR/weights.pt on rank 0, and per rank
OUTPUT_DIR/rank{r}.json (losses, NaN/inf skips, 8-bit state bytes of this rank's shards).

Checkpoints (torch.distributed.checkpoint.state_dict): ``--save_at K`` saves model and optimizer
after step K to OUTPUT_DIR/checkpoint_{format} for each of ``--checkpoint_format`` (``sharded``:
``dcp.save``; ``full``: gathered, ``torch.save`` by rank 0; ``sharded,full``: both);
``--resume_from DIR`` loads one (of the one format given) and continues from its step, on any
number of ranks. ``--dump_momentum`` writes each rank's dequantised 8-bit momentum (with its
offset in the flattened tensor) right after a save and right after a resume.
"""

import argparse
import copy
import json
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from sklearn.datasets import load_digits
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard

import hf_rlion
from hf_rlion.distributed_exit import exit_distributed_run


def _options(checkpoint_format):
    return StateDictOptions(full_state_dict=checkpoint_format == "full", cpu_offload=checkpoint_format == "full")


def save(model, optimizer, step, directory, checkpoint_format):
    options = _options(checkpoint_format)
    state = {"model": get_model_state_dict(model, options=options),
             "optim": get_optimizer_state_dict(model, optimizer, options=options)}  # fmt: skip
    if checkpoint_format == "sharded":
        dcp.save(state, checkpoint_id=directory)
    elif dist.get_rank() == 0:
        os.makedirs(directory, exist_ok=True)
        torch.save(state, os.path.join(directory, "full.pt"))
    if dist.get_rank() == 0:
        with open(os.path.join(directory, "step.json"), "w") as f:
            json.dump({"step": step}, f)
    dist.barrier()


def resume(model, optimizer, directory, checkpoint_format):
    options = _options(checkpoint_format)
    if checkpoint_format == "sharded":
        state = {"model": get_model_state_dict(model, options=options),
                 "optim": get_optimizer_state_dict(model, optimizer, options=options)}  # fmt: skip
        dcp.load(state, checkpoint_id=directory)
    else:
        state = torch.load(os.path.join(directory, "full.pt"), weights_only=True)
        options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, state["model"], options=options)
    set_optimizer_state_dict(model, optimizer, state["optim"], options=options)
    with open(os.path.join(directory, "step.json")) as f:
        return json.load(f)["step"]


def dump_momentum(model, optimizer, path):
    """{name: (offset of this rank's shard in the flattened tensor, its dequantised momentum)}."""
    from hf_rlion import sharded8bit
    from hf_rlion.rlion8bit import BLOCKSIZE

    dumped = {}
    for name, p in model.named_parameters():
        state = optimizer.state.get(p, {})
        if "state1" in state:
            dumped[name] = (sharded8bit._ShardLayout(p, BLOCKSIZE).start, sharded8bit.local_momentum(p, state).clone())
    torch.save(dumped, path)


def eight_bit_bytes(model, optimizer):
    """(bytes of codes + absmax, elements) of this rank's shards of the 8-bit tensors, and their local dtypes/shapes."""
    state_bytes, numel, layouts = 0, 0, {}
    for name, p in model.named_parameters():
        state = optimizer.state.get(p, {})
        if "state1" not in state:
            continue
        codes = state["state1"].to_local()
        state_bytes += codes.numel() * codes.element_size() + state["absmax1"].numel() * state["absmax1"].element_size()
        numel += p.to_local().numel()
        layouts[name] = {"codes_dtype": str(codes.dtype), "codes_shape": list(codes.shape),
                         "param_local_shape": list(p.to_local().shape), "param_shape": list(p.shape)}  # fmt: skip
    return state_bytes, numel, layouts


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--optim", default="rlion")
    parser.add_argument("--min_8bit_size", type=int, default=None, help="RLion8bit's (default: its own)")
    parser.add_argument("--global_batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--roundtrip", choices=["sharded", "full", "none"], default="sharded",
                        help="get/set the optimizer state dict in the middle of the run")  # fmt: skip
    parser.add_argument("--save_at", type=int, default=None)
    parser.add_argument("--resume_from", default=None)
    parser.add_argument("--checkpoint_format", default="sharded", help="sharded, full or sharded,full")
    parser.add_argument("--dump_momentum", action="store_true")
    parser.add_argument("--reference", action="store_true",
                        help="rank 0 also trains an unsharded copy, one process on the whole batch")  # fmt: skip
    parser.add_argument("--nan_at", type=int, default=None, help="make rank 1's shard of the first weight's gradient NaN")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    model = nn.Sequential(nn.Linear(64, 96), nn.LayerNorm(96), nn.GELU(), nn.Linear(96, 10))
    options = {} if args.min_8bit_size is None else {"min_8bit_size": args.min_8bit_size}
    reference = copy.deepcopy(model) if args.reference and rank == 0 else None
    if reference is not None:
        reference_optimizer = hf_rlion.create_optimizer(reference, args.optim, lr=3e-3, weight_decay=0.01, **options)
    fully_shard(model)
    optimizer = hf_rlion.create_optimizer(model, args.optim, lr=3e-3, weight_decay=0.01, **options)
    os.makedirs(args.output_dir, exist_ok=True)
    first_step, report = 0, {"losses": []}
    if args.resume_from:
        first_step = resume(model, optimizer, args.resume_from, args.checkpoint_format)
        if args.dump_momentum:
            dump_momentum(model, optimizer, os.path.join(args.output_dir, f"momentum_resumed_rank{rank}.pt"))
    per_rank = args.global_batch // world
    for step in range(first_step, args.steps):
        start = step * args.global_batch + rank * per_rank
        xb, yb = x[start : start + per_rank], y[start : start + per_rank]
        loss = nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        if step == args.nan_at:
            weight = model[0].weight
            if rank == 1:
                weight.grad.to_local()[0, 0] = float("nan")
            before = [p.to_local().clone() for p in model.parameters()]
        optimizer.step()
        optimizer.zero_grad()
        if step == args.nan_at:
            report["changed_at_nan_step"] = {
                name: not torch.equal(b, p.to_local()) for (name, p), b in zip(model.named_parameters(), before)
            }
        report["losses"].append(loss.item())
        if reference is not None:
            batch = slice(step * args.global_batch, (step + 1) * args.global_batch)
            nn.functional.cross_entropy(reference(x[batch]), y[batch]).backward()
            if step == args.nan_at and world > 1:  # the element that is [0, 0] of rank 1's shard
                reference[0].weight.grad[-(-reference[0].weight.shape[0] // world), 0] = float("nan")
            reference_optimizer.step()
            reference_optimizer.zero_grad()
        if args.roundtrip != "none" and step == args.steps // 2:  # round-trip the optimizer state in place
            options = StateDictOptions(full_state_dict=args.roundtrip == "full")
            state = get_optimizer_state_dict(model, optimizer, options=options)
            set_optimizer_state_dict(model, optimizer, state, options=options)
        if args.save_at is not None and step + 1 == args.save_at:
            for checkpoint_format in args.checkpoint_format.split(","):
                directory = os.path.join(args.output_dir, f"checkpoint_{checkpoint_format}")
                save(model, optimizer, step + 1, directory, checkpoint_format)
            if args.dump_momentum:
                dump_momentum(model, optimizer, os.path.join(args.output_dir, f"momentum_saved_rank{rank}.pt"))
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save({k: v.detach().cpu() for k, v in full.items()}, os.path.join(args.output_dir, "weights.pt"))
    if reference is not None:
        torch.save({k: v.detach() for k, v in reference.state_dict().items()}, os.path.join(args.output_dir, "reference.pt"))
    if args.optim == "rlion_8bit":
        state_bytes, numel, layouts = eight_bit_bytes(model, optimizer)
        report.update(eight_bit_state_bytes=state_bytes, eight_bit_numel=numel, layouts=layouts,
                      nonfinite_skips=optimizer.nonfinite_skips,
                      steps={n: optimizer.state[p]["step"].item() for n, p in model.named_parameters()})  # fmt: skip
    with open(os.path.join(args.output_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    exit_distributed_run()  # not destroy_process_group: see hf_rlion.distributed_exit


if __name__ == "__main__":
    main()
