"""Check the fused kernel's arctan on every one of the 2^32 float32 bit patterns.

    python benchmarks/atan_exhaustive.py                 # all 2^32 inputs vs correctly rounded (C loop)
    python benchmarks/atan_exhaustive.py --torch 4099    # + every 4099th pattern vs torch.atan

The sweep runs inside the compiled kernel (``rlion_atan_check`` in hf_rlion/kernels/rlion_cpu.c):
for each input it compares the kernel's float32 arctan with libm's float64 ``atan`` rounded to
float32 (the correctly rounded value: float64's error is far below half a float32 ulp), and
counts inputs 0, 1, 2 and more ulps away (the number of float32 values between the results).
NaN must give NaN and ±0 must keep its sign. ``--torch N`` also compares every N-th pattern
with ``torch.atan`` (in Python; N = 1 takes long). Exits non-zero if any input is more than
``--max-ulp`` (default 1) from the correctly rounded value, or on a NaN/sign problem.
"""

from __future__ import annotations

import argparse
import ctypes
import sys

import torch
from tqdm import tqdm

from hf_rlion.kernels import cpu_rlion


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    def ordered(x):
        i = x.view(torch.int32).to(torch.int64)
        return torch.where(i < 0, -(i & 0x7FFFFFFF), i)

    return (ordered(a) - ordered(b)).abs()


def sweep_correctly_rounded(block: int) -> tuple[list[int], int, float, int]:
    lib = cpu_rlion._load()
    if lib is None:
        raise SystemExit("the C kernel is unavailable (no compiler?)")
    check = lib.rlion_atan_check
    check.restype = ctypes.c_int64
    check.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32]
    counts = (ctypes.c_int64 * 4)()
    worst, worst_bits = ctypes.c_int64(-1), ctypes.c_uint32(0)
    problems = 0
    for start in tqdm(range(0, 1 << 32, block), desc="all 2^32 float32 vs correctly rounded", unit="block"):
        problems += check(start, start + block, counts, ctypes.byref(worst), ctypes.byref(worst_bits),
                          torch.get_num_threads())
    x = torch.tensor([worst_bits.value], dtype=torch.int64).to(torch.int32).view(torch.float32).item()
    return list(counts), worst.value, x, problems


def sample_against_torch(stride: int) -> tuple[list[int], int]:
    histogram = torch.zeros(4, dtype=torch.int64)
    worst = 0
    block = 1 << 24
    for start in tqdm(range(0, 1 << 32, block), desc=f"every {stride}th vs torch.atan", unit="block"):
        first = start + (-start) % stride
        bits = torch.arange(first, start + block, stride, dtype=torch.int64)
        if bits.numel() == 0:
            continue
        x = torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).view(torch.float32)
        x = x[~torch.isnan(x)]
        d = ulp_distance(cpu_rlion.atan(x), torch.atan(x))
        worst = max(worst, int(d.max()))
        histogram += torch.bincount(d.clamp_max(3), minlength=4)
    return histogram.tolist(), worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--block", type=int, default=1 << 26, help="bit patterns per progress step")
    parser.add_argument("--max-ulp", type=int, default=1)
    parser.add_argument("--torch", type=int, default=0, metavar="N", help="also compare every N-th pattern with torch.atan")
    args = parser.parse_args()
    counts, worst, where, problems = sweep_correctly_rounded(args.block)
    print(
        f"all {sum(counts):,} non-NaN float32 inputs vs correctly rounded arctan: max {worst} ulp (at x = {where!r}); "
        f"0 ulp {counts[0]:,}, 1 ulp {counts[1]:,}, 2 ulp {counts[2]:,}, >2 ulp {counts[3]:,}; "
        f"NaN/signed-zero problems: {problems}"
    )
    if args.torch:
        histogram, torch_worst = sample_against_torch(args.torch)
        print(
            f"every {args.torch}th pattern ({sum(histogram):,} non-NaN) vs torch.atan: max {torch_worst} ulp; "
            f"0 ulp {histogram[0]:,}, 1 ulp {histogram[1]:,}, 2 ulp {histogram[2]:,}, >2 ulp {histogram[3]:,}"
        )
    return 0 if worst <= args.max_ulp and problems == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
