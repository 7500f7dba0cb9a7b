"""Model cards and pushes to a local stand-in Hub (tests/hub_server.py, fixture ``local_hub``).

What these tests prove:
* the card parses back with ``huggingface_hub.ModelCard``: model-index metrics, dataset, tags,
  the optimizer and its hyperparameters, the reproduce command; bad input is a ValueError
  naming the argument; tokens never reach the card;
* a small real ViT, trained a few RLion steps on scikit-learn's digits, pushed with its card
  through the real ``huggingface_hub`` client, loads back from the pushed files with
  ``from_pretrained`` (from the stored folder, and from the repo id through the server's
  download endpoints) and gives the same logits; checkpoints are not pushed;
* pushing without a token, with a wrong token, or to an unreachable Hub raises HubPushError with
  a retry command, leaves the local output intact, and the retry command then succeeds;
* the token appears in no pushed file and no captured output;
* the card gives the parameter count, the preprocessing (from a transformers image processor or
  a timm data config), a per-epoch results table from the log history, the training-curves
  picture (uploaded with the model, linked by a relative path), the license (given, or read from
  the base model's card), the RLion BibTeX entry and how to rerun the recipe from a clone of the
  repository; a pushed card holds no absolute path of the machine (tmp, data, cache, output dirs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard

from hf_rlion import RLion
from hf_rlion.hub import HubPushError, build_model_card, push_folder_to_hub, redact_secrets

REPO_ROOT = Path(__file__).resolve().parents[1]


# -- helpers --------------------------------------------------------------------------------
def digits_images(n: int, size: int = 32):
    """The first ``n`` scikit-learn digits as (n, 3, size, size) float images in [0, 1] and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images[:n], dtype=torch.float32) / 16.0
    images = torch.nn.functional.interpolate(images[:, None], size=(size, size), mode="nearest").repeat(1, 3, 1, 1)
    return images, torch.tensor(digits.target[:n])


def tiny_vit(num_labels: int = 10):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=num_labels,
        id2label={i: str(i) for i in range(num_labels)},
        label2id={str(i): i for i in range(num_labels)},
    )
    return ViTForImageClassification(config)


def card_kwargs(**overrides):
    kwargs = dict(
        model_name="vit-tiny-digits-rlion",
        task="image-classification",
        dataset_name="sklearn-digits",
        metrics={"eval_accuracy": 0.875, "eval_top5_accuracy": 0.99},
        optimizer="rlion",
        optimizer_hyperparameters={"lr": 1e-3, "betas": (0.9, 0.99), "alpha": 3.0, "alpha_scaling": "rms"},
        training_hyperparameters={"num_train_epochs": 3, "per_device_train_batch_size": 16, "seed": 0},
        reproduce_command="accelerate launch recipes/image_classification.py --optim rlion",
        tags=["vision"],
    )
    kwargs.update(overrides)
    return kwargs


