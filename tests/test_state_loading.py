"""Loading optimizer state: checks before anything changes, RLion <-> RLion8bit conversion, torch's conventions.

Each test names the defect it guards against and failed on the code before these checks,
except the one whose docstring says it guards an existing check (cpu_rlion's shape test).
"""

import copy
import io
import math
import os

import pytest
import torch
from torch import nn

from hf_rlion import RLion
from hf_rlion.registry import parse_optim_args

bnb_functional = pytest.importorskip("bitsandbytes.functional")
from hf_rlion import rlion8bit as r8  # noqa: E402
from hf_rlion.kernels import cpu_rlion8bit  # noqa: E402
from hf_rlion.rlion8bit import RLion8bit  # noqa: E402


def _trained(cls, shapes, steps=3, dtype=torch.float32, seed=0, **kwargs):
    """An optimizer of class ``cls`` after ``steps`` steps on parameters of ``shapes``."""
    generator = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(s, generator=generator).to(dtype)) for s in shapes]
    opt = cls(params, lr=1e-2, **kwargs)
    for _ in range(steps):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=generator) * 1e-2).to(dtype)
        opt.step()
    return params, opt


def _step_all(params, opt, seed=1):
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=generator) * 1e-2).to(p.dtype)
    opt.step()


def _saved(opt):
    """``opt.state_dict()`` after a ``torch.save`` / ``torch.load(weights_only=True)`` round trip."""
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _snapshot(opt):
    return copy.deepcopy((opt.param_groups, {id(p): s for p, s in opt.state.items()}))


def _assert_unchanged(opt, snapshot):
    groups, state = snapshot
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == [
        {k: v for k, v in g.items() if k != "params"} for g in groups
    ]
    assert {id(p) for p in opt.state} == set(state)
    for p, s in opt.state.items():
        assert s.keys() == state[id(p)].keys()
        for key, value in s.items():
            assert torch.equal(value, state[id(p)][key]), key


# --------------------------------------------------------------------------------------------
# issue 16.2: state tensors that do not fit their parameter
# --------------------------------------------------------------------------------------------


def test_8bit_state_of_another_shape_with_the_same_numel_is_rejected_before_anything_changes():
    """Before: the (64, 80) codes loaded into a (80, 64) parameter, and the kernel trusted them
    (with other sizes: "double free or corruption")."""
    _, source = _trained(RLion8bit, [(64, 80), (10,)], min_8bit_size=1024)
    params, opt = _trained(RLion8bit, [(80, 64), (10,)], min_8bit_size=1024, seed=1)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=r"parameter 0 \(group 0, position 0, shape \(80, 64\)\).*'state1' has shape"):
        opt.load_state_dict(_saved(source))
    _assert_unchanged(opt, before)
    _step_all(params, opt)


def test_8bit_state_of_a_smaller_parameter_is_rejected():
    """Before: loaded, then the kernel updated part of the tensor (or wrote past the codes)."""
    _, source = _trained(RLion8bit, [(10,), (4000,)], min_8bit_size=1024)
    _, opt = _trained(RLion8bit, [(10,), (5000,)], min_8bit_size=1024, seed=1)
    with pytest.raises(ValueError, match=r"parameter 1 \(group 0, position 1, shape \(5000,\)\).*'state1'"):
        opt.load_state_dict(_saved(source))


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("absmax1", torch.zeros(3), "'absmax1' must be float32 with 16 entries"),
        ("qmap1", torch.linspace(-1, 1, 255), "'qmap1' must be 256 float32 entries"),
        ("state1", torch.zeros(64, 64, dtype=torch.int8), "'state1' .* must be uint8"),
        ("step", torch.tensor([1.0, 2.0]), "'step' must be a real scalar"),
        ("exp_avg", torch.zeros(64, 64), r"the state has keys \['absmax1', 'exp_avg'"),
    ],
)
def test_each_8bit_state_tensor_is_checked_against_its_parameter(key, value, message):
    _, source = _trained(RLion8bit, [(64, 64)], min_8bit_size=1024)
    saved = _saved(source)
    saved["state"][0][key] = value
    _, opt = _trained(RLion8bit, [(64, 64)], min_8bit_size=1024, seed=1)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(saved)
    _assert_unchanged(opt, before)


