"""The fused CPU kernel against the plain reference: same numbers, same contract, no big temporaries."""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys

import pytest
import torch

from hf_rlion import RLion
from hf_rlion.kernels import cpu_rlion
from hf_rlion._optimizer_base import finite_gradient_mask
from hf_rlion.rlion import _foreach_rlion, _fused_cpu_rlion, _single_tensor_rlion, rlion_update_

pytestmark = pytest.mark.skipif(not cpu_rlion.kernel_available(), reason="no C compiler for the CPU kernel")

GROUPS = [
    dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, alpha=3.0, alpha_scaling="rms", bias_correction=False),
    dict(lr=3e-3, betas=(0.8, 0.95), weight_decay=0.0, alpha=50.0, alpha_scaling="fixed", bias_correction=True),
    dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.5, alpha=1000.0, alpha_scaling="fixed", bias_correction=False),
    dict(lr=5e-3, betas=(0.5, 0.9), weight_decay=0.01, alpha=1.0, alpha_scaling="rms", bias_correction=True),
    dict(lr=2e-2, betas=(0.0, 0.999), weight_decay=0.0, alpha=10.0, alpha_scaling="fixed", bias_correction=True),
    dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.2, alpha=3.0, alpha_scaling="rms", bias_correction=False,
         maximize=True),
]
# one tensor per group spanning several 16384-element kernel chunks, plus small odd shapes
SHAPES = [(300, 129), (13,), (3, 4, 2), (), (70001,), (64, 3)]
GRAD_SCALES = [1e-3, 1.0, 1e-2, 0.3, 1e-4, 1e-3]


