"""Check the Triton kernels on a CUDA GPU, then time one optimizer step against the alternatives.

    python benchmarks/gpu_check.py                          # checks + timings, 100M fp32 params in 200 tensors
    python benchmarks/gpu_check.py --numel 2e7 --tensors 50 --dtype bfloat16 --iters 50
    python benchmarks/gpu_check.py --checks-only            # correctness only (seconds)

Checks (each prints PASS/FAIL with its largest deviation; the exit status is 1 when any fails):

1. arctan: ``hf_rlion.kernels.triton_atan`` on the GPU against the C kernel's arctan
   (``hf_rlion.kernels.cpu_rlion.atan``) on 2^22 random bit patterns plus specials: at most 1 ulp apart
   (a GPU compiler may contract a multiply-add the C code keeps separate).
2. RLion step (``triton_rlion.fused_rlion``): tensors of float32/bfloat16/float16 and awkward sizes
   against :func:`hf_rlion.rlion.rlion_update_` in float64 on the GPU, both scalings; a NaN gradient
   leaves its tensor untouched and is flagged.
3. RLion8bit step (``triton_rlion8bit.fused_rlion8bit``) against
   :func:`hf_rlion.rlion8bit.rlion8bit_reference_update_` (bitsandbytes' CUDA quantisation) from the
   same state: parameters within float32 rounding, absmax within 1e-6, codes at most one apart.
4. The optimizers' Triton path (``RLion``, ``RLion8bit`` with defaults): picked on CUDA; after a
   warm-up step, two steps (one with a NaN gradient) under ``torch.cuda.set_sync_debug_mode("error")``;
   ``nonfinite_skips`` is 1 when read; ``step()`` captured in a CUDA graph and replayed gives the
   eager steps' parameters and step counts.

Timings: CUDA events around each step (after warm-up), median over ``--iters`` steps, for torch's
fused and foreach AdamW, RLion's foreach path, the Triton RLion (both scalings), the Triton RLion8bit,
and bitsandbytes' Lion8bit / AdamW8bit where installed; ms/step, ratio to fused AdamW, and the
effective bandwidth of the bytes each update must move. Name the GPU with every figure you quote.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numel", type=float, default=1e8, help="parameters in total (default 1e8)")
    parser.add_argument("--tensors", type=int, default=200, help="tensors they are split into (default 200)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--iters", type=int, default=20, help="timed steps per optimizer (default 20)")
    parser.add_argument("--checks-only", action="store_true", help="skip the timings")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def _report(name: str, ok: bool, detail: str) -> bool:
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
    return ok


def check_atan(torch) -> bool:
    from hf_rlion.kernels import cpu_rlion
    from hf_rlion.kernels import triton_atan

    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**31), 2**31 - 1, (1 << 22,), generator=g, dtype=torch.int64).to(torch.int32)
    specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1.0, -1.0, 1e-45, 1e-40, 3.4e38])
    x = torch.cat([specials, bits.view(torch.float32), torch.randn(1 << 20, generator=g)])
    ours = triton_atan.atan(x.cuda()).cpu()
    reference = cpu_rlion.atan(x)
    nan = torch.isnan(x)

    def ordered(t):
        i = t.view(torch.int32).to(torch.int64)
        return torch.where(i < 0, -(i & 0x7FFFFFFF), i)

    ulps = (ordered(ours) - ordered(reference)).abs()[~nan]
    ok = bool(torch.isnan(ours[nan]).all()) and ulps.max().item() <= 1
    ok = ok and torch.equal(ours[~nan].signbit(), x[~nan].signbit())
    return _report("arctan vs C kernel", ok, f"max {ulps.max().item()} ulp, {(ulps > 0).float().mean().item():.2%} differ")


def _own_rounding(dtype) -> float:
    """The relative rounding step of storing a float32 result as ``dtype`` (0 for float32 itself)."""
    import torch

    return 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps


HYPERPARAMETERS = dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1, alpha=3.0, bias_correction=True)


def check_rlion(torch) -> bool:
    from hf_rlion.kernels.triton_rlion import fused_rlion
    from hf_rlion.rlion import rlion_update_

    ok = True
    torch.manual_seed(1)
    shapes = [(4095,), (), (0,), (4097,), (300, 771), (1,), (1 << 20,)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.bfloat16, torch.float16, torch.float32]
    for scaling in ("rms", "fixed"):
        params = [torch.randn(s, device="cuda").to(d) for s, d in zip(shapes, dtypes)]
        grads = [(torch.randn(s, device="cuda") * 1e-3).to(d) for s, d in zip(shapes, dtypes)]
        exp_avgs = [torch.randn(s, device="cuda") * 1e-3 for s in shapes]
        wide = [(p.double(), g.double(), m.double()) for p, g, m in zip(params, grads, exp_avgs)]
        steps = torch.arange(1, len(params) + 1, device="cuda", dtype=torch.float32)
        hp = dict(HYPERPARAMETERS, alpha_scaling=scaling, maximize=False)
        flags = fused_rlion(params, grads, exp_avgs, steps, **hp)
        worst = 0.0
        for (p64, g64, m64), step, p, m in zip(wide, range(1, len(params) + 1), params, exp_avgs):
            rlion_update_(p64, g64, m64, step, **hp)
            if p.numel() == 0:
                continue
            eps = _own_rounding(p.dtype) / 2 + torch.finfo(torch.float32).eps
            tolerance = p64.abs() * eps + hp["lr"] * 1e-5
            worst = max(worst, ((p.double() - p64).abs() / tolerance).max().item())
            m_tolerance = (m64.abs() + g64.abs()) * 4 * torch.finfo(torch.float32).eps
            worst = max(worst, ((m.double() - m64).abs() / m_tolerance).max().item())
        good = worst <= 1.0 and flags.tolist() == [0] * len(params)
        ok &= _report(f"RLion step, {scaling}", good, f"largest error {worst:.2f} of the tolerance")
    # NaN policy
    params = [torch.randn(5000, device="cuda"), torch.randn(300, device="cuda")]
    grads = [torch.randn(5000, device="cuda"), torch.randn(300, device="cuda")]
    grads[0][4500] = math.nan
    exp_avgs = [torch.zeros_like(p) for p in params]
    before = params[0].clone()
    flags = fused_rlion(params, grads, exp_avgs, [1, 1], alpha_scaling="rms", maximize=False, **HYPERPARAMETERS)
    good = flags.tolist() == [1, 0] and torch.equal(params[0], before) and not exp_avgs[0].any()
    ok &= _report("RLion NaN gradient skipped and flagged", good, f"flags {flags.tolist()}")
    return ok


def check_rlion8bit(torch) -> bool:
    import bitsandbytes.functional as bnb_functional

    from hf_rlion.kernels.triton_rlion8bit import fused_rlion8bit
    from hf_rlion.rlion8bit import rlion8bit_reference_update_

    ok = True
    qmap = bnb_functional.create_dynamic_map(signed=True).cuda()
    torch.manual_seed(2)
    shapes = [(1000,), (257,), (1 << 20,), (333, 77)]
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.float16]
    for scaling in ("rms", "fixed"):
        params = [torch.randn(s, device="cuda").to(d) for s, d in zip(shapes, dtypes)]
        grads = [(torch.randn(s, device="cuda") * 1e-3).to(d) for s, d in zip(shapes, dtypes)]
        states = [bnb_functional.quantize_blockwise(torch.randn(s, device="cuda") * 1e-3, code=qmap, blocksize=256) for s in shapes]
        codes = [c for c, _ in states]
        absmaxes = [q.absmax.clone() for _, q in states]
        ref = [[t.clone() for t in tensors] for tensors in (params, codes, absmaxes)]
        hp = dict(HYPERPARAMETERS, alpha_scaling=scaling, maximize=False)
        flags = fused_rlion8bit(params, grads, codes, absmaxes, qmap, [1] * len(params), **hp)
        worst_p, worst_a, code_gap, differing = 0.0, 0.0, 0, 0.0
        for i in range(len(params)):
            rlion8bit_reference_update_(ref[0][i], grads[i], ref[1][i], ref[2][i], qmap, 1, **hp)
            # two float32 results each within one float32 ulp of the exact step, then both rounded to the
            # parameter's dtype: they may land one bfloat16/float16 ulp apart
            eps = _own_rounding(params[i].dtype) + 2 * torch.finfo(torch.float32).eps
            tolerance = ref[0][i].double().abs() * eps + hp["lr"] * 1e-5
            worst_p = max(worst_p, ((params[i].double() - ref[0][i].double()).abs() / tolerance).max().item())
            worst_a = max(worst_a, ((absmaxes[i] - ref[2][i]).abs() / ref[2][i].clamp_min(1e-30)).max().item())
            gap = (codes[i].long() - ref[1][i].long()).abs()
            code_gap, differing = max(code_gap, gap.max().item()), max(differing, (gap > 0).float().mean().item())
        good = worst_p <= 1.0 and worst_a <= 1e-6 and code_gap <= 1 and flags.tolist() == [0] * len(params)
        detail = f"param error {worst_p:.2f} of tolerance, absmax rel {worst_a:.1e}, codes <= {code_gap} apart ({differing:.3%})"
        ok &= _report(f"RLion8bit step, {scaling}", good, detail)
    return ok


# --------------------------------------------------------------------------------------------
# Timings
# --------------------------------------------------------------------------------------------


def _optimizer_run(torch, make, grads, graph: bool):
    """Parameters and step counts after a warm-up step and len(grads) - 1 more, eager or graph-replayed."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(g.shape, device="cuda")) for g in grads[0]]
    for p in params:
        p.grad = torch.zeros_like(p)  # static gradient tensors, refilled before each step
    optimizer = make(params)

    def feed(step_grads):
        for p, g in zip(params, step_grads):
            p.grad.copy_(g)

    feed(grads[0])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as torch's graph guide does
        optimizer.step()
    torch.cuda.current_stream().wait_stream(side)
    if graph:
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            optimizer.step()
    for step_grads in grads[1:]:
        feed(step_grads)
        if graph:
            captured.replay()
        else:
            optimizer.step()
    torch.cuda.synchronize()
    steps = [optimizer.state[p]["step"].item() for p in params]
    return [p.detach().clone() for p in params], steps, optimizer


