"""benchmarks/gpu_check.py, the prepared GPU check, run end to end without a GPU (``--dry-run``: tiny
CPU tensors under Triton's interpreter), so that the one run on a lent GPU does not fail on the script."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
pytest.importorskip("bitsandbytes")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.py")


@pytest.mark.slow
def test_gpu_check_dry_run_passes_its_checks_and_writes_every_row(tmp_path):
    """Every check passes (the kernels against their references, the optimizers' Triton path, the NaN
    count; the sync-debug and CUDA-graph checks need CUDA and say so), and the markdown table has a
    timed row for torch's AdamW, each of our paths and bitsandbytes' optimizers, plus the goals."""
    markdown = tmp_path / "gpu_check.md"
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself, before importing Triton
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--dry-run", "--sets", "vit-b", "--markdown", str(markdown)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    checks = [line for line in proc.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert len(checks) == 14 and all(line.startswith("PASS") for line in checks), checks
    text = markdown.read_text()
    assert "checks: all passed" in text and "152 tensors" not in text  # the dry run's tiny ViT
    timed = {line.split(" | ")[0].lstrip("| ") for line in text.splitlines() if line.startswith("| ") and "unavailable" not in line}
    assert {
        "AdamW fused (torch)", "AdamW foreach (torch)", "RLion foreach (torch ops)", "RLion Triton, rms",
        "RLion Triton, fixed", "RLion8bit Triton, rms", "RLion8bit torch path (fused=False)",
        "Lion8bit (bitsandbytes)", "Lion 32-bit (bitsandbytes)",
    } <= timed, text  # fmt: skip
    assert "Lion Triton (lion-pytorch)" in text  # timed on CUDA; its Triton kernel refuses CPU tensors
    assert "- vit-b: RLion <= 1.0x torch fused AdamW:" in text