def make_problem(seed=0, steps=30, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    grads = [[(torch.randn(s, generator=gen) * sc).to(dtype) for s, sc in zip(SHAPES, GRAD_SCALES)] for _ in range(steps)]
    return params, grads


def run(params, grads, **path):
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = RLion([{"params": [p], **hp} for p, hp in zip(ps, GROUPS)], **path)
    for step_grads in grads:
        for p, g in zip(ps, step_grads):
            p.grad = g.clone()
        opt.step()
    return ps, opt


def float64_reference(params, grads):
    """The package's reference update, run in float64 (parameters and momentum)."""
    ps = [p.double() for p in params]
    ms = [torch.zeros_like(p) for p in ps]
    for t, step_grads in enumerate(grads, start=1):
        for p, g, m, hp in zip(ps, step_grads, ms, GROUPS):
            b1, b2 = hp["betas"]
            rlion_update_(p, g.double(), m, t, lr=hp["lr"], beta1=b1, beta2=b2, weight_decay=hp["weight_decay"],
                          alpha=hp["alpha"], alpha_scaling=hp["alpha_scaling"],
                          bias_correction=hp["bias_correction"], maximize=hp.get("maximize", False))
    return ps, ms


def test_default_cpu_path_is_the_fused_kernel():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = RLion([p])
    assert opt._implementation(opt.param_groups[0], [p]) is _fused_cpu_rlion
    for switches, expected in [(dict(foreach=False), _single_tensor_rlion), (dict(foreach=True), _foreach_rlion)]:
        other = RLion([p], **switches)
        assert other._implementation(other.param_groups[0], [p]) is expected


def test_matches_float64_reference_over_many_steps_all_options():
    """Error vs float64 at most the float32 storage error the reference path itself has (~1e-6)."""
    params, grads = make_problem(steps=40)
    fused, fused_opt = run(params, grads, fused=True)
    plain, _ = run(params, grads, foreach=False, fused=False)
    expected_p, expected_m = float64_reference(params, grads)
    for p, q, e_p, e_m in zip(fused, plain, expected_p, expected_m):
        scale = e_p.abs().max()
        fused_error = (p.detach().double() - e_p).abs().max() / scale
        reference_error = (q.detach().double() - e_p).abs().max() / scale
        assert fused_error < 3e-6
        assert fused_error <= 1.25 * reference_error + 1e-7
        torch.testing.assert_close(fused_opt.state[p]["exp_avg"].double(), e_m, rtol=1e-6, atol=1e-10)


def test_matches_float32_single_tensor_path_closely():
    params, grads = make_problem(seed=1)
    fused, fused_opt = run(params, grads, fused=True)
    plain, plain_opt = run(params, grads, foreach=False, fused=False)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7)
        # momentum does not depend on the arctan: same float32 formula, bit for bit
        assert torch.equal(fused_opt.state[a]["exp_avg"], plain_opt.state[b]["exp_avg"])
        assert fused_opt.state[a]["step"] == plain_opt.state[b]["step"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_round_like_the_reference(dtype):
    params, grads = make_problem(seed=2, steps=15, dtype=dtype)
    fused, fused_opt = run(params, grads, fused=True)
    plain, plain_opt = run(params, grads, foreach=False, fused=False)
    for a, b in zip(fused, plain):
        assert a.dtype == dtype and fused_opt.state[a]["exp_avg"].dtype == torch.float32
        torch.testing.assert_close(fused_opt.state[a]["exp_avg"], plain_opt.state[b]["exp_avg"], rtol=1e-6, atol=1e-9)
        # a float32 update 1 ulp apart may round the 8/11-bit mantissa the other way: at most 1 ulp of dtype
        ulp = torch.finfo(dtype).eps * b.detach().float().abs().clamp_min(torch.finfo(dtype).tiny)
        assert ((a.detach().float() - b.detach().float()).abs() <= ulp * 1.01).all()
        assert (a.detach() == b.detach()).float().mean() > 0.95


def test_bfloat16_rounding_is_round_to_nearest_even():
    # one step with lr chosen so that the float32 result falls exactly between two bfloat16 values
    p = torch.nn.Parameter(torch.tensor([1.0, 1.0], dtype=torch.bfloat16))
    p.grad = torch.tensor([-1.0, 1.0], dtype=torch.bfloat16)
    half_ulp = 2.0**-8  # bfloat16 spacing at 1 is 2^-7
    opt = RLion([p], lr=half_ulp, alpha=1e30, alpha_scaling="fixed", fused=True)
    opt.step()  # u = ±1 exactly: 1 ± 2^-8 ties to even -> 1.0 going up, 1 - 2^-8 is exact going down
    expected = torch.tensor([1.0 + half_ulp, 1.0 - half_ulp]).to(torch.bfloat16)
    assert torch.equal(p.detach(), expected)


def run_big_group(alpha_scaling, threads, split_min=None, steps=3):
    """One group large enough for the kernel to use several threads (and to split tensors)."""
    gen = torch.Generator().manual_seed(7)
    shapes = [(700_000,), (40_000,), (300, 129)]
    params = [torch.randn(s, generator=gen) for s in shapes]
    exp_avgs = [torch.zeros(s) for s in shapes]
    hp = dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1, alpha=3.0 if alpha_scaling == "rms" else 100.0,
              alpha_scaling=alpha_scaling, bias_correction=True, maximize=False)
    saved_threads, saved_split = torch.get_num_threads(), cpu_rlion.RMS_SPLIT_MIN_NUMEL
    try:
        torch.set_num_threads(threads)
        if split_min is not None:
            cpu_rlion.RMS_SPLIT_MIN_NUMEL = split_min
        for step in range(1, steps + 1):
            grads = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]
            cpu_rlion.fused_rlion(params, grads, exp_avgs, [step] * len(shapes), **hp)
    finally:
        torch.set_num_threads(saved_threads)
        cpu_rlion.RMS_SPLIT_MIN_NUMEL = saved_split
    return params + exp_avgs


@pytest.mark.parametrize("alpha_scaling", ["rms", "fixed"])
def test_results_do_not_depend_on_the_thread_count(alpha_scaling):
    one = run_big_group(alpha_scaling, threads=1)
    for a, b in zip(one, run_big_group(alpha_scaling, threads=2)):
        assert torch.equal(a, b)


