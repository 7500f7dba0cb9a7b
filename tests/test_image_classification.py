"""The image-classification recipe (recipes/image_classification.py).

What is proven here:

* top-1/top-5 accuracy (``compute_metrics`` after ``top5_class_ids``) equals scikit-learn's;
* the torchvision v2 transforms: eval = resize + center crop + exact normalisation; flips only when
  asked; each sample's augmentation is a pure function of its seed and leaves the global RNGs alone;
* mixup/cutmix in the collate: soft targets, reproducible from the samples' seeds; the soft-target
  loss equals ``F.cross_entropy(label_smoothing=...)`` on class ids;
* ``--config_overrides`` (lists, strings typed by the config's defaults), column choice, and the clear
  errors (unknown optimizer lists the valid names, unknown column lists the columns, missing/empty
  image folders, gated dataset, corrupt image named or skipped and counted);
* end to end, as users run it, with ``HF_HUB_OFFLINE=1``:
  - one process, ``--optim rlion``, image folders of real digits: the standard output files,
    ``train_images_per_second`` in the logs, checkpoints, and ``--resume_from_checkpoint``
    continuing to the same weights as the uninterrupted run;
  - RandAugment + mixup + cutmix + random erasing + label smoothing: trains, and two runs with one
    seed end with identical weights;
  - timm architectures from scratch (FasterNet-T0, EfficientNetV2-rw-t) on one process and on two
    CPU ranks beat chance on the digits;
  - two real CPU ranks (``recipes/configs/cpu_2ranks.yaml`` = ``accelerate launch --multi_gpu
    --num_processes 2`` with ``ACCELERATE_USE_CPU=1``), ``--optim rlion_8bit``,
    the embedded digits, ``--push_to_hub`` to a local stand-in Hub; the pushed folder loads with
    ``from_pretrained`` and its own image processor gives the same eval accuracy; the model card
    carries the metrics and the optimizer's hyperparameters;
  - the same 2-rank config without ``ACCELERATE_USE_CPU=1`` (two unconnected processes) is refused.

Not tested here: ``recipes/configs/multi_gpu.yaml`` and ``fsdp.yaml`` need GPUs (accelerate applies
FSDP only on accelerators; on CPU the recipe warns and runs DDP); ``--model_name_or_path timm/...``
needs the Hub.
"""
from __future__ import annotations

import importlib.util
import inspect
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hf_rlion.complete_checkpoints import CHECKPOINT_COMPLETE
from hf_rlion.digits import digits_dataset

from _classification_data import write_corrupt_file, write_digit_folders, write_parquet_copy, write_webdataset_copy

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPE = REPO_ROOT / "recipes" / "image_classification.py"
CPU_2RANKS_CONFIG = REPO_ROOT / "recipes" / "configs" / "cpu_2ranks.yaml"


