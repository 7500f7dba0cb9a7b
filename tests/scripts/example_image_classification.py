#!/usr/bin/env python
"""A stand-in for transformers' examples/pytorch/image-classification/run_image_classification.py.

Written for tests/test_transformers_examples.py: the same user-facing shape as the example (three
dataclasses parsed by ``HfArgumentParser`` with ``TrainingArguments``, a single ``.json`` argument
read by ``parse_json_file``, ``--train_dir``/``--validation_dir`` image folders through ``imagefolder``,
``evaluate.load("accuracy")``, ``AutoModelForImageClassification``/``AutoImageProcessor.from_pretrained``,
torchvision transforms, ``Trainer``, ``train_results.json``/``eval_results.json``), so a run through
``python -m hf_rlion.launch`` exercises what running the example does. It does not import hf_rlion:
``--optim rlion`` is valid only because the launcher registered it.
"""

import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import evaluate
import numpy as np
import torch
from datasets import load_dataset
from torchvision.transforms import CenterCrop, Compose, Normalize, RandomResizedCrop, Resize, ToTensor
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification, HfArgumentParser, Trainer, TrainingArguments


@dataclass
class DataTrainingArguments:
    train_dir: Optional[str] = field(default=None, metadata={"help": "A folder containing the training data."})
    validation_dir: Optional[str] = field(default=None, metadata={"help": "A folder containing the validation data."})


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="google/vit-base-patch16-224-in21k", metadata={"help": "Model id or path."})
    image_processor_name: Optional[str] = field(default=None, metadata={"help": "Image processor id or path."})


def main():
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(json_file=os.path.abspath(sys.argv[1]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses()

    data_files = {"train": os.path.join(data_args.train_dir, "**"), "validation": os.path.join(data_args.validation_dir, "**")}
    dataset = load_dataset("imagefolder", data_files=data_files)
    labels = dataset["train"].features["label"].names
    metric = evaluate.load("accuracy")

    def compute_metrics(p):
        return metric.compute(predictions=np.argmax(p.predictions, axis=1), references=p.label_ids)

    config = AutoConfig.from_pretrained(
        model_args.model_name_or_path,
        num_labels=len(labels),
        label2id={label: str(i) for i, label in enumerate(labels)},
        id2label={str(i): label for i, label in enumerate(labels)},
        finetuning_task="image-classification",
    )
    model = AutoModelForImageClassification.from_pretrained(model_args.model_name_or_path, config=config, ignore_mismatched_sizes=True)
    image_processor = AutoImageProcessor.from_pretrained(model_args.image_processor_name or model_args.model_name_or_path)
    size = image_processor.size.get("shortest_edge") or (image_processor.size["height"], image_processor.size["width"])
    normalize = Normalize(mean=image_processor.image_mean, std=image_processor.image_std)
    train_tf = Compose([RandomResizedCrop(size), ToTensor(), normalize])
    val_tf = Compose([Resize(size), CenterCrop(size), ToTensor(), normalize])

    def transform(tf):
        def apply(batch):
            batch["pixel_values"] = [tf(image.convert("RGB")) for image in batch["image"]]
            return batch

        return apply

    dataset["train"].set_transform(transform(train_tf))
    dataset["validation"].set_transform(transform(val_tf))

    def collate_fn(examples):
        return {
            "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "labels": torch.tensor([e["label"] for e in examples]),
        }

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset["train"],
        eval_dataset=dataset["validation"],
        compute_metrics=compute_metrics,
        processing_class=image_processor,
        data_collator=collate_fn,
    )
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    trainer.save_state()
    metrics = trainer.evaluate()
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    print(f"optimizer: {type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, 'optimizer') else trainer.optimizer).__name__}")


if __name__ == "__main__":
    main()
