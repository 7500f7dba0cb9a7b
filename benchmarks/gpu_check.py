"""Check the Triton kernels on a CUDA GPU, then time one optimizer step against the alternatives.

    python benchmarks/gpu_check.py                            # checks + timings on the ViT-B and 1.3B sets
    python benchmarks/gpu_check.py --markdown gpu_check.md    # the same, tables also written as markdown
    python benchmarks/gpu_check.py --checks-only              # correctness only (about a minute)
    python benchmarks/gpu_check.py --sets vit-b --dtype bfloat16 --iters 50
    python benchmarks/gpu_check.py --dry-run                  # no GPU: everything on tiny CPU tensors under
                                                              # Triton's interpreter (tests/test_gpu_check.py)

On a machine without a package index, bring bitsandbytes and lion-pytorch as wheels (docs/benchmarks.md,
"GPU"); the rest (torch, Triton) is what a stock CUDA image has. Everything else comes from this checkout.

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

Timings, per parameter set (``vit-b``: timm's ViT-B/16, 152 tensors, 86.6M parameters; ``1.3b``: a
GPT-2-style decoder of width 2048 and 24 layers, 292 tensors, 1.32B parameters): the median of
``--iters`` CUDA-event-timed steps (after three warm-up steps) for torch's fused and foreach AdamW,
RLion's foreach path, RLion and RLion8bit by their Triton kernels (``fused=True``), RLion8bit's
torch path (``fused=False``), bitsandbytes' Lion8bit, Lion (32-bit) and AdamW8bit, and lion-pytorch's
Triton Lion; each as ms/step, its ratio to fused AdamW, and the bandwidth of the bytes a one-pass
update must move (parameter and gradient read, parameter written, state read and written) against a
device-to-device copy measured in the same run. The goals of the GPU issue are printed as met or not.
Name the GPU with every figure you quote.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import time

#: The device everything runs on: "cuda", or "cpu" for --dry-run.
DEVICE = "cuda"
#: --dry-run: tiny sizes, CPU tensors, Triton's interpreter; CUDA-only checks are skipped.
DRY_RUN = False


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default="vit-b,1.3b", help="parameter sets to time: vit-b, 1.3b (default both)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--iters", type=int, default=20, help="timed steps per optimizer (default 20)")
    parser.add_argument("--checks-only", action="store_true", help="skip the timings")
    parser.add_argument("--markdown", default=None, help="also write the timing tables to this markdown file")
    parser.add_argument("--dry-run", action="store_true", help="no GPU: tiny CPU tensors under Triton's interpreter")
    return parser.parse_args(argv)


def _size(full: int, dry: int) -> int:
    return dry if DRY_RUN else full


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def _report(name: str, ok: bool, detail: str) -> bool:
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
    return ok


def check_atan(torch) -> bool:
    from hf_rlion.kernels import cpu_rlion, triton_atan

    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**31), 2**31 - 1, (_size(1 << 22, 1 << 10),), generator=g, dtype=torch.int64).to(torch.int32)
    specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1.0, -1.0, 1e-45, 1e-40, 3.4e38])
    x = torch.cat([specials, bits.view(torch.float32), torch.randn(_size(1 << 20, 1 << 10), generator=g)])
    ours = triton_atan.atan(x.to(DEVICE)).cpu()
    if DRY_RUN:  # the C kernel is off in a dry run: the correctly rounded arctan (the polynomial is within 1 ulp)
        reference, against = torch.atan(x.double()).float(), "correctly rounded arctan"
    else:
        reference, against = cpu_rlion.atan(x), "C kernel"
    nan = torch.isnan(x)

    def ordered(t):
        i = t.view(torch.int32).to(torch.int64)
        return torch.where(i < 0, -(i & 0x7FFFFFFF), i)

    ulps = (ordered(ours) - ordered(reference)).abs()[~nan]
    ok = bool(torch.isnan(ours[nan]).all()) and ulps.max().item() <= 1
    ok = ok and torch.equal(ours[~nan].signbit(), x[~nan].signbit())
    return _report(f"arctan vs {against}", ok, f"max {ulps.max().item()} ulp, {(ulps > 0).float().mean().item():.2%} differ")


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
    big = _size(1 << 20, 5000)
    shapes = [(4095,), (), (0,), (4097,), (300, _size(771, 7)), (1,), (big,)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.bfloat16, torch.float16, torch.float32]
    for scaling in ("rms", "fixed"):
        params = [torch.randn(s, device=DEVICE).to(d) for s, d in zip(shapes, dtypes)]
        grads = [(torch.randn(s, device=DEVICE) * 1e-3).to(d) for s, d in zip(shapes, dtypes)]
        exp_avgs = [torch.randn(s, device=DEVICE) * 1e-3 for s in shapes]
        wide = [(p.double(), g.double(), m.double()) for p, g, m in zip(params, grads, exp_avgs)]
        steps = torch.arange(1, len(params) + 1, device=DEVICE, dtype=torch.float32)
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
    params = [torch.randn(5000, device=DEVICE), torch.randn(300, device=DEVICE)]
    grads = [torch.randn(5000, device=DEVICE), torch.randn(300, device=DEVICE)]
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
    qmap = bnb_functional.create_dynamic_map(signed=True).to(DEVICE)
    torch.manual_seed(2)
    shapes = [(1000,), (257,), (_size(1 << 20, 3000),), (333, _size(77, 7))]
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.float16]
    for scaling in ("rms", "fixed"):
        params = [torch.randn(s, device=DEVICE).to(d) for s, d in zip(shapes, dtypes)]
        grads = [(torch.randn(s, device=DEVICE) * 1e-3).to(d) for s, d in zip(shapes, dtypes)]
        states = [
            bnb_functional.quantize_blockwise(torch.randn(s, device=DEVICE) * 1e-3, code=qmap, blocksize=256) for s in shapes
        ]
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


def _optimizer_run(torch, make, grads, graph: bool):
    """Parameters and step counts after a warm-up step and len(grads) - 1 more, eager or graph-replayed."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(g.shape, device=DEVICE)) for g in grads[0]]
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
    fused = True if DRY_RUN else None  # on CUDA the default picks Triton; on CPU only fused=True does
    makers = [
        ("RLion", lambda ps: RLion(ps, lr=1e-2, weight_decay=0.1, bias_correction=True, fused=fused)),
        ("RLion8bit", lambda ps: RLion8bit(ps, lr=1e-2, min_8bit_size=512, bias_correction=True, fused=fused)),
    ]
    for name, make in makers:
        torch.manual_seed(1)
        shapes = [(5000,), (64, 33), (300,)]
        grads = [[torch.randn(s, device=DEVICE) * 1e-2 for s in shapes] for _ in range(4)]
        grads[1][2][0] = math.nan
        # picked by default, and no synchronisation in step() after the warm-up step
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, device=DEVICE)) for s in shapes]
        optimizer = make(params)
        for p, g in zip(params, grads[0]):
            p.grad = g.clone()
        optimizer.step()
        if name == "RLion":
            picked = optimizer._implementation(optimizer.param_groups[0], params) is rlion._triton_kernel
        else:
            picked = optimizer._triton_candidates(optimizer.param_groups[0]) is not None
        no_sync, sync_detail = True, "not checked (CPU dry run)"
        try:
            if not DRY_RUN:
                torch.cuda.set_sync_debug_mode("error")
            for step_grads in grads[1:3]:
                for p, g in zip(params, step_grads):
                    p.grad = g.clone()
                optimizer.step()
            if not DRY_RUN:
                sync_detail = "no synchronisation"
        except RuntimeError as err:
            no_sync, sync_detail = False, str(err).splitlines()[0]
        finally:
            if not DRY_RUN:
                torch.cuda.set_sync_debug_mode("default")
        skips = optimizer.nonfinite_skips
        ok &= _report(f"{name} default path on {DEVICE}", bool(picked), "Triton" if picked else "not Triton")
        ok &= _report(f"{name} step() under sync debug mode 'error'", no_sync, sync_detail)
        ok &= _report(f"{name} NaN gradient counted", skips == 1, f"nonfinite_skips = {skips}")
        if DRY_RUN:
            ok &= _report(f"{name} step() in a CUDA graph", True, "not checked (CPU dry run)")
            continue
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


