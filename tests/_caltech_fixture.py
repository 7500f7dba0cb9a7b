"""A small dataset in Caltech101's official layout, written by the tests.

``101_ObjectCategories/<category>/image_NNNN.jpg`` (JPEG) and
``Annotations/<annotation folder>/annotation_NNNN.mat`` written with ``scipy.io.savemat``,
holding ``box_coord = [[y1, y2, x1, x2]]`` (1-based inclusive pixels, as Caltech's) and
``obj_contour`` (2 x N points relative to (x1, y1)). The renamed annotation folders
(airplanes -> Airplanes_Side_2, Faces -> Faces_2, ...) are used as Caltech uses them.

The images are learnable: a bright textured rectangle (the "object") on a dark noisy
background, the box being exactly the rectangle, at a random place and size, its colour
given by the category. A model that looks at the picture can do much better than the mean
box (and than the majority category).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

ANNOTATION_FOLDERS = {"Faces": "Faces_2", "Faces_easy": "Faces_3", "Motorbikes": "Motorbikes_16", "airplanes": "Airplanes_Side_2"}


@dataclass
class FixtureImage:
    image_path: Path
    annotation_path: Path
    box_coord: tuple[int, int, int, int]  # (y1, y2, x1, x2), 1-based inclusive
    size: tuple[int, int]  # (width, height)

    @property
    def normalised_box(self) -> list[float]:
        y1, y2, x1, x2 = self.box_coord
        w, h = self.size
        return [(x1 - 1) / w, (y1 - 1) / h, x2 / w, y2 / h]


def write_image(path: Path, box_coord, size, rng: np.random.Generator, color) -> None:
    w, h = size
    y1, y2, x1, x2 = box_coord
    pixels = rng.integers(0, 60, size=(h, w, 3)).astype(np.float64)
    texture = rng.integers(-25, 25, size=(y2 - y1 + 1, x2 - x1 + 1, 3))
    pixels[y1 - 1 : y2, x1 - 1 : x2] = np.clip(np.asarray(color) + texture, 0, 255)
    Image.fromarray(pixels.astype(np.uint8)).save(path, format="JPEG", quality=92)


def write_annotation(path: Path, box_coord) -> None:
    y1, y2, x1, x2 = box_coord
    contour = np.array([[0, x2 - x1, x2 - x1, 0], [0, 0, y2 - y1, y2 - y1]], dtype=np.float64)
    scipy.io.savemat(path, {"box_coord": np.array([[y1, y2, x1, x2]], dtype=np.uint16), "obj_contour": contour})


def write_caltech_fixture(
    root: Path, counts: dict[str, int] | None = None, seed: int = 0, zip_layout: bool = False
) -> dict[str, list[FixtureImage]]:
    """Write the fixture under ``root`` (under ``root/caltech-101`` with ``zip_layout``).

    ``counts``: images per category (default ``{"airplanes": 60, "Faces": 12, "ketch": 12}``).
    Returns the written images per category, in file-name order.
    """
    counts = counts or {"airplanes": 60, "Faces": 12, "ketch": 12}
    base = root / "caltech-101" if zip_layout else root
    rng = np.random.default_rng(seed)
    palette = [(240, 90, 90), (90, 240, 90), (90, 90, 240), (240, 240, 90), (90, 240, 240), (240, 90, 240)]
    colors = {name: palette[i % len(palette)] for i, name in enumerate(counts)}  # the category's cue
    written: dict[str, list[FixtureImage]] = {}
    for category, count in counts.items():
        image_dir = base / "101_ObjectCategories" / category
        annotation_dir = base / "Annotations" / ANNOTATION_FOLDERS.get(category, category)
        image_dir.mkdir(parents=True, exist_ok=True)
        annotation_dir.mkdir(parents=True, exist_ok=True)
        written[category] = []
        for number in range(1, count + 1):
            w, h = int(rng.integers(72, 100)), int(rng.integers(56, 80))
            bw, bh = int(rng.integers(w // 5, w // 2)), int(rng.integers(h // 5, h // 2))
            x1, y1 = int(rng.integers(1, w - bw + 1)), int(rng.integers(1, h - bh + 1))
            box_coord = (y1, y1 + bh - 1, x1, x1 + bw - 1)
            item = FixtureImage(image_dir / f"image_{number:04d}.jpg", annotation_dir / f"annotation_{number:04d}.mat", box_coord, (w, h))
            write_image(item.image_path, box_coord, (w, h), rng, colors[category])
            write_annotation(item.annotation_path, box_coord)
            written[category].append(item)
    (base / "101_ObjectCategories" / "BACKGROUND_Google").mkdir(exist_ok=True)
    return written