def all_bytes_under(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


# -- the card -------------------------------------------------------------------------------
def test_model_card_parses_back_with_metrics_optimizer_and_tags():
    card = build_model_card(**card_kwargs(dataset_split="test", base_model="google/vit-base-patch16-224"))
    parsed = ModelCard(card.content)  # parse the text, not the object we built
    data = parsed.data

    results = {r.metric_type: r for r in data.eval_results}
    assert set(results) == {"accuracy", "top5_accuracy"}
    assert results["accuracy"].metric_value == 0.875
    assert results["accuracy"].task_type == "image-classification"
    assert results["accuracy"].dataset_name == "sklearn-digits"
    assert results["accuracy"].dataset_split == "test"
    assert data.model_name == "vit-tiny-digits-rlion"
    assert data.datasets == ["sklearn-digits"]
    assert data.base_model == "google/vit-base-patch16-224"
    assert data.pipeline_tag == "image-classification"
    assert {"hf-rlion", "rlion", "vision", "image-classification"} <= set(data.tags)
    assert data.optimizer == {
        "name": "rlion",
        "hyperparameters": {"lr": 1e-3, "betas": [0.9, 0.99], "alpha": 3.0, "alpha_scaling": "rms"},
    }
    assert data.training_hyperparameters["num_train_epochs"] == 3
    assert "accelerate launch recipes/image_classification.py --optim rlion" in parsed.text
    assert "AutoModelForImageClassification" in parsed.text
    assert "| Accuracy | 0.8750 |" in parsed.text
    assert "**rlion** optimizer from hf-rlion: RLion" in parsed.text
    baseline = build_model_card(**card_kwargs(optimizer="adamw")).text
    assert "**adamw** optimizer, as a baseline run" in baseline and "optimizer from hf-rlion" not in baseline


@pytest.mark.parametrize(
    "overrides, argument",
    [
        ({"metrics": {"eval_accuracy": float("nan")}}, "metrics['eval_accuracy']"),
        ({"metrics": {"accuracy": "high"}}, "metrics['accuracy']"),
        ({"task": ""}, "task"),
        ({"optimizer": None}, "optimizer"),
        ({"optimizer_hyperparameters": [1e-3]}, "optimizer_hyperparameters"),
    ],
)
def test_model_card_rejects_bad_input_naming_the_argument(overrides, argument):
    with pytest.raises(ValueError, match=r"^" + __import__("re").escape(argument)):
        build_model_card(**card_kwargs(**overrides))


def test_model_card_never_contains_a_token():
    token = "hf_" + "Ab3" * 12
    card = build_model_card(
        **card_kwargs(
            reproduce_command=f"python recipes/image_classification.py --hub_token {token} --push_to_hub",
            training_hyperparameters={"hub_token": token, "note": f"pushed with {token}", "seed": 1},
        )
    )
    assert token not in card.content
    assert "--hub_token <redacted> --push_to_hub" in card.content
    assert "hub_token" not in ModelCard(card.content).data.training_hyperparameters
    assert redact_secrets(f"--token={token}") == "--token=<redacted>"
    assert redact_secrets("--hub-token secret --tokenizer_name gpt2 --max_tokens 8") == (
        "--hub-token <redacted> --tokenizer_name gpt2 --max_tokens 8"
    )
    kept = build_model_card(**card_kwargs(training_hyperparameters={"tokenizer_name": "gpt2", "access_token": "x"}))
    assert ModelCard(kept.content).data.training_hyperparameters == {"tokenizer_name": "gpt2"}


TRAINER_LOG_HISTORY = [  # the shape of Trainer.state.log_history with eval_strategy="epoch"
    {"loss": 2.31, "grad_norm": 1.0, "learning_rate": 1e-3, "epoch": 0.5, "step": 4},
    {"eval_loss": 1.9, "eval_accuracy": 0.4, "eval_top5_accuracy": 0.9, "eval_runtime": 0.5,
     "eval_samples_per_second": 128.0, "eval_steps_per_second": 8.0, "epoch": 1.0, "step": 8},
    {"loss": 1.25, "grad_norm": 1.0, "learning_rate": 5e-4, "epoch": 1.5, "step": 12},
    {"eval_loss": 1.1, "eval_accuracy": 0.75, "eval_top5_accuracy": 1.0, "eval_runtime": 0.5,
     "eval_samples_per_second": 128.0, "eval_steps_per_second": 8.0, "epoch": 2.0, "step": 16},
    {"train_runtime": 9.0, "train_samples_per_second": 1.0, "train_loss": 1.7, "epoch": 2.0, "step": 16},
    {"eval_loss": 1.1, "eval_accuracy": 0.75, "eval_top5_accuracy": 1.0, "epoch": 2.0, "step": 16},  # trainer.evaluate()
]  # fmt: skip


def test_model_card_details_results_license_citation_and_reproduce_section():
    from transformers import ViTImageProcessor

    from hf_rlion.hub import image_preprocessing

    processor = ViTImageProcessor(size={"height": 32, "width": 32}, resample=3)  # 3: PIL's BICUBIC
    num_parameters = tiny_vit().num_parameters()
    card = build_model_card(
        **card_kwargs(
            license="mit",
            num_parameters=num_parameters,
            preprocessing=image_preprocessing(processor),
            log_history=TRAINER_LOG_HISTORY,
            training_curves="training_curves.png",
        )
    )
    parsed = ModelCard(card.content)
    text = parsed.text
    assert parsed.data.license == "mit" and "This model is released under the `mit` license." in text
    assert f"- **Parameters:** {num_parameters / 1e6:.2f} M ({num_parameters:,})" in text
    assert "- **Image size:** 32 x 32" in text and "- **Interpolation:** bicubic" in text
    assert "- **Normalisation:** mean [0.5, 0.5, 0.5], std [0.5, 0.5, 0.5]" in text
    # One row per evaluation, training loss = the last logged before it; timings left out.
    assert "| Epoch | Step | Training loss | Validation loss | Accuracy | Top-5 accuracy |" in text
    assert "| 1 | 8 | 2.3100 | 1.9000 | 0.4000 | 0.9000 |" in text
    assert text.count("| 2 | 16 | 1.2500 | 1.1000 | 0.7500 | 1.0000 |") == 1  # the final evaluate() is not a new row
    assert "runtime" not in text.lower() and "per_second" not in text
    assert "![Training curves](training_curves.png)" in text
    assert "```bibtex\n@article{rong2025rlion," in text
    assert "author  = {Rong, Jian and Ma, Chenhao and Zhang, Qinghui and Cao, Yong and Kou, Weili}" in text
    assert "journal = {Scientific Reports}" in text and "volume  = {15}" in text and "year    = {2025}" in text
    assert "doi     = {10.1038/s41598-025-07112-4}" in text
    # The recipe lives in the repository, not in the wheel: clone, install, run the same command.
    reproduce = text.split("## How to reproduce")[1].split("\n## ")[0]
    assert "`recipes/image_classification.py`" in reproduce and "clone the repository" in reproduce
    assert 'pip install -e ".[recipes]"\naccelerate launch recipes/image_classification.py --optim rlion' in reproduce
    assert "pip install hf-rlion[recipes]" not in text

    timm = pytest.importorskip("timm")
    from timm.data import resolve_data_config

    data_config = resolve_data_config({}, model=timm.create_model("test_vit", pretrained=False))
    assert image_preprocessing(data_config) == {
        "image_size": [160, 160], "crop_pct": 0.95, "crop_mode": "center", "interpolation": "bicubic",
        "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
    }  # fmt: skip
    timm_card = build_model_card(**card_kwargs(preprocessing=image_preprocessing(data_config))).text
    assert "- **Image size:** 160 x 160" in timm_card and "- **Crop:** center, crop_pct 0.95" in timm_card
    unlicensed = build_model_card(**card_kwargs())
    assert ModelCard(unlicensed.content).data.license is None and "No license was given" in unlicensed.text
    with pytest.raises(ValueError, match="^training_curves"):
        build_model_card(**card_kwargs(training_curves="/tmp/curves.png"))


def test_strip_local_paths_keeps_urls_hub_ids_and_relative_paths(tmp_path):
    from hf_rlion.hub import strip_local_paths

    repo = tmp_path / "hf-rlion"
    text = (
        f"python recipes/x.py --output_dir {repo}/outputs/run1 --data_dir=/data/caltech-101 "
        f"--cache_dir /root/.cache/hf_rlion. See https://huggingface.co/org/name, org/name, runs/a, C:\\Users\\me\\data"
    )
    assert strip_local_paths(text, cwd=repo) == (
        "python recipes/x.py --output_dir outputs/run1 --data_dir=path/to/caltech-101 "
        "--cache_dir path/to/hf_rlion. See https://huggingface.co/org/name, org/name, runs/a, path/to/data"
    )
    assert strip_local_paths(f"{tmp_path}/a", cwd="/") == "path/to/a"  # never relative to / or ~


# -- pushing --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_vit_folder(tmp_path_factory):
    """A tiny ViT trained 5 RLion steps on digits, saved like a recipe's output folder (card included)."""
    images, labels = digits_images(64)
    model = tiny_vit()
    optimizer = RLion(model.parameters(), lr=1e-3)
    for step in range(5):
        batch = slice(16 * (step % 4), 16 * (step % 4 + 1))
        loss = model(pixel_values=images[batch], labels=labels[batch]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    folder = tmp_path_factory.mktemp("output")
    model.save_pretrained(folder)
    (folder / "eval_results.json").write_text(json.dumps({"eval_accuracy": 0.5}))
    build_model_card(**card_kwargs()).save(folder / "README.md")
    (folder / "checkpoint-5").mkdir()
    (folder / "checkpoint-5" / "optimizer.pt").write_bytes(b"not for the hub")
    with torch.no_grad():
        logits = model(pixel_values=images[:8]).logits
    return folder, images[:8], logits


def test_push_round_trip_loads_the_same_model(local_hub, trained_vit_folder):
    from transformers import ViTForImageClassification

    folder, images, logits = trained_vit_folder
    repo_id = f"{local_hub.user}/vit-tiny-digits-rlion"
    card = build_model_card(**card_kwargs(repo_id=repo_id))
    url = push_folder_to_hub(folder, repo_id, card=card, token=local_hub.token, endpoint=local_hub.endpoint)

    assert url == f"{local_hub.endpoint}/{repo_id}"
    pushed = local_hub.repo_dir(repo_id)
    names = sorted(p.relative_to(pushed).as_posix() for p in pushed.rglob("*") if p.is_file())
    assert names == ["README.md", "config.json", "eval_results.json", "model.safetensors"]
    assert (folder / "README.md").read_text() == (pushed / "README.md").read_text()  # card saved locally first
    assert local_hub.commits(repo_id)[-1]["summary"] == "Upload model trained with RLion (hf-rlion)"

    reloaded = ViTForImageClassification.from_pretrained(pushed).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=images).logits, logits)
    data = ModelCard.load(pushed / "README.md").data
    assert data.eval_results[0].metric_value == 0.875 and data.optimizer["name"] == "rlion"
    assert local_hub.token.encode() not in all_bytes_under(pushed)

    # The Hub answers like the real one: repo info lists the files, and a second push of the
    # same folder changes nothing (the client skips files whose git oid is unchanged).
    info = HfApi(endpoint=local_hub.endpoint).model_info(repo_id, token=local_hub.token)
    assert sorted(s.rfilename for s in info.siblings) == names
    push_folder_to_hub(folder, repo_id, token=local_hub.token, endpoint=local_hub.endpoint)
    assert len(local_hub.commits(repo_id)) == 1


