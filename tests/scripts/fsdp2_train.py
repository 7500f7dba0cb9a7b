"""FSDP2 (torch.distributed.fsdp.fully_shard) on CPU/gloo with RLion: parameters are DTensor shards.

accelerate enables FSDP only for accelerator back-ends (on CPU it silently falls back to DDP),
so this script shards with torch directly. Run with torchrun --nproc_per_node 2.
Saves the full (gathered) weights to OUTPUT_DIR/weights.pt on rank 0.
"""

import argparse
import os

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict, set_optimizer_state_dict, StateDictOptions
from torch.distributed.fsdp import fully_shard

import hf_rlion
from hf_rlion.distributed_exit import exit_distributed_run


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--optim", default="rlion")
    parser.add_argument("--global_batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    model = nn.Sequential(nn.Linear(64, 96), nn.LayerNorm(96), nn.GELU(), nn.Linear(96, 10))
    fully_shard(model)
    optimizer = hf_rlion.create_optimizer(model, args.optim, lr=3e-3, weight_decay=0.01)
    per_rank = args.global_batch // world
    for step in range(args.steps):
        start = step * args.global_batch + rank * per_rank
        xb, yb = x[start : start + per_rank], y[start : start + per_rank]
        loss = nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == args.steps // 2:  # round-trip the sharded optimizer state
            options = StateDictOptions(full_state_dict=False)
            state = get_optimizer_state_dict(model, optimizer, options=options)
            set_optimizer_state_dict(model, optimizer, state, options=options)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        os.makedirs(args.output_dir, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in full.items()}, os.path.join(args.output_dir, "weights.pt"))
    exit_distributed_run()  # not destroy_process_group: see hf_rlion.distributed_exit


if __name__ == "__main__":
    main()
