"""The built-in demo: a small ViT trained on scikit-learn's digits, then the whole pipeline, with no download.

The digits are real handwritten data (UCI, 1,797 8x8 grayscale images) bundled with scikit-learn, so the demo
needs nothing but the installed packages. Training takes well under the three minutes the quick start allows
on a 2-core CPU.
"""

from __future__ import annotations

DEMO_RECIPE = {
    "model": {
        "image_size": 8, "in_chans": 1, "patch_size": 2, "embed_dim": 64, "depth": 4, "num_heads": 4,
        "mlp_dim": 128,
    },
    "preprocess": {"crop_size": 8, "mean": [0.5], "std": [0.5]},
    "data": {"path": "builtin:digits", "calib_size": 128},
    "train": {"epochs": 40, "batch_size": 64, "lr": 2e-3, "warmup_epochs": 2, "crop_padding": 1, "flip": False},
    "measure": {"iterations": 100, "max_seconds": 3.0},
}