def check_optimizers(torch) -> bool:
    from hf_rlion import RLion, RLion8bit, rlion

    ok = True
    makers = [
        ("RLion", lambda ps: RLion(ps, lr=1e-2, weight_decay=0.1, bias_correction=True)),
        ("RLion8bit", lambda ps: RLion8bit(ps, lr=1e-2, min_8bit_size=512, bias_correction=True)),
    ]
    for name, make in makers:
        torch.manual_seed(1)
        shapes = [(5000,), (64, 33), (300,)]
        grads = [[torch.randn(s, device="cuda") * 1e-2 for s in shapes] for _ in range(4)]
        grads[1][2][0] = math.nan
        # picked by default, and no synchronisation in step() after the warm-up step
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in shapes]
        optimizer = make(params)
        for p, g in zip(params, grads[0]):
            p.grad = g.clone()
        optimizer.step()
        if name == "RLion":
            picked = optimizer._implementation(optimizer.param_groups[0], params) is rlion._triton_kernel
        else:
            picked = optimizer._triton_candidates(optimizer.param_groups[0]) is not None
        try:
            torch.cuda.set_sync_debug_mode("error")
            for step_grads in grads[1:3]:
                for p, g in zip(params, step_grads):
                    p.grad = g.clone()
                optimizer.step()
            no_sync, sync_detail = True, "no synchronisation"
        except RuntimeError as err:
            no_sync, sync_detail = False, str(err).splitlines()[0]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        skips = optimizer.nonfinite_skips
        ok &= _report(f"{name} default path on CUDA", bool(picked), "Triton" if picked else "not Triton")
        ok &= _report(f"{name} step() under sync debug mode 'error'", no_sync, sync_detail)
        ok &= _report(f"{name} NaN gradient counted", skips == 1, f"nonfinite_skips = {skips}")
        try:
            eager, eager_steps, _ = _optimizer_run(torch, make, grads, graph=False)
            replayed, replayed_steps, _ = _optimizer_run(torch, make, grads, graph=True)
            gap = max((a - b).abs().max().item() for a, b in zip(eager, replayed))
            same = gap == 0 and eager_steps == replayed_steps
            detail = f"max |eager - replay| = {gap:.3g}, steps {eager_steps} / {replayed_steps}"
        except Exception as err:  # a capture failure is a result to report, not a crash
            same, detail = False, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ok &= _report(f"{name} step() in a CUDA graph", same, detail)
    return ok


