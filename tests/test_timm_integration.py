"""``opt="rlion"`` / ``"rlion8bit"`` in timm's optimizer factory (hf_rlion.timm_integration).

What these tests prove:
* after ``import hf_rlion``, ``timm.optim.list_optimizers()`` lists ``rlion`` and ``rlion8bit``, and
  registering again changes nothing and logs no "overwriting" warning;
* ``create_optimizer_v2`` builds ``RLion`` / ``RLion8bit`` with timm's parameter groups (no weight
  decay on biases and norm weights), the given lr and betas, and drops ``eps``/``momentum``;
  ``lookahead_rlion`` is timm's ``Lookahead`` around RLion;
* each of the three trains a small timm model (``test_vit``): the loss on a fixed batch falls;
* ``import hf_rlion`` does not import timm, and a timm ``train.py``-style script run through
  ``python -m hf_rlion.launch`` builds RLion from ``--opt``/``--lr``/``--opt-betas``/``--opt-kwargs``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import hf_rlion
from hf_rlion import RLion
from hf_rlion.timm_integration import is_registered, register_optimizers, register_with_timm

timm = pytest.importorskip("timm")
from timm.optim import Lookahead, OptimInfo, OptimizerRegistry, create_optimizer_v2, list_optimizers  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEEDS_BNB = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="rlion8bit needs bitsandbytes")


class ConvNet(torch.nn.Module):
    """Weights (2-d and 4-d) that timm decays, and biases / norm weights (1-d) that it does not."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.norm = torch.nn.BatchNorm2d(8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.norm(self.conv(x)).mean((2, 3)))


def groups_by_decay(optimizer) -> dict[float, set[int]]:
    return {group["weight_decay"]: {id(p) for p in group["params"]} for group in optimizer.param_groups}


def test_list_optimizers_includes_the_names_and_registration_is_idempotent(caplog):
    assert {"rlion", "rlion8bit"} <= set(list_optimizers())
    assert is_registered()
    with caplog.at_level(logging.WARNING, logger="timm.optim._optim_factory"):
        register_with_timm()
        register_with_timm()
    assert not [r for r in caplog.records if "already registered" in r.getMessage()]

    fresh = OptimizerRegistry()
    register_optimizers(fresh, OptimInfo)
    first = {name: fresh.get_optimizer_info(name) for name in fresh.list_optimizers()}
    with caplog.at_level(logging.WARNING, logger="timm.optim._optim_factory"):
        register_optimizers(fresh, OptimInfo)
    assert {name: fresh.get_optimizer_info(name) for name in fresh.list_optimizers()} == first
    assert set(first) == {"rlion", "rlion8bit"} and not caplog.records
    assert first["rlion"].has_betas and not first["rlion"].has_eps and not first["rlion"].has_momentum


@pytest.mark.parametrize("opt, cls_name", [("rlion", "RLion"), pytest.param("rlion8bit", "RLion8bit", marks=NEEDS_BNB)])
def test_create_optimizer_v2_builds_ours_with_timm_grouping_and_betas(opt, cls_name):
    model = ConvNet()
    optimizer = create_optimizer_v2(
        model, opt=opt, lr=3e-4, weight_decay=0.05, betas=[0.95, 0.98], eps=1e-8, momentum=0.9, alpha=2.0
    )
    assert type(optimizer) is getattr(hf_rlion, cls_name)
    decayed = {id(model.conv.weight), id(model.head.weight)}
    assert groups_by_decay(optimizer) == {0.05: decayed, 0.0: {id(p) for p in model.parameters()} - decayed}
    for group in optimizer.param_groups:
        assert group["lr"] == 3e-4 and group["betas"] == (0.95, 0.98) and group["alpha"] == 2.0
        assert "eps" not in group and "momentum" not in group


def test_lookahead_rlion_wraps_rlion():
    model = ConvNet()
    optimizer = create_optimizer_v2(model, opt="lookahead_rlion", lr=1e-3, weight_decay=0.1)
    assert type(optimizer) is Lookahead and type(optimizer._base_optimizer) is RLion
    assert all(group["lookahead_k"] == 6 for group in optimizer.param_groups)


def test_unknown_rlion_option_is_an_error():
    with pytest.raises(TypeError, match="no_such_option"):
        create_optimizer_v2(ConvNet(), opt="rlion", lr=1e-3, no_such_option=1)


@pytest.mark.parametrize("opt", ["rlion", pytest.param("rlion8bit", marks=NEEDS_BNB), "lookahead_rlion"])
def test_trains_a_timm_vit(opt):
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=3, pretrained=False, img_size=32)  # timm's tiny test ViT
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
    optimizer = create_optimizer_v2(model, opt=opt, lr=1e-3, weight_decay=0.01)
    undecayed = next(g for g in optimizer.param_groups if g["weight_decay"] == 0.0)["params"]
    assert any(p is model.pos_embed for p in undecayed)  # in model.no_weight_decay(), though 3-d
    losses = []
    for _ in range(6):  # Lookahead syncs at step 6
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert losses[-1] < 0.5 * losses[0], losses


TRAIN_PY_LIKE = """
import argparse, sys
assert "timm" not in sys.modules, "import hf_rlion imported timm"
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.utils import ParseKwargs
import torch

parser = argparse.ArgumentParser()  # the optimizer flags of timm's train.py
parser.add_argument("--opt", default="sgd")
parser.add_argument("--opt-eps", default=None, type=float)
parser.add_argument("--opt-betas", default=None, type=float, nargs="+")
parser.add_argument("--momentum", type=float, default=0.9)
parser.add_argument("--weight-decay", type=float, default=2e-5)
parser.add_argument("--lr", type=float, default=None)
parser.add_argument("--opt-kwargs", nargs="*", default={}, action=ParseKwargs)
args = parser.parse_args()
model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)
inner = getattr(optimizer, "_base_optimizer", optimizer)
print(type(optimizer).__name__, type(inner).__name__, sorted(g["weight_decay"] for g in inner.param_groups),
      inner.defaults["lr"], inner.defaults["betas"], inner.defaults["alpha"])
"""


def test_train_py_style_script_through_hf_rlion_launch(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(TRAIN_PY_LIKE))
    command = [
        sys.executable, "-m", "hf_rlion.launch", str(script), "--opt", "lookahead_rlion", "--lr", "2e-4",
        "--weight-decay", "0.05", "--opt-betas", "0.9", "0.98", "--opt-kwargs", "alpha=5.0",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": REPO}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["Lookahead", "RLion", "[0.0,", "0.05]", "0.0002", "(0.9,", "0.98)", "5.0"]
