"""The CIFAR-10 ViT kept in the repository: its checksum, its recipe, and its accuracy on the JPEG test split."""

import tomllib

import pytest
import torch

from calibration.datasets import Subset, make_splits, open_source
from calibration.evaluate import evaluate_top1
from compress.model.importers import load_checkpoint
from compress.io import sha256_file
from tests.conftest import REPO

MODEL_DIR = REPO / "models" / "cifar10-vit"


def test_checksum_and_size():
    expected = (MODEL_DIR / "SHA256SUMS").read_text().split()[0]
    assert sha256_file(MODEL_DIR / "model.safetensors") == expected
    assert (MODEL_DIR / "model.safetensors").stat().st_size < 10 * 2**20


def test_architecture_is_the_recipes():
    recipe = tomllib.loads((MODEL_DIR / "recipe.toml").read_text())
    config = load_checkpoint(MODEL_DIR / "model.safetensors").config.to_dict()
    for key, value in recipe["model"].items():
        assert config[key] in (value, [value] * config["depth"]), key


@pytest.mark.slow
def test_top1_on_the_cifar10_jpeg_test_split(cifar10_dir):
    ckpt = load_checkpoint(MODEL_DIR / "model.safetensors")
    source = open_source(cifar10_dir)
    data = Subset(source, make_splits(source).eval, ckpt.preprocess)
    assert len(data) == 10_000
    with torch.inference_mode():
        result = evaluate_top1(lambda x: ckpt.model(torch.from_numpy(x)).numpy(), data, batch_size=500)
    assert result.top1 >= 0.75


def test_the_reference_vit_s_recipe_is_a_linear_probe_of_the_checked_source():
    """models/dinov2-s14-cifar10 holds the recipe and the checksums only (the model is rebuilt in minutes by
    bench/reference_model.py; the DINOv2 weights are not ours to commit)."""
    from compress.config import load_config

    folder = REPO / "models" / "dinov2-s14-cifar10"
    assert not list(folder.glob("*.safetensors")) and not list(folder.glob("*.onnx"))
    config = load_config(folder / "recipe.toml")
    assert config.train.frozen_blocks == 12 and config.model == {"num_classes": 10, "pool": "cls_mean"}
    assert (config.preprocess.crop_size, config.preprocess.interpolation) == (224, "bicubic")
    sums = dict(line.split()[::-1] for line in (folder / "SHA256SUMS").read_text().splitlines())
    assert len(sums["vit_s_focus.onnx"]) == 64