# --------------------------------------------------------------------------------------------
# Timings
# --------------------------------------------------------------------------------------------


def vit_shapes(width: int, depth: int, mlp: int, patch: int, tokens: int, classes: int) -> list[tuple]:
    """timm's VisionTransformer: patch embedding, class token, position embedding, ``depth`` blocks
    (norm, fused qkv, projection, norm, two MLP layers: 12 tensors each), final norm, head."""
    shapes = [(width, 3, patch, patch), (width,), (1, 1, width), (1, tokens, width)]
    for _ in range(depth):
        shapes += [(width,), (width,), (3 * width, width), (3 * width,), (width, width), (width,)]
        shapes += [(width,), (width,), (mlp, width), (mlp,), (width, mlp), (width,)]
    return shapes + [(width,), (width,), (classes, width), (classes,)]


def gpt_shapes(width: int, depth: int, vocab: int, context: int) -> list[tuple]:
    """A GPT-2-style decoder: token and position embeddings, ``depth`` blocks (12 tensors each), final norm."""
    shapes = [(vocab, width), (context, width)]
    for _ in range(depth):
        shapes += [(width,), (width,), (3 * width, width), (3 * width,), (width, width), (width,)]
        shapes += [(width,), (width,), (4 * width, width), (4 * width,), (width, 4 * width), (width,)]
    return shapes + [(width,), (width,)]