def test_rlion_momentum_of_another_shape_is_rejected_before_anything_changes():
    """Before: loaded; the step then failed (or broadcast a (1,)-shaped momentum)."""
    _, source = _trained(RLion, [(6, 4)])
    saved = _saved(source)
    saved["state"][0]["exp_avg"] = torch.zeros(4, 6)
    params, opt = _trained(RLion, [(6, 4)], seed=1)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=r"parameter 0 .*shape \(6, 4\)\).*'exp_avg' has shape \(4, 6\)"):
        opt.load_state_dict(saved)
    _assert_unchanged(opt, before)


@pytest.mark.parametrize("fused", [None, False])
def test_8bit_state_replaced_by_hand_with_wrong_sizes_raises_at_the_kernel_boundary(fused):
    """optimizer.state[p] replaced by hand (no load_state_dict): the kernel (fused=None) and
    bitsandbytes (fused=False) trust the sizes; before, smaller codes/absmax were a memory error."""
    params, opt = _trained(RLion8bit, [(64, 80), (64, 80)], min_8bit_size=1024, fused=fused)
    small = params[1]
    opt.state[params[0]] = {
        "step": torch.tensor(3.0),
        "state1": torch.zeros(10, dtype=torch.uint8),
        "absmax1": torch.ones(1),
        "qmap1": opt.state[small]["qmap1"],
    }
    with pytest.raises(ValueError, match=r"8-bit state of a parameter of shape \(64, 80\) .* does not fit"):
        _step_all(params, opt)


@pytest.mark.parametrize("fused", [None, False])
def test_a_step_that_finds_8bit_state_replaced_by_hand_changes_nothing(fused):
    """Before: the check ran where the bad tensor was stepped, after that step had counted (and,
    on the reference path or through another group's kernel call, updated) the other tensors."""
    generator = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(64, 80, generator=generator)) for _ in range(3)]
    opt = RLion8bit([{"params": params[:1]}, {"params": params[1:]}], lr=1e-2, min_8bit_size=1024, fused=fused)
    for seed in range(3):
        _step_all(params, opt, seed=seed)
    opt.state[params[2]] = {
        "step": torch.tensor(3.0),
        "state1": torch.zeros(10, dtype=torch.uint8),
        "absmax1": torch.ones(1),
        "qmap1": opt.state[params[1]]["qmap1"],
    }
    before, weights = _snapshot(opt), [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=r"8-bit state of a parameter of shape \(64, 80\) .* does not fit"):
        _step_all(params, opt, seed=3)
    _assert_unchanged(opt, before)
    for p, w in zip(params, weights):
        assert torch.equal(p, w)


@pytest.mark.skipif(not cpu_rlion8bit.kernel_available(), reason="the 8-bit C kernel is not built here")
def test_8bit_kernel_call_checks_sizes_for_direct_callers():
    param, grad = torch.randn(1000), torch.randn(1000)
    codes, absmax = torch.zeros(1000, dtype=torch.uint8), torch.ones(3)  # 4 blocks needed
    qmap = bnb_functional.create_dynamic_map(signed=True)
    hyperparameters = dict(
        lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.0, alpha=3.0, alpha_scaling="rms",
        bias_correction=False, maximize=False,
    )  # fmt: skip
    with pytest.raises(ValueError, match="absmax1 torch.float32 \\(3,\\)"):
        cpu_rlion8bit.fused_update_many_(
            cpu_rlion8bit._load_kernel(), [param], [grad], [codes], [absmax], [qmap], [1], **hyperparameters
        )


def test_rlion_fused_path_sends_a_misshapen_momentum_to_torch_which_raises():
    """Guards cpu_rlion's eligibility check: the C kernel never gets a momentum of another shape."""
    params, opt = _trained(RLion, [(6, 4)])
    opt.state[params[0]]["exp_avg"] = torch.zeros(24)
    with pytest.raises(RuntimeError):
        _step_all(params, opt)


# --------------------------------------------------------------------------------------------
# issue 16.5: corrupted state
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [RLion, RLion8bit])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_momentum_is_rejected_at_load(cls, bad):
    """Before: loaded, and the first step turned the weights into NaN (blamed on the gradients)."""
    _, source = _trained(cls, [(8, 8), (20,)])  # 32-bit state under RLion8bit too (below min_8bit_size)
    saved = _saved(source)
    saved["state"][1]["exp_avg"][3] = bad
    _, opt = _trained(cls, [(8, 8), (20,)], seed=1)
    with pytest.raises(ValueError, match=r"parameter 1 \(group 0, position 1, shape \(20,\)\).*'exp_avg'.*NaN or inf"):
        opt.load_state_dict(saved)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0])
