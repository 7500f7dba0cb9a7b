"""RLion8bit under FSDP2 (torch fully_shard) on gloo CPU ranks.

tests/scripts/fsdp2_train.py trains the digits MLP on 2 ranks. Its two weight matrices: ``0.weight``
(96×64) is split 48 rows per rank, so each shard starts on a 256-element block boundary;
``3.weight`` (10×96) is split 5 rows per rank, 480 elements, so with ``min_8bit_size=256`` it is
8-bit and a block straddles the two shards. ``--reference`` has rank 0 train an unsharded copy with a
one-process RLion8bit on the whole batch of each step, in lockstep.

tests/scripts/fsdp2_state_exactness.py gives sharded and one-process optimizers the same gradients
on 3 ranks (shards inside one block, ranks without rows) and compares their whole 8-bit state.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from test_distributed import HERE, _free_port, _run

pytest.importorskip("bitsandbytes")

SCRIPT = os.path.join(HERE, "scripts", "fsdp2_train.py")
EXACTNESS_SCRIPT = os.path.join(HERE, "scripts", "fsdp2_state_exactness.py")


def _torchrun(ranks: int, out, *args, cwd, script=SCRIPT):
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(ranks),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), script, "--output_dir", str(out),
               *(("--optim", "rlion_8bit") if script == SCRIPT else ()), *args]  # fmt: skip
    _run(command, cwd)
    return out


def _weights(out, name="weights.pt"):
    return torch.load(out / name, weights_only=True)


def _report(out, rank):
    return json.loads((out / f"rank{rank}.json").read_text())


def _initial_weights():
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.LayerNorm(96), nn.GELU(), nn.Linear(96, 10)).state_dict()


def _relative_deviation(weights, reference, start):
    """``‖θ − θ_ref‖ / ‖θ_ref − θ_0‖`` per tensor (the measure of ``test_8bit_run_tracks_fp32_rlion_on_digits``)."""
    return {k: ((weights[k] - reference[k]).norm() / (reference[k] - start[k]).norm()).item() for k in reference}


def _momentum(out, kind, ranks):
    """The whole dequantised 8-bit momentum of each tensor, from the per-rank dumps (``--dump_momentum``)."""
    pieces: dict[str, list] = {}
    for rank in range(ranks):
        for name, (start, values) in torch.load(out / f"momentum_{kind}_rank{rank}.pt", weights_only=True).items():
            pieces.setdefault(name, []).append((start, values.reshape(-1)))
    return {name: torch.cat([v for _, v in sorted(parts, key=lambda t: t[0])]) for name, parts in pieces.items()}


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    """min_8bit_size=256: both weight matrices 8-bit, ``3.weight`` with a block across the shards. In-run
    full state-dict round trip at step 10, checkpoints of both formats at step 10, a NaN in rank 1's
    shard of ``0.weight``'s gradient at step 5."""
    tmp = tmp_path_factory.mktemp("sharded")
    return _torchrun(2, tmp / "run", "--min_8bit_size", "256", "--roundtrip", "full", "--reference", "--save_at", "10",
                     "--checkpoint_format", "sharded,full", "--dump_momentum", "--nan_at", "5", cwd=tmp)  # fmt: skip


@pytest.mark.slow
def test_sharded_run_matches_the_one_process_run_to_rounding_and_stays_8bit(sharded_run):
    """The shards are quantised on one process's blocks, so with a block across the shards, a full
    state-dict round trip and a NaN step the run differs from one process only by the rounding of the
    gradient reduction and of the RMS sum, and the rare code that rounding moves across a midpoint:
    within 1e-4 of the one-process run's distance travelled, per tensor (measured: <= 4.2e-6; with
    each shard quantised on its own blocks it was 5e-3). The state is 8-bit and sharded on every
    rank: codes uint8 shaped like the local shard, codes + absmax <= 1.02 bytes per parameter of the
    rank's 8-bit shards."""
    weights, reference = _weights(sharded_run), _weights(sharded_run, "reference.pt")
    assert weights.keys() == reference.keys()
    deviation = _relative_deviation(weights, reference, _initial_weights())
    assert max(deviation.values()) < 1e-4, deviation
    for rank in (0, 1):
        report = _report(sharded_run, rank)
        assert set(report["layouts"]) == {"0.weight", "3.weight"}
        for layout in report["layouts"].values():
            assert layout["codes_dtype"] == "torch.uint8"
            assert layout["codes_shape"] == layout["param_local_shape"]
            assert layout["param_local_shape"][0] == layout["param_shape"][0] // 2  # half the rows: sharded
        bytes_per_parameter = report["eight_bit_state_bytes"] / report["eight_bit_numel"]
        assert 1.0 < bytes_per_parameter <= 1.02, bytes_per_parameter


@pytest.mark.slow
def test_nan_in_one_shard_skips_the_whole_tensor_on_every_rank(sharded_run):
    """Rank 1's shard of ``0.weight``'s gradient holds a NaN at step 5: both ranks leave their shard of
    ``0.weight`` unchanged (rank 0's own gradient was finite), count one skip, and step the rest."""
    for rank in (0, 1):
        report = _report(sharded_run, rank)
        changed = report["changed_at_nan_step"]
        assert changed.pop("0.weight") is False
        assert all(changed.values()), changed
        assert report["nonfinite_skips"] == 1
        assert report["steps"]["0.weight"] == 19 and report["steps"]["3.weight"] == 20