PARAMETER_SETS = {
    "vit-b": lambda: vit_shapes(768, 12, 3072, 16, 197, 1000) if not DRY_RUN else vit_shapes(16, 2, 64, 4, 17, 10),
    "1.3b": lambda: gpt_shapes(2048, 24, 50304, 2048) if not DRY_RUN else gpt_shapes(16, 2, 97, 16),
}


def make_params(torch, shapes, dtype):
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, device=DEVICE, dtype=dtype) * 0.02)
        p.grad = torch.randn(shape, device=DEVICE, dtype=dtype) * 1e-3
        params.append(p)
    return params


def time_steps(torch, step, iters: int) -> float:
    """Median ms of ``step()``: CUDA events after three warm-up steps (wall clock in a dry run)."""
    for _ in range(1 if DRY_RUN else 3):
        step()
    if DRY_RUN:
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
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


def copy_bandwidth(torch, nbytes: int, iters: int) -> float:
    """GB/s of a device-to-device copy of ``nbytes`` (bytes read + bytes written, over the median time)."""
    source = torch.empty(nbytes // 4, dtype=torch.float32, device=DEVICE).normal_()
    target = torch.empty_like(source)
    ms = time_steps(torch, lambda: target.copy_(source), iters)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def candidates():
    """(name, factory of an optimizer for the parameters, state bytes read + written per parameter of a
    one-pass update, given the parameter's element size ``b``)."""
    import torch

    from hf_rlion import RLion, RLion8bit

    def bnb(name):
        def make(params):
            import bitsandbytes as bnb_module

            return getattr(bnb_module.optim, name)(params, lr=1e-4)

        return make

    def lion_pytorch_triton(params):
        from lion_pytorch import Lion

        return Lion(params, lr=1e-4, use_triton=True)

    eight_bit = lambda b: 2 + 8 / 256  # noqa: E731 - codes in and out, absmax per 256
    return [
        ("AdamW fused (torch)", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True), lambda b: 16),
        ("AdamW foreach (torch)", lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True), lambda b: 16),
        ("RLion foreach (torch ops)", lambda ps: RLion(ps, lr=1e-4, fused=False, foreach=True), lambda b: 8),
        ("RLion Triton, rms", lambda ps: RLion(ps, lr=1e-4, fused=True), lambda b: 8),
        ("RLion Triton, fixed", lambda ps: RLion(ps, lr=1e-4, fused=True, alpha_scaling="fixed"), lambda b: 8),
        ("RLion8bit Triton, rms", lambda ps: RLion8bit(ps, lr=1e-4, fused=True), eight_bit),
        ("RLion8bit torch path (fused=False)", lambda ps: RLion8bit(ps, lr=1e-4, fused=False), eight_bit),
        ("Lion8bit (bitsandbytes)", bnb("Lion8bit"), eight_bit),
        ("Lion 32-bit (bitsandbytes)", bnb("Lion"), lambda b: 8),
        ("AdamW8bit (bitsandbytes)", bnb("AdamW8bit"), lambda b: 4 + 16 / 256),
        ("Lion Triton (lion-pytorch)", lion_pytorch_triton, lambda b: 2 * b),  # its momentum has the parameter's dtype
    ]


def time_set(torch, set_name: str, args) -> dict:
    """The rows of one parameter set: {name: (ms, GB/s) or the reason it could not run}, and the copy bandwidth."""
    dtype = getattr(torch, args.dtype)
    params = make_params(torch, PARAMETER_SETS[set_name](), dtype)
    numel = sum(p.numel() for p in params)
    element = params[0].element_size()
    copy = copy_bandwidth(torch, numel * 4, args.iters)
    print(f"\n{set_name}: {numel:,} {args.dtype} parameters in {len(params)} tensors; "
          f"device copy {copy:.0f} GB/s", flush=True)  # fmt: skip
    rows = {}
    for name, make, state_bytes in candidates():
        try:
            optimizer = make(params)
            ms = time_steps(torch, optimizer.step, args.iters)
        except Exception as err:  # an optimizer that cannot run here is a row, not a crash
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            rows[name] = reason.replace("|", "/")[:120]
            print(f"{name:38s} unavailable: {rows[name]}", flush=True)
        else:
            moved = numel * (3 * element + state_bytes(element))
            rows[name] = (ms, moved / (ms * 1e-3) / 1e9)
            print(f"{name:38s} {ms:9.3f} ms", flush=True)
        optimizer = None
        gc.collect()
        if not DRY_RUN:
            torch.cuda.empty_cache()
    tensors = len(params)
    del params
    return {"rows": rows, "copy": copy, "numel": numel, "tensors": tensors}


