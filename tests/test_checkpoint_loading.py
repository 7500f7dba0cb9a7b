"""Resume restores every model weight or fails: ``hf_rlion.checkpoints`` and its Trainer patch.

transformers>=5 saves ViT (and every model with a weight conversion mapping) with renamed keys;
Trainer 5.x loaded such a checkpoint with every weight "missing", logged it and trained on from
the initialisation. These tests train tiny models for a few steps on synthetic data and check
that a resume (and ``load_best_model_at_end``) now restores the weights bit for bit, that a
checkpoint with missing or unexpected keys stops the resume with an error naming them, and that
the Accelerate ``save_state``/``load_state`` path of the detection recipe never had the problem.

Runs against whichever transformers is installed (the ViT tests also on 4.x, where there is no
renaming and the patch must change nothing but the strictness).
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import hf_rlion  # noqa: F401  (patches Trainer when transformers.trainer loads)
from hf_rlion.checkpoints import CheckpointMismatchError, load_model_weights, saved_weight_conversions

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainingArguments, ViTConfig, ViTForImageClassification  # noqa: E402

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
NUM_LABELS = 3


def tiny_vit(seed: int) -> ViTForImageClassification:
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=32, patch_size=8, num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
        intermediate_size=64, num_labels=NUM_LABELS,
    )  # fmt: skip
    return ViTForImageClassification(config)


def synthetic_images(n: int = 48) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, NUM_LABELS, (n,), generator=g)
    # Each class brightens its own third of the image, so the loss actually moves.
    images = torch.randn(n, 3, 32, 32, generator=g)
    for i, label in enumerate(labels):
        images[i, :, int(label) * 10 : int(label) * 10 + 10] += 1.5
    return [{"pixel_values": images[i], "labels": labels[i]} for i in range(n)]


def training_args(output_dir, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(output_dir), optim="rlion", learning_rate=1e-3, per_device_train_batch_size=8,
        num_train_epochs=2, save_strategy="steps", save_steps=4, logging_steps=100, seed=3, report_to="none",
        dataloader_num_workers=0, use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    settings.update(overrides)
    return TrainingArguments(**settings)


def trainer(model, output_dir, **overrides) -> Trainer:
    return Trainer(model=model, args=training_args(output_dir, **overrides), train_dataset=synthetic_images())


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_vit_checkpoints_are_saved_with_renamed_keys_on_transformers_5(tmp_path):
    """The premise: on transformers>=5 the saved keys are not the model's (so a plain load_state_dict misses them all)."""
    model = tiny_vit(0)
    model.save_pretrained(tmp_path)
    saved = set(load_file(str(tmp_path / "model.safetensors")))
    assert (saved != set(model.state_dict())) == TRANSFORMERS_5
    assert bool(saved_weight_conversions(model)) == TRANSFORMERS_5


def test_load_model_weights_restores_a_saved_vit_exactly(tmp_path):
    written, fresh = tiny_vit(0), tiny_vit(1)
    written.save_pretrained(tmp_path)
    load_model_weights(fresh, tmp_path)
    assert_same_weights(fresh, written)


