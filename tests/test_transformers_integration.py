"""`--optim rlion` in transformers: the enum, the parser, Trainer, the launcher, create_optimizer.

Runs against whichever transformers is installed; CI runs this file on the newest release and
again on the oldest supported one (see .ci/run).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import hf_rlion
from hf_rlion import RLion, create_optimizer
from hf_rlion.transformers_integration import is_registered, register_with_transformers

transformers = pytest.importorskip("transformers")
from transformers import HfArgumentParser, Trainer, TrainingArguments  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(argv, tmp_path):
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--report_to", "none", *argv]
    )
    return args


class DigitsMLP(nn.Module):
    """A small classifier returning what Trainer expects (loss first)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 10))

    def forward(self, pixel_values, labels=None):
        logits = self.net(pixel_values)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


def digits_splits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    rows = lambda a, b: [{"pixel_values": x[i], "labels": y[i]} for i in range(a, b)]  # noqa: E731
    return rows(0, 1400), rows(1400, len(y))


def test_names_are_registered_and_idempotent():
    register_with_transformers()
    register_with_transformers()
    from transformers.training_args import OptimizerNames

    values = [m.value for m in OptimizerNames]
    for name in ("rlion", "rlion_8bit", "paged_rlion_8bit"):
        assert values.count(name) == 1
        assert OptimizerNames(name).value == name
    assert is_registered()


def test_training_arguments_accept_rlion(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), optim="rlion", optim_args="alpha=5,bias_correction=true")
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    assert cls is RLion
    assert kwargs == {"alpha": 5, "bias_correction": True, "lr": args.learning_rate}


def test_command_line_optim_and_optim_args(tmp_path):
    args = parse(
        ["--optim", "rlion", "--optim_args", "alpha=0.5,alpha_scaling=fixed,beta1=0.95,beta2=0.98", "--learning_rate", "3e-4"],
        tmp_path,
    )
    model = DigitsMLP()
    trainer = Trainer(model=model, args=args)
    opt = trainer.create_optimizer()
    inner = getattr(opt, "optimizer", opt)
    assert isinstance(inner, RLion)
    group = inner.param_groups[0]
    assert group["alpha"] == 0.5 and group["alpha_scaling"] == "fixed"
    assert group["betas"] == (0.95, 0.98) and group["lr"] == 3e-4


def test_betas_default_to_lion_and_adam_betas_are_ignored_with_a_warning(tmp_path):
    args = parse(["--optim", "rlion"], tmp_path)
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    assert "betas" not in kwargs  # RLion's default (0.9, 0.99), not Trainer's adam_beta2 = 0.999
    assert RLion([nn.Parameter(torch.zeros(1))], **kwargs).param_groups[0]["betas"] == (0.9, 0.99)
    args = parse(["--optim", "rlion", "--adam_beta2", "0.95"], tmp_path)
    with pytest.warns(UserWarning, match="adam_beta1/--adam_beta2 are Adam's and are ignored"):
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    assert "betas" not in kwargs


def test_unknown_optim_args_key_lists_the_valid_ones(tmp_path):
    args = parse(["--optim", "rlion", "--optim_args", "alhpa=3"], tmp_path)
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['alhpa'\].*valid: alpha, alpha_scaling"):
        Trainer.get_optimizer_cls_and_kwargs(args)


def test_malformed_optim_args_are_rejected(tmp_path):
    args = parse(["--optim", "rlion", "--optim_args", "alpha"], tmp_path)
    with pytest.raises(ValueError, match="expected 'key=value'"):
        Trainer.get_optimizer_cls_and_kwargs(args)


def test_bad_rlion_values_from_the_command_line_name_the_argument(tmp_path):
    args = parse(["--optim", "rlion", "--optim_args", "alpha=-1"], tmp_path)
    trainer = Trainer(model=DigitsMLP(), args=args)
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        trainer.create_optimizer()


def test_unknown_optim_name_is_rejected_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse(["--optim", "rlionn"], tmp_path)
    assert "invalid choice: 'rlionn'" in capsys.readouterr().err


def test_other_optimizers_still_work(tmp_path):
    args = parse(["--optim", "adamw_torch"], tmp_path)
    cls, _ = Trainer.get_optimizer_cls_and_kwargs(args)
    assert cls is torch.optim.AdamW


def test_8bit_names_build_the_8bit_classes_or_fail_clearly(tmp_path):
    for name in ("rlion_8bit", "paged_rlion_8bit"):
        args = parse(["--optim", name], tmp_path)
        try:
            cls, _ = Trainer.get_optimizer_cls_and_kwargs(args, DigitsMLP())
        except ImportError as err:  # bitsandbytes not installed: the message names the extra
            assert "hf-rlion[8bit]" in str(err)
            continue
        expected = "RLion8bit" if name == "rlion_8bit" else "PagedRLion8bit"
        assert cls.__name__ == expected


