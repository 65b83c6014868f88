"""Shared fixtures: tiny synthetic data sets written to a temporary folder."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"


def write_pair(root: Path, split: str, stem: str, image: np.ndarray, mask: np.ndarray, image_ext: str = ".png"):
    (root / split / "images").mkdir(parents=True, exist_ok=True)
    (root / split / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / split / "images" / f"{stem}{image_ext}")
    Image.fromarray(mask).save(root / split / "masks" / f"{stem}.png")


def make_stripes_dataset(root: Path, n_train: int = 6, n_val: int = 2, size: int = 32, seed: int = 0) -> Path:
    """Bright vertical stripes (mask 255) on dark noise: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("val", n_val)):
        for i in range(count):
            mask = np.zeros((size, size), np.uint8)
            for x in rng.choice(size - 4, size=2, replace=False):
                mask[:, x : x + 3] = 255
            image = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
            image[mask > 0] = rng.integers(180, 255, (int((mask > 0).sum()), 3)).astype(np.uint8)
            write_pair(root, split, f"img{i:02d}", image, mask)
    return root


@pytest.fixture
def stripes(tmp_path) -> Path:
    return make_stripes_dataset(tmp_path / "stripes")
