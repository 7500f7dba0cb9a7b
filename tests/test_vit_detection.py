"""The ViT detection recipe (recipes/vit_detection_caltech101.py), its reader (hf_rlion.caltech101), its model.

What these tests prove, on a Caltech-layout fixture written by ``_caltech_fixture`` (real
``.mat`` files via scipy.io.savemat, JPEG images, the renamed annotation folders):

* annotation parsing: ``box_coord = [y1, y2, x1, x2]`` (1-based) becomes the exact normalised
  (x1, y1, x2, y2); the four renamed folders are followed; boxes a pixel over the border are
  clipped, boxes outside or without area, corrupt and missing ``.mat`` files and orphan
  annotations are skipped and reported by file (or fail naming the file with ``strict``); the
  official zip's folder and its archives are found; the parsed dataset is cached and a changed
  file rebuilds it;
* the split is sorted first 80 % / last 20 % per category (or seeded), bad input is a clear error;
* arguments: a JSON or YAML file gives the same dataclasses as the flags; a flip moves image and
  box together and is drawn from (seed, epoch, index) only (not the global RNG, not the order);
* the model: save_pretrained / AutoModel.from_pretrained round trip, IoU and GIoU against plain
  references, GIoU loss and class head train, a pretrained ViT backbone is loaded;
* end to end (real training, tiny ViT): RLion (MSE) and RLion8bit (GIoU) beat the constant-mean-box baseline by a clear
  margin on the whole test split and the saved model reproduces eval_results.json; resuming from
  the last complete checkpoint (a half-written one lying next to it) ends with exactly the
  weights of an uninterrupted run; 2 real CPU ranks (gloo DDP) evaluate the whole test split
  once and push model + card to a local stand-in Hub; a class head learns the categories.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _caltech_fixture import write_annotation, write_caltech_fixture  # noqa: E402

from hf_rlion import caltech101  # noqa: E402
from hf_rlion.complete_checkpoints import CHECKPOINT_COMPLETE, complete_checkpoints, read_marker, resolve_checkpoint  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPE = REPO_ROOT / "recipes" / "vit_detection_caltech101.py"

_spec = importlib.util.spec_from_file_location("vit_detection_caltech101", RECIPE)
recipe = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = recipe  # dataclasses look their module up there
_spec.loader.exec_module(recipe)

# A tiny ViT (32x32 input, 4x4 patches of 8, width 32, one layer) so a run takes seconds.
TINY_MODEL = (
    "--image_size 32 --patch_size 8 --hidden_size 32 --num_hidden_layers 1 --num_attention_heads 2 "
    "--intermediate_size 64 --head_hidden_sizes 64 --head_dropout 0 --hidden_dropout_prob 0"
).split()


@pytest.fixture(scope="module")
def caltech(tmp_path_factory):
    """The fixture dataset: 60 airplanes, 12 Faces, 12 ketch (what it wrote, and where)."""
    root = tmp_path_factory.mktemp("caltech101")
    return root, write_caltech_fixture(root)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("dataset_cache")


def run_recipe(data_dir, output_dir, cache_dir, *extra: str) -> dict:
    args = ["--data_dir", str(data_dir), "--output_dir", str(output_dir), "--dataset_cache_dir", str(cache_dir)]
    return recipe.main(args + TINY_MODEL + ["--per_device_train_batch_size", "8", "--num_plot_images", "4", *extra])


# -- annotations ----------------------------------------------------------------------------


def _mat(path: Path, **variables) -> Path:
    scipy.io.savemat(path, variables)
    return path


def test_read_box_turns_one_based_yx_coordinates_into_normalised_xyxy(tmp_path):
    # Rows 11..30 and columns 21..60 (1-based, inclusive) of a 100 x 50 image cover the
    # continuous box x in [20, 60], y in [10, 30].
    path = _mat(tmp_path / "a.mat", box_coord=np.array([[11, 30, 21, 60]], dtype=np.uint16), obj_contour=np.zeros((2, 3)))
    assert caltech101.read_box(path, width=100, height=50) == [0.2, 0.2, 0.6, 0.6]
    # The whole image, written as float as some Caltech files are.
    path = _mat(tmp_path / "b.mat", box_coord=np.array([[1.0, 50.0, 1.0, 100.0]]))
    assert caltech101.read_box(path, width=100, height=50) == [0.0, 0.0, 1.0, 1.0]


def test_read_box_clips_a_pixel_over_the_border_and_rejects_bad_boxes_naming_the_file(tmp_path):
    over_by_one = _mat(tmp_path / "over.mat", box_coord=np.array([[0, 51, 0, 101]]))
    assert caltech101.read_box(over_by_one, width=100, height=50) == [0.0, 0.0, 1.0, 1.0]
    bad = {
        "outside.mat": dict(box_coord=np.array([[1, 20, 90, 120]])),
        "no_area.mat": dict(box_coord=np.array([[10, 20, 40, 39]])),
        "not_four.mat": dict(box_coord=np.array([[10, 20, 40]])),
        "no_box.mat": dict(obj_contour=np.zeros((2, 3))),
    }
    for name, variables in bad.items():
        with pytest.raises(caltech101.AnnotationError, match=name):
            caltech101.read_box(_mat(tmp_path / name, **variables), width=100, height=50)
    corrupt = tmp_path / "corrupt.mat"
    corrupt.write_bytes(b"MATLAB 5.0 MAT-file, truncated garbage")
    with pytest.raises(caltech101.AnnotationError, match="corrupt.mat.*unreadable"):
        caltech101.read_box(corrupt, width=100, height=50)


def test_loader_follows_renamed_folders_and_reads_every_box_exactly(caltech, cache_dir):
    root, written = caltech
    dataset, skipped, cache_path, from_cache = caltech101.load_caltech101(root, ["airplanes", "Faces", "ketch"], cache_dir, show_progress=False)
    assert skipped == [] and not from_cache and cache_path.parent == cache_dir
    assert dataset.features["label"].names == ["airplanes", "Faces", "ketch"]
    expected = [(c, item) for c in ("airplanes", "Faces", "ketch") for item in written[c]]
    assert len(dataset) == len(expected)
    np.testing.assert_allclose(np.array(dataset["box"]), np.array([i.normalised_box for _, i in expected]), rtol=0, atol=1e-7)
    assert dataset["image_file"] == [str(i.image_path.relative_to(root)) for _, i in expected]
    assert dataset["category"] == [c for c, _ in expected]
    first = dataset[0]
    assert first["image"].size == expected[0][1].size == (first["width"], first["height"])


def test_second_load_comes_from_the_cache_and_a_changed_file_rebuilds_it(tmp_path):
    root = tmp_path / "data"
    written = write_caltech_fixture(root, {"airplanes": 5}, seed=3)
    cache = tmp_path / "cache"
    first, _, path1, cached1 = caltech101.load_caltech101(root, ["airplanes"], cache, show_progress=False)
    second, _, path2, cached2 = caltech101.load_caltech101(root, ["airplanes"], cache, show_progress=False)
    assert (cached1, cached2) == (False, True) and path1 == path2
    assert all(Path(f["filename"]).is_relative_to(path1) for f in second.cache_files)
    assert second["box"] == first["box"] and second[4]["image"].tobytes() == first[4]["image"].tobytes()
    # Moving the last box changes the annotation file: a new fingerprint, the new box.
    item = written["airplanes"][-1]
    y1, y2, x1, x2 = item.box_coord
    write_annotation(item.annotation_path, (y1, y2 - 1, x1, x2))
    os.utime(item.annotation_path, ns=(1, 1))
    third, _, path3, cached3 = caltech101.load_caltech101(root, ["airplanes"], cache, show_progress=False)
    assert not cached3 and path3 != path1
    assert third["box"][-1][3] == pytest.approx((y2 - 1) / item.size[1])


def test_bad_annotations_are_skipped_and_reported_or_fail_naming_the_file_when_strict(tmp_path):
    root = tmp_path / "data"
    written = write_caltech_fixture(root, {"airplanes": 7}, seed=1)
    items = written["airplanes"]
    items[0].annotation_path.write_bytes(b"not a mat file")  # corrupt
    items[1].annotation_path.unlink()  # missing
    w, h = items[2].size
    write_annotation(items[2].annotation_path, (1, h, w + 10, w + 20))  # outside the image
    items[3].image_path.write_bytes(b"\xff\xd8 truncated jpeg")  # unreadable image
    orphan = items[0].annotation_path.with_name("annotation_0099.mat")  # annotation without image
    write_annotation(orphan, (1, 5, 1, 5))

    dataset, skipped, _, _ = caltech101.load_caltech101(root, ["airplanes"], tmp_path / "cache", show_progress=False)
    assert len(dataset) == 3
    assert dataset["image_file"] == [str(i.image_path.relative_to(root)) for i in items[4:]]
    reported = {Path(s["file"]).name: s["reason"] for s in skipped}
    assert set(reported) == {"annotation_0001.mat", "annotation_0002.mat", "annotation_0003.mat", "image_0004.jpg", "annotation_0099.mat"}
    assert "missing" in reported["annotation_0002.mat"] and "outside" in reported["annotation_0003.mat"]
    assert "without image" in reported["annotation_0099.mat"]

    with pytest.raises(caltech101.AnnotationError, match="annotation_0001.mat"):
        caltech101.load_caltech101(root, ["airplanes"], tmp_path / "cache-strict", strict=True, show_progress=False)
    # A cached dataset with skipped files is refused by a strict run as well.
    with pytest.raises(caltech101.AnnotationError, match="annotation_0001.mat"):
        caltech101.load_caltech101(root, ["airplanes"], tmp_path / "cache", strict=True, show_progress=False)


def test_the_official_zip_folder_and_its_archives_are_found(tmp_path):
    written = write_caltech_fixture(tmp_path / "unzipped", {"airplanes": 3}, seed=2, zip_layout=True)
    dataset, *_ = caltech101.load_caltech101(tmp_path / "unzipped", ["airplanes"], tmp_path / "cache", show_progress=False)
    assert len(dataset) == 3
    # What caltech-101.zip really holds: the two archives, extracted once into the cache.
    zipped = tmp_path / "zip" / "caltech-101"
    zipped.mkdir(parents=True)
    base = tmp_path / "unzipped" / "caltech-101"
    with tarfile.open(zipped / "101_ObjectCategories.tar.gz", "w:gz") as tar:
        tar.add(base / "101_ObjectCategories", arcname="101_ObjectCategories")
    with tarfile.open(zipped / "Annotations.tar", "w") as tar:
        tar.add(base / "Annotations", arcname="Annotations")
    from_archives, _, _, _ = caltech101.load_caltech101(tmp_path / "zip", ["airplanes"], tmp_path / "cache2", show_progress=False)
    assert from_archives["box"] == dataset["box"]
    assert [p.name for p in (tmp_path / "cache2").glob("extracted-*")] and len(written["airplanes"]) == 3


def test_categories_all_lists_annotated_ones_and_unknown_names_fail_listing_the_allowed(caltech):
    root, _ = caltech
    assert caltech101.resolve_categories(["all"], root) == ["Faces", "airplanes", "ketch"]  # no BACKGROUND_Google
    assert caltech101.resolve_categories(["ketch,airplanes"], root) == ["ketch", "airplanes"]
    with pytest.raises(ValueError, match=r"--categories.*'airplane'.*allowed: 'all'.*'airplanes'"):
        caltech101.resolve_categories(["airplane"], root)
    with pytest.raises(ValueError, match="--data_dir .* is not a Caltech101 folder"):
        caltech101.locate_caltech_root(root / "101_ObjectCategories", root)
    with pytest.raises(ValueError, match="--data_dir .* is not a directory"):
        caltech101.locate_caltech_root(root / "missing", root)


def test_split_is_sorted_first_80_percent_per_category_or_seeded(caltech, cache_dir):
    root, _ = caltech
    dataset, *_ = caltech101.load_caltech101(root, ["airplanes", "Faces", "ketch"], cache_dir, show_progress=False)
    train, test = caltech101.split_train_test(dataset)
    # airplanes rows 0..59, Faces 60..71, ketch 72..83: first int(0.8 n) of each train.
    assert train == list(range(0, 48)) + list(range(60, 69)) + list(range(72, 81))
    assert test == list(range(48, 60)) + list(range(69, 72)) + list(range(81, 84))
    seeded = caltech101.split_train_test(dataset, split_seed=7)
    assert seeded == caltech101.split_train_test(dataset, split_seed=7) and seeded[0] != train
    assert sorted(seeded[0] + seeded[1]) == list(range(84)) and len(seeded[1]) == len(test)
    kept, validation = caltech101.split_off_validation(dataset, train, 0.1)
    assert validation == list(range(43, 48)) + [68] + [80]  # the last 10 % of each category's training images
    assert sorted(kept + validation) == sorted(train)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--optim", "adam"], "invalid choice: 'adam'"),
        (["--optim_args", "alpha"], "--optim_args: .*'alpha'"),
        (["--optim", "sgd", "--optim_args", "alpha=3"], r"--optim_args: .*\['alpha'\].*valid: momentum"),
        (["--test_fraction", "1.5"], "--test_fraction out of range"),
        (["--head_hidden_sizes", "64,-1"], "expected positive integers"),
        (["--loss", "l1"], "invalid choice: 'l1'"),
    ],
)
def test_bad_arguments_are_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        recipe.parse_args(["--data_dir", ".", "--output_dir", "o", *argv])
    assert __import__("re").search(message, capsys.readouterr().err)


def test_arguments_from_a_json_or_yaml_file_equal_the_same_flags(tmp_path):
    import yaml

    flags = ["--data_dir", "d", "--output_dir", "o", "--optim", "adamw", "--categories", "airplanes", "Faces", "--head_hidden_sizes", "64,32", "--hflip_probability", "0.5", "--class_head"]
    content = {"data_dir": "d", "output_dir": "o", "optim": "adamw", "categories": ["airplanes", "Faces"], "head_hidden_sizes": "64,32", "hflip_probability": 0.5, "class_head": True}
    (tmp_path / "args.json").write_text(json.dumps(content))
    (tmp_path / "args.yaml").write_text(yaml.safe_dump(content))
    expected = recipe.parse_args(flags)
    assert expected[1].class_head and expected[0].categories == ["airplanes", "Faces"]
    assert recipe.parse_args([str(tmp_path / "args.json")]) == expected == recipe.parse_args([str(tmp_path / "args.yaml")])


def test_a_flip_moves_image_and_box_together_and_depends_only_on_seed_epoch_and_index(caltech, cache_dir):
    root, _ = caltech
    dataset, *_ = caltech101.load_caltech101(root, ["airplanes"], cache_dir, show_progress=False)
    rows = dataset.select(range(8))
    plain, flipped = recipe.CaltechBoxes(rows, 32), recipe.CaltechBoxes(rows, 32, hflip_probability=1.0)
    for i in range(len(rows)):
        torch.testing.assert_close(plain[i]["boxes"], torch.tensor(rows[i]["box"]), rtol=0, atol=1e-6)  # resizing keeps the normalised box
        assert torch.equal(flipped[i]["pixel_values"], plain[i]["pixel_values"].flip(-1))
        x1, y1, x2, y2 = plain[i]["boxes"].tolist()
        torch.testing.assert_close(flipped[i]["boxes"], torch.tensor([1 - x2, y1, 1 - x1, y2]), rtol=0, atol=1e-6)
    half = recipe.CaltechBoxes(rows, 32, hflip_probability=0.5, seed=3)

    def flips(epoch: int, order) -> dict[int, bool]:
        half.set_epoch(epoch)
        return {i: not torch.equal(half[i]["pixel_values"], plain[i]["pixel_values"]) for i in order}

    torch.manual_seed(0)
    first = flips(1, range(8))
    torch.manual_seed(123)  # neither the global RNG nor the order of access matters
    assert flips(1, reversed(range(8))) == first
    assert any(flips(epoch, range(8)) != first for epoch in (2, 3, 4)) and 0 < sum(first.values()) < 8


# -- model ----------------------------------------------------------------------------------


def test_default_config_is_the_baseline_model_and_round_trips_through_auto_classes(tmp_path):
    from transformers import AutoConfig, AutoModel

    from hf_rlion.models import ViTBoxRegressionConfig, ViTBoxRegressionModel

    config = ViTBoxRegressionConfig()
    assert (config.image_size, config.patch_size, config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (224, 32, 64, 4, 4)
    assert config.num_patches == 49 and config.head_hidden_sizes == [2048, 1024, 512, 64, 32]
    small = ViTBoxRegressionConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, head_hidden_sizes=[8])
    model = ViTBoxRegressionModel(small).eval()
    assert model.box_head[2].in_features == 16 * 16  # the flattened patch tokens (CLS excluded)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert type(AutoConfig.from_pretrained(tmp_path)) is ViTBoxRegressionConfig
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is ViTBoxRegressionModel
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(model(x).pred_boxes, loaded(x).pred_boxes)
    with pytest.raises(ValueError, match="loss must be one of"):
        ViTBoxRegressionConfig(loss="l1")


def _iou_reference(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area = lambda r: max(0.0, r[2] - r[0]) * max(0.0, r[3] - r[1])  # noqa: E731
    union = area(a) + area(b) - ix * iy
    return ix * iy / union if union > 0 else 0.0


def test_iou_and_giou_against_plain_references():
    from hf_rlion.models import box_iou, generalized_box_iou

    g = torch.Generator().manual_seed(0)
    corners = torch.rand(200, 2, 2, generator=g, dtype=torch.float64)
    boxes = torch.cat([corners.min(1).values, corners.max(1).values], -1)
    a, b = boxes[:100], boxes[100:]
    expected = torch.tensor([_iou_reference(x.tolist(), y.tolist()) for x, y in zip(a, b)], dtype=torch.float64)
    torch.testing.assert_close(box_iou(a, b), expected, rtol=0, atol=1e-12)
    assert box_iou(a, a).allclose(torch.ones(100, dtype=torch.float64))
    # Two unit squares side by side with a gap of 1: IoU 0, enclosing area 3, union 2.
    left, right = torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([[2.0, 0.0, 3.0, 1.0]])
    assert generalized_box_iou(left, right).item() == pytest.approx(-1 / 3, abs=1e-6)
    torch.testing.assert_close(generalized_box_iou(a, a), torch.ones(100, dtype=torch.float64), rtol=0, atol=1e-12)
    enclosing = (torch.maximum(a[:, 2:], b[:, 2:]) - torch.minimum(a[:, :2], b[:, :2])).prod(-1)
    union = (a[:, 2:] - a[:, :2]).prod(-1) + (b[:, 2:] - b[:, :2]).prod(-1)
    union = union - expected * union / (1 + expected)  # |A u B| = (|A| + |B|) / (1 + IoU)
    torch.testing.assert_close(generalized_box_iou(a, b), expected - (enclosing - union) / enclosing, rtol=0, atol=1e-12)


def test_giou_loss_and_class_head_train_and_a_pretrained_backbone_loads(tmp_path):
    from transformers import ViTConfig, ViTModel

    from hf_rlion.models import ViTBoxRegressionConfig, ViTBoxRegressionModel, generalized_box_iou

    tiny = dict(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    model = ViTBoxRegressionModel(ViTBoxRegressionConfig(**tiny, head_hidden_sizes=[8], loss="giou", class_head=True, num_labels=3))
    x, boxes, labels = torch.randn(4, 3, 32, 32), torch.tensor([[0.1, 0.2, 0.5, 0.6]] * 4), torch.tensor([0, 1, 2, 1])
    out = model(x, boxes=boxes, labels=labels)
    assert out.logits.shape == (4, 3)
    assert (out.pred_boxes[:, 2:] >= out.pred_boxes[:, :2]).all()  # always a valid box
    expected_box_loss = (1 - generalized_box_iou(out.pred_boxes, boxes)).mean()
    torch.testing.assert_close(out.box_loss, expected_box_loss)
    torch.testing.assert_close(out.loss, out.box_loss + 0.1 * torch.nn.functional.cross_entropy(out.logits, labels))
    out.loss.backward()
    assert model.classifier.weight.grad.abs().sum() > 0 and model.box_head[-1].weight.grad.abs().sum() > 0

    backbone = ViTModel(ViTConfig(**tiny), add_pooling_layer=False)
    backbone.save_pretrained(tmp_path / "backbone")
    loaded = ViTBoxRegressionModel.from_pretrained_backbone(str(tmp_path / "backbone"), head_hidden_sizes=[8])
    for name, tensor in backbone.state_dict().items():
        assert torch.equal(loaded.vit.state_dict()[name], tensor), name


# -- end to end -----------------------------------------------------------------------------


def _test_split_predictions(output_dir: Path, root: Path, cache: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions of the saved model on the whole test split, computed here without the training loop."""
    from transformers import AutoModel

    import hf_rlion.models  # noqa: F401

    model = AutoModel.from_pretrained(output_dir).eval()
    dataset, *_ = caltech101.load_caltech101(root, ["airplanes"], cache, show_progress=False)
    _, test = caltech101.split_train_test(dataset)
    rows = recipe.CaltechBoxes(dataset.select(test), model.config.image_size)
    batch = torch.utils.data.default_collate([rows[i] for i in range(len(rows))])
    with torch.no_grad():
        return model(pixel_values=batch["pixel_values"]).pred_boxes, batch["boxes"]


