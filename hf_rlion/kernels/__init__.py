"""Every compute kernel of hf_rlion, and the code that builds, loads and picks them.

The modules here import nothing from the rest of the package (``tests/test_package_layout.py``):
the optimizers call into this folder, never the other way round. Importing the package imports
neither Triton nor a compiled library; each is loaded on first use.

CPU (C, compiled on first use by :mod:`.native` with ``cc -O3 -march=native -fopenmp``, cached in
``~/.cache/hf_rlion`` and loaded with ``ctypes``):

- ``rlion_atan.h``: the float32 arctangent ``rlion_atanf`` and its coefficients, included by both C
  kernels (and read by :mod:`.triton_atan`), so every fused path takes the same arctangent;
- ``rlion_cpu.c`` + :mod:`.cpu_rlion`: the fused step of :class:`hf_rlion.RLion` (float32 momentum;
  float32, bfloat16 and float16 parameters), the one-pass NaN/inf check ``finite_mask`` used by both
  optimizers, and the C step counter;
- ``rlion8bit_cpu.c`` + :mod:`.cpu_rlion8bit`: the fused step of :class:`hf_rlion.RLion8bit` on
  bitsandbytes' 8-bit blockwise state (float32 and bfloat16 parameters);
- :mod:`.native`: compiles, verifies (owner, mode, SHA-256, ABI signature) and loads those libraries.

GPU (Triton; on CPU tensors only under ``TRITON_INTERPRET=1``, which is how they are tested):

- :mod:`.triton_atan`: ``rlion_atanf`` ported operation for operation;
- :mod:`.triton_rlion`: the fused step of :class:`hf_rlion.RLion`;
- :mod:`.triton_rlion8bit`: the fused step of :class:`hf_rlion.RLion8bit` (same state layout);
- :mod:`.dispatch`: where Triton can run and which tensors it takes (imports Triton only when asked).

Where each optimizer picks its kernel, one place each: ``RLion._implementation`` (C kernel, Triton,
torch's foreach or the per-tensor reference, per parameter group) and, for RLion8bit,
``RLion8bit._triton_candidates`` (the whole group on Triton) then ``RLion8bit._use_kernel`` (the C
kernel or the bitsandbytes reference, :mod:`hf_rlion.reference8bit`, per tensor).
"""
