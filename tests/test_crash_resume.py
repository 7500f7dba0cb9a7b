"""Crash and resume: a recipe run killed with SIGKILL and resumed ends with the uninterrupted run's weights.

For both recipes and both optimizers: one uninterrupted run; one run killed at a random moment
after its first complete checkpoint (the kill may land mid-step or mid-save: the random delays
are seeded, and the test asserts the process really was still running); then a resume from the
last complete checkpoint. The final weights must be bit-identical. The classification recipe is
also run with a tiny ViT, whose checkpoints transformers>=5 writes under renamed keys, and with
every augmentation on (RandAugment, mixup, cutmix, random erasing, label smoothing: all seeded per
sample or per batch), and a resume from a checkpoint missing a weight must stop with an error.
"""

from __future__ import annotations

import importlib.util
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from _caltech_fixture import write_caltech_fixture  # noqa: E402

from hf_rlion.complete_checkpoints import complete_checkpoints  # noqa: E402

CLASSIFICATION = REPO / "recipes" / "image_classification.py"
DETECTION = REPO / "recipes" / "vit_detection_caltech101.py"


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _run(cmd, cwd):
    proc = subprocess.run(cmd, env=_env(), cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _run_and_kill(cmd, cwd, complete_checkpoints, output_dir: Path, delay: float) -> int:
    """Start ``cmd``; once it has one complete checkpoint, wait ``delay`` s and SIGKILL it. Returns how many were complete."""
    proc = subprocess.Popen(cmd, env=_env(), cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not complete_checkpoints(output_dir):
            assert proc.poll() is None, f"run ended before its first checkpoint: {proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.02)
        time.sleep(delay)
        assert proc.poll() is None, "the run finished before the kill: make it longer"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return len(complete_checkpoints(output_dir))


def _assert_same_weights(a: Path, b: Path):
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


# The embedded ResNet saves its own keys; a ViT is saved with renamed keys on transformers>=5
# (``hf_rlion.checkpoints`` converts them back on resume).
TINY_VIT = [
    "--model_type", "vit",
    "--config_overrides", "image_size=32,patch_size=8,hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64",
]  # fmt: skip


# Every augmentation the recipe has, each drawn from per-sample (and, for mixup/cutmix, per-batch) seeds.
AUGMENTED = [
    "--auto_augment", "rand-m9-mstd0.5", "--mixup", "0.8", "--cutmix", "1.0", "--reprob", "0.25",
    "--label_smoothing_factor", "0.1",
]  # fmt: skip


@pytest.mark.slow
# Both optimizers and both model families: the embedded ResNet with every augmentation on (per-sample
# and per-batch seeds) under rlion_8bit, and a tiny ViT (renamed checkpoint keys) under rlion.
@pytest.mark.parametrize("optim,model", [("rlion", "vit"), ("rlion_8bit", "augmented")])
def test_classification_recipe_killed_and_resumed(optim, model, tmp_path):
    if optim == "rlion_8bit":
        pytest.importorskip("bitsandbytes")
    common = [
        sys.executable, str(CLASSIFICATION), "--optim", optim, "--max_train_samples", "192", "--max_eval_samples", "32",
        "--per_device_train_batch_size", "16", "--num_train_epochs", "3", "--save_strategy", "steps", "--save_steps", "4",
        "--save_total_limit", "2", "--eval_strategy", "no", "--lr_scheduler_type", "cosine", "--warmup_steps", "3",
        "--dataloader_num_workers", "0", "--seed", "11", "--logging_steps", "50",
    ] + {"vit": TINY_VIT, "augmented": AUGMENTED}.get(model, [])  # fmt: skip
    _run(common + ["--output_dir", str(tmp_path / "straight")], tmp_path)
    crashed = tmp_path / "crashed"
    delay = random.Random(f"classification-{optim}" + ("-augmented" if model == "augmented" else "")).uniform(0.0, 1.0)
    _run_and_kill(common + ["--output_dir", str(crashed)], tmp_path, complete_checkpoints, crashed, delay)
    resumed = _run(common + ["--output_dir", str(crashed), "--resume_from_checkpoint", "last"], tmp_path)
    assert f"Loading model from {crashed}{os.sep}checkpoint-" in resumed.stderr + resumed.stdout
    _assert_same_weights(tmp_path / "straight" / "model.safetensors", crashed / "model.safetensors")


@pytest.mark.slow
def test_classification_recipe_refuses_a_checkpoint_with_missing_weights(tmp_path):
    """A resume whose checkpoint lacks model weights exits non-zero naming the checkpoint and a key; it does not train on."""
    common = [
        sys.executable, str(CLASSIFICATION), "--max_train_samples", "32", "--max_eval_samples", "16",
        "--per_device_train_batch_size", "16", "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2",
        "--eval_strategy", "no", "--dataloader_num_workers", "0", "--output_dir", str(tmp_path / "run"), *TINY_VIT,
    ]  # fmt: skip
    _run(common, tmp_path)
    checkpoint = tmp_path / "run" / "checkpoint-2"
    weights = load_file(str(checkpoint / "model.safetensors"))
    dropped = sorted(weights)[0]
    del weights[dropped]
    save_file(weights, str(checkpoint / "model.safetensors"), metadata={"format": "pt"})
    proc = subprocess.run(
        common + ["--max_steps", "4", "--resume_from_checkpoint", str(checkpoint)],
        env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "CheckpointMismatchError" in proc.stderr and str(checkpoint) in proc.stderr and dropped in proc.stderr
    assert not (tmp_path / "run" / "checkpoint-4").exists()


@pytest.mark.slow
# rlion_8bit: its 8-bit state goes through Accelerate's save_state/load_state too (rlion is covered above).
@pytest.mark.parametrize("optim", ["rlion_8bit"])
def test_detection_recipe_killed_and_resumed(optim, tmp_path):
    if optim == "rlion_8bit":
        pytest.importorskip("bitsandbytes")
    data = tmp_path / "caltech101"
    write_caltech_fixture(data)
    common = [
        sys.executable, str(DETECTION), "--data_dir", str(data), "--dataset_cache_dir", str(tmp_path / "cache"),
        "--optim", optim, "--learning_rate", "3e-3", "--num_train_epochs", "5", "--per_device_train_batch_size", "8",
        "--image_size", "32", "--patch_size", "8", "--hidden_size", "32", "--num_hidden_layers", "1",
        "--num_attention_heads", "2", "--intermediate_size", "64", "--head_hidden_sizes", "64", "--head_dropout", "0",
        "--hidden_dropout_prob", "0", "--num_plot_images", "2", "--hflip_probability", "0.5", "--seed", "5",
    ]  # fmt: skip
    _run(common + ["--output_dir", str(tmp_path / "straight")], tmp_path)
    crashed = tmp_path / "crashed"
    delay = random.Random(f"detection-{optim}").uniform(0.0, 1.0)
    _run_and_kill(common + ["--output_dir", str(crashed)], tmp_path, complete_checkpoints, crashed, delay)
    _run(common + ["--output_dir", str(crashed), "--resume_from_checkpoint", "latest"], tmp_path)
    _assert_same_weights(tmp_path / "straight" / "checkpoint-5" / "model.safetensors", crashed / "checkpoint-5" / "model.safetensors")
    _assert_same_weights(tmp_path / "straight" / "model.safetensors", crashed / "model.safetensors")
