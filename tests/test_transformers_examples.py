"""transformers' example scripts run offline through ``python -m hf_rlion.launch`` (docs/transformers_examples.md).

tests/scripts/example_image_classification.py has the example's user-facing shape (HfArgumentParser
with TrainingArguments, imagefolder data, ``evaluate.load("accuracy")``, ``from_pretrained``). Proven
here, with ``HF_HUB_OFFLINE=1`` and ``HF_EVALUATE_OFFLINE=1``, everything local (a model directory,
image folders, an ``accuracy/accuracy.py`` metric script in the working directory):

* through the launcher, ``--optim rlion`` is accepted, the optimizer Trainer builds is ``RLion``, and
  the run writes ``eval_results.json`` with the metric's ``eval_accuracy``;
* the same command without the launcher is refused by argparse (``invalid choice: 'rlion'``), so
  the launcher is what makes it work.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from _classification_data import write_digit_folders

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "scripts" / "example_image_classification.py"

# A minimal `evaluate` metric script: what `evaluate.load("accuracy")` finds in ./accuracy/ before the Hub.
ACCURACY_SCRIPT = '''
import datasets
import evaluate


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Fraction of predictions equal to the references.", citation="", inputs_description="",
            features=datasets.Features({"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}),
        )

    def _compute(self, predictions, references):
        return {"accuracy": sum(int(p == r) for p, r in zip(predictions, references)) / len(references)}
'''


def _local_model(folder: Path) -> Path:
    """A tiny ResNet and its image processor saved as a model directory (what from_pretrained reads)."""
    from transformers import ConvNextImageProcessor

    from hf_rlion.digits import digits_resnet

    digits_resnet(num_labels=10).save_pretrained(folder)
    ConvNextImageProcessor(size={"shortest_edge": 24}, crop_pct=1.0).save_pretrained(folder)
    return folder


def test_example_script_runs_offline_with_rlion_through_the_launcher(tmp_path):
    train_dir, val_dir = write_digit_folders(tmp_path / "data", classes=(0, 1, 2), per_class_train=12, per_class_val=4)
    model_dir = _local_model(tmp_path / "model")
    (tmp_path / "accuracy").mkdir()
    (tmp_path / "accuracy" / "accuracy.py").write_text(ACCURACY_SCRIPT)
    args = [
        "--model_name_or_path", str(model_dir), "--train_dir", str(train_dir), "--validation_dir", str(val_dir),
        "--output_dir", str(tmp_path / "out"), "--optim", "rlion", "--learning_rate", "1e-3", "--max_steps", "4",
        "--per_device_train_batch_size", "8", "--report_to", "none", "--remove_unused_columns", "false",
        "--save_strategy", "no", "--dataloader_num_workers", "0",
    ]  # fmt: skip
    env = {
        **os.environ, "HF_HUB_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }  # fmt: skip
    launched = subprocess.run(
        [sys.executable, "-m", "hf_rlion.launch", str(SCRIPT), *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert launched.returncode == 0, launched.stdout[-2000:] + launched.stderr[-4000:]
    assert "optimizer: RLion" in launched.stdout
    results = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert 0.0 <= results["eval_accuracy"] <= 1.0
    assert json.loads((tmp_path / "out" / "trainer_state.json").read_text())["global_step"] == 4

    plain = subprocess.run([sys.executable, str(SCRIPT), *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert plain.returncode != 0 and "invalid choice: 'rlion'" in plain.stderr
