"""Time one optimizer step, side by side, for RLion's paths and the optimizers it competes with.

    python benchmarks/optimizer_step.py                       # 25M fp32 params in 50 tensors
    python benchmarks/optimizer_step.py --sizes 1e5,1e6,1e7,5e7 --plot docs/figures/step_time_vs_params.png
    python benchmarks/optimizer_step.py --first-step --memory # + fresh-process time to first step, peak RSS

For every optimizer it prints the median ms/step, Mparam/s, state bytes/param (measured from the
optimizer's state), the ratio to torch's fused AdamW, and the effective bandwidth: the bytes the
update cannot avoid moving (read parameter, gradient and state; write parameter and state) per
second, next to the bandwidth of an in-place ``a += b`` (12 bytes/element) measured in the same run.
"best" columns: the fastest of the rounds (the least disturbed by other load), for reference.

The machine is usually shared: every round times each optimizer once, in turn, and the medians
over rounds are compared, so a burst of load hits all of them alike. Ratios are what count.
All optimizers step the same parameters and gradients (updates do not change the timing).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

# The bytes per parameter an update must move at the least: read param + grad (4 + 4 for
# float32) plus the state read and written, plus the param written.
FP32 = 4


@dataclass
class Candidate:
    name: str
    make: Callable[[list], torch.optim.Optimizer]
    state_bytes_moved: float  # state bytes read + written per parameter (besides param/grad traffic)


def _rlion(**kw):
    from hf_rlion import RLion

    return lambda ps: RLion(ps, lr=1e-4, **kw)


def _rlion8bit(ps):
    from hf_rlion import RLion8bit

    return RLion8bit(ps, lr=1e-4)


def _lion_pytorch(ps):
    from lion_pytorch import Lion

    return Lion(ps, lr=1e-4)


def _bnb(name, **kw):
    def make(ps):
        import bitsandbytes as bnb

        return getattr(bnb.optim, name)(ps, lr=1e-4, **kw)

    return make


CANDIDATES = [
    Candidate("adamw fused (torch)", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True), 2 * 8),
    Candidate("adamw foreach (torch)", lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True), 2 * 8),
    Candidate("rlion fused, rms", _rlion(fused=True), 2 * 4),
    Candidate("rlion fused, fixed", _rlion(fused=True, alpha_scaling="fixed", alpha=100.0), 2 * 4),
    Candidate("rlion foreach, rms", _rlion(foreach=True, fused=False), 2 * 4),
    Candidate("rlion single, rms", _rlion(foreach=False, fused=False), 2 * 4),
    Candidate("rlion_8bit", _rlion8bit, 2 * 1),
    Candidate("lion (lion-pytorch)", _lion_pytorch, 2 * 4),
    Candidate("lion 32-bit (bitsandbytes)", _bnb("Lion", optim_bits=32), 2 * 4),
    Candidate("lion8bit (bitsandbytes)", _bnb("Lion8bit"), 2 * 1),
]
REFERENCE = "adamw fused (torch)"


def make_params(numel: int, tensors: int, seed: int = 0) -> list[torch.nn.Parameter]:
    """``tensors`` float32 parameters of equal size summing to ~``numel``, with gradients ~1e-3."""
    gen = torch.Generator().manual_seed(seed)
    per = max(1, numel // tensors)
    params = []
    for _ in range(tensors):
        p = torch.nn.Parameter(torch.randn(per, generator=gen))
        p.grad = torch.randn(per, generator=gen) * 1e-3
        params.append(p)
    return params


def stream_bandwidth(numel: int, repeats: int) -> float:
    """GB/s of ``a += b`` on float32 arrays of ``numel`` elements (reads 8, writes 4 bytes/element)."""
    a, b = torch.ones(numel), torch.ones(numel)
    a.add_(b)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a.add_(b)
        times.append(time.perf_counter() - t0)
    return 12 * numel / statistics.median(times) / 1e9


def state_bytes_per_param(optimizer: torch.optim.Optimizer, numel: int) -> float:
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.numel() > 1:
                total += value.numel() * value.element_size()
    return total / numel


def time_steps(candidates: list[Candidate], params, rounds: int, progress: bool) -> dict[str, dict]:
    """Build every optimizer, take one warm-up step each, then ``rounds`` rounds of one timed step each."""
    numel = sum(p.numel() for p in params)
    results: dict[str, dict] = {}
    live = {}
    for cand in candidates:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt = cand.make(params)
                t0 = time.perf_counter()
                opt.step()  # creates the state; not timed as a step
                first = time.perf_counter() - t0
        except Exception as err:  # an optimizer missing here is reported, not fatal
            results[cand.name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:90]}"}
            continue
        live[cand.name] = opt
        results[cand.name] = {"times": [], "first": first, "state_bytes": state_bytes_per_param(opt, numel)}
    iterator = range(rounds)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc=f"{numel / 1e6:.1f}M params", leave=False)
    for _ in iterator:
        for name, opt in live.items():
            t0 = time.perf_counter()
            opt.step()
            results[name]["times"].append(time.perf_counter() - t0)
    for name in live:
        r = results[name]
        r["ms"] = statistics.median(r["times"]) * 1e3
        r["best_ms"] = min(r["times"]) * 1e3
    del live
    return results


def print_table(results: dict[str, dict], candidates: list[Candidate], numel: int, stream_gbs: float) -> None:
    ref = results.get(REFERENCE, {}).get("ms")
    ref_best = results.get(REFERENCE, {}).get("best_ms")
    print(
        f"\n{numel / 1e6:.1f}M float32 params; stream (a += b) {stream_gbs:.1f} GB/s; "
        f"{torch.get_num_threads()} threads"
    )
    header = (
        f"{'optimizer':30s} {'ms/step':>9s} {'best ms':>9s} {'Mparam/s':>9s} {'state B/p':>9s} {'x adamw':>8s} "
        f"{'best x':>7s} {'GB/s':>7s} {'% stream':>8s}"
    )
    print(header)
    print("-" * len(header))
    for cand in candidates:
        r = results.get(cand.name)
        if r is None:
            continue
        if "error" in r:
            print(f"{cand.name:30s} unavailable: {r['error']}")
            continue
        ms = r["ms"]
        gbs = (2 * FP32 + FP32 + cand.state_bytes_moved) * numel / (ms / 1e3) / 1e9
        ratio = f"{ms / ref:8.2f}" if ref else f"{'-':>8s}"
        best_ratio = f"{r['best_ms'] / ref_best:7.2f}" if ref_best else f"{'-':>7s}"
        print(
            f"{cand.name:30s} {ms:9.2f} {r['best_ms']:9.2f} {numel / ms / 1e3:9.0f} {r['state_bytes']:9.2f} {ratio} "
            f"{best_ratio} {gbs:7.1f} {100 * gbs / stream_gbs:7.0f}%"
        )


FIRST_STEP_SCRIPT = textwrap.dedent(
    """
    import time, sys
    t0 = time.perf_counter()
    import torch
    from hf_rlion import RLion
    numel, tensors = int(sys.argv[1]), int(sys.argv[2])
    params = [torch.nn.Parameter(torch.randn(numel // tensors)) for _ in range(tensors)]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = RLion(params, lr=1e-4)
    t1 = time.perf_counter()
    opt.step()
    t2 = time.perf_counter()
    print(f"{t1 - t0:.3f} {t2 - t1:.3f}")
    """
)


def first_step_times(numel: int, tensors: int) -> None:
    """Fresh-process time to the first RLion step: with an empty kernel cache (compiles) and a warm one."""
    with tempfile.TemporaryDirectory() as cold_cache:
        for label, env_extra in (("empty kernel cache (compiles)", {"HF_RLION_CACHE": cold_cache}), ("warm kernel cache", {})):
            env = dict(os.environ, **env_extra)
            out = subprocess.run(
                [sys.executable, "-c", FIRST_STEP_SCRIPT, str(numel), str(tensors)],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
            setup, first = float(out[-2]), float(out[-1])
            print(
                f"fresh process, {label}: import + model setup {setup:.2f} s, first RLion.step() {first:.2f} s, "
                f"total {setup + first:.2f} s"
            )


MEMORY_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from hf_rlion import RLion
    numel, tensors, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    kw = {"fused": dict(fused=True), "foreach": dict(foreach=True, fused=False), "single": dict(foreach=False, fused=False)}[mode]
    params = [torch.nn.Parameter(torch.randn(numel // tensors)) for _ in range(tensors)]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = RLion(params, lr=1e-4, **kw)
    opt.step()  # state allocated here
    def kib(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1])
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS mark (VmHWM)
    before = kib("VmRSS")
    opt.step()
    print((kib("VmHWM") - before) / 1024)
    """
)


def step_memory(numel: int, tensors: int) -> None:
    """Peak RSS growth during one (non-first) RLion step, per path, each in a fresh process."""
    largest = numel // tensors * 4 / 2**20
    print(f"\npeak RSS growth during one RLion step ({numel / 1e6:.0f}M params, largest tensor {largest:.1f} MiB):")
    for mode in ("fused", "foreach", "single"):
        out = subprocess.run(
            [sys.executable, "-c", MEMORY_SCRIPT, str(numel), str(tensors), mode],
            capture_output=True,
            text=True,
        )
        value = out.stdout.split()[-1] if out.returncode == 0 and out.stdout.split() else f"failed: {out.stderr[-200:]}"
        print(f"  {mode:8s} {float(value):8.1f} MiB" if out.returncode == 0 else f"  {mode:8s} {value}")


def plot(curves: dict[str, list[tuple[int, float]]], path: str, machine: str, stat: str, rounds: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for name, points in curves.items():
        if points:
            xs, ys = zip(*points)
            style = "-" if name.startswith("rlion") else "--"
            ax.plot(xs, ys, style, marker="o", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters (float32, 50 tensors)")
    ax.set_ylabel(
        f"ms per optimizer step ({'median' if stat == 'median' else 'fastest'} of {rounds} rounds)"
    )
    ax.set_title(f"Optimizer step time vs parameter count\n{machine}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def machine_description() -> str:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=25e6, help="total float32 parameters (default 25e6)")
    parser.add_argument("--tensors", type=int, default=50, help="number of parameter tensors (default 50)")
    parser.add_argument("--rounds", type=int, default=15, help="timed steps per optimizer (median reported)")
    parser.add_argument("--sizes", type=str, default="", help="comma-separated parameter counts for the scaling curve")
    parser.add_argument("--plot", type=str, default="", help="write the step-time-vs-parameters figure here")
    parser.add_argument(
        "--plot-stat",
        choices=["median", "best"],
        default="median",
        help="plot the median step time, or the fastest round (closest to an idle machine)",
    )
    parser.add_argument(
        "--only", type=str, default="", help="comma-separated substrings: time only optimizers whose name has one"
    )
    parser.add_argument("--skip", type=str, default="", help="comma-separated substrings of names to leave out")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--first-step", action="store_true", help="also time the first step in fresh processes")
    parser.add_argument("--memory", action="store_true", help="also measure peak RSS growth during a step")
    parser.add_argument("--memory-tensors", type=int, default=5, help="tensors in the --memory model (default 5)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    candidates = CANDIDATES
    if args.only:
        keys = args.only.split(",")
        candidates = [c for c in candidates if any(k in c.name for k in keys) or c.name == REFERENCE]
    if args.skip:
        keys = args.skip.split(",")
        candidates = [c for c in candidates if not any(k in c.name for k in keys) or c.name == REFERENCE]
    machine = machine_description()
    print(machine)
    sizes = [int(float(s)) for s in args.sizes.split(",")] if args.sizes else [int(args.params)]
    curves: dict[str, list[tuple[int, float]]] = {c.name: [] for c in candidates}
    for numel in sizes:
        params = make_params(numel, args.tensors)
        numel = sum(p.numel() for p in params)
        stream = stream_bandwidth(numel, max(5, args.rounds))
        results = time_steps(candidates, params, args.rounds, progress=sys.stderr.isatty())
        print_table(results, candidates, numel, stream)
        for name, r in results.items():
            if "ms" in r:
                curves[name].append((numel, r["best_ms" if args.plot_stat == "best" else "ms"]))
        del params, results
    if args.plot:
        plot(curves, args.plot, machine, args.plot_stat, args.rounds)
    if args.first_step:
        print()
        first_step_times(int(args.params), args.tensors)
    if args.memory:
        # few large tensors, so that a tensor-sized temporary would show in the resident set
        step_memory(int(args.params), args.memory_tensors)


if __name__ == "__main__":
    main()
