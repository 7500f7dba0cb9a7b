"""RLion8bit on FSDP2 shards against one process, on the same gradients: run with torchrun --nproc_per_node N.

Every rank builds the same parameters (shapes whose shards start and end inside 256-element blocks,
shards smaller than a block, ranks with no rows), shards a copy with ``fully_shard`` and keeps an
unsharded copy. Each step gives both copies the same gradients (random, some blocks tiny, some
zero), steps a sharded RLion8bit and a one-process RLion8bit, and compares the gathered 8-bit
state (``state_dict()``: codes and absmax of the whole tensor) and the parameters with the
one-process ones. Then the sharded state goes through ``state_dict()`` → ``load_state_dict()`` of a
fresh sharded optimizer and the one-process state is loaded into a sharded optimizer, and both must
give the same state again.

``--configs`` lists ``FUSED:ALPHA_SCALING[:DTYPE]`` entries, run one after the other (``FUSED`` the
optimizers' ``fused``: ``none`` is each device's choice; ``DTYPE`` the parameters' and gradients',
float32 by default). Under Triton's interpreter (``TRITON_INTERPRET=1``,
``HF_RLION_NATIVE=0``) ``true:...`` steps the shards with the Triton kernels. Rank 0 writes
OUTPUT_DIR/report.json: per configuration, per step, whether the whole state equals the one-process
state and the largest parameter difference.
"""

import argparse
import json
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import distribute_tensor

from hf_rlion import RLion8bit
from hf_rlion.distributed_exit import exit_distributed_run

SHAPES = {"odd": (37, 29), "tiny_rows": (7, 45), "fewer_rows_than_ranks": (2, 300), "vector": (1000,), "aligned": (64, 32)}


class Parameters(nn.Module):
    def __init__(self):
        super().__init__()
        for name, shape in SHAPES.items():
            self.register_parameter(name, nn.Parameter(torch.randn(shape)))


def gradient(shape, step, index, dtype):
    generator = torch.Generator().manual_seed(1000 * step + index)
    g = torch.randn(shape, generator=generator).to(dtype)
    flat = g.view(-1)
    flat[:256] *= 1e-30 if step % 2 else 0.0  # a tiny or zero first block
    return g


def whole_state(optimizer, params):
    """{index: (codes, absmax)} of the whole tensors, gathered from optimizer.state_dict()."""
    state = optimizer.state_dict()["state"]
    out = {}
    for index, p in enumerate(params):
        entry = state[index]
        codes, absmax = entry["state1"], entry["absmax1"]
        codes = codes.full_tensor() if hasattr(codes, "full_tensor") else codes
        absmax = absmax.full_tensor() if hasattr(absmax, "full_tensor") else absmax
        out[index] = (codes.reshape(-1).clone(), absmax.reshape(-1).clone())
    return out


def compare(sharded_state, reference_state):
    return all(
        torch.equal(sharded_state[i][0], reference_state[i][0]) and torch.equal(sharded_state[i][1], reference_state[i][1])
        for i in reference_state
    )


def run(fused, alpha_scaling, dtype, steps):
    """One configuration: the report of the module docstring."""
    torch.manual_seed(0)
    model = Parameters().to(dtype)
    reference = [p.detach().clone() for p in model.parameters()]
    fully_shard(model)
    params = list(model.parameters())
    options = dict(lr=1e-2, weight_decay=0.1, min_8bit_size=1, fused=fused, alpha_scaling=alpha_scaling)
    optimizer, reference_optimizer = RLion8bit(params, **options), RLion8bit(reference, **options)
    report = {"state_equal": [], "params_max_difference": []}
    for step in range(steps):
        for index, (p, q) in enumerate(zip(params, reference)):
            g = gradient(q.shape, step, index, dtype)
            q.grad = g.clone()
            p.grad = distribute_tensor(g, p.device_mesh, p.placements)
        optimizer.step()
        reference_optimizer.step()
        report["state_equal"].append(compare(whole_state(optimizer, params), whole_state(reference_optimizer, reference)))
        report["params_max_difference"].append(max((p.full_tensor() - q).abs().max().item() for p, q in zip(params, reference)))
    saved = whole_state(optimizer, params)
    fresh = RLion8bit(params, **options)
    fresh.load_state_dict(optimizer.state_dict())
    report["reloaded_equal"] = compare(whole_state(fresh, params), saved)
    from_one_process = RLion8bit(params, **options)
    from_one_process.load_state_dict(reference_optimizer.state_dict())
    report["one_process_state_loads_equal"] = compare(
        whole_state(from_one_process, params), whole_state(reference_optimizer, reference)
    )
    local_numels = [None] * dist.get_world_size()
    dist.all_gather_object(local_numels, [p.to_local().numel() for p in params])
    report["local_numels"] = local_numels  # [rank][tensor]
    return report


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--configs", default="none:rms", help="comma-separated FUSED:ALPHA_SCALING[:DTYPE] (FUSED: none/true/false)")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    reports = {}
    for config in args.configs.split(","):
        fused, alpha_scaling, dtype = (config.split(":") + ["float32"])[:3]
        fused = {"none": None, "true": True, "false": False}[fused]
        reports[config] = run(fused, alpha_scaling, getattr(torch, dtype), args.steps)
    if dist.get_rank() == 0:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "report.json"), "w") as f:
            json.dump(reports, f)
    exit_distributed_run()


if __name__ == "__main__":
    main()
