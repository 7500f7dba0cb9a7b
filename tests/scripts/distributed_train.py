"""Train a small MLP on scikit-learn's digits with accelerate; save each rank's final weights.

Run by tests/test_distributed.py in one process and under 2-rank gloo DDP / FSDP2:

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 tests/scripts/distributed_train.py \
        --optim rlion --global_batch 32 --steps 20 --output_dir OUT
"""

import argparse
import json
import os

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from sklearn.datasets import load_digits
from torch import nn

import hf_rlion
from hf_rlion.distributed_exit import exit_distributed_run


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--optim", default="rlion")
    parser.add_argument("--global_batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--min_8bit_size", type=int, default=None, help="RLion8bit's (default: its own)")
    parser.add_argument("--save_state", action="store_true", help="also round-trip the optimizer state")
    args = parser.parse_args()

    accelerator = Accelerator()
    set_seed(0)
    x, y = load_digits(return_X_y=True)
    data = torch.utils.data.TensorDataset(torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y))
    per_device = args.global_batch // accelerator.num_processes
    loader = torch.utils.data.DataLoader(data, batch_size=per_device, shuffle=False, drop_last=True)
    model = nn.Sequential(nn.Linear(64, 96), nn.LayerNorm(96), nn.GELU(), nn.Linear(96, 10))
    model, loader = accelerator.prepare(model, loader)  # FSDP needs the model wrapped before the optimizer
    options = {} if args.min_8bit_size is None else {"min_8bit_size": args.min_8bit_size}
    optimizer = accelerator.prepare(hf_rlion.create_optimizer(model, args.optim, lr=3e-3, weight_decay=0.01, **options))

    losses, step = [], 0
    while step < args.steps:
        for xb, yb in loader:
            loss = nn.functional.cross_entropy(model(xb), yb)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(accelerator.gather(loss.detach()).mean().item())
            step += 1
            if args.save_state and step == args.steps // 2:
                accelerator.save_state(os.path.join(args.output_dir, "state"))
                accelerator.wait_for_everyone()
                accelerator.load_state(os.path.join(args.output_dir, "state"))
            if step >= args.steps:
                break

    full = accelerator.get_state_dict(model)
    os.makedirs(args.output_dir, exist_ok=True)
    if accelerator.is_main_process:
        torch.save({k: v.detach().cpu() for k, v in full.items()}, os.path.join(args.output_dir, "weights.pt"))
    local = {n: p.detach().cpu().clone() for n, p in accelerator.unwrap_model(model).named_parameters()}
    torch.save(local, os.path.join(args.output_dir, f"rank{accelerator.process_index}.pt"))
    if accelerator.is_main_process:
        with open(os.path.join(args.output_dir, "run.json"), "w") as f:
            json.dump({"num_processes": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
                       "losses": losses}, f)
    exit_distributed_run()  # a gloo rank may otherwise abort at interpreter exit (see hf_rlion.distributed_exit)


if __name__ == "__main__":
    main()
