"""Several processes: 2-rank gloo DDP through accelerate, and FSDP2 (torch fully_shard) on CPU.

Each run trains the same MLP on scikit-learn's digits for 20 steps with a global batch of 32;
the single-process run sees the same 32 samples per step, so the weights must agree.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BIN = os.path.dirname(sys.executable)


def _run(cmd, tmp_path, returncode=0):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == returncode, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def _single_process(optim, out):
    return [sys.executable, os.path.join(HERE, "scripts", "distributed_train.py"), "--optim", optim, "--output_dir", str(out)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp(optim, out, *extra):
    return [
        os.path.join(BIN, "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--main_process_port", str(_free_port()),
        "--mixed_precision", "no", "--dynamo_backend", "no",
        os.path.join(HERE, "scripts", "distributed_train.py"), "--optim", optim, "--output_dir", str(out), *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("optim", ["rlion", "rlion_8bit"])
def test_ddp_two_ranks_identical_and_equal_to_one_process(optim, tmp_path):
    if optim == "rlion_8bit":
        pytest.importorskip("bitsandbytes")
    _run(_single_process(optim, tmp_path / "single"), tmp_path)
    _run(_ddp(optim, tmp_path / "ddp", "--save_state"), tmp_path)
    run = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert run["num_processes"] == 2 and run["distributed_type"] == "DistributedType.MULTI_CPU"
    rank0 = torch.load(tmp_path / "ddp" / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "ddp" / "rank1.pt", weights_only=True)
    single = torch.load(tmp_path / "single" / "rank0.pt", weights_only=True)
    for name in single:
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between ranks"
        # all-reduce sums in another order than one big batch: float32 rounding, nothing more
        torch.testing.assert_close(rank0[name], single[name], rtol=1e-5, atol=1e-6)
    assert run["losses"][-1] < run["losses"][0]


def test_fsdp2_sharded_parameters_match_one_process(tmp_path):
    """RLion on DTensor shards: the per-tensor RMS is global, so sharding changes nothing."""
    _run(_single_process("rlion", tmp_path / "single"), tmp_path)
    torchrun = [os.path.join(BIN, "torchrun"), "--standalone", "--nproc_per_node", "2"]
    _run([*torchrun, os.path.join(HERE, "scripts", "fsdp2_train.py"), "--output_dir", str(tmp_path / "fsdp")], tmp_path)
    sharded = torch.load(tmp_path / "fsdp" / "weights.pt", weights_only=True)
    single = torch.load(tmp_path / "single" / "rank0.pt", weights_only=True)
    assert sharded.keys() == single.keys()
    for name in single:
        torch.testing.assert_close(sharded[name], single[name], rtol=1e-5, atol=1e-6)


_EXIT_SCRIPT = """
import sys, torch, torch.distributed as dist
from hf_rlion.distributed_exit import exit_distributed_run
exit_distributed_run()  # no process group yet: returns
dist.init_process_group("gloo")
total = torch.ones(1)
dist.all_reduce(total)
open(sys.argv[1] + f"/rank{dist.get_rank()}.txt", "w").write(str(int(total.item())))
exit_distributed_run(int(sys.argv[2]))
raise SystemExit("exit_distributed_run returned in a distributed run")
"""


@pytest.mark.parametrize("exit_code", [0, 3])
def test_exit_distributed_run_is_a_no_op_alone_and_exits_every_rank_with_its_code(exit_code, tmp_path):
    script = tmp_path / "exit.py"
    script.write_text(_EXIT_SCRIPT)
    torchrun = [os.path.join(BIN, "torchrun"), "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path), str(exit_code)]
    result = _run(torchrun, tmp_path, returncode=0 if exit_code == 0 else 1)  # torchrun: 1 when any rank fails
    if exit_code:
        assert f"exitcode  : {exit_code}" in result.stderr  # the launcher reports each rank's own code
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["2", "2"]