def make_params(torch, numel: int, tensors: int, dtype):
    per = max(1, numel // tensors)
    params = []
    for _ in range(tensors):
        p = torch.nn.Parameter(torch.randn(per, device="cuda", dtype=dtype))
        p.grad = torch.randn(per, device="cuda", dtype=dtype) * 1e-3
        params.append(p)
    return params


def time_steps(torch, step, iters: int) -> float:
    """Median ms of ``step()`` by CUDA events, after three warm-up steps."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def candidates(torch, params):
    """(name, step function, state bytes read + written per parameter)."""
    from hf_rlion import RLion, RLion8bit
    from hf_rlion.kernels.triton_rlion import fused_rlion
    from hf_rlion.kernels.triton_rlion8bit import fused_rlion8bit

    hp = dict(lr=1e-4, beta1=0.9, beta2=0.99, weight_decay=0.0, alpha=3.0, bias_correction=False, maximize=False)
    grads = [p.grad for p in params]
    exp_avgs = [torch.zeros(p.shape, device="cuda") for p in params]
    codes = [torch.full(p.shape, 127, dtype=torch.uint8, device="cuda") for p in params]
    absmaxes = [torch.zeros(math.ceil(p.numel() / 256), device="cuda") for p in params]
    import bitsandbytes.functional as bnb_functional

    qmap = bnb_functional.create_dynamic_map(signed=True).cuda()
    steps = [1] * len(params)
    out = [
        ("adamw fused (torch)", torch.optim.AdamW(params, lr=1e-3, fused=True).step, 16),
        ("adamw foreach (torch)", torch.optim.AdamW(params, lr=1e-3, foreach=True).step, 16),
        ("rlion foreach (torch ops)", RLion(params, lr=1e-4, foreach=True).step, 8),
        ("rlion (optimizer, Triton path)", RLion(params, lr=1e-4).step, 8),
        ("rlion8bit (optimizer, Triton path)", RLion8bit(params, lr=1e-4).step, 2 + 8 / 256),
        ("rlion triton, rms", lambda: fused_rlion(params, grads, exp_avgs, steps, alpha_scaling="rms", **hp), 8),
        ("rlion triton, fixed", lambda: fused_rlion(params, grads, exp_avgs, steps, alpha_scaling="fixed", **hp), 8),
        (
            "rlion triton, fixed, no NaN check",
            lambda: fused_rlion(params, grads, exp_avgs, steps, alpha_scaling="fixed", check_finite=False, **hp),
            8,
        ),
        (
            "rlion8bit triton, rms",
            lambda: fused_rlion8bit(params, grads, codes, absmaxes, qmap, steps, alpha_scaling="rms", **hp),
            2 + 8 / 256,
        ),
    ]
    try:
        import bitsandbytes as bnb

        out.append(("lion8bit (bitsandbytes)", bnb.optim.Lion8bit(params, lr=1e-4).step, 2 + 8 / 256))
        out.append(("adamw8bit (bitsandbytes)", bnb.optim.AdamW8bit(params, lr=1e-3).step, 4 + 16 / 256))
    except Exception as err:  # pragma: no cover - depends on the installed bitsandbytes
        print(f"bitsandbytes optimizers unavailable: {err}")
    return out


def run_timings(torch, args) -> None:
    dtype = getattr(torch, args.dtype)
    params = make_params(torch, int(args.numel), args.tensors, dtype)
    numel = sum(p.numel() for p in params)
    value_bytes = params[0].element_size()
    print(f"\n{torch.cuda.get_device_name()}: {numel / 1e6:.1f}M {args.dtype} parameters in {len(params)} tensors")
    rows = []
    for name, step, state_bytes in candidates(torch, params):
        ms = time_steps(torch, step, args.iters)
        moved = numel * (3 * value_bytes + state_bytes)  # read p, g; write p; state in and out
        rows.append((name, ms, moved / (ms * 1e-3) / 1e9))
        torch.cuda.empty_cache()
    reference = rows[0][1]
    print(f"{'optimizer':38s} {'ms/step':>9s} {'x fused AdamW':>14s} {'GB/s':>8s}")
    for name, ms, bandwidth in rows:
        print(f"{name:38s} {ms:9.3f} {ms / reference:14.2f} {bandwidth:8.0f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check (the kernels' CPU tests: tests/test_triton_kernels.py)")
        return 2
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    import triton

    print(f"triton {triton.__version__}")
    ok = check_atan(torch)
    ok &= check_rlion(torch)
    ok &= check_rlion8bit(torch)
    ok &= check_optimizers(torch)
    if not args.checks_only:
        run_timings(torch, args)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
