"""Compute kernels of hf_rlion. ``triton_rlion`` and ``triton_rlion8bit`` hold the fused GPU steps
(Triton, imported on demand: importing this package does not import Triton)."""
