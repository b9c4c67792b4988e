"""Shared fixtures: the tiny ViT (32x32 input, patch 8, dim 64, depth 2, 4 heads) and small real datasets."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from calibration.datasets import digits_source
from compress.model.vit import ViTConfig, VisionTransformer

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("VIT_COMPRESS_SHARED_DATA", REPO.parent / "shared" / "data"))

TINY = dict(image_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_dim=128, num_classes=10)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tiny_vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(ViTConfig(**TINY)).eval()


def write_digit_folder(root: Path, *, per_class: int = 20, classes: int = 10, size: int = 32, mode: str = "RGB",
                       suffix: str = ".png") -> Path:
    """An ImageFolder of real handwritten digits (scikit-learn's), upscaled to ``size``."""
    source = digits_source()
    for label in range(classes):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        for j, index in enumerate(np.flatnonzero(source.labels == label)[:per_class]):
            image = source.load(int(index)).resize((size, size), Image.Resampling.BILINEAR).convert(mode)
            image.save(folder / f"{j:03d}{suffix}")
    return root


@pytest.fixture
def digit_folder(tmp_path: Path) -> Path:
    return write_digit_folder(tmp_path / "digits")


@pytest.fixture(scope="session")
def cifar10_dir(tmp_path_factory) -> Path:
    """CIFAR-10 JPEGs from ../shared/data, unpacked once per session; skipped with the reason when absent."""
    archive = SHARED_DATA / "cifar10-jpeg.tar.gz"
    if not archive.exists():
        pytest.skip(f"CIFAR-10 is not available: {archive} is absent (set VIT_COMPRESS_SHARED_DATA to its folder)")
    root = tmp_path_factory.mktemp("cifar10")
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    return root


@pytest.fixture(scope="session")
def digits_model(tmp_path_factory):
    """A real trained model: the demo's ViT on scikit-learn's digits, 12 epochs (a few seconds), ~90% top-1."""
    from compress.config import load_config
    from compress.demo import DEMO_RECIPE
    from compress.train.job import train_job

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    config = load_config(None, ["train.epochs=12"], base=DEMO_RECIPE)
    ckpt, summary = train_job(config, tmp_path_factory.mktemp("digits-train"))
    assert summary["eval_top1"] is None or summary["eval_top1"] > 0.5
    return ckpt