def test_tensors_split_across_threads_give_the_same_numbers():
    # "rms": small tensors are done by one thread each, large ones split across threads
    assert cpu_rlion.split_numel([700_000, 40_000, 38_700], 2) == cpu_rlion.RMS_SPLIT_MIN_NUMEL > 700_000
    owned = run_big_group("rms", threads=2)
    split = run_big_group("rms", threads=2, split_min=1)  # now the 700k and 40k tensors are split
    for a, b in zip(owned, split):
        assert torch.equal(a, b)


@pytest.mark.parametrize("alpha_scaling", ["rms", "fixed"])
@pytest.mark.parametrize("threads", [1, 2])
def test_pipelined_read_pass_gives_each_tensor_the_numbers_it_gets_alone(alpha_scaling, threads):
    # With rms (or check_finite) each thread updates one tensor while reading the next it has
    # taken; which tensors get paired depends on the thread count and timing. Stepping every
    # tensor alone in its own call (no pairing) must give the same bits, including around a
    # tensor skipped for a NaN gradient and for bfloat16 tensors in the same call.
    gen = torch.Generator().manual_seed(3)
    shapes = [(90_001,), (256,), (70_000,), (1000, 65), (1,), (33_000,), (16384,), (257, 3)]
    dtypes = [torch.float32, torch.float32, torch.bfloat16, torch.float32, torch.float32, torch.bfloat16,
              torch.float32, torch.float32]
    params = [torch.randn(s, generator=gen).to(d) for s, d in zip(shapes, dtypes)]
    grads = [(torch.randn(s, generator=gen) * 1e-2).to(d) for s, d in zip(shapes, dtypes)]
    grads[3].view(-1)[12345] = float("nan")
    exp_avgs = [torch.randn(s, generator=gen) * 1e-2 for s in shapes]
    hp = dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.0, alpha=3.0 if alpha_scaling == "rms" else 100.0,
              alpha_scaling=alpha_scaling, bias_correction=True, maximize=False, check_finite=True)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        together = [t.clone() for t in params], [m.clone() for m in exp_avgs]
        skipped = cpu_rlion.fused_rlion(*together[:1], grads, together[1], [4] * len(shapes), **hp)
        alone = [t.clone() for t in params], [m.clone() for m in exp_avgs]
        skipped_alone = [i for i in range(len(shapes))
                         if cpu_rlion.fused_rlion([alone[0][i]], [grads[i]], [alone[1][i]], [4], **hp)]
    finally:
        torch.set_num_threads(saved)
    assert skipped == skipped_alone == [3]
    assert torch.equal(together[0][3], params[3]) and torch.equal(together[1][3], exp_avgs[3])
    for a, b in zip(together[0] + together[1], alone[0] + alone[1]):
        assert torch.equal(a, b)
    assert not torch.equal(together[0][0], params[0])


@pytest.mark.parametrize("threads", [1, 2])
def test_finite_gradient_whose_sum_of_squares_overflows_is_stepped_like_the_reference(threads, monkeypatch):
    # |c| ~ 1e20: sum(c^2) is inf in float32 (torch's norm too), so RMS = inf and alpha_t = 0. The
    # kernel used to take the inf total for a NaN/inf gradient and skip the tensor; it must step it
    # as the reference does (momentum updated, parameter only decayed), and count no skip.
    gen = torch.Generator().manual_seed(5)
    shapes = [(3000,), (700_000,), (500,)]
    monkeypatch.setattr(cpu_rlion, "RMS_SPLIT_MIN_NUMEL", 1)  # the 700k tensor is split across the threads
    params = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) * 1e-2 for s in shapes]
    grads[0].mul_(1e22)
    grads[1].mul_(1e22)
    hp = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, alpha=3.0, alpha_scaling="rms")
    results = []
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for fused in (True, False):
            ps = [torch.nn.Parameter(t.clone()) for t in params]
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt = RLion(ps, fused=fused, foreach=False, **hp)
            opt.step()
            assert opt.nonfinite_skips == 0
            results.append((ps, [opt.state[p]["exp_avg"] for p in ps]))
    finally:
        torch.set_num_threads(saved)
    (fast_p, fast_m), (ref_p, ref_m) = results
    for i in (0, 1):
        assert torch.equal(fast_p[i], ref_p[i]) and torch.equal(fast_p[i], params[i] * (1 - 1e-2 * 0.1))
        assert torch.equal(fast_m[i], ref_m[i]) and torch.isfinite(fast_m[i]).all()
    assert torch.allclose(fast_p[2], ref_p[2], rtol=0, atol=1e-6) and not torch.equal(fast_p[2], params[2])


