"""Check the fused kernel's arctan on every one of the 2^32 float32 bit patterns.

    python benchmarks/atan_exhaustive.py            # all 2^32 inputs (a few minutes on 2 cores)
    python benchmarks/atan_exhaustive.py --stride 97  # every 97th pattern, quick

Compares ``hf_rlion.fused_cpu.atan`` with the correctly rounded arctan (torch's float64 arctan
rounded to float32; float64's error is far below half a float32 ulp) and with ``torch.atan``,
and prints the largest distance in ulps (the number of float32 values between the two results)
with a histogram, plus the NaN and signed-zero checks. Exits non-zero if the kernel is more than
``--max-ulp`` (default 1) from the correctly rounded value anywhere.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from hf_rlion import fused_cpu


def ordered(bits: np.ndarray) -> np.ndarray:
    """Map float32 bit patterns to integers in the floats' order (so ulp distance = difference)."""
    b = bits.astype(np.int64)
    return np.where(b >= 0x80000000, 0x80000000 - b, b)


def ulp_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(ordered(a.view(np.uint32)) - ordered(b.view(np.uint32)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stride", type=int, default=1, help="test every STRIDE-th bit pattern (default all)")
    parser.add_argument("--block", type=int, default=1 << 24, help="bit patterns per block")
    parser.add_argument("--max-ulp", type=int, default=1)
    args = parser.parse_args()
    from tqdm import tqdm

    worst = {"correctly rounded": (0, 0.0), "torch.atan": (0, 0.0)}
    histogram = {key: np.zeros(4, dtype=np.int64) for key in worst}
    problems = 0
    for start in tqdm(range(0, 1 << 32, args.block), desc="atan, all float32", unit="block"):
        first = start + (-start) % args.stride
        bits = np.arange(first, start + args.block, args.stride, dtype=np.uint64).astype(np.uint32)
        if bits.size == 0:
            continue
        x = bits.view(np.float32)
        ours = fused_cpu.atan(torch.from_numpy(x)).numpy()
        exact = torch.atan(torch.from_numpy(x).double()).float().numpy()
        theirs = torch.atan(torch.from_numpy(x)).numpy()
        nan = np.isnan(x)
        problems += int(np.count_nonzero(~np.isnan(ours[nan])))  # NaN must stay NaN
        zero = x == 0
        problems += int(np.count_nonzero(np.signbit(ours[zero]) != np.signbit(x[zero])))  # ±0 keep sign
        for key, reference in (("correctly rounded", exact), ("torch.atan", theirs)):
            d = ulp_distance(ours[~nan], reference[~nan])
            if d.size and d.max() > worst[key][0]:
                worst[key] = (int(d.max()), float(x[~nan][d.argmax()]))
            histogram[key] += np.bincount(np.minimum(d, 3), minlength=4)
    tested = int(histogram["torch.atan"].sum())
    print(f"tested {tested:,} non-NaN inputs (stride {args.stride}); NaN/signed-zero problems: {problems}")
    for key, (ulps, where) in worst.items():
        h = histogram[key]
        print(
            f"vs {key:18s}: max {ulps} ulp (at x = {where!r}); "
            f"0 ulp {h[0]:,}, 1 ulp {h[1]:,}, 2 ulp {h[2]:,}, >2 ulp {h[3]:,}"
        )
    return 0 if worst["correctly rounded"][0] <= args.max_ulp and problems == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