def table(set_name: str, result: dict, dtype: str) -> list[str]:
    rows, copy = result["rows"], result["copy"]
    reference = rows["AdamW fused (torch)"]
    lines = [
        f"**{set_name}**: {result['numel']:,} {dtype} parameters in {result['tensors']} tensors; "
        f"device-to-device copy {copy:.0f} GB/s",
        "",
        "| optimizer | ms/step | × fused AdamW | GB/s (one-pass bytes) | % of copy |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        if isinstance(row, str):
            lines.append(f"| {name} | unavailable: {row} | | | |")
            continue
        ms, bandwidth = row
        ratio = f"{ms / reference[0]:.2f}" if not isinstance(reference, str) else "-"
        lines.append(f"| {name} | {ms:.3f} | {ratio} | {bandwidth:.0f} | {100 * bandwidth / copy:.0f} % |")
    return lines


def goals(set_name: str, result: dict) -> list[str]:
    """The GPU issue's goals, met or not, on this set."""
    rows, copy = result["rows"], result["copy"]

    def ms(name):
        row = rows.get(name)
        return None if row is None or isinstance(row, str) else row[0]

    lines = []
    for ours, theirs, label in (
        ("RLion Triton, rms", "AdamW fused (torch)", "RLion <= 1.0x torch fused AdamW"),
        ("RLion8bit Triton, rms", "Lion8bit (bitsandbytes)", "RLion8bit <= 1.0x bitsandbytes Lion8bit"),
    ):
        a, b = ms(ours), ms(theirs)
        if a is None or b is None:
            lines.append(f"- {set_name}: {label}: not measured")
        else:
            lines.append(f"- {set_name}: {label}: {'met' if a <= b else 'NOT met'} ({a / b:.2f}x)")
    if set_name == "1.3b":
        for name in ("RLion Triton, rms", "RLion8bit Triton, rms"):
            row = rows.get(name)
            if row is not None and not isinstance(row, str):
                share = row[1] / copy
                lines.append(f"- {set_name}: {name} >= 70 % of copy bandwidth: {'met' if share >= 0.7 else 'NOT met'} ({share:.0%})")
    return lines


def run_timings(torch, args) -> list[str]:
    markdown = []
    for set_name in [s.strip() for s in args.sets.split(",") if s.strip()]:
        if set_name not in PARAMETER_SETS:
            raise SystemExit(f"gpu_check: unknown parameter set {set_name!r} (known: {', '.join(PARAMETER_SETS)})")
        result = time_set(torch, set_name, args)
        lines = table(set_name, result, args.dtype)
        print("\n" + "\n".join(lines))
        print("\n".join(goals(set_name, result)))
        markdown += lines + [""] + goals(set_name, result) + [""]
        if not DRY_RUN:
            torch.cuda.empty_cache()
    return markdown


def main(argv=None) -> int:
    global DEVICE, DRY_RUN
    args = parse_args(argv)
    if args.dry_run:
        DEVICE, DRY_RUN = "cpu", True
        # before torch and Triton are imported: Triton's interpreter, and the C kernel off so that
        # fused=True on CPU tensors means the Triton kernels
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["HF_RLION_NATIVE"] = "0"
        args.iters = min(args.iters, 2)
    import torch

    if not DRY_RUN and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (--dry-run runs everything on tiny CPU tensors under Triton's interpreter)")
        return 2
    import triton

    device_name = torch.cuda.get_device_name() if not DRY_RUN else "CPU (dry run under Triton's interpreter)"
    header = f"device: {device_name}, torch {torch.__version__}, triton {triton.__version__}"
    print(header, flush=True)
    ok = check_atan(torch)
    ok &= check_rlion(torch)
    ok &= check_rlion8bit(torch)
    ok &= check_optimizers(torch)
    markdown = [] if args.checks_only else run_timings(torch, args)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join([header, "", f"checks: {'all passed' if ok else 'SOME FAILED'}", "", *markdown]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