def test_step_counts_are_incremented_by_the_kernel_or_by_torch_for_other_dtypes():
    counts = [torch.tensor(2.0), torch.tensor(7.0)]
    assert cpu_rlion.increment_steps(counts) == [3, 8] and [c.item() for c in counts] == [3.0, 8.0]
    other = [torch.tensor(2.0), torch.tensor(5.0, dtype=torch.float64)]
    assert cpu_rlion.increment_steps(other) is None and other[1].item() == 5.0  # untouched
    # an optimizer whose state holds a float64 count (an old checkpoint) still counts, via torch
    p = torch.nn.Parameter(torch.randn(10))
    opt = RLion([p], lr=1e-2)
    p.grad = torch.randn(10)
    opt.step()
    opt.state[p]["step"] = torch.tensor(5.0, dtype=torch.float64)
    opt.step()
    assert opt.state[p]["step"].item() == 6.0 and opt.state[p]["step"].dtype == torch.float64


def test_non_contiguous_tensors_fall_back_to_the_reference_in_the_same_call():
    gen = torch.Generator().manual_seed(4)
    params = [torch.randn(40, 30, generator=gen).t(), torch.randn(20000, generator=gen), torch.randn(7, generator=gen)]
    assert not params[0].is_contiguous()
    ref_params = [p.clone() for p in params]
    ms, ref_ms = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    hp = dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1, alpha=3.0, alpha_scaling="rms",
              bias_correction=True, maximize=False)
    for step in range(1, 6):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        _fused_cpu_rlion(params, grads, ms, [step] * 3, **hp)
        _single_tensor_rlion(ref_params, grads, ref_ms, [step] * 3, **hp)
    assert torch.equal(params[0], ref_params[0])  # the strided one took the reference path exactly
    for a, b in zip(params[1:], ref_params[1:]):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7)


def test_a_group_with_an_unsupported_dtype_uses_the_torch_path():
    p32, p64 = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = RLion([p32, p64])
    assert opt._implementation(opt.param_groups[0], [p32, p64]) is _single_tensor_rlion


def test_fused_true_on_unsupported_params_raises_clearly():
    with pytest.raises(RuntimeError, match="dtype"):
        p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
        p.grad = torch.ones(3, dtype=torch.float64)
        RLion([p], fused=True).step()
    assert not cpu_rlion.is_supported([torch.zeros(2, dtype=torch.float64)])
    assert cpu_rlion.is_supported([torch.zeros(2), torch.zeros(2, dtype=torch.bfloat16)])


def test_zero_size_and_scalar_parameters():
    empty = torch.nn.Parameter(torch.zeros(0, 5))
    scalar = torch.nn.Parameter(torch.tensor(2.0))
    empty.grad, scalar.grad = torch.zeros(0, 5), torch.tensor(0.5)
    opt = RLion([empty, scalar], lr=0.1, alpha_scaling="fixed", alpha=1.0, fused=True)
    opt.step()
    # c = 0.1 * 0.5 = 0.05; step = 0.1 * (2/pi) * atan(0.05)
    assert scalar.item() == pytest.approx(2.0 - 0.1 * (2 / math.pi) * math.atan(0.05), rel=1e-6)
    assert empty.shape == (0, 5)


