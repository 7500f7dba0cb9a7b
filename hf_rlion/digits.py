"""scikit-learn's handwritten digits as an image-classification dataset, and the tiny ResNet that learns them.

The default of ``recipes/image_classification.py`` and the ``recipe_digits`` task of
``benchmarks/compare_optimizers.py``: real images, no download, a few CPU minutes to ~99 % accuracy.

    from hf_rlion.digits import digits_dataset, digits_resnet
    splits = digits_dataset()          # DatasetDict: train 1437, validation 360 (image, label)
    model = digits_resnet(num_labels=10)
"""

from __future__ import annotations

#: Side of the rendered digit images in pixels.
DIGITS_IMAGE_SIZE = 32
#: ``ResNetConfig`` settings of the tiny ResNet (about 80k parameters; a same-sized ViT is ~10x slower on CPU).
DIGITS_RESNET_CONFIG = {"embedding_size": 16, "hidden_sizes": [16, 32, 64], "depths": [1, 1, 1], "layer_type": "basic"}


def digits_dataset(image_size: int = DIGITS_IMAGE_SIZE):
    """scikit-learn's handwritten digits as RGB images: a fixed stratified 80/20 train/validation split.

    1797 images of 8x8 pixels with 17 grey levels (UCI "Optical Recognition of Handwritten Digits"),
    upscaled bicubically to ``image_size`` and replicated to 3 channels; dark ink on white as in a scan.
    Split: ``train_test_split(test_size=0.2, stratify=labels, random_state=0)`` -> 1437 / 360.
    Returns a ``datasets.DatasetDict`` with columns ``image`` (PIL) and ``label`` (``ClassLabel`` "0".."9").
    """
    import datasets
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = (255 - np.round(digits.images * (255.0 / 16.0))).astype(np.uint8)
    images = [Image.fromarray(p, mode="L").resize((image_size, image_size), Image.BICUBIC).convert("RGB") for p in pixels]
    labels = digits.target.astype(np.int64)
    train_idx, eval_idx = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=0)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])})

    def subset(idx):
        return datasets.Dataset.from_dict({"image": [images[i] for i in idx], "label": [int(labels[i]) for i in idx]}, features=features)

    return datasets.DatasetDict({"train": subset(train_idx), "validation": subset(eval_idx)})


def digits_resnet(num_labels: int = 10):
    """The tiny ``ResNetForImageClassification`` (:data:`DIGITS_RESNET_CONFIG`), freshly initialised."""
    from transformers import ResNetConfig, ResNetForImageClassification

    return ResNetForImageClassification(ResNetConfig(**DIGITS_RESNET_CONFIG, num_labels=num_labels))
