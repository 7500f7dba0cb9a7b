"""Image folders the image-classification tests train on: real handwritten digits written as PNG files.

``write_digit_folders(root, classes, per_class_train, per_class_val)`` writes scikit-learn's
8x8 digits, upscaled to 24x24 RGB, as ``root/train/<class>/<n>.png`` and
``root/validation/<class>/<n>.png`` (first images of each class for train, the next ones for
validation: deterministic, no overlap). ``write_corrupt_file(folder)`` adds a ``.png`` file that is
not an image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_digit_folders(
    root: Path, classes: tuple[int, ...] = (0, 1, 2, 3, 4), per_class_train: int = 40, per_class_val: int = 12, size: int = 24
) -> tuple[Path, Path]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    train_dir, val_dir = Path(root) / "train", Path(root) / "validation"
    for label in classes:
        indices = np.flatnonzero(digits.target == label)[: per_class_train + per_class_val]
        for n, index in enumerate(indices):
            split_dir = train_dir if n < per_class_train else val_dir
            folder = split_dir / f"digit_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (255 - np.round(digits.images[index] * (255 / 16))).astype(np.uint8)
            image = Image.fromarray(pixels, mode="L").resize((size, size), Image.BICUBIC).convert("RGB")
            image.save(folder / f"{n:04d}.png")
    return train_dir, val_dir


def write_corrupt_file(folder: Path, name: str = "broken.png") -> Path:
    path = Path(folder) / name
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"this is not an image" * 8)
    return path


def write_parquet_copy(root: Path, dataset_dict) -> Path:
    """``dataset_dict`` as ``root/data/<split>-00000-of-00001.parquet``, the layout of the Hub's parquet copies."""
    data = Path(root) / "data"
    data.mkdir(parents=True, exist_ok=True)
    for split, dataset in dataset_dict.items():
        dataset.to_parquet(str(data / f"{split}-00000-of-00001.parquet"))
    return Path(root)


def write_webdataset_copy(root: Path, dataset_dict) -> Path:
    """``dataset_dict`` (columns image, label) as webdataset shards ``root/<split>-0000.tar`` holding
    ``<key>.jpg``, ``<key>.cls`` (the class index as text) and ``<key>.json``: the layout of
    ``timm/imagenet-1k-wds``."""
    import io
    import json
    import tarfile

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for split, dataset in dataset_dict.items():
        with tarfile.open(root / f"{split}-0000.tar", "w") as tar:
            for i, row in enumerate(dataset):
                jpeg = io.BytesIO()
                row["image"].convert("RGB").save(jpeg, format="JPEG", quality=95)
                members = {
                    "jpg": jpeg.getvalue(),
                    "cls": str(row["label"]).encode(),
                    "json": json.dumps({"label": row["label"]}).encode(),
                }
                for extension, payload in members.items():
                    info = tarfile.TarInfo(f"{split}_{i:06d}.{extension}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return root