def test_resume_from_saved_state_is_bit_identical():
    params, grads = make_problem(seed=5, steps=10)
    straight, straight_opt = run(params, grads, fused=True)
    first, first_opt = run(params, grads[:6], fused=True)
    buffer = io.BytesIO()
    torch.save(first_opt.state_dict(), buffer)
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    opt = RLion([{"params": [p], **hp} for p, hp in zip(resumed, GROUPS)], fused=True)
    buffer.seek(0)
    opt.load_state_dict(torch.load(buffer, weights_only=True))
    for step_grads in grads[6:]:
        for p, g in zip(resumed, step_grads):
            p.grad = g.clone()
        opt.step()
    for a, b in zip(resumed, straight):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_finite_mask_agrees_with_the_torch_check(dtype):
    grads = [torch.randn(50_000).to(dtype) for _ in range(6)] + [torch.randn(3, 3).to(dtype).t()]
    grads[1][-1] = float("nan")  # the last element of a multi-chunk tensor
    grads[2][0] = float("inf")
    grads[3][20_000] = -float("inf")
    grads[6][0, 2] = float("nan")  # non-contiguous: goes through the torch check
    grads.append(torch.tensor([float("nan")], dtype=torch.float64))
    expected = finite_gradient_mask(grads)
    assert expected == [True, False, False, False, True, True, False, False]
    assert cpu_rlion.finite_mask(grads, finite_gradient_mask) == expected


def test_learns_digits_like_the_reference():
    """End to end: a small MLP on scikit-learn's digits, fused vs reference, same trajectory."""
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    train, test = slice(0, 1400), slice(1400, None)

    def train_model(**path):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
        opt = RLion(model.parameters(), lr=3e-3, weight_decay=0.01, **path)
        gen = torch.Generator().manual_seed(0)
        for _ in range(150):
            idx = torch.randint(0, 1400, (64,), generator=gen)
            loss = torch.nn.functional.cross_entropy(model(x[train][idx]), y[train][idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            return model, (model(x[test]).argmax(1) == y[test]).float().mean().item()

    fused_model, fused_acc = train_model(fused=True)
    plain_model, plain_acc = train_model(foreach=False, fused=False)
    assert fused_acc > 0.85
    assert abs(fused_acc - plain_acc) < 0.02
    for a, b in zip(fused_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def _peak_rss_growth_mib(step) -> float:
    def kib(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark
    before = kib("VmRSS")
    step()
    return (kib("VmHWM") - before) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_a_step_allocates_no_tensor_sized_temporaries():
    params = [torch.nn.Parameter(torch.randn(2_000_000)) for _ in range(4)]  # 4 x 7.6 MiB
    for p in params:
        p.grad = torch.randn_like(p)
    opt = RLion(params, fused=True)
    opt.step()  # allocates the momentum
    growth = _peak_rss_growth_mib(opt.step)
    assert growth < 2.0, f"peak RSS grew {growth:.1f} MiB during a fused step"


def test_kernel_disabled_by_environment_falls_back_to_torch():
    code = (
        "import warnings, torch\n"
        "warnings.simplefilter('ignore')\n"
        "from hf_rlion import RLion\n"
        "from hf_rlion.kernels import cpu_rlion\n"
        "p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.ones(3)\n"
        "assert not cpu_rlion.is_supported([p])\n"
        "RLion([p], lr=0.1).step()\n"
        "print(p.tolist())\n"
    )
    env = dict(os.environ, HF_RLION_NATIVE="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    expected = 1.0 - 0.1 * (2 / math.pi) * math.atan(3.0)  # rms scaling: alpha * c / RMS(c) = 3
    assert [round(v, 6) for v in eval(out.stdout)] == [round(expected, 6)] * 3
