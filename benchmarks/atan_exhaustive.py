"""Check the fused kernel's arctan on every one of the 2^32 float32 bit patterns.

    python benchmarks/atan_exhaustive.py            # all 2^32 inputs (a few minutes on 2 cores)
    python benchmarks/atan_exhaustive.py --stride 97  # every 97th pattern, quick
    python benchmarks/atan_exhaustive.py --blocks 0:128   # the first half (run halves in parallel)

Compares ``hf_rlion.fused_cpu.atan`` with the correctly rounded arctan (torch's float64 arctan
rounded to float32; float64's error is far below half a float32 ulp) and with ``torch.atan``,
and prints the largest distance in ulps (the number of float32 values between the two results)
with a histogram, plus the NaN and signed-zero checks. Exits non-zero if the kernel is more than
``--max-ulp`` (default 1) from the correctly rounded value anywhere.
"""

from __future__ import annotations

import argparse
import sys

import torch

from hf_rlion import fused_cpu


def ordered(x: torch.Tensor) -> torch.Tensor:
    """Map float32 values to integers in the floats' order (so ulp distance = difference)."""
    b = x.view(torch.int32).to(torch.int64)
    return torch.where(b < 0, -(b & 0x7FFFFFFF), b)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (ordered(a) - ordered(b)).abs()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stride", type=int, default=1, help="test every STRIDE-th bit pattern (default all)")
    parser.add_argument("--block", type=int, default=1 << 24, help="bit patterns per block")
    parser.add_argument("--blocks", type=str, default="", help="FIRST:LAST block range (default all)")
    parser.add_argument("--max-ulp", type=int, default=1)
    args = parser.parse_args()
    from tqdm import tqdm

    worst = {"correctly rounded": (0, 0.0), "torch.atan": (0, 0.0)}
    histogram = {key: torch.zeros(4, dtype=torch.int64) for key in worst}
    problems = 0
    n_blocks = (1 << 32) // args.block
    first_block, last_block = (int(v) for v in args.blocks.split(":")) if args.blocks else (0, n_blocks)
    for block in tqdm(range(first_block, last_block), desc="atan, all float32", unit="block"):
        start = block * args.block
        first = start + (-start) % args.stride
        bits = torch.arange(first, start + args.block, args.stride, dtype=torch.int64)
        if bits.numel() == 0:
            continue
        x = torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).view(torch.float32)
        ours = fused_cpu.atan(x)
        exact = torch.atan(x.double()).float()
        theirs = torch.atan(x)
        nan = torch.isnan(x)
        problems += int((~torch.isnan(ours[nan])).sum())  # NaN must stay NaN
        zero = x == 0
        problems += int((torch.signbit(ours[zero]) != torch.signbit(x[zero])).sum())  # ±0 keep sign
        keep = ~nan
        for key, reference in (("correctly rounded", exact), ("torch.atan", theirs)):
            d = ulp_distance(ours[keep], reference[keep])
            if d.numel() and int(d.max()) > worst[key][0]:
                worst[key] = (int(d.max()), float(x[keep][d.argmax()]))
            histogram[key] += torch.bincount(d.clamp_max(3), minlength=4)
    tested = int(histogram["torch.atan"].sum())
    print(
        f"blocks {first_block}:{last_block} of {n_blocks}: tested {tested:,} non-NaN inputs (stride {args.stride}); "
        f"NaN/signed-zero problems: {problems}"
    )
    for key, (ulps, where) in worst.items():
        h = histogram[key].tolist()
        print(
            f"vs {key:18s}: max {ulps} ulp (at x = {where!r}); "
            f"0 ulp {h[0]:,}, 1 ulp {h[1]:,}, 2 ulp {h[2]:,}, >2 ulp {h[3]:,}"
        )
    return 0 if worst["correctly rounded"][0] <= args.max_ulp and problems == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