@pytest.mark.skipif(
    not TRANSFORMERS_5 and tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 6),
    reason="Trainer 4.x reloads rng_state.pth with torch.load's default weights_only, which torch>=2.6 refuses",
)
def test_trainer_resume_of_a_vit_is_bit_identical(tmp_path):
    straight = trainer(tiny_vit(0), tmp_path / "straight")
    straight.train()
    assert straight.state.global_step == 12
    # A different initialisation: only a real load of checkpoint-4 can give the straight run's weights.
    resumed = trainer(tiny_vit(1), tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-4"))
    assert resumed.state.global_step == 12
    assert_same_weights(resumed.model, straight.model)


@pytest.mark.parametrize("fault", ["missing", "unexpected"])
def test_trainer_resume_from_a_checkpoint_with_wrong_keys_fails(fault, tmp_path):
    trainer(tiny_vit(0), tmp_path, max_steps=2, save_steps=2).train()
    checkpoint = tmp_path / "checkpoint-2"
    weights = load_file(str(checkpoint / "model.safetensors"))
    if fault == "missing":
        key = sorted(k for k in weights if "classifier" not in k)[0]
        del weights[key]
    else:
        key = "vit.extra_head.weight"
        weights[key] = torch.zeros(2)
    save_file(weights, str(checkpoint / "model.safetensors"), metadata={"format": "pt"})
    resumed = trainer(tiny_vit(1), tmp_path / "resumed", max_steps=4, save_steps=2)
    with pytest.raises(CheckpointMismatchError) as err:
        resumed.train(resume_from_checkpoint=str(checkpoint))
    message = str(err.value)
    assert str(checkpoint) in message and key in message
    assert resumed.state.global_step == 0


def test_load_best_model_at_end_restores_the_best_vit_checkpoint(tmp_path):
    evaluations = []

    def first_is_best(_prediction):
        evaluations.append(1)
        return {"order": -float(len(evaluations))}  # greater is better: the first evaluation wins

    run = Trainer(
        model=tiny_vit(0),
        args=training_args(
            tmp_path, eval_strategy="steps", eval_steps=4, load_best_model_at_end=True,
            metric_for_best_model="order", greater_is_better=True, save_total_limit=None,
        ),  # fmt: skip
        train_dataset=synthetic_images(),
        eval_dataset=synthetic_images(16),
        compute_metrics=first_is_best,
    )
    run.train()
    assert run.state.best_model_checkpoint.endswith("checkpoint-4")
    best = tiny_vit(1)
    load_model_weights(best, run.state.best_model_checkpoint)
    assert_same_weights(run.model, best)
    last = tiny_vit(1)
    load_model_weights(last, tmp_path / "checkpoint-12")
    assert not torch.equal(last.classifier.weight, best.classifier.weight)


def test_load_model_weights_converts_fused_experts_and_skips_tied_weights(tmp_path):
    """A model whose mapping has converters (per-expert files <-> fused tensors) and tied embeddings."""
    if not TRANSFORMERS_5:
        pytest.skip("weight converters exist from transformers 5")
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=2, num_experts_per_tok=1, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    written = MixtralForCausalLM(config)
    written.save_pretrained(tmp_path)
    saved = set(load_file(str(tmp_path / "model.safetensors")))
    assert any(".experts.0." in k for k in saved) and "lm_head.weight" not in saved  # per-expert, tie dropped
    torch.manual_seed(1)
    fresh = MixtralForCausalLM(config)
    load_model_weights(fresh, tmp_path)
    assert_same_weights(fresh, written)
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight


@pytest.mark.skipif(not TRANSFORMERS_5, reason="hf_rlion.models (the detection recipe's model) needs transformers>=5")
def test_accelerate_save_state_keeps_the_model_keys_and_load_state_is_strict(tmp_path):
    """The detection recipe's path (Accelerator.save_state/load_state of ViTBoxRegressionModel) has no renaming."""
    from accelerate import Accelerator

    from hf_rlion import models

    def box_model(seed):
        torch.manual_seed(seed)
        config = models.ViTBoxRegressionConfig(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=64, head_hidden_sizes=[64],
        )  # fmt: skip
        return models.ViTBoxRegressionModel(config)

    writer = Accelerator(cpu=True)
    written = writer.prepare(box_model(0))
    writer.save_state(str(tmp_path / "state"))
    weights = load_file(str(tmp_path / "state" / "model.safetensors"))
    assert set(weights) == set(written.state_dict())
    assert bool(saved_weight_conversions(written))  # a ViT: save_pretrained would rename, save_state does not

    reader = Accelerator(cpu=True)
    fresh = reader.prepare(box_model(1))
    reader.load_state(str(tmp_path / "state"))
    assert_same_weights(fresh, written)

    del weights[sorted(weights)[0]]
    save_file(weights, str(tmp_path / "state" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="Missing key"):
        reader.load_state(str(tmp_path / "state"))