def test_corrupted_absmax_is_rejected_at_load(bad):
    _, source = _trained(RLion8bit, [(64, 64)], min_8bit_size=1024)
    saved = _saved(source)
    saved["state"][0]["absmax1"][5] = bad
    _, opt = _trained(RLion8bit, [(64, 64)], min_8bit_size=1024, seed=1)
    with pytest.raises(ValueError, match="'absmax1' .*NaN, inf or negative"):
        opt.load_state_dict(saved)


def test_a_garbled_quantisation_map_is_rejected_at_load():
    _, source = _trained(RLion8bit, [(64, 64)], min_8bit_size=1024)
    saved = _saved(source)
    saved["state"][0]["qmap1"] = saved["state"][0]["qmap1"].flip(0)
    _, opt = _trained(RLion8bit, [(64, 64)], min_8bit_size=1024, seed=1)
    with pytest.raises(ValueError, match="'qmap1' .*ascending values within"):
        opt.load_state_dict(saved)


def _tiny_trainer(output_dir, optim, max_steps=2, optim_args=None):
    transformers = pytest.importorskip("transformers")

    class TinyClassifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 10))

        def forward(self, x, labels=None):
            logits = self.net(x)
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    generator = torch.Generator().manual_seed(0)
    rows = [{"x": torch.randn(64, generator=generator), "labels": torch.tensor(i % 10)} for i in range(32)]
    torch.manual_seed(0)
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), optim=optim, optim_args=optim_args, learning_rate=1e-3,
        per_device_train_batch_size=8, max_steps=max_steps, save_strategy="steps", save_steps=2,
        logging_steps=100, report_to="none", use_cpu=True, seed=0, dataloader_num_workers=0,
    )  # fmt: skip
    return transformers.Trainer(model=TinyClassifier(), args=args, train_dataset=rows)