def _load_recipe():
    spec = importlib.util.spec_from_file_location("image_classification_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


recipe = _load_recipe()


def _env(**extra) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.update(extra)
    return env


def _run(command: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"command failed ({proc.returncode}): {' '.join(command)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _free_port() -> int:
    """A free TCP port for the ranks' rendezvous (other test runs on this machine may hold 29500)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------
# Metric, transforms, mixing, loss
# ---------------------------------------------------------------------------------------------


def test_top_k_accuracy_equals_sklearn():
    from sklearn.metrics import accuracy_score, top_k_accuracy_score
    from transformers import EvalPrediction

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(300, 7)).astype(np.float32)
    labels = rng.integers(0, 7, size=300)
    logits[np.arange(150), labels[:150]] += 2.0  # half of them mostly right
    ranked = recipe.top5_class_ids(torch.from_numpy(logits)).numpy()
    assert ranked.shape == (300, 5)
    result = recipe.compute_metrics(EvalPrediction(predictions=ranked, label_ids=labels))
    assert result["accuracy"] == accuracy_score(labels, logits.argmax(-1))
    assert result["top5_accuracy"] == pytest.approx(top_k_accuracy_score(labels, logits, k=5, labels=range(7)), abs=1e-12)
    three_classes = recipe.top5_class_ids(torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])).numpy()
    assert recipe.compute_metrics(EvalPrediction(predictions=three_classes, label_ids=np.array([1, 2]))) == {"accuracy": 0.5}


def _transforms(image_size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), crop_pct=1.0, **data):
    prep = recipe.Preprocessing(image_size, mean, std, "bicubic", crop_pct)
    return recipe.build_transforms(prep, recipe.DataTrainingArguments(dataset_name="x", **data))


def test_eval_transform_is_a_center_crop_and_exact_normalisation():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(36, 40, 3), dtype=np.uint8)  # height 36, width 40
    mean, std = (0.2, 0.4, 0.6), (0.5, 0.25, 0.125)
    # crop_pct chosen so that the "resize shorter side to 32 / crop_pct" step is the identity (36 -> 36).
    _, evaluation = _transforms(32, mean, std, crop_pct=32 / 36)
    out = evaluation(Image.fromarray(pixels))
    expected = (pixels[2:34, 4:36].astype(np.float32) / 255.0 - np.float32(mean)) / np.float32(std)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), expected.transpose(2, 0, 1), rtol=0, atol=1e-6)


def test_train_transform_flips_only_when_asked():
    pixels = np.zeros((16, 16, 3), dtype=np.uint8)
    pixels[:, :8] = 255  # left half white
    image = Image.fromarray(pixels)
    torch.manual_seed(0)
    no_flip, _ = _transforms(16, train_crop_scale="1,1", horizontal_flip=False)
    assert all(no_flip(image)[0, :, 0].min() > 0.99 for _ in range(20))
    flip, _ = _transforms(16, train_crop_scale="1,1", horizontal_flip=True)
    left_is_white = [bool(flip(image)[0, :, 0].min() > 0.99) for _ in range(40)]
    assert 5 < sum(left_is_white) < 35  # flipped about half of the time


def test_seeded_augmentation_is_a_function_of_the_seed_and_leaves_global_rngs_alone():
    import random

    image = digits_dataset()["train"][0]["image"]
    train, _ = _transforms(32, auto_augment="rand-m9-n2", reprob=0.5)
    torch.manual_seed(123)
    random.seed(123)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    outputs = {}
    for epoch, index in [(0, 5), (0, 5), (1, 5), (0, 6)]:
        with recipe.seeded(recipe.sample_seed(11, epoch, index)):
            outputs.setdefault((epoch, index), []).append(train(image))
    assert torch.equal(*outputs[(0, 5)])
    assert not torch.equal(outputs[(0, 5)][0], outputs[(1, 5)][0]) and not torch.equal(outputs[(0, 5)][0], outputs[(0, 6)][0])
    assert torch.equal(before[0], torch.get_rng_state()) and before[1] == random.getstate()
    assert np.array_equal(before[2], np.random.get_state()[1])


def test_mixup_cutmix_collate_gives_soft_targets_reproducible_from_the_sample_seeds():
    collate = recipe.Collator(num_labels=4, mixup=0.8, cutmix=1.0)
    rng = torch.Generator().manual_seed(0)
    examples = [{"pixel_values": torch.rand(3, 8, 8, generator=rng), "labels": i % 4, "augment_seed": 100 + i} for i in range(6)]
    first, again = collate(examples), collate(examples)
    assert first["labels"].shape == (6, 4) and torch.allclose(first["labels"].sum(-1), torch.ones(6))
    assert first["labels"].max() < 1  # every row mixes two images
    assert torch.equal(first["pixel_values"], again["pixel_values"]) and torch.equal(first["labels"], again["labels"])
    other = collate([{**e, "augment_seed": e["augment_seed"] + 1} for e in examples])
    assert not torch.equal(other["labels"], first["labels"])
    plain = collate([{k: v for k, v in e.items() if k != "augment_seed"} for e in examples])  # evaluation batch
    assert plain["labels"].tolist() == [0, 1, 2, 3, 0, 1] and torch.equal(plain["pixel_values"][2], examples[2]["pixel_values"])


def test_soft_target_loss_equals_cross_entropy_with_label_smoothing():
    logits = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(8) % 5
    loss = recipe.soft_target_cross_entropy(0.1)
    expected = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
    torch.testing.assert_close(loss({"logits": logits}, labels), expected)
    one_hot = torch.nn.functional.one_hot(labels, 5).float()
    torch.testing.assert_close(loss({"logits": logits}, one_hot), expected)
    # Trainer's count for soft targets is C entries per sample (here 2 accumulated batches of 8): per-sample sum / 16.
    torch.testing.assert_close(loss({"logits": logits}, one_hot, num_items_in_batch=torch.tensor(16 * 5)), expected / 2)


# ---------------------------------------------------------------------------------------------
# Arguments and errors
# ---------------------------------------------------------------------------------------------


def test_config_overrides_parse_lists_and_follow_the_current_types(tmp_path):
    import transformers

    config = recipe.config_from_overrides("resnet", "embedding_size=16,hidden_sizes=[16,32,64],depths=[1,1,1],layer_type=basic")
    assert (config.embedding_size, config.hidden_sizes, config.depths, config.layer_type) == (16, [16, 32, 64], [1, 1, 1], "basic")
    # Derived settings follow (built through the constructor), so the saved config loads again.
    assert config.stage_names == ["stem", "stage1", "stage2", "stage3"]
    config.save_pretrained(tmp_path)
    assert transformers.AutoConfig.from_pretrained(tmp_path).depths == [1, 1, 1]
    vit = recipe.config_from_overrides("vit", "layer_norm_eps=1e-3,qkv_bias=false,hidden_act=gelu_new")
    assert (vit.layer_norm_eps, vit.qkv_bias, vit.hidden_act) == (1e-3, False, "gelu_new")
    assert recipe.config_from_overrides("timm_wrapper", "architecture=fasternet_t0").architecture == "fasternet_t0"
    timm_config = recipe.config_from_overrides("timm_wrapper", "architecture=efficientnetv2_rw_t,model_args={bn_momentum: 0.5}")
    assert (timm_config.architecture, timm_config.model_args) == ("efficientnetv2_rw_t", {"bn_momentum": 0.5})
    assert recipe.config_from_overrides("vit", "image_size=32,patch_size=8").patch_size == 8  # numbers only
    with pytest.raises(ValueError, match="has no attribute 'hiden_size'"):
        recipe.config_from_overrides("vit", "hiden_size=3")
    with pytest.raises(ValueError, match="expected key=value"):
        recipe.config_from_overrides("vit", "hidden_size")


def test_timm_architecture_from_scratch_gets_its_own_processor_offline(tmp_path):
    """--model_type timm_wrapper: the processor comes from the architecture's timm pretrained_cfg (no Hub), and
    the saved model folder gives back a processor with the trained input size."""
    import timm
    from transformers import AutoImageProcessor

    model_args = recipe.ModelArguments(model_type="timm_wrapper", config_overrides="architecture=efficientnetv2_rw_t", image_size=48)
    model, processor = recipe.build_model_and_processor(model_args, ["a", "b", "c"])
    expected = timm.data.resolve_data_config(model=timm.create_model("efficientnetv2_rw_t"))
    prep = recipe.model_preprocessing(model_args, recipe.DataTrainingArguments(dataset_name="x"), model.config, processor)
    assert (prep.image_size, prep.mean, prep.std, prep.crop_pct) == (48, expected["mean"], expected["std"], expected["crop_pct"])
    assert model(pixel_values=torch.zeros(2, 3, 48, 48)).logits.shape == (2, 3)
    recipe.record_preprocessing(model, processor, prep)
    model.save_pretrained(tmp_path)
    assert AutoImageProcessor.from_pretrained(tmp_path).data_config["input_size"] == (3, 48, 48)


def test_unknown_optimizer_lists_the_valid_names(capsys):
    with pytest.raises(SystemExit):
        recipe.parse_arguments(["--optim", "rlionn"])
    message = capsys.readouterr().err
    assert "invalid choice: 'rlionn'" in message
    for name in ("rlion", "rlion_8bit", "paged_rlion_8bit", "adamw_torch"):
        assert f"'{name}'" in message


def test_recipe_defaults_and_rlion_hyperparameters_come_from_the_class():
    _, data_args, training_args = recipe.parse_arguments([])
    assert training_args.optim == "rlion" and data_args.embedded
    assert "alpha" not in (training_args.optim_args or "")  # RLion's own defaults are never overridden here


def test_a_settings_file_keeps_the_recipe_defaults(tmp_path):
    settings = tmp_path / "run.yaml"
    settings.write_text("learning_rate: 0.003\nmax_train_samples: 10\n")
    _, data_args, training_args = recipe.parse_arguments([str(settings)])
    assert training_args.learning_rate == 0.003 and data_args.max_train_samples == 10
    assert training_args.optim == "rlion" and training_args.output_dir == recipe.RECIPE_TRAINING_DEFAULTS["output_dir"]


def test_unknown_column_lists_the_columns():
    with pytest.raises(ValueError, match=r"--label_column_name 'target' is not a column of the dataset; its columns: image, label"):
        recipe.pick_column(["image", "label"], "target", recipe.LABEL_COLUMN_CANDIDATES, "--label_column_name")
    assert recipe.pick_column(["__key__", "jpg", "cls"], None, recipe.IMAGE_COLUMN_CANDIDATES, "--image_column_name") == "jpg"
    assert recipe.pick_column(["__key__", "jpg", "cls"], None, recipe.LABEL_COLUMN_CANDIDATES, "--label_column_name") == "cls"


def test_missing_and_empty_image_dirs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="--train_dir '.*nowhere': no such directory"):
        recipe.main(["--train_dir", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "out")])
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no image files"):
        recipe.main(["--train_dir", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "out")])


def test_unknown_column_in_a_real_image_folder(tmp_path):
    train_dir, val_dir = write_digit_folders(tmp_path, classes=(0, 1), per_class_train=2, per_class_val=1)
    with pytest.raises(ValueError, match="--image_column_name 'jpg' is not a column of the dataset; its columns: image, label"):
        recipe.main(["--train_dir", str(train_dir), "--image_column_name", "jpg", "--output_dir", str(tmp_path / "out")])


def test_gated_dataset_error_says_how_to_get_access():
    from datasets.exceptions import DatasetNotFoundError

    # The exception datasets raises for a gated repository without a token (datasets/load.py).
    original = DatasetNotFoundError(
        "Dataset 'ILSVRC/imagenet-1k' is a gated dataset on the Hub. You must be authenticated to access it."
    )
    err = recipe.explain_load_error("ILSVRC/imagenet-1k", original)
    assert isinstance(err, ValueError)
    assert "is gated" in str(err) and "https://huggingface.co/datasets/ILSVRC/imagenet-1k" in str(err)
    assert "HF_TOKEN" in str(err) and "--token" in str(err)


def test_missing_dataset_offline_is_a_clear_error(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    # What HF_HUB_OFFLINE=1 sets when read at import time.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"--dataset_name 'no-such-user/no-such-dataset' could not be reached \(offline\?\)"):
        recipe.main(["--dataset_name", "no-such-user/no-such-dataset", "--output_dir", str(tmp_path / "out")])


def _tiny_run_args(train_dir: Path, val_dir: Path, out: Path) -> list[str]:
    return [
        "--train_dir", str(train_dir), "--validation_dir", str(val_dir), "--output_dir", str(out),
        "--max_steps", "1", "--per_device_train_batch_size", "4", "--dataloader_num_workers", "0",
        "--save_strategy", "no", "--eval_strategy", "no", "--image_size", "16",
    ]  # fmt: skip


def test_corrupt_image_fails_naming_the_file(tmp_path):
    train_dir, val_dir = write_digit_folders(tmp_path, classes=(0, 1), per_class_train=2, per_class_val=1)
    broken = write_corrupt_file(train_dir / "digit_1")
    with pytest.raises(ValueError, match=f"corrupt image file '{broken}'"):
        recipe.main(_tiny_run_args(train_dir, val_dir, tmp_path / "out") + ["--per_device_train_batch_size", "8"])


def test_corrupt_image_skip_drops_and_counts(tmp_path):
    train_dir, val_dir = write_digit_folders(tmp_path, classes=(0, 1), per_class_train=3, per_class_val=1)
    write_corrupt_file(train_dir / "digit_1")
    write_corrupt_file(val_dir / "digit_0", "also_broken.png")
    recipe.main(_tiny_run_args(train_dir, val_dir, tmp_path / "out") + ["--corrupt_images", "skip"])
    train_results = _read_json(tmp_path / "out" / "train_results.json")
    eval_results = _read_json(tmp_path / "out" / "eval_results.json")
    assert train_results["train_skipped_images"] == 1 and train_results["train_samples"] == 6
    assert eval_results["eval_samples"] == 2 and eval_results["eval_skipped_images"] == 1


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------


def _small_digits(train: int = 96, validation: int = 32):
    digits = digits_dataset()
    return {"train": digits["train"].select(range(train)), "validation": digits["validation"].select(range(validation))}


def test_streamed_parquet_copy(tmp_path):
    """--dataset_name <parquet copy> --streaming: labels from the ClassLabel kept in the parquet schema."""
    root = write_parquet_copy(tmp_path / "parquet", _small_digits())
    out = tmp_path / "out"
    recipe.main([
        "--dataset_name", str(root), "--streaming", "--max_steps", "2", "--per_device_train_batch_size", "16",
        "--output_dir", str(out), "--dataloader_num_workers", "0", "--save_strategy", "no", "--eval_strategy", "no",
    ])  # fmt: skip
    assert _read_json(out / "trainer_state.json")["global_step"] == 2
    assert _read_json(out / "config.json")["id2label"] == {str(i): str(i) for i in range(10)}
    assert 0.0 <= _read_json(out / "eval_results.json")["eval_accuracy"] <= 1.0
    with pytest.raises(ValueError, match="--streaming needs --max_steps"):
        recipe.main(["--dataset_name", str(root), "--streaming", "--output_dir", str(out)])


def test_webdataset_copy_with_integer_labels(tmp_path):
    """A timm/imagenet-1k-wds-like copy: columns __key__, jpg, cls (plain integers), json."""
    root = write_webdataset_copy(tmp_path / "wds", _small_digits())
    out = tmp_path / "out"
    recipe.main([
        "--dataset_name", str(root), "--max_steps", "2", "--per_device_train_batch_size", "16",
        "--output_dir", str(out), "--dataloader_num_workers", "0", "--save_strategy", "no", "--eval_strategy", "no",
    ])  # fmt: skip
    results = _read_json(out / "all_results.json")
    assert results["train_samples"] == 96 and results["eval_samples"] == 32
    assert len(_read_json(out / "config.json")["id2label"]) == 10  # classes 0..max(cls)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_fine_tune_from_a_local_model_directory_with_other_classes(tmp_path):
    """--model_name_or_path <dir>: weights come from the directory; the head is rebuilt for the new classes."""
    source_data = write_digit_folders(tmp_path / "two", classes=(0, 1), per_class_train=4, per_class_val=2)
    recipe.main(_tiny_run_args(*source_data, tmp_path / "source") + ["--seed", "1"])  # not the tuned run's init
    target_data = write_digit_folders(tmp_path / "three", classes=(5, 6, 7), per_class_train=4, per_class_val=2)
    args = _tiny_run_args(*target_data, tmp_path / "tuned")
    args[args.index("--image_size") : args.index("--image_size") + 2] = []  # the size comes from the saved processor
    recipe.main(args + ["--model_name_or_path", str(tmp_path / "source"), "--learning_rate", "1e-12"])
    config = _read_json(tmp_path / "tuned" / "config.json")
    assert sorted(config["id2label"].values()) == ["digit_5", "digit_6", "digit_7"]
    assert _read_json(tmp_path / "tuned" / "preprocessor_config.json")["size"] == {"shortest_edge": 16}
    source, tuned = _weights(tmp_path / "source"), _weights(tmp_path / "tuned")
    assert tuned["classifier.1.weight"].shape == (3, source["classifier.1.weight"].shape[1])
    body = "resnet.embedder.embedder.convolution.weight"
    torch.testing.assert_close(tuned[body], source[body], rtol=0, atol=1e-9)  # one step at lr 1e-12


def test_one_process_rlion_checkpoints_and_resume(tmp_path):
    """Train 3 epochs with a checkpoint per epoch; resume from epoch 2 elsewhere; same final weights."""
    train_dir, val_dir = write_digit_folders(tmp_path / "data")
    common = [
        sys.executable, str(RECIPE), "--train_dir", str(train_dir), "--validation_dir", str(val_dir),
        "--optim", "rlion", "--num_train_epochs", "3", "--per_device_train_batch_size", "20",
        "--lr_scheduler_type", "constant", "--save_total_limit", "3", "--seed", "7",
        "--train_crop_scale", "0.6,1.0", "--horizontal_flip", "false",  # digits: mild crops, no mirror images
    ]  # fmt: skip
    full = tmp_path / "full"
    proc = _run(common + ["--output_dir", str(full)], _env(), tmp_path)
    assert "eval_accuracy = " in proc.stdout and "1 process(es)" in proc.stdout

    for name in ("all_results.json", "train_results.json", "eval_results.json", "trainer_state.json",
                 "config.json", "model.safetensors", "preprocessor_config.json", "training_curves.png"):  # fmt: skip
        assert (full / name).is_file(), name
    assert sorted(p.name for p in full.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]
    assert all((c / CHECKPOINT_COMPLETE).is_file() for c in full.glob("checkpoint-*"))
    eval_results = _read_json(full / "eval_results.json")
    all_results = _read_json(full / "all_results.json")
    assert eval_results["eval_samples"] == 60 and all_results["train_samples"] == 200
    assert eval_results["eval_accuracy"] == all_results["eval_accuracy"]
    assert "eval_top5_accuracy" in eval_results  # 5 classes
    # Real learning on real digits in 30 steps: 5 classes, chance is 0.2.
    assert eval_results["eval_accuracy"] >= 0.5, eval_results
    config = _read_json(full / "config.json")
    assert sorted(config["id2label"].values()) == [f"digit_{d}" for d in range(5)]
    state = _read_json(full / "trainer_state.json")
    assert state["global_step"] == 30
    assert [round(e["epoch"]) for e in state["log_history"] if "eval_accuracy" in e] == [1, 2, 3]
    speeds = [e["train_images_per_second"] for e in state["log_history"] if "loss" in e]
    assert speeds and all(speed > 0 for speed in speeds)  # logged with each training loss
    assert "'train_images_per_second'" in proc.stdout + proc.stderr  # and shown while training

    resumed = tmp_path / "resumed"
    _run(common + ["--output_dir", str(resumed), "--resume_from_checkpoint", str(full / "checkpoint-20")], _env(), tmp_path)
    assert _read_json(resumed / "trainer_state.json")["global_step"] == 30
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(b[key], a[key]), key  # exact: same data order, augmentations and RLion state
    assert _read_json(resumed / "eval_results.json")["eval_accuracy"] == eval_results["eval_accuracy"]


AUGMENTATIONS = [
    "--auto_augment", "rand-m9-mstd0.5", "--mixup", "0.8", "--cutmix", "1.0", "--reprob", "0.25",
    "--label_smoothing_factor", "0.1",
]  # fmt: skip


def test_all_augmentations_train_and_are_deterministic_under_a_seed(tmp_path):
    """RandAugment + mixup + cutmix + random erasing + label smoothing: the loss is finite, the weights move,
    and a second run with the same seed ends with the same weights."""
    train_dir, val_dir = write_digit_folders(tmp_path / "data", classes=(0, 1, 2), per_class_train=8, per_class_val=2)
    runs = []
    for name in ("a", "b"):
        args = _tiny_run_args(train_dir, val_dir, tmp_path / name)
        recipe.main(args + ["--max_steps", "3", "--per_device_train_batch_size", "8", "--logging_steps", "1", *AUGMENTATIONS])
        runs.append(_weights(tmp_path / name))
    losses = [e["loss"] for e in _read_json(tmp_path / "a" / "trainer_state.json")["log_history"] if "loss" in e]
    assert len(losses) == 3 and all(math.isfinite(loss) and loss > 0 for loss in losses)
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key
    torch.manual_seed(42)  # Trainer's default seed: the model's initial weights
    initial = recipe.build_model_and_processor(recipe.ModelArguments(), ["0", "1", "2"])[0].state_dict()
    assert not torch.equal(initial["classifier.1.weight"], runs[0]["classifier.1.weight"])


# Digits at 32 px, a few hundred samples, 3 epochs: each run takes well under a minute of CPU time. The
# EfficientNetV2 is benchmarks/compare_optimizers.py's: B0, the family's smallest, at half width and depth
# (timm's channel/depth multipliers through TimmWrapperConfig.model_args). EfficientNet's many BatchNorm
# layers lag behind weights that move this fast (eval accuracy stays at chance with the default momentum 0.1
# for ~30 steps, train-mode accuracy is ~0.98), so that run tracks batch statistics faster (bn_momentum).
TIMM_RUNS = {
    "fasternet_t0": ["architecture=fasternet_t0", "--max_train_samples", "320"],
    "tf_efficientnetv2_b0": [
        "architecture=tf_efficientnetv2_b0,model_args={bn_momentum: 0.5, channel_multiplier: 0.5, depth_multiplier: 0.5}",
        "--max_train_samples", "256",
    ],
}
TIMM_ARCHITECTURES = list(TIMM_RUNS)


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize("architecture", TIMM_ARCHITECTURES)
def test_timm_architecture_from_scratch_beats_chance(architecture, ranks, tmp_path):
    """--model_type timm_wrapper --config_overrides architecture=...: built offline (processor from timm's
    pretrained_cfg), trained on the digits on 1 process or 2 CPU ranks, well above chance (0.1)."""
    out = tmp_path / "out"
    launcher = [sys.executable]
    env = _env()
    if ranks == 2:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2RANKS_CONFIG),
                    "--main_process_port", str(_free_port())]  # fmt: skip
        env["ACCELERATE_USE_CPU"] = "1"
    command = launcher + [
        str(RECIPE), "--model_type", "timm_wrapper", "--config_overrides", *TIMM_RUNS[architecture], "--image_size", "32",
        "--num_train_epochs", "3", "--max_eval_samples", "100", "--per_device_train_batch_size", str(32 // ranks),
        "--eval_strategy", "no", "--save_strategy", "no", "--output_dir", str(out),
    ]  # fmt: skip
    proc = _run(command, env, tmp_path)
    assert f"{ranks} process(es)" in proc.stdout
    assert _read_json(out / "config.json")["architecture"] == architecture
    assert _read_json(out / "eval_results.json")["eval_accuracy"] >= 0.3


@pytest.mark.slow
def test_two_cpu_ranks_rlion_8bit_push_and_reload(tmp_path, local_hub):
    """2 real gloo ranks, --optim rlion_8bit on the embedded digits, push to a local Hub, reload, same accuracy."""
    pytest.importorskip("bitsandbytes")
    from huggingface_hub import ModelCard
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    out = tmp_path / "out"
    repo_id = f"{local_hub.user}/digits-rlion-8bit"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2RANKS_CONFIG),
        "--main_process_port", str(_free_port()),
        str(RECIPE), "--optim", "rlion_8bit", "--output_dir", str(out), "--max_train_samples", "256",
        "--max_eval_samples", "96", "--num_train_epochs", "2", "--per_device_train_batch_size", "16",
        "--push_to_hub", "--hub_model_id", repo_id,
    ]  # fmt: skip
    proc = _run(command, _env(ACCELERATE_USE_CPU="1", **local_hub.env), tmp_path)
    assert "2 process(es)" in proc.stdout
    assert local_hub.token not in proc.stdout + proc.stderr
    # 256 samples / (16 per rank x 2 ranks) = 8 steps per epoch: two ranks really shared the data.
    assert _read_json(out / "trainer_state.json")["global_step"] == 16
    eval_accuracy = _read_json(out / "eval_results.json")["eval_accuracy"]

    pushed = local_hub.repo_dir(repo_id)
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= {p.name for p in pushed.iterdir()}
    assert not list(pushed.glob("checkpoint-*"))

    # The pushed model and image processor, loaded as a user would, score the same on the same eval images.
    model = AutoModelForImageClassification.from_pretrained(pushed).eval()
    processor = AutoImageProcessor.from_pretrained(pushed)
    eval_split = digits_dataset()["validation"].select(range(96))
    pixels = processor(images=[image.convert("RGB") for image in eval_split["image"]], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        predictions = model(pixel_values=pixels).logits.argmax(-1).numpy()
    assert math.isclose(float((predictions == np.asarray(eval_split["label"])).mean()), eval_accuracy, abs_tol=1e-12)

    card = ModelCard.load(pushed / "README.md")
    data = card.data.to_dict()
    assert {"hf-rlion", "rlion", "rlion_8bit", "image-classification"} <= set(data["tags"])
    results = data["model-index"][0]["results"]
    reported = {m["type"]: m["value"] for r in results for m in r["metrics"]}
    assert math.isclose(reported["accuracy"], eval_accuracy)
    import hf_rlion

    signature = inspect.signature(hf_rlion.RLion8bit.__init__).parameters
    hyper = data["optimizer"]["hyperparameters"]
    assert hyper["alpha"] == signature["alpha"].default and hyper["alpha_scaling"] == signature["alpha_scaling"].default
    assert "accelerate launch recipes/image_classification.py" in card.text and "--optim rlion_8bit" in card.text
    # The card's picture is uploaded beside it, and no folder of this machine is named.
    assert (pushed / "training_curves.png").is_file() and "![Training curves](training_curves.png)" in card.text
    assert str(tmp_path) not in card.content and "--output_dir out " in card.text  # relative to where it ran
    assert f"({model.num_parameters():,})" in card.text and f'from_pretrained("{repo_id}")' in card.text
    results_table = card.text.split("## Training results")[1].split("![Training curves]")[0]
    assert results_table.count("\n| ") == 3  # header + one row per epoch (the final evaluate() is epoch 2's)


@pytest.mark.slow
def test_unconnected_processes_are_refused(tmp_path):
    """The 2-rank config without ACCELERATE_USE_CPU=1 starts two separate trainings: the recipe refuses."""
    env = _env()
    env.pop("ACCELERATE_USE_CPU", None)
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2RANKS_CONFIG),
        "--main_process_port", str(_free_port()),
        str(RECIPE), "--output_dir", str(tmp_path / "out"), "--max_train_samples", "32", "--max_steps", "1",
    ]  # fmt: skip
    proc = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "2 processes were launched but training sees 1" in proc.stderr and "ACCELERATE_USE_CPU=1" in proc.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()