def test_trainer_trains_digits_with_rlion_from_a_parsed_command_line(tmp_path):
    """A real Trainer.train() on scikit-learn's digits, optimizer chosen by `--optim rlion`."""
    train, test = digits_splits()
    args = parse(
        [
            "--optim", "rlion",
            "--learning_rate", "1e-3",
            "--weight_decay", "0.01",
            "--num_train_epochs", "6",
            "--per_device_train_batch_size", "32",
            "--lr_scheduler_type", "constant",
            "--save_strategy", "no",
            "--logging_steps", "20",
            "--use_cpu",
            "--seed", "0",
        ],
        tmp_path,
    )  # fmt: skip
    torch.manual_seed(0)
    model = DigitsMLP()
    trainer = Trainer(model=model, args=args, train_dataset=train)
    result = trainer.train()
    assert isinstance(getattr(trainer.optimizer, "optimizer", trainer.optimizer), RLion)
    # decay on the Linear weights only, as Trainer groups it
    decays = sorted(g["weight_decay"] for g in trainer.optimizer.param_groups)
    assert decays == [0.0, 0.01]
    with torch.no_grad():
        x = torch.stack([r["pixel_values"] for r in test])
        y = torch.stack([r["labels"] for r in test])
        accuracy = (model(x)["logits"].argmax(-1) == y).float().mean().item()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0] / 4, losses
    assert accuracy > 0.9, accuracy
    assert result.training_loss < 1.0


STOCK_SCRIPT = textwrap.dedent(
    """
    # A script that knows nothing about hf_rlion: transformers' stock parser and Trainer.
    import json, sys
    from transformers import HfArgumentParser, Trainer, TrainingArguments
    import torch
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses()
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, torch.nn.Linear(2, 2))
    print(json.dumps({"optim": args.optim.value, "cls": cls.__name__, "kwargs": sorted(kwargs), "main": __name__}))
    """
)


def run_script(cmd, tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_launch_runs_a_stock_script_with_the_names_registered(tmp_path):
    script = tmp_path / "stock_train.py"
    script.write_text(STOCK_SCRIPT)
    argv = [str(script), "--output_dir", str(tmp_path / "out"), "--optim", "rlion", "--optim_args", "alpha=2"]
    plain = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert plain.returncode != 0 and "invalid choice: 'rlion'" in plain.stderr  # without the launcher
    out = run_script([sys.executable, "-m", "hf_rlion.launch", *argv], tmp_path)
    assert out == {"optim": "rlion", "cls": "RLion", "kwargs": ["alpha", "lr"], "main": "__main__"}


def test_accelerate_launch_dash_m_hf_rlion_launch(tmp_path):
    script = tmp_path / "stock_train.py"
    script.write_text(STOCK_SCRIPT)
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    cmd = [accelerate, "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "hf_rlion.launch", str(script),
           "--output_dir", str(tmp_path / "out"), "--optim", "rlion"]  # fmt: skip
    out = run_script(cmd, tmp_path)
    assert out["cls"] == "RLion" and out["main"] == "__main__"


def test_launch_without_a_script_prints_usage():
    result = subprocess.run([sys.executable, "-m", "hf_rlion.launch"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "python -m hf_rlion.launch SCRIPT.py" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "hf_rlion.launch", "no_such_script.py"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0 and "no such script" in result.stderr


def test_import_hf_rlion_does_not_import_transformers():
    code = "import sys, hf_rlion; print('transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr


def test_create_optimizer_groups_like_trainer():
    config = transformers.ViTConfig(
        image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    model = transformers.ViTForImageClassification(config)
    trainer_decay = set(Trainer.get_decay_parameter_names(None, model))
    opt = create_optimizer(model, "rlion", lr=1e-3, weight_decay=0.1, alpha=2.0)
    names = {id(p): n for n, p in model.named_parameters()}
    ours_decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    ours_no_decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert ours_decay == trainer_decay
    assert ours_no_decay == set(names.values()) - trainer_decay
    assert any("bias" in n for n in ours_no_decay) and any("layernorm" in n for n in ours_no_decay)
    assert opt.param_groups[0]["alpha"] == 2.0 and opt.param_groups[0]["lr"] == 1e-3


def test_create_optimizer_errors():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="unknown optimizer 'rlon'; valid names: rlion, rlion_8bit"):
        create_optimizer(model, "rlon")
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['eps'\] for optimizer 'rlion'"):
        create_optimizer(model, "rlion", eps=1e-8)
    with pytest.raises(ValueError, match="weight_decay must be"):
        create_optimizer(model, "rlion", weight_decay=-1)
    with pytest.raises(TypeError, match="needs an nn.Module"):
        create_optimizer([nn.Parameter(torch.zeros(1))], "rlion")
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        create_optimizer(frozen, "rlion")


def test_create_optimizer_other_names():
    model = nn.Linear(2, 2)
    assert isinstance(create_optimizer(model, "adamw", lr=1e-3, beta2=0.95), torch.optim.AdamW)
    assert create_optimizer(model, "adamw", beta2=0.95).param_groups[0]["betas"] == (0.9, 0.95)
    assert isinstance(create_optimizer(model, "sgd", lr=0.1, momentum=0.9), torch.optim.SGD)
    assert create_optimizer(model, "rlion").param_groups[0]["lr"] == hf_rlion.OPTIMIZERS["rlion"].default_lr