@pytest.mark.slow
def test_sharded_checkpoint_resumes_bit_identically_on_the_same_ranks(sharded_run, tmp_path):
    """dcp.save at step 10, a fresh 2-rank run loads it (get/set_optimizer_state_dict) and continues:
    weights equal the uninterrupted run's bit for bit (the checkpoint holds the live codes and absmax)."""
    resumed = _torchrun(2, tmp_path / "resumed", "--min_8bit_size", "256", "--roundtrip", "none",
                        "--resume_from", str(sharded_run / "checkpoint_sharded"), cwd=tmp_path)  # fmt: skip
    uninterrupted, weights = _weights(sharded_run), _weights(resumed)
    for name in uninterrupted:
        assert torch.equal(weights[name], uninterrupted[name]), name


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint_format", ["sharded", "full"])
def test_checkpoint_of_two_ranks_resumes_exactly_on_one_rank(sharded_run, tmp_path, checkpoint_format):
    """The 2-rank checkpoint (dcp.save, or the gathered full_state_dict) loaded on 1 rank: the momentum
    right after loading equals the saved one bit for bit, the block across the shards included; the
    run continues within the rounding of a different gradient reduction."""
    resumed = _torchrun(1, tmp_path / "resumed", "--min_8bit_size", "256", "--roundtrip", "none",
                        "--checkpoint_format", checkpoint_format, "--dump_momentum",
                        "--resume_from", str(sharded_run / f"checkpoint_{checkpoint_format}"), cwd=tmp_path)  # fmt: skip
    saved, loaded = _momentum(sharded_run, "saved", 2), _momentum(resumed, "resumed", 1)
    assert saved.keys() == loaded.keys() == {"0.weight", "3.weight"}
    for name in saved:
        assert torch.equal(saved[name], loaded[name]), name
    uninterrupted, weights = _weights(sharded_run), _weights(resumed)
    for name in uninterrupted:
        torch.testing.assert_close(weights[name], uninterrupted[name], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_sharded_checkpoint_of_two_ranks_loads_exactly_on_three(sharded_run, tmp_path):
    """The 2-rank dcp.save checkpoint loaded on 3 ranks (other shard boundaries, blocks shared
    differently): the momentum right after loading equals the saved one bit for bit. (The run then
    takes 30 samples a step instead of 32, so only the loaded state is compared.)"""
    resumed = _torchrun(3, tmp_path / "resumed", "--min_8bit_size", "256", "--roundtrip", "none", "--global_batch", "30",
                        "--steps", "11", "--dump_momentum", "--resume_from", str(sharded_run / "checkpoint_sharded"),
                        cwd=tmp_path)  # fmt: skip
    saved, loaded = _momentum(sharded_run, "saved", 2), _momentum(resumed, "resumed", 3)
    assert saved.keys() == loaded.keys() == {"0.weight", "3.weight"}
    for name in saved:
        assert torch.equal(saved[name], loaded[name]), name


def _exactness_report(tmp_path, configs):
    out = _torchrun(3, tmp_path / "out", "--configs", configs, cwd=tmp_path, script=EXACTNESS_SCRIPT)
    return json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_sharded_state_is_the_one_process_state_bit_for_bit(tmp_path):
    """3 ranks, the same gradients as one process (tiny and zero blocks, shards inside one block, a
    rank with no rows): after every step the gathered codes and absmax equal the one-process
    RLion8bit's bit for bit, with the C kernel (rms; float32 and bfloat16 parameters) and the
    reference (fixed α). The reference's parameters are bit-identical too; the C kernel's float32
    ones differ by its arctangent on the pieces of shared blocks, which take the reference update (a
    few ulps). Saving and loading the sharded state, and loading the one-process state onto the
    shards, give the same state again."""
    reports = _exactness_report(tmp_path, "none:rms,false:fixed,none:rms:bfloat16")
    for config, report in reports.items():
        assert report["state_equal"] == [True] * 4, (config, report)
        assert report["reloaded_equal"] and report["one_process_state_loads_equal"], (config, report)
        numels = [n for rank in report["local_numels"] for n in rank]
        assert 0 in numels and any(0 < n < 256 for n in numels), report  # the layouts this test is about
    assert max(reports["none:rms"]["params_max_difference"]) < 1e-6
    assert max(reports["none:rms:bfloat16"]["params_max_difference"]) <= 2**-5  # a bfloat16 ulp of |p| < 8 (measured: 0)
    assert reports["false:fixed"]["params_max_difference"] == [0.0] * 4


@pytest.mark.slow
def test_triton_kernels_step_the_shards_under_the_interpreter(tmp_path, monkeypatch):
    """``fused=True`` with the C kernel off, under Triton's interpreter: the Triton kernels step each
    rank's whole blocks (without them ``fused=True`` would raise) and the pieces of shared blocks take
    the kernel's momentum arithmetic and nearest-code rule, so the gathered state equals a one-process
    Triton run's bit for bit."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("HF_RLION_NATIVE", "0")
    report = _exactness_report(tmp_path, "true:rms")["true:rms"]
    assert report["state_equal"] == [True] * 4, report
    assert report["reloaded_equal"] and report["one_process_state_loads_equal"], report
    assert max(report["params_max_difference"]) < 1e-6
