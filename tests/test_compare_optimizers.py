"""The optimizer study script: a seconds-long real run of its small default, and its pieces."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_optimizers.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("compare_optimizers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["compare_optimizers"] = module
    spec.loader.exec_module(module)
    return module


def test_small_default_on_digits_writes_sane_results_and_plots(study, tmp_path):
    """The small default grid restricted to digits, one epoch each: every cell is recorded once,
    with a finite loss curve and a metric in [0, 1], and the report writes its tables and plots."""
    assert study.main(["--tasks", "digits", "--epochs", "1", "--out", str(tmp_path)]) == 0
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    expected = {study.run_key(r) for r in study.small_grid() if r["task"] == "digits"}
    assert {study.run_key(r) for r in records} == expected and len(records) == len(expected)
    for r in records:
        assert 0.0 <= r["metric"] <= 1.0
        assert len(r["train_loss_curve"]) == 1 and math.isfinite(r["train_loss_curve"][0])
        assert r["registry_name"] in ("adamw", "lion", "rlion")
    # One epoch at lr 1e-2 is enough for every optimizer of the default grid to beat chance (0.1) clearly.
    assert all(r["metric"] > 0.5 for r in records if r["lr"] == 1e-2), [(r["optimizer"], r["metric"]) for r in records]
    for name in ("results_lr_sweep_no_warmup.png", "results_alpha.png", "results_loss_curves.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    tables = (tmp_path / "tables.md").read_text()
    assert "| adamw |" in tables and f"| {study.default_rlion_label()} |" in tables

    # --resume skips what is recorded: nothing new is trained, the file is unchanged.
    before = (tmp_path / "results.jsonl").read_text()
    study.main(["--tasks", "digits", "--epochs", "1", "--out", str(tmp_path), "--resume"])
    assert (tmp_path / "results.jsonl").read_text() == before


def test_unknown_task_is_a_clear_error(study, tmp_path):
    with pytest.raises(ValueError, match="--tasks: unknown task.*valid: digits, boxes, textures"):
        study.main(["--tasks", "mnist", "--out", str(tmp_path)])


def test_box_iou_against_hand_computed_values(study):
    pred = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.2, 0.2, 0.4, 0.4], [0.0, 0.0, 1.0, 1.0], [0.6, 0.6, 0.4, 0.4]])
    target = torch.tensor([[0.25, 0.25, 0.75, 0.75], [0.2, 0.2, 0.4, 0.4], [0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    # overlap 0.0625 / union (0.25 + 0.25 - 0.0625); identical; target inside pred; inverted box has area 0
    expected = torch.tensor([0.0625 / 0.4375, 1.0, 0.25, 0.0])
    torch.testing.assert_close(study.box_iou(pred, target), expected)


def test_generated_boxes_enclose_their_object(study):
    """The regression target is the object's true box: the ellipse inscribed in it differs in
    brightness from everything outside it by at least the smallest object contrast (0.8) minus noise."""
    images, boxes = study.make_box_images(16, size=32, seed=3)
    assert images.shape == (16, 1, 32, 32) and boxes.shape == (16, 4)
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert boxes.min() >= 0 and boxes.max() <= 1
    centers = (torch.arange(32) + 0.5) / 32
    yy, xx = torch.meshgrid(centers, centers, indexing="ij")
    for image, (x1, y1, x2, y2) in zip(images[:, 0], boxes):
        cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
        ellipse = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 0.8  # a margin inside the edge
        outside = (xx < x1) | (xx > x2) | (yy < y1) | (yy > y2)
        assert (image[ellipse].mean() - image[outside].mean()).abs() > 0.4
    # Same generator seed: same images (the study is reproducible).
    again, _ = study.make_box_images(16, size=32, seed=3)
    assert torch.equal(images, again)


def test_texture_patches_are_standardised_and_splits_disjoint(study):
    data = study._textures_data(patch=16, train_per_class=20, test_per_class=10)
    assert data.x_train.shape == (60, 1, 16, 16) and data.x_test.shape == (30, 1, 16, 16)
    torch.testing.assert_close(data.x_train.mean(dim=(1, 2, 3)), torch.zeros(60), atol=1e-4, rtol=0)
    torch.testing.assert_close(data.x_train.std(dim=(1, 2, 3), unbiased=False), torch.ones(60), atol=1e-3, rtol=0)
    assert sorted(data.y_train.unique().tolist()) == [0, 1, 2]


def test_recipe_caltech_task_goes_through_the_detection_recipe(study):
    """The detection task's data comes from the recipe's loader and split, its model from the recipe."""
    task = study.TASKS["recipe_caltech"]
    data = study.task_data(task)
    assert data.x_train.shape == (240, 3, 64, 64) and data.x_test.shape == (60, 3, 64, 64)
    for boxes in (data.y_train, data.y_test):
        assert boxes.min() >= 0 and boxes.max() <= 1
        assert torch.all(boxes[:, 2] > boxes[:, 0]) and torch.all(boxes[:, 3] > boxes[:, 1])
    model = task.make_model()
    assert type(model.model).__name__ == "ViTBoxRegressionModel"
    record = study.train_one(task, study.default_rlion_config(), 1e-3, seed=0, warmup=False, epochs=2)
    assert math.isfinite(record["metric"]) and record["metric"] > study.learned_nothing_metric(task)


def test_paper_arch_tasks_build_train_and_report(study, tmp_path):
    """FasterNet-T0 and the half-size EfficientNetV2-B0 are built from scratch by timm (nothing
    downloaded) with the sizes and input channels the docs state; one step on 15 texture patches
    trains with a finite loss (every optimizer of the ``--paper-archs`` grid on FasterNet, RLion's
    defaults on EfficientNetV2), and the report writes the mean ± std table and the bar plot."""
    import dataclasses

    grid = study.paper_archs_grid()
    assert len(grid) == 36 and {r["lr"] for r in grid} == {1e-3} and not any(r["warmup"] for r in grid)
    assert {r["task"] for r in grid} == set(study.PAPER_ARCH_TASKS)
    optimizers = {r["optimizer"].label: r["optimizer"] for r in grid}
    assert set(optimizers) == {"adamw", "lion", study.default_rlion_label()}

    sizes = {"fasternet": (2.5e6, 2.8e6), "effnetv2": (0.7e6, 0.85e6)}
    for name in study.PAPER_ARCH_TASKS:
        model = study.TASKS[name].make_model()
        low, high = sizes[name.split("_")[0]]
        assert low < sum(p.numel() for p in model.parameters()) < high
        channels = 3 if name.endswith("digits") else 1  # the recipe's RGB digits; grey texture patches
        assert model(torch.zeros(2, channels, 32, 32)).shape == (2, 10 if name.endswith("digits") else 3)

    records = []
    for name, labels in (("fasternet_textures", list(optimizers)), ("effnetv2_textures", [study.default_rlion_label()])):
        task = study.TASKS[name]
        data = study.task_data(task)
        assert data.x_train.shape[1:] == (1, 32, 32)
        tiny = study.TaskData(data.x_train[::100], data.y_train[::100], data.x_test[::50], data.y_test[::50])
        tiny_task = dataclasses.replace(task, name=f"{name}_tiny", make_data=lambda tiny=tiny: tiny)
        for label in labels:
            record = study.train_one(tiny_task, optimizers[label], 1e-3, seed=0, warmup=False, epochs=1)
            assert not record["diverged"] and math.isfinite(record["train_loss_curve"][0])
            assert 0.0 <= record["metric"] <= 1.0
            records.append(dict(record, task=name))

    tables = study.paper_archs_report(records, tmp_path)
    assert (tmp_path / "results_paper_archs.png").stat().st_size > 10_000
    assert "| adamw | " in tables and " ± 0.000 (" in tables  # one seed: std 0, difference to AdamW shown