def test_pushed_card_shows_the_uploaded_curves_and_holds_no_local_path(local_hub, trained_vit_folder, tmp_path, monkeypatch):
    """A run with every folder absolute (output, data, cache, base checkpoint): the pushed README.md
    names none of them, the curves picture is uploaded next to it and shown by a relative link."""
    from PIL import Image

    from hf_rlion.hub import _ABSOLUTE_PATH

    trained = trained_vit_folder[0]
    repo_root = tmp_path / "hf-rlion"  # where the recipe was run from
    output_dir = repo_root / "outputs" / "vit-digits"
    output_dir.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (output_dir / name).write_bytes((trained / name).read_bytes())
    Image.new("RGB", (8, 8), "white").save(output_dir / "training_curves.png")
    base_checkpoint, data_dir, cache_dir = tmp_path / "base-vit", tmp_path / "data" / "digits", tmp_path / ".cache" / "hf"
    base_checkpoint.mkdir()
    monkeypatch.chdir(repo_root)
    card = build_model_card(
        **card_kwargs(
            dataset_name=str(data_dir),
            base_model=str(base_checkpoint),
            reproduce_command=(
                f"accelerate launch recipes/image_classification.py --train_dir {data_dir} --output_dir {output_dir} "
                f"--cache_dir={cache_dir} --model_name_or_path {base_checkpoint}"
            ),
            training_hyperparameters={"seed": 0, "logging_dir": str(output_dir / "runs")},
            optimizer_hyperparameters={"lr": 1e-3, "note": f"state in {cache_dir}."},
            log_history=TRAINER_LOG_HISTORY,
            training_curves="training_curves.png",
            license="apache-2.0",
        )
    )
    repo_id = f"{local_hub.user}/vit-paths"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the card's picture is in the folder: no warning
        push_folder_to_hub(output_dir, repo_id, card=card, token=local_hub.token, endpoint=local_hub.endpoint)

    pushed = local_hub.repo_dir(repo_id)
    readme = (pushed / "README.md").read_text()
    assert (pushed / "training_curves.png").read_bytes() == (output_dir / "training_curves.png").read_bytes()
    assert "![Training curves](training_curves.png)" in readme
    assert str(tmp_path) not in readme and tempfile.gettempdir() + os.sep not in readme
    assert not _ABSOLUTE_PATH.search(readme), _ABSOLUTE_PATH.search(readme)
    assert "--output_dir outputs/vit-digits" in readme  # under the working directory: relative to it
    assert "--train_dir path/to/digits" in readme and "--cache_dir=path/to/hf" in readme
    data = ModelCard(readme).data
    assert data.datasets == ["digits"] and data.base_model is None and "local checkpoint (`base-vit`)" in readme
    assert data.license == "apache-2.0" and data.training_hyperparameters["logging_dir"] == "outputs/vit-digits/runs"