def test_rlion_training_beats_the_mean_box_baseline_on_the_whole_test_split(caltech, cache_dir, tmp_path):
    root, _ = caltech
    out = tmp_path / "run"
    result = run_recipe(root, out, cache_dir, "--optim", "rlion", "--learning_rate", "3e-3", "--num_train_epochs", "10", "--validation_fraction", "0")
    metrics = json.loads((out / "eval_results.json").read_text())
    assert metrics == result["eval"]
    assert metrics["num_images"] == 12  # the whole test split: last 20 % of 60
    assert metrics["mean_iou"] > metrics["mean_box_baseline_mean_iou"] + 0.2, metrics
    # The saved model, loaded afresh, gives the reported figures.
    pred, target = _test_split_predictions(out, root, cache_dir)
    assert recipe.box_metrics(pred, target)["mean_iou"] == pytest.approx(metrics["mean_iou"], abs=1e-5)
    everything = json.loads((out / "all_results.json").read_text())
    assert everything["optimizer"] == "rlion" and everything["eval_mean_iou"] == metrics["mean_iou"]
    history = json.loads((out / "log_history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, 11)) and history[-1]["train_loss"] < history[0]["train_loss"]
    from PIL import Image

    assert Image.open(out / "predictions.png").size[0] > 400 and (out / "training_curves.png").is_file()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-10"]  # last == kept


def test_resume_from_the_last_complete_checkpoint_gives_the_uninterrupted_weights(caltech, cache_dir, tmp_path):
    from safetensors.torch import load_file

    root, _ = caltech
    # Warm-up into the third epoch: the scheduler's state matters after resuming; flips and
    # the validation-based choice of the best epoch too.
    common = ["--optim", "rlion", "--learning_rate", "3e-3", "--lr_scheduler_type", "constant_with_warmup", "--warmup_steps", "14", "--hflip_probability", "0.5"]
    run_recipe(root, tmp_path / "straight", cache_dir, *common, "--num_train_epochs", "3")
    resumed = tmp_path / "resumed"
    run_recipe(root, resumed, cache_dir, *common, "--num_train_epochs", "2")
    # A crash while writing epoch 3's checkpoint leaves checkpoint-3 without its completeness marker.
    shutil.copytree(resumed / "checkpoint-2", resumed / "checkpoint-3")
    (resumed / "checkpoint-3" / CHECKPOINT_COMPLETE).unlink()
    assert Path(resolve_checkpoint("latest", resumed)).name == "checkpoint-2"
    with pytest.raises(ValueError, match=r"checkpoint-3 is not a complete checkpoint"):
        run_recipe(root, resumed, cache_dir, *common, "--num_train_epochs", "3", "--resume_from_checkpoint", str(resumed / "checkpoint-3"))
    result = run_recipe(root, resumed, cache_dir, *common, "--num_train_epochs", "3", "--resume_from_checkpoint", "latest")
    # The last epoch's weights (the kept model may be an earlier, validation-chosen epoch).
    for saved in ("checkpoint-3/model.safetensors", "model.safetensors"):
        straight_weights = load_file(tmp_path / "straight" / saved)
        resumed_weights = load_file(resumed / saved)
        assert straight_weights.keys() == resumed_weights.keys()
        for name in straight_weights:
            assert torch.equal(straight_weights[name], resumed_weights[name]), (saved, name)
    assert read_marker(resumed / "checkpoint-3")["history"] == read_marker(tmp_path / "straight" / "checkpoint-3")["history"]
    assert result["eval"] == json.loads((tmp_path / "straight" / "eval_results.json").read_text())
    history = json.loads((resumed / "log_history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    best = result["eval"]["epoch"]  # chosen on the validation split
    assert sorted(Path(p).name for p in complete_checkpoints(resumed)) == sorted({f"checkpoint-{best}", "checkpoint-3"})
    assert sorted(p.name for p in resumed.glob("checkpoint-*")) == sorted({f"checkpoint-{best}", "checkpoint-3"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_cpu_ranks_evaluate_the_whole_test_split_and_push_to_the_hub(caltech, cache_dir, tmp_path, local_hub):
    root, _ = caltech
    out = tmp_path / "ddp"
    env = {**os.environ, **local_hub.env, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_RLION_CACHE": str(tmp_path / "hf_rlion_cache")}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        str(RECIPE), "--data_dir", str(root), "--output_dir", str(out), "--dataset_cache_dir", str(cache_dir),
        *TINY_MODEL, "--per_device_train_batch_size", "4", "--num_train_epochs", "2", "--learning_rate", "3e-3",
        "--validation_fraction", "0", "--optim", "rlion", "--push_to_hub", "--hub_model_id", "vit-caltech-ddp",
    ]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert local_hub.token not in proc.stdout + proc.stderr
    results = json.loads((out / "all_results.json").read_text())
    metrics = json.loads((out / "eval_results.json").read_text())
    assert results["num_processes"] == 2 and metrics["num_images"] == 12  # each test image once
    pred, target = _test_split_predictions(out, root, cache_dir)
    assert recipe.box_metrics(pred, target)["mean_iou"] == pytest.approx(metrics["mean_iou"], abs=1e-5)

    pushed = local_hub.repo_dir(f"{local_hub.user}/vit-caltech-ddp")
    assert (pushed / "model.safetensors").is_file() and not list(pushed.glob("checkpoint-*"))
    card = (pushed / "README.md").read_text()
    assert "rlion" in card and "Caltech101" in card and f"{metrics['mean_iou']:.4f}" in card
    assert f'from_pretrained("{local_hub.user}/vit-caltech-ddp")' in card  # the usage names the real repo
    assert "accelerate launch --num_processes 2 recipes/vit_detection_caltech101.py" in card
    assert (pushed / "training_curves.png").is_file() and "![Training curves](training_curves.png)" in card
    assert str(tmp_path) not in card and "| Epoch | Step | Training loss | Mean IoU |" in card
    from transformers import AutoModel

    import hf_rlion.models  # noqa: F401

    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(AutoModel.from_pretrained(pushed).eval()(x).pred_boxes, AutoModel.from_pretrained(out).eval()(x).pred_boxes)


def test_rlion_8bit_with_the_giou_loss_beats_the_mean_box_baseline(caltech, cache_dir, tmp_path):
    root, _ = caltech
    result = run_recipe(
        root, tmp_path / "8bit", cache_dir, "--optim", "rlion_8bit", "--learning_rate", "3e-3", "--num_train_epochs", "6",
        "--validation_fraction", "0", "--loss", "giou",
    )  # fmt: skip
    metrics = result["eval"]
    assert metrics["num_images"] == 12
    assert metrics["mean_iou"] > metrics["mean_box_baseline_mean_iou"] + 0.15, metrics


def test_class_head_over_several_categories_learns_the_category_and_the_box(caltech, cache_dir, tmp_path):
    root, _ = caltech
    result = run_recipe(
        root, tmp_path / "classes", cache_dir, "--optim", "rlion", "--learning_rate", "3e-3", "--num_train_epochs", "8",
        "--validation_fraction", "0", "--categories", "airplanes,Faces,ketch", "--class_head",
    )  # fmt: skip
    metrics = result["eval"]
    assert metrics["num_images"] == 12 + 3 + 3
    assert metrics["accuracy"] > 12 / 18 + 0.1, metrics  # clearly above always answering the majority class
    assert metrics["mean_iou"] > metrics["mean_box_baseline_mean_iou"] + 0.1, metrics