def test_trainer_resume_from_a_truncated_optimizer_file_names_the_file(tmp_path):
    """Before: torch's "PytorchStreamReader failed reading zip archive", naming no file."""
    _tiny_trainer(tmp_path / "run", "rlion").train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    optimizer_file = checkpoint / "optimizer.pt"
    data = optimizer_file.read_bytes()
    optimizer_file.write_bytes(data[: len(data) // 2])
    trainer = _tiny_trainer(tmp_path / "resumed", "rlion", max_steps=4)
    with pytest.raises(RuntimeError, match=f"{str(optimizer_file)!s} cannot be read"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


def test_trainer_resume_keeps_the_valueerror_of_a_rejected_optimizer_state(tmp_path):
    """Before: the optimizer's ValueError (which names the parameter) came back as a RuntimeError."""
    _tiny_trainer(tmp_path / "run", "rlion").train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    saved["state"][0]["exp_avg"][0] = math.nan
    torch.save(saved, checkpoint / "optimizer.pt")
    trainer = _tiny_trainer(tmp_path / "resumed", "rlion", max_steps=4)
    with pytest.raises(ValueError, match=rf"checkpoint {checkpoint}: RLion.load_state_dict: parameter 0 .*NaN or inf"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


def test_trainer_resume_raises_other_failures_of_a_readable_file_as_they_are(tmp_path):
    """Before: every failure became a RuntimeError, here a KeyError of a state dict without its groups."""
    _tiny_trainer(tmp_path / "run", "rlion").train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    torch.save({"state": {}}, checkpoint / "optimizer.pt")
    trainer = _tiny_trainer(tmp_path / "resumed", "rlion", max_steps=4)
    with pytest.raises(KeyError, match="param_groups"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


# --------------------------------------------------------------------------------------------
# issue 16.6: resuming with the other optimizer (rlion <-> rlion_8bit)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rlion8bit_state_loads_into_rlion_as_the_dequantised_momentum(dtype):
    """Before: KeyError 'exp_avg' at the first step."""
    params, source = _trained(RLion8bit, [(64, 80), (20,)], dtype=dtype, min_8bit_size=1024)
    saved = _saved(source)
    target = [nn.Parameter(p.detach().clone()) for p in params]
    opt = RLion(target, lr=1e-2)
    opt.load_state_dict(saved)
    codes, absmax, qmap = (source.state[params[0]][k] for k in ("state1", "absmax1", "qmap1"))
    expected = bnb_functional.dequantize_blockwise(codes, absmax=absmax, code=qmap, blocksize=256)
    momentum = opt.state[target[0]]["exp_avg"]
    assert momentum.dtype == torch.float32 and momentum.shape == (64, 80)
    assert torch.equal(momentum, expected)
    assert torch.equal(opt.state[target[1]]["exp_avg"], source.state[params[1]]["exp_avg"])
    assert opt.state[target[0]]["step"] == 3
    _step_all(target, opt)
    assert opt.state[target[0]]["step"] == 4 and all(torch.isfinite(p).all() for p in target)


def test_rlion_state_loads_into_rlion8bit_as_bitsandbytes_codes():
    """Before: the 32-bit momentum silently stayed 32-bit (no memory saved) and groups without
    ``optim_bits``/``min_8bit_size`` raised KeyError at the first step."""
    params, source = _trained(RLion, [(64, 80), (20,)])
    saved = _saved(source)
    assert "min_8bit_size" not in saved["param_groups"][0]
    target = [nn.Parameter(p.detach().clone()) for p in params]
    opt = RLion8bit(target, lr=1e-2, min_8bit_size=1024)
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["min_8bit_size"] == 1024 and opt.param_groups[0]["optim_bits"] == 8
    state = opt.state[target[0]]
    assert set(state) == {"step", "state1", "absmax1", "qmap1"}
    codes, quant_state = bnb_functional.quantize_blockwise(
        source.state[params[0]]["exp_avg"], code=state["qmap1"], blocksize=256
    )
    assert torch.equal(state["state1"], codes) and torch.equal(state["absmax1"], quant_state.absmax)
    assert torch.equal(opt.state[target[1]]["exp_avg"], source.state[params[1]]["exp_avg"])  # below min_8bit_size
    _step_all(target, opt)
    assert state["step"] == 4 and all(torch.isfinite(p).all() for p in target)


def test_rlion8bit_state_follows_the_32bit_override_of_the_loading_optimizer():
    """An embedding stepped with 8-bit state, loaded where keep_embeddings_in_32bit asks for 32-bit
    state (Trainer does that for rlion_8bit): it gets the exp_avg RLion8bit would have created."""
    torch.manual_seed(0)
    source_model, target_model = nn.Embedding(64, 80), nn.Embedding(64, 80)
    target_model.load_state_dict(source_model.state_dict())
    source = RLion8bit(source_model.parameters(), lr=1e-2, min_8bit_size=1024)
    source_model(torch.arange(64)).square().sum().backward()
    source.step()
    assert "state1" in source.state[source_model.weight]
    r8.keep_embeddings_in_32bit(target_model)
    target = RLion8bit(target_model.parameters(), lr=1e-2, min_8bit_size=1024)
    target.load_state_dict(_saved(source))
    codes, absmax, qmap = (source.state[source_model.weight][k] for k in ("state1", "absmax1", "qmap1"))
    expected = bnb_functional.dequantize_blockwise(codes, absmax=absmax, code=qmap, blocksize=256)
    assert set(target.state[target_model.weight]) == {"step", "exp_avg"}
    assert torch.equal(target.state[target_model.weight]["exp_avg"], expected)


def test_trainer_checkpoint_of_optim_rlion_resumes_with_optim_rlion_8bit(tmp_path):
    _tiny_trainer(tmp_path / "run", "rlion").train()
    # Trainer 4.x reads rng_state.pth with torch.load's default weights_only, which torch>=2.6
    # refuses (numpy arrays); without the file it resumes with fresh RNG state, all versions.
    (tmp_path / "run" / "checkpoint-2" / "rng_state.pth").unlink()
    resumed = _tiny_trainer(tmp_path / "resumed", "rlion_8bit", max_steps=4, optim_args="min_8bit_size=1024")
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    opt = getattr(resumed.optimizer, "optimizer", resumed.optimizer)
    first = resumed.model.net[0].weight
    assert type(opt) is RLion8bit and opt.state[first]["state1"].dtype == torch.uint8
    assert opt.state[first]["step"] == 4


# --------------------------------------------------------------------------------------------
# issue 16.7: torch's conventions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [RLion, RLion8bit])
def test_a_step_saved_as_a_python_number_loads_as_a_float32_tensor(cls):
    """torch's optimizers accept old state dicts whose ``step`` is a number; before, the C step
    counter was handed a Python float."""
    params, source = _trained(cls, [(64, 80)], min_8bit_size=1024) if cls is RLion8bit else _trained(cls, [(64, 80)])
    saved = _saved(source)
    saved["state"][0]["step"] = 3
    opt = cls([nn.Parameter(p.detach().clone()) for p in params], lr=1e-2)
    opt.load_state_dict(saved)
    (step,) = [s["step"] for s in opt.state.values()]
    assert isinstance(step, torch.Tensor) and step.dtype == torch.float32 and step == 3
    _step_all(opt.param_groups[0]["params"], opt)
    assert step == 4


@pytest.mark.parametrize("cls", [RLion, RLion8bit])
def test_param_groups_saved_before_an_option_existed_load_with_the_defaults(cls):
    params, source = _trained(cls, [(8, 8)])
    saved = _saved(source)
    for key in ("maximize", "foreach", "fused", "alpha_scaling", "bias_correction", "optim_bits", "min_8bit_size"):
        saved["param_groups"][0].pop(key, None)
    target = [nn.Parameter(p.detach().clone()) for p in params]
    opt = cls(target, lr=1e-2, alpha_scaling="fixed")
    opt.load_state_dict(saved)
    group = opt.param_groups[0]
    assert group["alpha_scaling"] == "fixed" and group["maximize"] is False and group["fused"] is None
    _step_all(target, opt)


@pytest.mark.parametrize("cls", [RLion, RLion8bit])
def test_a_rejected_param_group_does_not_stay_behind(cls):
    """Before: add_param_group raised but kept the group, and the next step used alpha=-1."""
    p, q = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(3))
    opt = cls([p])
    with pytest.raises(ValueError, match="alpha must be"):
        opt.add_param_group({"params": [q], "alpha": -1.0})
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["params"] == [p]
    opt.add_param_group({"params": (t for t in [q]), "betas": [0.8, 0.9]})  # generators and lists, as torch
    assert opt.param_groups[1]["params"] == [q] and opt.param_groups[1]["betas"] == (0.8, 0.9)


def test_a_state_dict_with_a_bad_option_leaves_the_optimizer_as_it_was():
    """Before: the state was loaded, then the check raised: the optimizer kept alpha=-1."""
    params, opt = _trained(RLion, [(8, 8)])
    saved = _saved(opt)
    saved["param_groups"][0]["alpha"] = -1.0
    saved["param_groups"][0]["lr"] = 0.5
    before = _snapshot(opt)
    with pytest.raises(ValueError, match="group 0: alpha must be"):
        opt.load_state_dict(saved)
    _assert_unchanged(opt, before)


def test_optim_args_reject_duplicate_keys_and_keep_spaces_inside_values():
    """Before: 'alpha=1,alpha=2' silently gave alpha=2 and 'alpha_scaling=fi xed' became 'fixed'."""
    assert parse_optim_args(" alpha = 3 , alpha_scaling=fixed ") == {"alpha": 3, "alpha_scaling": "fixed"}
    assert parse_optim_args("alpha_scaling=fi xed") == {"alpha_scaling": "fi xed"}
    with pytest.raises(ValueError, match="'alpha' is given more than once"):
        parse_optim_args("alpha=1,alpha=2")


def test_rlion8bit_on_meta_parameters_says_they_must_be_materialised():
    """Before: a RuntimeError from deep inside torch/bitsandbytes."""
    p = nn.Parameter(torch.empty(64, 80, device="meta"))
    p.grad = torch.empty(64, 80, device="meta")
    opt = RLion8bit([p], min_8bit_size=1024)
    with pytest.raises(ValueError, match="meta device.*cannot hold 8-bit state.*Materialise"):
        opt.step()


def test_rlion_steps_meta_parameters_as_torch_optimizers_do():
    """Before: 'Tensor.item() cannot be called on meta tensors' from the NaN/inf gradient check."""
    p = nn.Parameter(torch.empty(6, 4, device="meta"))
    p.grad = torch.empty(6, 4, device="meta")
    opt = RLion([p])
    opt.step()
    assert opt.state[p]["exp_avg"].is_meta and opt.state[p]["step"] == 1