def test_push_warns_when_the_cards_picture_is_not_uploaded(local_hub, tmp_path):
    folder = tmp_path / "no-picture"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    card = build_model_card(**card_kwargs(training_curves="training_curves.png"))
    with pytest.warns(UserWarning, match="shows training_curves.png, which .* does not hold"):
        push_folder_to_hub(folder, "no-picture", card=card, token=local_hub.token, endpoint=local_hub.endpoint)


def test_license_is_read_from_the_base_models_card(local_hub, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from hf_rlion.hub import base_model_license

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    build_model_card(**card_kwargs(license="cc-by-nc-4.0")).save(base / "README.md")
    push_folder_to_hub(base, "base-vit", token=local_hub.token, endpoint=local_hub.endpoint)

    repo_id = f"{local_hub.user}/base-vit"
    assert base_model_license(repo_id, token=local_hub.token, endpoint=local_hub.endpoint) == "cc-by-nc-4.0"
    assert base_model_license(str(base)) == "cc-by-nc-4.0"  # a local checkpoint folder
    assert base_model_license(str(tmp_path)) is None  # a folder without a card
    with pytest.warns(UserWarning, match="could not read the license of"):
        assert base_model_license(f"{local_hub.user}/missing", token=local_hub.token, endpoint=local_hub.endpoint) is None
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert base_model_license("google/vit-base-patch16-224") is None  # offline: nothing is tried
    assert base_model_license(None) is None


def test_push_without_token_fails_clearly_and_keeps_the_output(local_hub, trained_vit_folder, monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    folder = trained_vit_folder[0]
    (folder / "README.md").unlink()
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    with pytest.raises(HubPushError, match="no Hugging Face token") as excinfo:
        push_folder_to_hub(folder, "someone/model", card=build_model_card(**card_kwargs()), endpoint=local_hub.endpoint)
    assert f"python -m hf_rlion.hub push {folder} someone/model" in str(excinfo.value)
    assert local_hub.requests == []  # nothing was sent
    assert (folder / "README.md").is_file()  # the card is written locally even though the push failed
    assert {p: p.read_bytes() for p in before} == before


def test_push_with_a_wrong_token_fails_clearly_without_echoing_it(local_hub, trained_vit_folder):
    wrong = "hf_" + "Z" * 34
    with pytest.raises(HubPushError, match="token was rejected") as excinfo:
        push_folder_to_hub(trained_vit_folder[0], "model", token=wrong, endpoint=local_hub.endpoint)
    assert wrong not in str(excinfo.value) and "python -m hf_rlion.hub push" in str(excinfo.value)
    assert local_hub.repo_ids() == []


def test_push_to_a_namespace_the_token_cannot_write_fails_clearly(local_hub, trained_vit_folder):
    with pytest.raises(HubPushError, match="403") as excinfo:
        push_folder_to_hub(trained_vit_folder[0], "other-org/model", token=local_hub.token, endpoint=local_hub.endpoint)
    assert local_hub.token not in str(excinfo.value)


def test_push_argument_errors(local_hub, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        push_folder_to_hub(tmp_path / "missing", "model", token=local_hub.token, endpoint=local_hub.endpoint)
    with pytest.raises(ValueError, match="^repo_id"):
        push_folder_to_hub(tmp_path, "a/b/c", token=local_hub.token, endpoint=local_hub.endpoint)


def test_retry_command_reports_errors_without_a_traceback(tmp_path, capsys):
    from hf_rlion.hub import main

    assert main(["push", str(tmp_path / "missing"), "me/model"]) == 1
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: a missing REPO_ID is a usage error
        main(["push", str(tmp_path)])


def _subprocess_env(local_hub, tmp_path) -> dict:
    env = {**os.environ, **local_hub.env, "HF_HOME": str(tmp_path / "hf_home"), "PYTHONPATH": str(REPO_ROOT)}
    env.pop("HF_HUB_CACHE", None)
    return env


def test_unreachable_hub_then_retry_command_pushes(local_hub, trained_vit_folder, tmp_path):
    """A push to a Hub that is down fails with a retry command; running that command later works."""
    from hub_server import LocalHub

    with LocalHub(tmp_path / "down", local_hub.token) as down:
        dead_endpoint = down.endpoint
    folder = trained_vit_folder[0]
    card = build_model_card(**card_kwargs())
    with pytest.raises(HubPushError) as excinfo:
        push_folder_to_hub(folder, "vit-retry", card=card, token=local_hub.token, endpoint=dead_endpoint)
    message = str(excinfo.value)
    assert "local output is intact" in message and local_hub.token not in message
    retry = message.split("Retry the push with:\n")[1].splitlines()[0].strip()
    assert retry == f"python -m hf_rlion.hub push {folder} vit-retry"

    result = subprocess.run(
        [sys.executable, *retry.split()[1:]],
        env=_subprocess_env(local_hub, tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert f"{local_hub.endpoint}/{local_hub.user}/vit-retry" in result.stdout
    assert local_hub.token not in result.stdout + result.stderr
    pushed = local_hub.repo_dir("vit-retry")
    assert (pushed / "README.md").read_text() == card.content + "\n" or (pushed / "README.md").read_text() == (
        folder / "README.md"
    ).read_text()
    assert not (pushed / "checkpoint-5").exists()


def test_from_pretrained_downloads_by_repo_id_through_the_stand_in_hub(local_hub, trained_vit_folder, tmp_path):
    """``from_pretrained("user/name")`` with HF_ENDPOINT at the server: the download side of the round trip."""
    folder, images, logits = trained_vit_folder
    repo_id = f"{local_hub.user}/vit-download"
    push_folder_to_hub(folder, repo_id, token=local_hub.token, endpoint=local_hub.endpoint, private=True)
    torch.save(images, tmp_path / "images.pt")
    script = textwrap.dedent(
        f"""
        import torch
        from transformers import ViTForImageClassification
        model = ViTForImageClassification.from_pretrained({repo_id!r}).eval()
        with torch.no_grad():
            torch.save(model(pixel_values=torch.load({str(tmp_path / "images.pt")!r})).logits, {str(tmp_path / "logits.pt")!r})
        """
    )
    env = _subprocess_env(local_hub, tmp_path)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "logits.pt"), logits)
    downloads = [path for method, path in local_hub.requests if method == "GET" and "/resolve/" in path]
    assert downloads and all(path.startswith(f"/{repo_id}/resolve/") for path in downloads)
    assert any(path.endswith("/model.safetensors") for path in downloads)
    assert local_hub.token not in result.stdout + result.stderr


def test_files_holding_the_token_are_not_pushed(local_hub, tmp_path):
    """transformers pickles TrainingArguments, --hub_token included, into training_args.bin."""
    from transformers import TrainingArguments

    folder = tmp_path / "output"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    args = TrainingArguments(str(folder), hub_token=local_hub.token, report_to=[])
    torch.save(args, folder / "training_args.bin")
    assert local_hub.token.encode() in (folder / "training_args.bin").read_bytes()  # the hazard is real

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        push_folder_to_hub(folder, "model", token=local_hub.token, endpoint=local_hub.endpoint)
    messages = [str(w.message) for w in record]
    assert any(m.startswith("Not pushing training_args.bin") for m in messages), messages
    assert any("has no README.md" in m for m in messages)  # no card given, none in the folder
    assert all(local_hub.token not in m for m in messages)
    pushed = local_hub.repo_dir("model")
    assert sorted(p.name for p in pushed.iterdir()) == ["config.json"]
    assert (folder / "training_args.bin").is_file()  # left alone locally


def test_hyperparameters_for_the_card_come_from_the_optimizer_and_training_arguments(tmp_path):
    from transformers import TrainingArguments

    from hf_rlion.hub import optimizer_hyperparameters, training_hyperparameters

    import inspect

    from hf_rlion import create_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    optimizer = create_optimizer(model, "rlion", lr=3e-4, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.1, total_iters=2)
    optimizer.step(), scheduler.step(), optimizer.step(), scheduler.step()
    assert optimizer.param_groups[0]["lr"] < 3e-4  # decayed; the card must report the initial value
    hparams = optimizer_hyperparameters(optimizer)
    signature = inspect.signature(RLion).parameters
    expected = {
        name: list(p.default) if isinstance(p.default, tuple) else p.default
        for name, p in signature.items()
        if name not in ("params", "foreach", "fused") and p.default is not None
    }
    expected.update(lr=3e-4, weight_decay=[0.1, 0.0])  # decayed weights, then biases and norms (Trainer's grouping)
    assert hparams == expected
    args = TrainingArguments(
        str(tmp_path),
        learning_rate=3e-4,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=4,
        optim="rlion",
        hub_token="hf_" + "x" * 30,
        report_to=[],
    )
    training = training_hyperparameters(args, world_size=2)
    assert training["total_train_batch_size"] == 64
    assert type(training["optim"]) is str and training["optim"] == "rlion"  # plain str, not an enum: YAML-safe
    assert training["lr_scheduler_type"] == "linear" and not any("token" in key for key in training)
    with pytest.raises(ValueError, match="^optimizer must be"):
        optimizer_hyperparameters(object())


TRAINER_RECIPE_FLOW = '''
import sys
from pathlib import Path

import torch
from datasets import Dataset
from transformers import HfArgumentParser, Trainer, TrainingArguments

import hf_rlion  # registers --optim rlion
from hf_rlion.hub import build_model_card, optimizer_hyperparameters, push_folder_to_hub, training_hyperparameters
from test_hub import digits_images, tiny_vit

(training_args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses()
push_to_hub = training_args.push_to_hub
training_args.push_to_hub = False  # docs/hub.md: the Trainer must not push by itself
images, labels = digits_images(64)
dataset = Dataset.from_dict({"pixel_values": images.numpy(), "labels": labels.numpy()}).with_format("torch")
trainer = Trainer(model=tiny_vit(), args=training_args, train_dataset=dataset, eval_dataset=dataset,
                  compute_metrics=lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())})
trainer.train()
metrics = trainer.evaluate()
trainer.save_model()
if push_to_hub and trainer.is_world_process_zero():
    card = build_model_card(
        model_name=training_args.hub_model_id, task="image-classification", dataset_name="sklearn-digits",
        metrics={"eval_accuracy": metrics["eval_accuracy"]}, optimizer=training_args.optim,
        optimizer_hyperparameters=optimizer_hyperparameters(trainer.optimizer),
        training_hyperparameters=training_hyperparameters(training_args),
        reproduce_command="python " + " ".join(sys.argv),
    )
    url = push_folder_to_hub(training_args.output_dir, training_args.hub_model_id, card=card,
                             token=training_args.hub_token, private=training_args.hub_private_repo)
    print("Pushed to", url)
'''


def test_trainer_recipe_flow_pushes_its_card_and_nothing_else(local_hub, tmp_path):
    """The integration docs/hub.md gives the Trainer recipe, run as a subprocess with --hub_token on
    the command line (the worst case): one commit, our card, no checkpoint, no token anywhere."""
    from transformers import ViTForImageClassification

    script = tmp_path / "recipe_flow.py"
    script.write_text(TRAINER_RECIPE_FLOW)
    output_dir = tmp_path / "out"
    command = [
        sys.executable, str(script), "--output_dir", str(output_dir), "--optim", "rlion", "--learning_rate", "1e-3",
        "--num_train_epochs", "1", "--per_device_train_batch_size", "16", "--save_strategy", "epoch",
        "--report_to", "none", "--use_cpu", "--disable_tqdm", "true",
        "--push_to_hub", "--hub_model_id", "vit-trainer-rlion", "--hub_token", local_hub.token,
    ]  # fmt: skip
    env = {**_subprocess_env(local_hub, tmp_path), "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{REPO_ROOT / 'tests'}"}
    env.pop("HF_TOKEN")  # the token only on the command line
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert local_hub.token not in result.stdout + result.stderr
    assert "Not pushing training_args.bin" in result.stderr  # it holds the token: left out, with a warning

    repo_id = f"{local_hub.user}/vit-trainer-rlion"
    assert result.stdout.strip().endswith(f"Pushed to {local_hub.endpoint}/{repo_id}")
    assert [c["summary"] for c in local_hub.commits(repo_id)] == ["Upload model trained with RLion (hf-rlion)"]
    pushed = local_hub.repo_dir(repo_id)
    names = sorted(p.relative_to(pushed).as_posix() for p in pushed.rglob("*") if p.is_file())
    assert names == ["README.md", "config.json", "model.safetensors"]  # no checkpoint-4/, no training_args.bin
    assert (output_dir / "checkpoint-4").is_dir() and (output_dir / "training_args.bin").is_file()
    assert local_hub.token.encode() not in all_bytes_under(pushed)

    card = ModelCard.load(pushed / "README.md")
    assert card.data.optimizer["name"] == "rlion" and card.data.optimizer["hyperparameters"]["lr"] == 1e-3
    assert card.data.training_hyperparameters["optim"] == "rlion"
    accuracy = card.data.eval_results[0].metric_value
    saved = ViTForImageClassification.from_pretrained(output_dir)
    reloaded = ViTForImageClassification.from_pretrained(pushed)
    for a, b in zip(saved.state_dict().values(), reloaded.state_dict().values()):
        assert torch.equal(a, b)
    assert 0.0 <= accuracy <= 1.0


# -- the stand-in Hub itself ----------------------------------------------------------------
def _request(local_hub, method, path, body: bytes | None = None, token: str | None = None, headers=None):
    import urllib.error
    import urllib.request

    request = urllib.request.Request(local_hub.endpoint + path, data=body, method=method, headers=headers or {})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_stand_in_hub_refuses_paths_outside_the_repository_and_oversized_bodies(local_hub):
    HfApi(endpoint=local_hub.endpoint, token=local_hub.token).create_repo("safe")
    repo_root = local_hub.repo_dir("safe")
    for path in ("../escape.txt", "/etc/escape.txt", ".git/config", "a/../../escape.txt"):
        lines = [
            {"key": "header", "value": {"summary": "try to escape"}},
            {"key": "file", "value": {"path": path, "content": "eA==", "encoding": "base64"}},
        ]
        body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
        status, answer = _request(local_hub, "POST", f"/api/models/{local_hub.user}/safe/commit/main", body, local_hub.token)
        assert status == 400 and b"Invalid path" in answer, (path, status, answer)
    assert not any(repo_root.parent.parent.rglob("escape.txt")) and local_hub.commits("safe") == []

    status, _ = _request(local_hub, "POST", "/api/repos/create", b"{}", token=None)
    assert status == 401
    status, _ = _request(
        local_hub, "POST", "/api/repos/create", token=local_hub.token, headers={"Content-Length": str(1 << 40)}
    )
    assert status == 413
    status, _ = _request(local_hub, "GET", "/api/datasets/x/y", token=local_hub.token)
    assert status == 404
